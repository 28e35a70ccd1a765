"""The FlowEdit target: the edit itself on a flow whose velocities are known, and as a training target."""

import pytest
import torch

from erase.config import ConfigError, TrainConfig
from erase.flowedit import edit_start, flowedit
from erase.train import train


def point_mass_velocity(mean: torch.Tensor):
    """The exact velocity of a flow onto one image `mean`: x_t = (1 - t)·mean + t·ε, so v = ε - mean = (x - mean) / t."""
    return lambda x, sigma: (x - mean) / sigma


def noise_source(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    draws = {}

    def noise(step, k):
        if (step, k) not in draws:
            draws[step, k] = torch.randn(shape, generator=gen)
        return draws[step, k]

    return noise


@pytest.mark.parametrize("start", [0, 3, 6])
def test_an_edit_between_two_point_masses_lands_on_the_target_whatever_the_noise(start):
    source, target = torch.randn(2, 5), torch.randn(2, 5)
    sigmas = torch.linspace(1.0, 0.0, 9)
    edited = flowedit(point_mass_velocity(source), point_mass_velocity(target), source, sigmas, start=start,
                      noise=noise_source((2, 5)), average=2)
    # v_tar - v_src = (z_edit - target) / t: the Euler steps shrink z_edit - target by t_next / t, to 0 at t = 0
    assert torch.allclose(edited, target, atol=1e-5)
    assert not torch.allclose(source, target, atol=1e-2)


def test_an_edit_towards_the_same_prompt_is_the_source_itself():
    source = torch.randn(3, 4)
    same = point_mass_velocity(torch.randn(3, 4))  # any velocity: the two terms cancel
    edited = flowedit(same, same, source, torch.linspace(1.0, 0.0, 5), start=1, noise=noise_source((3, 4)))
    assert torch.allclose(edited, source, atol=1e-5)  # up to rounding: z_edit + (z_src - x_src) is not z_src bit for bit


def test_the_edit_starts_where_its_strength_says():
    assert edit_start(28, 24 / 28) == 4  # FlowEdit's FLUX.1 setting: the last 24 of 28 steps edited
    assert edit_start(4, 1.0) == 0 and edit_start(4, 0.01) == 3  # at least one step is edited


def test_the_edit_target_trains_with_one_edit_per_prompt_and_noise(tiny, monkeypatch):
    import erase.train as recipe

    calls = []
    real = recipe.flowedit

    def counting(*args, **kwargs):
        calls.append(args[2].shape[0])  # the batch of sources edited
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "flowedit", counting)
    cfg = TrainConfig(concept="cat", steps=3, batch_size=2, log_every=1, target="edit", substitutions={"cat": "dog"},
                      sampling_steps=2)
    result = train(tiny, cfg, ["a photo of a cat", "a cat on a sofa"], ["a bowl of fruit"], progress=False)
    assert sum(calls) == 2  # two (prompt, seed) pairs, each edited once over three steps
    assert result.history[-1]["erase_loss"] > 0


def test_the_edit_target_needs_a_substitution_and_a_model_of_the_same_latents(tiny):
    with pytest.raises(ConfigError, match="needs a map: pass --substitute OLD=NEW"):
        TrainConfig(concept="cat", target="edit").validate()
    from erase.pipelines import ModelError

    cfg = TrainConfig(concept="cat", steps=1, batch_size=1, target="edit", substitutions={"cat": "dog"},
                      edit_model="flux-bench")
    with pytest.raises(ModelError, match="must share the latent space"):
        train(tiny, cfg, ["a photo of a cat"], ["a bowl of fruit"], progress=False)


def test_on_the_toy_world_the_edit_drops_the_colour_and_keeps_more_of_the_source_than_its_prompt_alone():
    from erase.masks import MaskHooks
    from erase.pipelines import load_generator
    from erase.train import EditTargetCache, EncodingCache, TargetCache

    gen = load_generator("toy")
    cfg = TrainConfig(concept="red", target="edit", substitutions={"red ": ""})
    prompts, seeds = ["a red circle", "a red square", "a striped red cross", "a red bar"], [1, 2, 3, 4]
    with MaskHooks(gen.transformer, []) as hooks:
        encode = EncodingCache(gen)
        sources = TargetCache(gen, gen.sigmas(gen.default_steps), hooks, encode)
        source = sources.get(prompts, seeds)
        edited = EditTargetCache(sources, gen, encode, cfg).get(prompts, seeds)
        drawn_grey = sources.get(["a circle", "a square", "a striped cross", "a bar"], seeds)  # the target prompt alone

    def redness(latents):
        image = gen.decode(latents)
        return (image[:, 0] - image[:, 1:].max(dim=1).values).clamp(min=0).mean(dim=(1, 2))

    assert (redness(source) > 0.05).all() and (redness(edited) < 0.3 * redness(source)).all()
    assert (edited - source).abs().mean() < (drawn_grey - source).abs().mean()  # the layout is the source's
