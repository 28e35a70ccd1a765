"""`erase eval`'s figures on the toy world, with fresh (untrained) weights: the arithmetic, not the quality."""

import pytest
import torch

from erase.evaluate import detection_rates, evaluate_toy, toy_eval_set
from pipelines import toy
from pipelines import toy_world as world


@pytest.fixture(scope="module")
def fresh():
    transformer, text = toy.build_models(seed=1)
    torch.manual_seed(0)
    return toy.ToyGenerator(transformer, text), toy.ToyDetector().eval()


def test_eval_set_covers_every_concept_with_fixed_seeds():
    prompts, seeds, concepts = toy_eval_set(seeds_per_prompt=2)
    assert set(concepts) == set(world.all_concepts())
    assert len(set(seeds)) == len(seeds) == len(prompts)
    assert toy_eval_set(seeds_per_prompt=2)[1] == seeds  # the same seeds every time


def test_detection_rate_counts_the_named_attribute():
    found = [{"object": "circle", "colour": "red"}, {"object": "square", "colour": "red"},
             {"object": "circle", "colour": "blue"}, {"object": "square", "colour": "red"},
             {"object": "nothing", "colour": "red"}]
    rates = detection_rates(found, ["circle", "circle", "red", "red", "red"])
    assert rates == {"circle": 0.5, "red": 1 / 3}  # no object, no colour


def test_base_model_report(fresh):
    gen, detector = fresh
    report = evaluate_toy(gen, detector, concept="circle", seeds_per_prompt=1)
    assert set(report["detection"]) == set(world.all_concepts())
    assert report["erasure_rate"] == report["detection"]["circle"] and report["preservation"] == 1.0


@pytest.mark.slow
def test_all_ones_mask_changes_nothing_and_a_full_mask_changes_images(fresh):
    gen, detector = fresh
    sites = [s for s in gen.mask_sites() if s.group == "ffn"]
    ones = {s.name: torch.ones(s.size) for s in sites}
    report = evaluate_toy(gen, detector, binary_masks=ones, sites=sites, concept="red", seeds_per_prompt=1)
    assert report["detection"] == report["base_detection"]
    assert report["preservation"] == 1.0 and report["neutral_fidelity"]["mean_abs_pixel_diff"] == 0.0
    zeros = {s.name: torch.zeros(s.size) for s in sites}
    report = evaluate_toy(gen, detector, binary_masks=zeros, sites=sites, concept="red", seeds_per_prompt=1)
    assert report["neutral_fidelity"]["mean_abs_pixel_diff"] > 0
    prompts, _, concepts = toy_eval_set(1)
    assert report["neutral_fidelity"]["n"] == sum(c != "red" and "red" not in p.split() for p, c in zip(prompts, concepts))


def test_unknown_concept_is_a_clear_error(fresh):
    gen, detector = fresh
    with pytest.raises(ValueError, match="no concept 'unicorn'"):
        evaluate_toy(gen, detector, concept="unicorn", seeds_per_prompt=1)
