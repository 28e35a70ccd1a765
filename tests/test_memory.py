"""What makes a FLUX.1 step fit in memory computes the same mask gradients as the plain computation (fp32)."""

import pytest
import torch

from erase.config import TrainConfig
from erase.train import train

CAT, NEUTRAL = ["a photo of a cat", "a cat on a sofa"], ["a bowl of fruit", "a red car"]
TOLERANCE = 1e-5  # relative error of the mask gradients, fp32


def first_step_gradients(gen, **settings) -> torch.Tensor:
    """The mask logits' gradient of one optimisation step, read back from Adam's first moment (0.1 x it)."""
    cfg = TrainConfig(concept="cat", **{"steps": 1, "batch_size": 2, "log_every": 1, "sampling_steps": 3,
                                        "parametrisation": "sigmoid", "init_logit": 0.5, **settings})
    states = []
    train(gen, cfg, CAT, NEUTRAL, progress=False, on_log=lambda row, state: states.append(state.resume_point()))
    moments = states[-1]["optimizer"]["state"]
    return torch.cat([moments[i]["exp_avg"].flatten() for i in sorted(moments)])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def plain_gradients(gen, beta: float = 0.01) -> torch.Tensor:
    """The same first step written out plainly: one batch, both terms in one loss, one backward, no
    checkpoint of any kind, and the empty prompt's output as the target."""
    from erase.masks import MaskHooks, select_sites
    from erase.sampler import sample
    from erase.train import cycle_batches, first_seeds, prompt_rows

    cfg = TrainConfig(concept="cat", batch_size=2)
    erase_first, neutral_first = first_seeds(cfg)
    e_prompts, e_seeds = next(cycle_batches(prompt_rows(CAT, erase_first), 2, cfg.seed))
    n_prompts, n_seeds = next(cycle_batches(prompt_rows(NEUTRAL, neutral_first), 2, cfg.seed + 1))
    sites = select_sites(gen.mask_sites(), ("ffn", "norm"))
    logits = {s.name: torch.full((s.size,), 0.5, requires_grad=True) for s in sites}
    sigmas = gen.sigmas(3)
    with MaskHooks(gen.transformer, sites) as hooks:
        def final(prompts, seeds, values):
            cond = gen.encode(prompts)
            hooks.values = values
            return sample(lambda x, s: gen.velocity(x, s, cond), gen.noise(seeds), sigmas, checkpointing=False)

        with torch.no_grad():
            erase_target, neutral_target = final([""] * 2, e_seeds, {}), final(n_prompts, n_seeds, {})
        values = {name: torch.sigmoid(lam) for name, lam in logits.items()}
        loss = (torch.mean((final(e_prompts, e_seeds, values) - erase_target) ** 2)
                + beta * torch.mean((final(n_prompts, n_seeds, values) - neutral_target) ** 2))
        loss.backward()
    by_group = [s.name for s in sites if s.group == "ffn"] + [s.name for s in sites if s.group == "norm"]
    return torch.cat([logits[name].grad for name in by_group]) * 0.1  # as Adam's first moment after one step


@pytest.mark.parametrize("settings", [
    dict(checkpointing=False),  # each term on its own, the whole batch at once
    dict(micro_batch=1),  # and a sample at a time, step-wise checkpointed
    dict(micro_batch=1, block_checkpointing=True),  # and every block checkpointed too
])
def test_the_recipes_step_gives_the_gradients_of_the_plain_computation(tiny, settings):
    plain = plain_gradients(tiny)
    assert plain.abs().sum() > 0
    assert relative_error(first_step_gradients(tiny, **settings), plain) < TOLERANCE


@pytest.mark.parametrize("checkpointing", [False, True])
def test_per_block_checkpointing_gives_the_plain_gradients(tiny, checkpointing):
    plain = first_step_gradients(tiny, checkpointing=False)
    assert plain.abs().sum() > 0, "no gradient: the comparison would be vacuous"
    blocks = first_step_gradients(tiny, checkpointing=checkpointing, block_checkpointing=True)
    assert relative_error(blocks, plain) < TOLERANCE
    assert not tiny.transformer.gradient_checkpointing  # switched off again with the hooks


def test_per_block_checkpointing_recomputes_blocks_with_their_masks(tiny):
    # a recomputed block without its masks would give other gradients: the masks must count
    from erase.masks import MaskHooks

    sites = tiny.mask_sites()
    logits = {s.name: torch.full((s.size,), 0.3, requires_grad=True) for s in sites}
    cond, sigmas = tiny.encode(CAT[:1]), tiny.sigmas(2)
    from erase.sampler import sample

    grads = []
    for blocks in (False, True):
        with MaskHooks(tiny.transformer, sites, checkpoint_blocks=blocks) as hooks:
            values = {k: torch.sigmoid(v) for k, v in logits.items()}

            def velocity(x, sigma):
                with hooks.using(values):
                    return tiny.velocity(x, sigma, cond)

            final = sample(velocity, tiny.noise([1]), sigmas, checkpointing=False)
            (gradient,) = torch.autograd.grad(final.square().mean(), [logits[sites[0].name]])
            grads.append(gradient)
    assert grads[0].abs().sum() > 0 and relative_error(grads[1], grads[0]) < TOLERANCE


def test_cached_encodings_are_the_encoders_own(tiny):
    from erase.train import EncodingCache

    cache = EncodingCache(tiny)
    cache(["a bowl of fruit", "a red car"])
    mixed = cache(["a red car", "a photo of a cat", "a red car"])  # one prompt new, two cached, one twice
    fresh = tiny.encode(["a red car", "a photo of a cat", "a red car"])
    for field in ("prompt_embeds", "pooled", "text_ids"):
        torch.testing.assert_close(getattr(mixed, field), getattr(fresh, field), rtol=1e-6, atol=1e-6)
    assert set(cache.rows) == {"a bowl of fruit", "a red car", "a photo of a cat"}


@pytest.mark.parametrize("settings", [
    dict(checkpointing=True),  # every step recomputed: it must redraw the noise of its forward
    dict(checkpointing=True, block_checkpointing=True),  # and every block within each step
])
def test_mask_noise_per_hook_call_is_redrawn_alike_when_recomputed(tiny, settings):
    noisy = {"parametrisation": "hard_concrete", "init_logit": 0.5, "mask_noise": "per_call"}
    plain = first_step_gradients(tiny, checkpointing=False, **noisy)
    assert plain.abs().sum() > 0
    assert relative_error(first_step_gradients(tiny, **settings, **noisy), plain) < TOLERANCE
    # not vacuous: one draw per step is another gradient
    assert relative_error(first_step_gradients(tiny, **settings, **{**noisy, "mask_noise": "per_step"}), plain) > 1e-3
