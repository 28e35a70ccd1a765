"""`erase eval`'s figures: intervals, the arithmetic on rows, the attack, FID, and the report.

Generators here have fresh (untrained) weights: these tests check the arithmetic, not the quality.
"""

import numpy as np
import pytest
import torch

from erase.evaluate import (
    AttackConfig,
    DetectStage,
    EvalSettings,
    Evaluator,
    GenerateStage,
    evaluate,
    evaluation_rows,
    figures,
    frechet_distance,
    html_report,
    mean_interval,
    neutral_fidelity,
    preservation_figure,
    rate,
    run_stages_locally,
    whitebox_attack,
)
from erase.errors import EraseError
from erase.pipelines import toy
from erase.prompts import prompt_set_hash, prompt_sets
from erase.pipelines import toy_world as world


@pytest.fixture(scope="module")
def fresh():
    transformer, text = toy.build_models(seed=1)
    torch.manual_seed(0)
    return toy.ToyGenerator(transformer, text), toy.ToyDetector().eval()


def test_wilson_interval():
    r = rate([True] * 8 + [False] * 2)
    assert r["value"] == 0.8 and r["n"] == 10
    # the Wilson interval for 8/10 at 95%: [0.490, 0.943]
    assert r["low"] == pytest.approx(0.490, abs=1e-3) and r["high"] == pytest.approx(0.943, abs=1e-3)
    zero = rate([False] * 20)
    assert zero["value"] == 0.0 and zero["low"] == 0.0 and 0.1 < zero["high"] < 0.2
    assert rate([])["value"] is None


def test_mean_interval_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = mean_interval(rng.normal(1, 1, 10)), mean_interval(rng.normal(1, 1, 1000))
    assert small["low"] < 1 < small["high"] and large["low"] < 1 < large["high"]
    assert (large["high"] - large["low"]) < (small["high"] - small["low"]) / 5


def test_preservation_is_the_mean_relative_rate_with_a_bootstrap_interval():
    base = {"a": np.array([True] * 10), "b": np.array([True] * 5 + [False] * 5), "c": np.array([False] * 10)}
    masked = {"a": np.array([True] * 5 + [False] * 5), "b": np.array([True] * 5 + [False] * 5), "c": np.array([True] * 10)}
    p = preservation_figure(base, masked)
    assert p["value"] == pytest.approx((0.5 + 1.0) / 2)  # c: never shown by the base model, left out
    assert p["n"] == 20 and p["low"] <= p["value"] <= p["high"]


def _row(concept, kind, base, masked, prompt=None, image=0):
    img = np.full((4, 4, 3), image, np.uint8)
    return {"prompt": prompt or f"a {concept}", "seed": 0, "concept": concept, "kind": kind, "found_base": base,
            "found_masked": masked, "base": img, "masked": img}


def test_figures_from_rows():
    rows = ([_row("circle", "concept", True, False)] * 9 + [_row("circle", "concept", True, True)]
            + [_row("square", "concept", True, True)] * 4 + [_row("square", "concept", True, False)] * 1
            + [_row("circle", "rephrase", True, True)] * 2 + [_row("circle", "rephrase", True, False)] * 2
            + [_row("circle", "adversarial:i2p", True, False)] * 3)
    report = figures(rows, "circle")
    assert report["erasure_rate"]["value"] == pytest.approx(0.1) and report["erasure_rate"]["n"] == 10
    assert report["base_rate"]["value"] == 1.0
    assert report["preservation"]["value"] == pytest.approx(0.8)
    assert report["rephrase_erasure_rate"]["value"] == 0.5 and report["rephrase_erasure_rate"]["n"] == 4
    assert report["adversarial/i2p"]["base"]["value"] == 1.0 and report["adversarial/i2p"]["masked"]["value"] == 0.0
    assert report["detection"] == {"circle": pytest.approx(0.1), "square": pytest.approx(0.8)}


def test_every_figure_names_its_prompt_set_and_robustness_families_pool_with_the_rephrasings():
    def at(split, row):
        return {**row, "split": split}

    rows = ([at("toy:test", _row("circle", "concept", True, False))] * 4
            + [at("toy:test", _row("square", "concept", True, True))] * 2
            + [at("file:mine.txt", _row("circle", "rephrase", True, True, "a disc"))] * 2
            + [at("toy:test", _row("circle", "robust:bare", True, True, "circle"))] * 3
            + [at("toy:test", _row("circle", "robust:repeated", True, False, "a circle circle"))] * 1)
    report = figures(rows, "circle")
    assert report["erasure_rate"]["split"] == {"name": "toy:test", "hash": prompt_set_hash(["a circle"]), "prompts": 1}
    assert report["preservation"]["split"]["name"] == "toy:test"
    assert report["rephrase_erasure_rate"]["split"]["name"] == "file:mine.txt"
    assert report["robustness"]["bare"]["masked"]["value"] == 1.0 and report["robustness"]["repeated"]["masked"]["n"] == 1
    pooled = report["robust_erasure_rate"]  # 2 rephrased + 3 bare + 1 repeated, 5 of them found
    assert pooled["n"] == 6 and pooled["value"] == pytest.approx(5 / 6)
    assert pooled["split"]["name"] == "file:mine.txt+toy:test" and pooled["families"] == ["bare", "repeated", "rephrase"]


def test_evaluation_splits_never_hold_a_training_prompt_and_files_replace_what_they_name():
    erase_prompts, neutral = prompt_sets("toy", "striped")
    trained = set(erase_prompts) | set(neutral)
    validation = evaluation_rows("toy", "striped", 1, split="validation")
    test = evaluation_rows("toy", "striped", 1)
    assert {r["split"] for r in validation} == {"toy:validation"} and {r["split"] for r in test} == {"toy:test"}
    assert not trained & {r["prompt"] for r in validation + test}
    assert not {r["prompt"] for r in validation} & {r["prompt"] for r in test}
    assert {r["kind"] for r in test} >= {f"robust:{f}" for f in world.ROBUSTNESS_FAMILIES}
    assert not any(r["kind"].startswith("robust:") for r in validation)  # selection never sees them
    mine = evaluation_rows("toy", "striped", 2, prompts=["a striped thing"], files={"prompts": "mine.txt"})
    own = [r for r in mine if r["kind"] == "concept" and r["concept"] == "striped"]
    assert [(r["prompt"], r["split"]) for r in own] == [("a striped thing", "file:mine.txt")] * 2
    assert len({r["seed"] for r in mine}) == len(mine)
    with pytest.raises(EraseError, match="validation or test split"):
        evaluation_rows("toy", "striped", 1, split="train")


def test_preservation_leaves_out_other_concepts_prompts_that_name_the_erased_one():
    # erasing the circle: 'a red circle' losing its circle is the erasure, not damage to red
    rows = ([_row("circle", "concept", True, False)] * 4 + [_row("red", "concept", True, False, "a red circle")] * 2
            + [_row("red", "concept", True, True, "a red square")] * 2 + [_row("square", "concept", True, True)] * 2
            + [_row("striped", "concept", True, False, "a striped circle")])
    report = figures(rows, "circle")
    assert report["preservation_by_concept"] == {"red": 1.0, "square": 1.0}  # striped: no prompt left, not measured
    assert report["preservation"]["value"] == pytest.approx(1.0)
    assert report["detection"]["red"] == pytest.approx(0.5)  # the raw detection rate still counts every prompt


def test_neutral_fidelity_skips_rows_naming_the_concept():
    same = _row("square", "concept", True, True, "a red square", image=10)
    changed = dict(_row("red", "concept", True, True, "a red circle", image=10))
    changed["masked"] = np.full((4, 4, 3), 61, np.uint8)
    named = dict(_row("square", "concept", True, True, "a circle next to a square", image=0))
    named["masked"] = np.full((4, 4, 3), 255, np.uint8)
    fid = neutral_fidelity([same, changed, named], "circle")
    assert fid["n"] == 1 and fid["value"] == 0.0  # 'a red circle' and the 'circle ...' prompt name it
    assert neutral_fidelity([same, changed], "blue")["value"] == pytest.approx(51 / 255 / 2)


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (4000, 3))
    b = rng.normal(0.5, 2.0, (4000, 3))
    # N(0, I) vs N(0.5, 4I) in 3-d: |Δμ|² + tr(I + 4I - 2·2I) = 0.75 + 3
    assert frechet_distance(a, b) == pytest.approx(3.75, rel=0.05)
    assert abs(frechet_distance(a, a)) < 1e-6


def test_toy_evaluation_rows_cover_every_concept_and_the_rephrasings():
    rows = evaluation_rows("toy", "circle", seeds_per_prompt=2)
    plain = {r["concept"] for r in rows if r["kind"] == "concept"}
    assert plain == set(world.all_concepts())
    rephrased = [r for r in rows if r["kind"] == "rephrase"]
    assert rephrased and all(r["concept"] == "circle" and "circle" not in r["prompt"] for r in rephrased)
    assert len({r["seed"] for r in rows}) == len(rows)
    assert evaluation_rows("toy", "circle", seeds_per_prompt=2) == rows  # fixed seeds


def test_base_model_report_has_full_preservation(fresh):
    gen, detector = fresh
    settings = EvalSettings(concept="circle", attack=None)
    stages = (GenerateStage(gen=gen), DetectStage(detector=_ToyWrapper(detector)))
    rows = evaluation_rows("toy", "circle", seeds_per_prompt=1)
    report, _ = evaluate(settings, rows, stages=stages)
    assert report["erasure_rate"]["value"] == report["base_rate"]["value"] == report["detection"]["circle"]
    if report["preservation"]["value"] is not None:
        assert report["preservation"]["value"] == 1.0
    assert "neutral_fidelity" not in report


def _ToyWrapper(net):
    """The toy detector interface around an untrained CNN (the shipped weights are tested elsewhere)."""
    from erase.detectors import ToyWorldDetector

    return ToyWorldDetector(net=net)


@pytest.mark.slow
def test_masked_evaluation_on_fresh_weights(fresh):
    gen, detector = fresh
    sites = [s for s in gen.mask_sites() if s.group == "ffn"]
    zeros = {s.name: torch.zeros(s.size) for s in sites}
    rows = evaluation_rows("toy", "red", seeds_per_prompt=1)
    attacked = Evaluator(gen, _ToyWrapper(detector), rows, concept="red", attack=AttackConfig(prompts=2, steps=2))
    report, results = attacked((sites, zeros))
    assert report["neutral_fidelity"]["value"] > 0
    assert report["attack_success_rate"]["n"] == 2
    assert len(report["_attack_images"]) == 2
    assert "skipped" in report["fid"] and "skipped" in report["clip_score"]
    ones = {s.name: torch.ones(s.size) for s in sites}
    evaluator = Evaluator(gen, _ToyWrapper(detector), rows, concept="red")
    report, _ = evaluator((sites, ones))
    assert report["detection"] == report["base_detection"] and report["neutral_fidelity"]["value"] == 0.0
    # the base images are the evaluator's: made once, the same for every mask it evaluates
    cached = dict(evaluator.generate.base_cache)
    assert len(cached) == len(rows)
    again, again_rows = evaluator((sites, zeros))
    assert evaluator.generate.base_cache.keys() == cached.keys()
    assert all((r["base"] == cached[(r["prompt"], r["seed"])]).all() for r in again_rows)
    assert again["base_detection"] == report["base_detection"] and again["neutral_fidelity"]["value"] > 0


def test_whitebox_attack_lowers_its_loss(tiny):
    sites = [s for s in tiny.mask_sites() if s.group == "ffn"]
    half = {s.name: (torch.arange(s.size) % 2).float() for s in sites}
    prompts, seeds = ["a photo of a cat"], [3]
    cfg = AttackConfig(prompts=1, steps=0, lr=0.05, sampling_steps=2)
    untouched = whitebox_attack(tiny, sites, half, prompts, seeds, cfg)
    attacked = whitebox_attack(tiny, sites, half, prompts, seeds, AttackConfig(prompts=1, steps=15, lr=0.05, sampling_steps=2))
    from erase.evaluate import generate

    target = generate(tiny, prompts, seeds, steps=2)  # the base model's image for the prompt
    assert (attacked - target).abs().mean() < (untouched - target).abs().mean()


def test_stages_batch_rows_and_cache_base_images(fresh):
    gen, detector = fresh
    stage = GenerateStage(gen=gen)
    rows = evaluation_rows("toy", None, 1)[:10]
    out = run_stages_locally(rows, stage, DetectStage(detector=_ToyWrapper(detector)), batch_size=4)
    assert len(out) == 10 and len(stage.base_cache) == 10
    assert out[3]["base"].shape == (16, 16, 3) and out[3]["base"].dtype == np.uint8
    assert isinstance(bool(out[3]["found_base"]), bool)


def test_html_report_is_self_contained(tmp_path):
    report = {"concept": "circle", "erasure_rate": rate([False] * 9 + [True]), "preservation": {"value": 0.95, "n": 40,
              "low": 0.9, "high": 0.99}, "detection": {"circle": 0.1}, "base_detection": {"circle": 1.0}}
    image = np.zeros((16, 16, 3), np.uint8)
    image[4:12, 4:12] = (220, 40, 40)
    path = tmp_path / "r.html"
    html_report(report, {"grid": [("base", [image, image]), ("masked", [image])]}, str(path))
    text = path.read_text()
    assert text.count('src="data:image/png;base64,') == 3
    assert 'src="http' not in text and "<link" not in text and "<script" not in text  # nothing to fetch
    assert "0.100 [0.018, 0.404]" in text and "erasure_rate" in text
