"""The toy world's renderer, prompts and concept groups."""

import numpy as np
import pytest

from erase.pipelines import toy_world as world


def test_world_has_the_required_variety():
    assert len(world.OBJECTS) >= 6 and len(world.COLOURS) >= 5
    assert len(world.STYLES) >= 3 and len(world.BACKGROUNDS) >= 2
    assert set(world.GROUPS) == {"objects", "colours", "styles", "backgrounds"}
    concepts = world.all_concepts()
    assert len(concepts) == len(set(concepts)), "a concept name is used in two groups"
    for concept in concepts:
        synonyms, indirect = world.PHRASINGS[concept]
        assert synonyms and indirect


@pytest.mark.parametrize("obj", world.OBJECTS)
def test_render_shows_the_object_in_its_colour_on_its_background(obj):
    rng = np.random.default_rng(0)
    image = world.render(obj, "red", "solid", "dark", rng)
    assert image.shape == (16, 16, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    red = (image[..., 0] > 0.6) & (image[..., 1] < 0.4)
    assert 15 < red.sum() < 200, "the object should cover part of the image"
    corner = image[0, 0]
    assert np.abs(corner - np.array(world.BACKGROUNDS["dark"])).max() < 0.2


def test_shapes_are_distinct_and_styles_change_pixels():
    rng = np.random.default_rng(1)
    silhouettes = {}
    for obj in world.OBJECTS:
        image = world.render(obj, "yellow", "solid", "dark", np.random.default_rng(5))
        silhouettes[obj] = image[..., 0] > 0.5
    for a in world.OBJECTS:
        for b in world.OBJECTS:
            if a < b:
                assert (silhouettes[a] != silhouettes[b]).sum() >= 12, f"{a} and {b} look alike"
    solid = world.render("square", "blue", "solid", "light", np.random.default_rng(2)) < 0.5
    outlined = world.render("square", "blue", "outlined", "light", np.random.default_rng(2)) < 0.5
    striped = world.render("square", "blue", "striped", "light", np.random.default_rng(2)) < 0.5
    assert outlined[..., 0].sum() < solid[..., 0].sum() and striped[..., 0].sum() < solid[..., 0].sum()
    assert (outlined != striped).any()


def test_empty_prompt_is_an_empty_background():
    rng = np.random.default_rng(3)
    for _ in range(400):
        image, prompt, attrs = world.training_example(rng)
        if prompt == "":
            assert attrs["object"] == world.NOTHING
            assert np.abs(image - np.array(world.BACKGROUNDS[attrs["background"]])).max() < 0.2
            break
    else:
        pytest.fail("no empty-prompt example in 400 draws")


def test_prompts_name_the_attributes_in_each_phrasing():
    attrs = {"object": "triangle", "colour": "green", "style": "outlined", "background": "light"}
    assert world.make_prompt(attrs) == "an outlined green triangle on a light background"
    assert world.make_prompt({**attrs, "style": None, "background": None}) == "a green triangle"
    synonym = world.make_prompt(attrs, {"object": "synonym"})
    assert "triangle" not in synonym and world.PHRASINGS["triangle"][0][0] in synonym
    indirect = world.make_prompt(attrs, {"colour": "indirect"})
    assert "green" not in indirect and world.PHRASINGS["green"][1][0] in indirect
    vocab = set(world.vocabulary())
    rng = np.random.default_rng(0)
    for _ in range(200):
        _, prompt, _ = world.training_example(rng)
        assert set(prompt.split()) <= vocab, prompt


def test_concept_prompts_cover_the_other_attributes():
    prompts = world.concept_prompts("circle")
    assert len(prompts) == len(world.STYLES) * len(world.COLOURS)
    assert all("circle" in p for p in prompts)
    rephrased = world.concept_prompts("circle", "synonym")
    assert not any("circle" in p for p in rephrased)
    assert world.attribute_of("striped") == "style" and world.group_of("dark") == "backgrounds"


def test_held_out_combinations_never_appear_in_training():
    rng = np.random.default_rng(0)
    examples = [world.training_example(rng)[2] for _ in range(3000)]
    seen = {(attrs["object"], attrs["colour"]) for attrs in examples
            if attrs["object"] != world.NOTHING and attrs["colour"] != world.DEFAULT_COLOUR}
    blanks = sum(attrs["object"] == world.NOTHING for attrs in examples) / len(examples)
    assert abs(blanks - world.BLANK_SHARE) < 0.03
    assert len(seen) == len(world.OBJECTS) * len(world.COLOURS) - len(world.HELD_OUT)
    assert not seen & set(world.HELD_OUT)
    held = {o for o, _ in world.HELD_OUT}, {c for _, c in world.HELD_OUT}
    assert held[0] == set(world.OBJECTS) and held[1] == set(world.COLOURS)


def test_unnamed_colour_and_style_are_drawn_grey_and_solid():
    def names_any(prompt, concepts):
        words = [w for c in concepts for w in [c, *world.PHRASINGS[c][0], *world.PHRASINGS[c][1]]]
        return any(f" {w} " in f" {prompt} " for w in words)

    rng = np.random.default_rng(3)
    unnamed = 0
    for _ in range(400):
        image, prompt, attrs = world.training_example(rng)
        if not prompt:
            continue
        assert (attrs["colour"] == world.DEFAULT_COLOUR) == (not names_any(prompt, world.COLOURS))
        if not names_any(prompt, world.STYLES):
            assert attrs["style"] == world.DEFAULT_STYLE
        if attrs["colour"] == world.DEFAULT_COLOUR:
            unnamed += 1
            shape = np.abs(image - np.array(world.BACKGROUNDS[attrs["background"]])).max(-1) > 0.2
            assert np.allclose(image[shape].mean(0), world.DEFAULT_COLOUR_RGB, atol=0.06)
    assert unnamed > 20
    assert world.DEFAULT_COLOUR in world.detector_classes("colour")
    assert world.DEFAULT_COLOUR not in world.all_concepts()


def test_the_prompt_splits_share_no_prompt_and_cover_every_way_the_generator_is_prompted():
    by_split = {s: set() for s in world.SPLITS}
    for concept in world.all_concepts():
        for split in world.SPLITS:
            by_split[split] |= set(world.split_prompts(concept, split))
    assert not (by_split["train"] & by_split["validation"] or by_split["train"] & by_split["test"]
                or by_split["validation"] & by_split["test"])
    train = world.split_prompts("striped", "train")
    assert any("background" in p for p in train) and any("background" not in p for p in train)
    for word in ("striped", "banded", "lined", "zebra-patterned", "stripe-filled"):  # every phrasing, not the first
        assert any(f" {word} " in f" {p} " for p in train), word
    # the held-out family (every attribute named) is in the test split only
    full = [p["prompt"] for p in world.concept_universe("striped") if p["family"] == world.HELD_OUT_FAMILY]
    assert full and {world.split_of(p) for p in full} == {"test"}
    assert not any(p in by_split["train"] | by_split["validation"] for p in full)
    # fixed by the world's seed: the same call gives the same split
    assert world.split_prompts("circle", "validation") == world.split_prompts("circle", "validation")
    with pytest.raises(KeyError, match="unknown split"):
        world.split_prompts("circle", "dev")


def test_robustness_families_are_built_from_test_prompts_and_never_trained_on():
    train = {p for c in world.all_concepts() for p in world.split_prompts(c, "train")}
    for family in world.ROBUSTNESS_FAMILIES:
        prompts = world.robustness_prompts("striped", family)
        assert len(prompts) == world.PER_FAMILY and not set(prompts) & train, family
        assert all("striped" in p for p in prompts), family
    assert set(world.robustness_prompts("striped", "bare")) == {"striped"}
    assert all(p.count("striped") == 2 for p in world.robustness_prompts("striped", "repeated"))
    assert all(", " in p and not p.startswith(("a ", "an ")) for p in world.robustness_prompts("striped", "comma_list"))
    extra = world.robustness_prompts("circle", "extra_attributes")
    assert all("background" in p and sum(s in p.split() for s in world.STYLES) >= 1 for p in extra)
