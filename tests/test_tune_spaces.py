"""Search space files: the shipped ones load, and every kind of mistake names the file and key."""

import pytest

from erase.config import FILE_KEYS as SETTINGS
from erase.spaces import SpaceError, available, load_space


@pytest.mark.parametrize("name", ["default", "flux_nudity", "toy_fast", "toy_adaptive"])
def test_shipped_spaces_load_into_optuna_distributions(name):
    from optuna.distributions import FloatDistribution

    space = load_space(name, SETTINGS)
    dists = space.optuna_distributions()
    assert "beta" in dists and isinstance(dists["beta"], FloatDistribution) and dists["beta"].log
    assert name in available()


@pytest.mark.parametrize("text, message", [
    ("search: {beta: {distribution: loguniform, low: 0.1, high: 0.01}}", "key 'beta': low 0.1 is greater than high 0.01"),
    ("search: {beta: {distribution: uniform, low: 0.5, high: 0.5}}", "key 'beta': the range [0.5, 0.5] is empty"),
    ("search: {beta: {distribution: loguniform, low: 0, high: 1}}", "loguniform needs low > 0"),
    ("search: {betta: {distribution: uniform, low: 0, high: 1}}", "key 'betta' is not an erasure setting"),
    ("search: {beta: {distribution: normal, low: 0, high: 1}}", "unknown distribution 'normal'"),
    ("search: {target: {distribution: categorical, choices: []}}", "non-empty list `choices`"),
    ("search: {beta: {distribution: uniform, low: 0, high: 1, q: 2}}", "unknown field(s) q"),
    ("fixed: {beta: 0.1}\nsearch: {beta: {distribution: uniform, low: 0, high: 1}}", "both fixed and searched"),
    ("serch: {}", "unknown top-level key(s) serch"),
    ("fixed: {steps: 3}", "`search` is empty"),
    ("search: [1, 2", "not valid YAML"),
])
def test_bad_space_files_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as err:
        load_space(str(path), SETTINGS)
    assert str(path) in str(err.value) and message in str(err.value)


def test_unknown_space_name_lists_the_shipped_ones():
    with pytest.raises(SpaceError, match="shipped: concept_graph, default, flux_nudity, toy_adaptive, toy_fast"):
        load_space("nope", SETTINGS)


def test_the_adaptive_space_searches_ages_settings_into_a_valid_config():
    import optuna

    from erase.config import resolve

    space = load_space("toy_adaptive", SETTINGS)
    dists = space.optuna_distributions()
    assert {"adaptive_k", "adaptive_temperature", "adaptive_hard", "adaptive_lr", "adaptive_lambda"} <= set(dists)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask(dists)
    cfg = resolve("toy", "circle", fixed=space.fixed, sampled=trial.params)
    assert cfg.target == "adaptive" and isinstance(cfg.adaptive_k, int) and isinstance(cfg.adaptive_hard, bool)


def test_the_flux_nudity_space_is_the_reference_recipe_with_its_flowedit_target():
    from erase.config import resolve

    space = load_space("flux_nudity", SETTINGS)
    cfg = resolve("flux.1-schnell", "nudity", fixed=space.fixed, sampled={"beta": 0.01})
    assert (cfg.target, cfg.substitutions["nude"], cfg.text_length, cfg.grad_accum, cfg.mask_noise) == (
        "edit", "clothed", 512, 4, "per_call")
    assert cfg.beta == 0.01 and cfg.plan_memory  # the draw over the recipe; memory left to the planner
