"""The toy world's shipped generator and detector: size, loading, the recorded bars, and a real erasure."""

import json
import os

import pytest
import torch

from erase.detectors import ToyWorldDetector
from erase.evaluate import generate
from erase.masks import MaskHooks, fingerprint
from erase.pipelines import load_generator, mask_sites, toy
from erase.pipelines import toy_world as world
from erase.toy_train import detector_accuracy, held_out_quality


@pytest.fixture(scope="module")
def shipped():
    return load_generator("toy"), toy.load_detector()


def test_shipped_weights_are_small_and_load(shipped):
    size = os.path.getsize(toy.GENERATOR_FILE) + os.path.getsize(toy.DETECTOR_FILE)
    assert size <= 20 * 2**20
    gen, _ = shipped
    assert gen.model_id == "toy" and gen.default_steps == 4
    assert fingerprint(gen.mask_sites()) == fingerprint(mask_sites("toy"))


def test_detector_names_every_attribute_of_fresh_renders(shipped):
    _, detector = shipped
    accuracy = detector_accuracy(detector, seed=4242, n=1500)
    assert min(accuracy.values()) >= 0.98, accuracy


def test_generator_meets_the_held_out_bar_as_recorded(shipped):
    gen, detector = shipped
    with open(os.path.join(toy.WEIGHTS_DIR, "figures.json")) as f:
        figures = json.load(f)
    assert gen.guidance == figures["default_guidance"]
    quality = held_out_quality(gen, detector)  # the recipe's own check: same prompts, same seeds
    assert quality["accuracy"]["object"] >= 0.9 and quality["accuracy"]["colour"] >= 0.9, quality
    recorded = figures["held_out_quality_by_guidance"][str(float(gen.guidance))]["accuracy"]
    assert quality["accuracy"]["object"] == pytest.approx(recorded["object"], abs=0.03)


@pytest.mark.slow
def test_short_erasure_lowers_the_concept_detection_rate(shipped):
    from erase.config import resolve
    from erase.prompts import prompt_sets
    from erase.train import train

    gen, _ = shipped
    detector = ToyWorldDetector()
    erase_prompts, neutral = prompt_sets("toy", "circle")
    # the recipe for an object (the other objects as its target), cut short
    cfg = resolve("toy", "circle", flags={"steps": 80, "log_every": 80})
    assert cfg.target == "adaptive"
    result = train(gen, cfg, erase_prompts, neutral[::4], progress=False)
    prompts = world.concept_prompts("circle")
    seeds = list(range(7000, 7000 + len(prompts)))
    before = detector.detect(generate(gen, prompts, seeds))["circle"][1].mean()
    with MaskHooks(gen.transformer, result.masks.sites, result.masks.binary()):
        after = detector.detect(generate(gen, prompts, seeds))["circle"][1].mean()
    assert before >= 0.8 and after <= before - 0.2, (before, after)


def test_ablation_removes_whole_site_groups_and_the_detector_sees_it(shipped):
    from erase.ablation import ABLATIONS, detection_with_removed

    gen, detector = shipped
    figures = {name: detection_with_removed(gen, detector, ABLATIONS[name], seeds_per_prompt=1)
               for name in ("none", "attn, every head", "ffn + norm (the default sites)")}
    untouched, no_heads = ({k: v["value"] for k, v in figures[name].items()} for name in ("none", "attn, every head"))
    assert figures["none"]["object"]["n"] == 90 and figures["none"]["style_not_default"]["n"] == 60
    assert figures["none"]["colour"]["low"] <= untouched["colour"] <= figures["none"]["colour"]["high"]
    assert untouched["object"] >= 0.9 and untouched["colour"] >= 0.9, untouched
    # without attention no prompt reaches the image: every attribute falls far below the untouched model
    assert all(no_heads[a] <= untouched[a] - 0.4 for a in ("object", "colour", "style")), (untouched, no_heads)
    # the style column without the prompts that ask for the default look (solid): a third of the combinations
    assert untouched["style_not_default"] >= 0.85, untouched
    assert no_heads["style_not_default"] <= untouched["style_not_default"] - 0.3, (untouched, no_heads)
    # the property the shipped generator was trained for: without every unit of the default sites
    # it does not hear the prompt (object at chance, 1/6; colour grey; style the default, solid)
    removed = {k: v["value"] for k, v in figures["ffn + norm (the default sites)"].items()}
    assert removed["object"] <= 0.25 and removed["colour"] <= 0.1 and removed["style_not_default"] <= 0.2, removed
    # and the hooks are gone afterwards: the same call gives the same figures again
    assert detection_with_removed(gen, detector, ABLATIONS["none"], seeds_per_prompt=1) == figures["none"]


def test_zeroed_text_encoder_layers_come_back_whole(shipped):
    from erase.ablation import TEXT_ENCODER_ABLATIONS, zeroed

    gen, _ = shipped
    before = {k: v.clone() for k, v in gen.text_encoder.state_dict().items()}
    with zeroed(gen.text_encoder, TEXT_ENCODER_ABLATIONS["text encoder: every self-attention output"]):
        inside = gen.text_encoder.state_dict()
        out_proj = [k for k in inside if "self_attn.out_proj" in k]
        assert out_proj and all(inside[k].abs().sum() == 0 for k in out_proj)
        assert all(torch.equal(inside[k], before[k]) for k in inside if k not in out_proj)
    assert all(torch.equal(v, before[k]) for k, v in gen.text_encoder.state_dict().items())
    with pytest.raises(ValueError, match="no parameters"):
        with zeroed(gen.text_encoder, ("no_such_layer",)):
            pass
