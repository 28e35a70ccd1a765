"""`erase bench` produces its rows and ratios (the figures themselves live in the closing note)."""

import pytest

from erase import bench
from erase.errors import EraseError


@pytest.mark.slow
def test_bench_rows_on_tiny_model():
    report = bench.run("flux-tiny", [1, 2], repeats=1, progress=False)
    rows = report["rows"]
    assert [(r["steps"], r["checkpointing"]) for r in rows] == [(1, True), (1, False), (2, True), (2, False)]
    for r in rows:
        assert r["seconds"] > 0 and r["peak_mb"] >= 0
    assert set(report["ratios"]["time_checkpointed_over_plain"]) == {"1", "2"}
    # the tiny model's activations can stay below what peak RSS resolves, so the peak ratios are tested below


def test_ratios_divide_the_bars_and_skip_a_peak_too_small_to_measure():
    def row(steps, ckpt, seconds, peak):
        return {"steps": steps, "checkpointing": ckpt, "seconds": seconds, "peak_mb": peak}

    rows = [row(1, True, 2.0, 10.0), row(1, False, 1.0, 20.0), row(4, True, 8.0, 12.0), row(4, False, 4.0, 80.0)]
    assert bench.ratios(rows) == {"time_checkpointed_over_plain": {"1": 2.0, "4": 2.0},
                                  "peak_checkpointed_over_plain": {"1": 0.5, "4": 0.15},
                                  "peak_checkpointed_4_over_1_steps": 1.2}
    unmeasured = [row(1, True, 2.0, 0.0), row(1, False, 1.0, 0.0), row(4, True, 8.0, 12.0), row(4, False, 4.0, 80.0)]
    out = bench.ratios(unmeasured)
    assert out["peak_checkpointed_over_plain"] == {"4": 0.15} and "peak_checkpointed_4_over_1_steps" not in out


def test_best_so_far_counts_steps_and_keeps_the_best():
    curve = bench._best_so_far([{"steps": 10, "score": 0.2}, {"steps": 5, "score": None}, {"steps": 20, "score": 0.1},
                                {"steps": 10, "score": 0.4}])
    assert curve == [{"steps": 10, "best": 0.2}, {"steps": 15, "best": 0.2}, {"steps": 35, "best": 0.2},
                     {"steps": 45, "best": 0.4}]
    assert bench._best_so_far([{"steps": 3, "score": None}]) == [{"steps": 3, "best": None}]


@pytest.mark.slow
def test_search_comparison_runs_the_grid_and_a_sweep_on_the_same_box(tmp_path):
    report = bench.compare_search("circle", steps=4, lrs=(0.5,), trials=2, storage=str(tmp_path / "sweeps"),
                                  tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", progress=False)
    assert [r["config"]["beta"] for r in report["grid"]["runs"]] == bench.grid_betas("toy")
    assert report["grid_steps"] == 5 * 4 and report["grid"]["curve"][-1]["best"] == report["grid_best"]
    assert len(report["optuna_asha"]["runs"]) == 2
    assert all(1e-3 <= r["config"]["beta"] <= 10.0 for r in report["optuna_asha"]["runs"])
    bests = [p["best"] for p in report["optuna_asha"]["curve"] if p["best"] is not None]
    assert bests == sorted(bests) and report["optuna_steps"] <= 2 * 4
    assert report["optuna_asha"]["sweep_cost"]["wall_seconds"] > 0


def test_the_reference_grid_moves_to_the_models_beta_scale():
    assert bench.grid_betas("flux.1-schnell") == list(bench.GRID_BETAS)  # the paper's own scale: unchanged
    assert bench.grid_betas("toy") == [2.5, 0.25, 0.025, 0.0025, 0.00025]  # toy recipe β 0.25 = 25x the paper's 0.01


def test_match_beta_raises_beta_until_the_erasure_rate_meets_the_level():
    # a stand-in erasure whose detection rate rises smoothly with β (smaller β erases harder)
    def erase_at(beta):
        return {"beta": beta, "erasure_rate": {"value": min(1.0, 0.1 * beta ** 0.5)}}

    tried = bench.match_beta(erase_at, [erase_at(1.0)], level=0.5, tolerance=0.02, max_runs=12)
    betas = [r["beta"] for r in tried]
    assert betas[:4] == [1.0, 4.0, 16.0, 64.0]  # x4 until the rate passes 0.5 (β 25)
    assert abs(tried[-1]["erasure_rate"]["value"] - 0.5) <= 0.02
    assert 16.0 < tried[-1]["beta"] < 64.0  # then bisected inside the bracket


def test_match_beta_lowers_beta_when_the_concept_is_not_erased_enough():
    def erase_at(beta):  # the same stand-in: the level 0.05 lies at β 0.25
        return {"beta": beta, "erasure_rate": {"value": min(1.0, 0.1 * beta ** 0.5)}}

    tried = bench.match_beta(erase_at, [erase_at(4.0)], level=0.05, tolerance=0.005, max_runs=12)
    assert [r["beta"] for r in tried] == [4.0, 1.0, 0.25]  # /4 until the rate reaches the level


def test_match_beta_bisects_between_both_sides():
    def erase_at(beta):  # level 0.3 at β 9
        return {"beta": beta, "erasure_rate": {"value": min(1.0, 0.1 * beta ** 0.5)}}

    # from above: 64 and 16 erase too little, 4 too much; then bisected inside 4..16
    tried = bench.match_beta(erase_at, [erase_at(64.0)], level=0.3, tolerance=0.001, max_runs=30)
    assert [r["beta"] for r in tried][:4] == [64.0, 16.0, 4.0, 8.0]
    assert all(4.0 <= r["beta"] <= 16.0 for r in tried[1:])
    assert abs(tried[-1]["erasure_rate"]["value"] - 0.3) <= 0.001


def test_match_beta_keeps_the_tightest_bracket_when_rates_are_noisy():
    rates = {1.0: 0.5, 0.25: 0.0, 0.5: 0.6, 0.3535533905932738: 0.3}  # β 0.5 erases less than β 1 did: noise

    def erase_at(beta):
        return {"beta": beta, "erasure_rate": {"value": rates[beta]}}

    tried = bench.match_beta(erase_at, [erase_at(1.0)], level=0.3, tolerance=0.01, max_runs=10)
    # 1 too weak -> /4; 0.25 too hard -> sqrt(0.25 * 1); 0.5 too weak -> sqrt(0.25 * 0.5), not sqrt(0.25 * 1)
    assert [r["beta"] for r in tried] == [1.0, 0.25, 0.5, 0.3535533905932738]


def test_the_matching_level_is_the_strongest_strategys_rate_or_the_one_given():
    first = {"empty": 0.17, "substitute": 0.6, "adaptive": 0.4}
    assert bench.matching_level(first) == 0.17
    assert bench.matching_level(first, 0.05) == 0.05
    with pytest.raises(EraseError, match="between 0 and 1"):
        bench.matching_level(first, 5)


def test_the_hardest_common_level_is_the_lowest_rate_the_weakest_eraser_reached():
    # the cross benchmark matched at 0.15: adaptive's rates rose again below beta 0.0625
    runs = {"empty": [0.15], "substitute": [0.52, 0.18, 0.12, 0.10, 0.17], "adaptive": [0.62, 0.35, 0.20, 0.40, 0.37]}
    strategies = {s: {"runs": [{"erasure_rate": r} for r in rates]} for s, rates in runs.items()}
    assert bench.hardest_common_level(strategies) == 0.20


def test_match_beta_stops_at_its_run_budget():
    calls = []

    def never_enough(beta):
        calls.append(beta)
        return {"beta": beta, "erasure_rate": {"value": 0.0}}

    tried = bench.match_beta(never_enough, [never_enough(1.0)], level=0.5, tolerance=0.02, max_runs=3)
    assert len(tried) == 3 and len(calls) == 3


@pytest.mark.slow  # three short erasures and their evaluations: about a minute here
def test_target_comparison_trains_with_the_recipes_settings_for_the_concept(monkeypatch, capsys):
    # A style: `erase train` maps it onto its prompt with the word dropped and uses the recipe's
    # noises per prompt; the benchmark must compare the strategies under those same settings.
    import erase.train
    from erase.pipelines import recipe_defaults

    configs = []
    real_train = erase.train.train

    def spy(gen, cfg, *args, **kwargs):
        configs.append(cfg)
        return real_train(gen, cfg, *args, **kwargs)

    monkeypatch.setattr(erase.train, "train", spy)
    report = bench.compare_targets("striped", ["solid", "outlined"], steps=2, seeds_per_prompt=1, progress=False)
    assert [c.target for c in configs] == ["empty", "substitute", "adaptive", "edit"]
    recipe = recipe_defaults("toy", "striped")
    assert all(c.noises_per_prompt == recipe["noises_per_prompt"] and c.beta == recipe["beta"] for c in configs)
    assert configs[1].substitutions == configs[3].substitutions == recipe["substitutions"] and configs[0].substitutions == {}
    assert report["substitute"].startswith("striped='', banded=''")  # every phrasing of the word dropped
    for result in report["strategies"].values():
        assert set(result["neighbour_preservation"]) == {"solid", "outlined"}
    assert report["strategies"]["adaptive"]["learnt_target"]
    logged = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bench targets: striped")]
    assert [line.split()[3] for line in logged] == ["empty", "substitute", "adaptive", "edit"]  # one line per run


def test_an_objects_substitute_and_edit_replace_every_phrasing_of_it(monkeypatch):
    # the erase prompts name the cross by its synonyms and descriptions too ("a red plus sign"):
    # a substitution of the word alone would find nothing to replace in them
    import erase.train
    from erase.pipelines import recipe_defaults

    configs = []

    class Stop(Exception):
        pass

    def spy(gen, cfg, *args, **kwargs):
        configs.append(cfg)
        raise Stop

    monkeypatch.setattr(bench, "toy_erasure", lambda concept, seeds: (None, [], [], None))
    monkeypatch.setattr(erase.train, "train", spy)
    with pytest.raises(Stop):
        bench.compare_targets("cross", ["circle"], strategies=("substitute",), progress=False)
    assert configs[0].target == "substitute"
    assert configs[0].steps == recipe_defaults("toy", "cross")["steps"]  # no steps given: the recipe's, as erase train
    assert configs[0].substitutions["cross"] == configs[0].substitutions["plus sign"] == "shape"
    assert len(configs[0].substitutions) == 5


@pytest.mark.slow
def test_the_gpu_checks_cpu_twin_runs_both_recipes_beside_the_planner():
    report = bench.check_recipes("flux-bench", ["paper", "reference"], steps=2, progress=False)
    assert [r["recipe"] for r in report["recipes"]] == ["paper", "reference"]
    for r in report["recipes"]:
        assert r["seconds_per_step"] > 0 and r["peak_gb"] >= r["before_gb"] > 0
        assert r["predicted_peak_gb"] > 0 and r["fits"] and set(r["setting"]) == {"micro_batch", "block_checkpointing"}
    paper, reference = report["recipes"]
    assert (paper["samples_per_step"], reference["samples_per_step"]) == (4, 4)  # batch 4; batch 1 x 4 accumulated


def test_the_gpu_check_says_what_to_run_without_a_gpu(monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(EraseError, match="no CUDA device here.*--device cpu --model flux-bench"):
        bench.check_recipes("flux.1-schnell", ["paper"], device="cuda", random_weights=True)
    with pytest.raises(EraseError, match="has no recipe 'fast'"):
        bench.check_recipes("flux-bench", ["fast"])


@pytest.mark.slow
def test_inference_bench_dropped_neurons_give_a_smaller_model_with_the_folded_images():
    from erase.bench import PAPER_SPARSITY, run_inference

    report = run_inference(("toy",), images=1, progress=False)
    toy = report["models"]["toy"]
    assert set(toy["variants"]) == {"base", "hooks", "folded", "dropped"}
    assert all(row["seconds_per_image"] > 0 for row in toy["variants"].values())
    dropped = toy["variants"]["dropped"]
    # the ffn sites lose between the image stream's share and the text stream's
    assert PAPER_SPARSITY["ff"] - 0.01 < dropped["dropped_share_of_ffn"] < PAPER_SPARSITY["ff_context"] + 0.01
    assert toy["params_over_base"]["dropped"] < 0.95 and toy["params_over_base"]["folded"] == 1.0
    # fp32: the hooked and dropped models draw the folded model's images, up to the order of float sums
    assert toy["max_abs_difference_to_folded"]["hooks"] < 1e-5
    assert toy["max_abs_difference_to_folded"]["dropped"] < 1e-5
