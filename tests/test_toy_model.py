"""The toy generator behind the FLUX.1 interface, on freshly initialised weights (no shipped files needed)."""

import numpy as np
import pytest
import torch

from erase.masks import MaskHooks, Masks
from erase.pipelines import mask_sites, toy
from erase.pipelines import toy_world as world
from erase.sampler import sample


@pytest.fixture(scope="module")
def fresh_toy():
    transformer, text = toy.build_models(seed=0)
    return transformer, text


def test_pack_and_unpack_are_inverse():
    images = torch.rand(2, 3, 16, 16)
    packed = toy.pack(images)
    assert packed.shape == (2, 64, 12)
    torch.testing.assert_close(toy.unpack(packed), images)


def test_tokenizer_maps_every_world_word_and_flags_unknown_words(fresh_toy):
    _, text = fresh_toy
    ids = text.tokenize(["a striped red circle on a dark background", "a plaid unicorn", ""])
    assert ids[0, 0] == 2 and (ids[0, 1:9] > 2).all() and (ids[0, 9:] == 0).all()
    assert (ids[1, 2:4] == 1).all()  # unknown words
    assert ids[2, 0] == 2 and (ids[2, 1:] == 0).all()  # the empty prompt: start token only


def test_toy_sites_match_the_meta_inventory(fresh_toy):
    transformer, text = fresh_toy
    gen = toy.ToyGenerator(transformer, text)
    assert [(s.name, s.size) for s in gen.mask_sites()] == [(s.name, s.size) for s in mask_sites("toy")]


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_unrolled_backprop_with_and_without_guidance(fresh_toy, random_logits, guidance):
    transformer, text = fresh_toy
    gen = toy.ToyGenerator(transformer, text, guidance=guidance)
    cond = gen.encode(["a red circle", "a blue bar"])
    assert (cond.uncond_embeds is None) == (guidance == 1.0)
    sites = gen.mask_sites()
    masks = Masks(sites, random_logits(sites), "sigmoid")
    grads = []
    for checkpointing in (False, True):
        for lam in masks.logits.values():
            lam.grad = None
        with MaskHooks(gen.transformer, sites, masks.values(training=True)):
            final = sample(lambda x, s: gen.velocity(x, s, cond), gen.noise([1, 2]), gen.sigmas(4), checkpointing)
            final.square().mean().backward()
        grads.append(torch.cat([masks.logits[s.name].grad for s in sites]))
    assert grads[0].norm() > 0
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()) < 1e-5
    images = gen.decode(final.detach())
    assert images.shape == (2, 3, 16, 16)


def test_detector_predicts_every_attribute():
    detector = toy.ToyDetector().eval()
    found = detector.predict(torch.rand(3, 3, 16, 16))
    assert len(found) == 3 and set(found[0]) == {"object", "colour", "style", "background"}


def test_recipe_maps_a_toy_colour_or_style_onto_its_prompt_without_the_word_and_an_object_onto_the_others():
    from erase.pipelines import recipe_defaults
    from erase.prompts import substitute

    # masks only remove, and with the masked units removed the generator draws the default look:
    # an object maps onto the other objects (AGE), never onto the empty background it cannot reach
    assert recipe_defaults("toy", "cross")["target"] == "adaptive"
    assert recipe_defaults("toy", "cross")["beta"] == toy.BETA_BY_ATTRIBUTE["object"]
    assert recipe_defaults("toy", "striped")["beta"] == toy.RECIPE_DEFAULTS["beta"]
    blue = recipe_defaults("toy", "blue")
    assert blue["target"] == "substitute" and blue["beta"] == toy.BETA_BY_ATTRIBUTE["colour"]
    assert substitute("a striped blue circle", blue["substitutions"]) == "a striped circle"
    striped = recipe_defaults("toy", "striped")["substitutions"]  # every phrasing: erasure trains on them all
    assert striped == {"striped": "", "banded": "", "lined": "", "zebra-patterned": "", "stripe-filled": ""}
    assert substitute("a zebra-patterned red circle", striped) == "a red circle"
    assert recipe_defaults("flux.1-schnell", "nudity") == {}  # FLUX.1 takes TrainConfig's own: the paper's


def test_toy_prompt_reaches_the_transformer_through_its_tokens_only(fresh_toy):
    gen = toy.ToyGenerator(*fresh_toy)
    cond = gen.encode(["a blue circle", "a red square"])
    assert torch.count_nonzero(cond.pooled) == 0
    assert not torch.allclose(cond.prompt_embeds[0], cond.prompt_embeds[1])


def test_a_frozen_text_encoder_keeps_its_initialisation_while_the_generator_learns():
    from erase.toy_train import train_generator

    config = dict(toy.TRANSFORMER_CONFIG, num_layers=1, num_single_layers=0)
    start_transformer, start_text = toy.build_models(0, config)
    transformer, text = train_generator(0, steps=3, batch=4, progress=False, transformer_config=config,
                                        text_encoder="frozen")
    assert all(torch.equal(p, start_text.state_dict()[k]) for k, p in text.state_dict().items())
    assert not all(torch.equal(p, start_transformer.state_dict()[k]) for k, p in transformer.state_dict().items())
    _, joint_text = train_generator(0, steps=3, batch=4, progress=False, transformer_config=config, text_encoder="joint")
    assert not all(torch.equal(p, start_text.state_dict()[k]) for k, p in joint_text.state_dict().items())
    with pytest.raises(ValueError, match="text_encoder"):
        train_generator(0, steps=1, batch=2, progress=False, transformer_config=config, text_encoder="thawed")


def test_retrained_weights_load_with_the_architecture_they_were_trained_with(tmp_path):
    from erase import toy_train

    toy_train.main(["--out", str(tmp_path), "--detector-from", toy.WEIGHTS_DIR, "--generator-steps", "2", "--batch", "4",
                    "--dual-blocks", "1", "--single-blocks", "1", "--text-encoder", "frozen", "--guidances", "1.0",
                    "--threads", "1"])
    transformer_config, _ = toy.architecture(str(tmp_path))
    assert (transformer_config["num_layers"], transformer_config["num_single_layers"]) == (1, 1)
    gen = toy.load(str(tmp_path))
    assert len(gen.transformer.transformer_blocks) == 1 and len(gen.transformer.single_transformer_blocks) == 1
    command = toy.json.load(open(tmp_path / "figures.json"))["command"]
    assert "--text-encoder frozen" in command and f"--detector-from {toy.WEIGHTS_DIR}" in command
    # a folder without config.json is the module's constants (weights from before the file existed)
    assert toy.architecture(str(tmp_path / "elsewhere"))[0] == toy.TRANSFORMER_CONFIG


def test_a_variant_without_dual_blocks_is_refused_before_any_training(tmp_path, capsys):
    from erase import toy_train

    with pytest.raises(SystemExit) as exit_info:
        toy_train.main(["--out", str(tmp_path / "v"), "--dual-blocks", "0"])
    assert exit_info.value.code == 2 and "--dual-blocks must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_removal_steps_train_with_the_default_sites_removed_toward_the_default_look():
    from erase.toy_train import default_look_batch, train_generator

    detector = toy.load_detector()
    looks = detector.predict(default_look_batch(np.random.default_rng(0), 24))
    assert {(f["colour"], f["style"]) for f in looks} == {(world.DEFAULT_COLOUR, world.DEFAULT_STYLE)}
    assert len({f["object"] for f in looks}) >= 3  # any object: the object is not heard either

    config = dict(toy.TRANSFORMER_CONFIG, num_layers=1, num_single_layers=1)
    start, _ = toy.build_models(0, config)
    producer = "transformer_blocks.0.ff_context.net.0.proj.weight"  # feeds a masked FFN site only
    single = "single_transformer_blocks.0.proj_mlp.weight"  # outside every default site

    def change(transformer, name):
        return float((transformer.state_dict()[name] - start.state_dict()[name]).abs().max())

    # every step a removal step: no gradient reaches the removed units' producer (weight decay
    # alone moves it, by far less than Adam's steps move the rest)
    removed_only, _ = train_generator(0, steps=3, batch=4, progress=False, transformer_config=config,
                                      text_encoder="frozen", removal_every=1)
    ordinary, _ = train_generator(0, steps=3, batch=4, progress=False, transformer_config=config, text_encoder="frozen")
    assert change(removed_only, producer) < 1e-4 < change(removed_only, single)
    assert change(ordinary, producer) > 1e-4
    with pytest.raises(ValueError, match="removal_every"):
        train_generator(0, steps=1, batch=2, progress=False, transformer_config=config, removal_every=-1)
