"""One resolved configuration: the layers' order, the checks on every layer, and the flags made from the fields."""

import dataclasses
import json

import pytest

from erase import config
from erase.cli import main
from erase.config import ConfigError, resolve
from erase.pipelines import model, models


@pytest.fixture
def layered(monkeypatch):
    """flux-tiny under another name, with recipe defaults and a named recipe of its own."""
    entry = dataclasses.replace(
        model("flux-tiny"), name="layered",
        recipe_defaults=lambda concept: {"beta": 0.2, "steps": 7, "lr_ffn": 0.3, "seed": 3},
        recipes={"quick": {"steps": 5, "lr_ffn": 0.4, "batch_size": 2}})
    monkeypatch.setitem(models(), "layered", entry)
    return entry


def test_each_layer_overrides_the_ones_before_it(layered):
    cfg = resolve("layered", "cat", fixed={"recipe": "quick", "lr_ffn": 0.45, "batch_size": 3},
                  sampled={"batch_size": 1, "beta": 0.25}, flags={"beta": 0.3})
    assert cfg.lr_norm == 0.5  # 1. TrainConfig's own default
    assert cfg.seed == 3  # 2. the model's recipe defaults
    assert cfg.steps == 5  # 3. the named recipe, over the recipe defaults (7)
    assert cfg.lr_ffn == 0.45  # 4. the fixed settings, over the recipe (0.4)
    assert cfg.batch_size == 1  # 5. the sampled values, over the fixed settings (3)
    assert cfg.beta == 0.3  # 6. the flags, over the sampled value (0.25)
    assert resolve("layered", "cat", fixed={"recipe": "quick"}, flags={"recipe": None}).steps == 5
    assert resolve("layered", "cat").steps == 7 and resolve("flux-tiny", "cat").steps == 400


@pytest.mark.parametrize("layers, message", [
    (dict(fixed={"stepz": 3}), "fixed settings: 'stepz' is not a setting of a run"),
    (dict(fixed={"steps": "many"}), "fixed settings: 'steps' must be a whole number, got 'many'"),
    (dict(fixed={"steps": 2.5}), "'steps' must be a whole number"),
    (dict(sampled={"sites": 3}), "the sampled values: 'sites' must be a comma-separated list"),
    (dict(flags={"checkpointing": "no"}), "the flags: 'checkpointing' must be true or false"),
    (dict(fixed={"log_every": 5}), "'log_every' is not a setting of a run"),
    (dict(fixed={"recipe": "slow"}), "layered has no recipe 'slow'; its recipes: quick"),
    (dict(fixed={"steps": 0}), "steps must be at least 1"),
    (dict(flags={"sites": ("ffn", "mlp")}), "site group 'mlp' does not exist"),
])
def test_a_bad_layer_names_where_the_value_came_from(layered, layers, message):
    with pytest.raises(ConfigError) as err:
        resolve("layered", "cat", **layers)
    assert message in str(err.value)


def test_values_are_taken_in_the_forms_files_and_samplers_give():
    cfg = resolve("toy", "circle", fixed={"beta": "1e-5", "sites": "ffn, norm, attn", "lr_attn": 1, "steps": 100.0},
                  flags={"log_every": 5})
    assert cfg.beta == 1e-5 and cfg.sites == ("ffn", "norm", "attn") and cfg.lr_attn == 1.0
    assert isinstance(cfg.steps, int) and cfg.steps == 100 and cfg.log_every == 5


def test_substitutions_serve_the_substitute_target_only():
    blue = resolve("toy", "blue")  # the toy recipe maps a colour onto its prompt without the word, in any phrasing
    assert blue.target == "substitute"
    assert blue.substitutions == {"blue": "", "azure": "", "navy": "", "sky-coloured": "", "ocean-coloured": ""}
    assert resolve("toy", "blue", flags={"target": "empty"}).substitutions == {}
    assert blue.beta == 2.0  # the toy recipe's beta for a colour
    cross = resolve("toy", "cross")
    assert cross.target == "adaptive" and cross.substitutions == {}
    assert cross.beta == 0.1 and cross.steps == 200  # the toy recipe's for an object


def _train_parser():
    import argparse

    parser = argparse.ArgumentParser()
    config.add_flags(parser)
    return parser


def test_every_setting_has_a_flag_with_help_and_its_real_default():
    parser = _train_parser()
    by_dest = {a.dest: a for a in parser._actions}
    defaults = config.TrainConfig(concept="x")
    for name in config.SETTINGS:
        action = by_dest[name]
        assert action.default is None  # not given: the lower layers decide
        assert action.help and "(default: " in action.help and "(default: None)" not in action.help, name
        shown = action.help.rsplit("(default: ", 1)[1]
        value = getattr(defaults, name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert shown.startswith(f"{value:g}"), (name, shown)  # the number the run reads
    assert "(default: 0.01; toy: 0.25)" in by_dest["beta"].help and "(default: 400; toy: 200)" in by_dest["steps"].help  # where a model's recipe differs, it says so
    args = parser.parse_args(["--beta", "0.5", "--no-checkpointing", "--substitute", "cat=dog", "--sites", "ffn"])
    assert config.flag_values(args) == {"beta": 0.5, "checkpointing": False, "substitutions": {"cat": "dog"},
                                        "sites": ("ffn",)}


def test_train_takes_a_config_file_with_the_keys_of_a_spaces_fixed(tmp_path, capsys):
    settings = tmp_path / "run.yaml"
    settings.write_text("steps: 3\nbatch_size: 1\nbeta: 0.05\nsites: ffn\nsampling_steps: 2\n")
    out = tmp_path / "m.safetensors"
    code = main(["train", "--model", "flux-tiny", "--concept", "cat", "--config", str(settings), "--beta", "0.07",
                 "--out", str(out), "--quiet", "--json"])
    assert code == 0
    used = json.loads(capsys.readouterr().out)["config"]
    assert (used["steps"], used["batch_size"], used["sites"], used["sampling_steps"]) == (3, 1, ["ffn"], 2)
    assert used["beta"] == 0.07  # the flag over the file
    settings.write_text("steps: 3\nbetta: 0.05\n")
    code = main(["train", "--model", "flux-tiny", "--concept", "cat", "--config", str(settings), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"config file {settings}: 'betta' is not a setting of a run" in err


def test_a_recipe_named_by_the_flags_wins_over_the_files_without_an_error(layered):
    layered.recipes["slow"] = {"steps": 9}
    cfg = resolve("layered", "cat", fixed={"recipe": "quick", "lr_ffn": 0.45}, flags={"recipe": "slow"})
    assert cfg.steps == 9 and cfg.lr_ffn == 0.45


def test_the_flux_models_name_the_papers_recipe():
    cfg = resolve("flux.1-schnell", "nudity", flags={"recipe": "paper"})
    table_6 = (cfg.batch_size, cfg.lr_ffn, cfg.lr_norm, cfg.lr_attn, cfg.beta, cfg.optimizer, cfg.weight_decay, cfg.steps)
    assert table_6 == (4, 0.5, 0.5, 0.0, 0.01, "adam", 0.01, 400)
    assert resolve("flux.1-schnell", "nudity").optimizer == "adamw"  # without the recipe, the reference code's
    assert resolve("flux-tiny", "cat", fixed={"recipe": "paper"}, flags={"steps": 3}).steps == 3  # flags over it
    with pytest.raises(ConfigError, match="toy has no recipe 'paper'; its recipes: none"):
        resolve("toy", "circle", flags={"recipe": "paper"})


def test_the_flux_models_name_the_reference_codes_recipe():
    cfg = resolve("flux.1-schnell", "nudity", flags={"recipe": "reference"})
    flux_yaml = (cfg.beta, cfg.lr_ffn, cfg.lr_norm, cfg.lr_attn, cfg.parametrisation, cfg.init_logit,
                 cfg.sampling_steps, cfg.batch_size, cfg.grad_accum, cfg.steps, cfg.text_length)
    assert flux_yaml == (0.1, 0.5, 0.5, 0.0, "hard_concrete", 3.0, 5, 1, 4, 80, 512)
    assert cfg.shared_noise and cfg.mask_noise == "per_call"
    with pytest.raises(ConfigError, match="a shared starting noise is one noise"):
        resolve("flux.1-schnell", "nudity", flags={"recipe": "reference", "noises_per_prompt": 2})
    with pytest.raises(ConfigError, match="needs the hard-concrete parametrisation"):
        resolve("flux.1-schnell", "nudity", flags={"recipe": "reference", "parametrisation": "sigmoid"})
