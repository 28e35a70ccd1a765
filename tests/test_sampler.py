"""Step-wise checkpointed unrolled backprop gives the gradients of plain full backprop."""

import pytest
import torch

from erase.masks import MaskHooks, Masks
from erase.sampler import sample


def _mask_grads(gen, masks, prompts, seeds, sigmas, checkpointing):
    for lam in masks.logits.values():
        lam.grad = None
    cond = gen.encode(prompts)
    target = torch.zeros_like(gen.noise(seeds))
    with MaskHooks(gen.transformer, masks.sites) as hooks:
        hooks.values = masks.values(training=True, generator=torch.Generator().manual_seed(7))
        final = sample(lambda x, s: gen.velocity(x, s, cond), gen.noise(seeds), sigmas, checkpointing)
        loss = torch.mean((final - target) ** 2)
        loss.backward()
    return {k: v.grad.clone() for k, v in masks.logits.items()}, final.detach()


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_checkpointed_gradients_equal_full_backprop(tiny, random_logits, steps):
    sites = tiny.mask_sites()  # ffn, norm and attn
    masks = Masks(sites, random_logits(sites, seed=steps), "hard_concrete")
    sigmas = tiny.sigmas(steps)
    plain, out_plain = _mask_grads(tiny, masks, ["a red cat", "a blue house"], [1, 2], sigmas, checkpointing=False)
    ckpt, out_ckpt = _mask_grads(tiny, masks, ["a red cat", "a blue house"], [1, 2], sigmas, checkpointing=True)
    assert torch.equal(out_plain, out_ckpt)
    flat_plain = torch.cat([plain[k] for k in sorted(plain)])
    flat_ckpt = torch.cat([ckpt[k] for k in sorted(ckpt)])
    assert flat_plain.norm() > 0, "gradients vanished: the parity check would be vacuous"
    rel = ((flat_ckpt - flat_plain).norm() / flat_plain.norm()).item()
    assert rel < 1e-5, f"relative gradient error {rel:.2e} at {steps} steps"
    for group in ("ffn", "norm", "attn"):
        assert any(plain[s.name].abs().sum() > 0 for s in sites if s.group == group), f"no gradient reaches {group}"


def test_sampler_without_grad_matches_with_grad(tiny):
    cond = tiny.encode(["a green tree"])
    sigmas = tiny.sigmas(3)
    with torch.no_grad():
        a = sample(lambda x, s: tiny.velocity(x, s, cond), tiny.noise([5]), sigmas, checkpointing=True)
    b = sample(lambda x, s: tiny.velocity(x, s, cond), tiny.noise([5]), sigmas, checkpointing=True)
    assert torch.equal(a, b.detach())
