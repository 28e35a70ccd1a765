"""Masks, hooks, binarisation, folding into weights, and the mask file."""

import copy

import pytest
import torch

from erase.masks import (
    MaskError,
    MaskHooks,
    Masks,
    binarize,
    drop_masked_neurons,
    fingerprint,
    fold_into_weights,
    load_mask_file,
    save_mask_file,
    select_sites,
    sparsity,
)
from erase.sampler import sample


def _run(gen, transformer=None, prompt="a yellow star", seed=3, steps=2):
    transformer = transformer or gen.transformer
    cond = gen.encode([prompt])
    saved, gen.transformer = gen.transformer, transformer
    try:
        with torch.no_grad():
            return sample(lambda x, s: gen.velocity(x, s, cond), gen.noise([seed]), gen.sigmas(steps))
    finally:
        gen.transformer = saved


def test_all_ones_mask_is_bit_identical(tiny):
    sites = tiny.mask_sites()
    before = _run(tiny)
    ones = {s.name: torch.ones(s.size) for s in sites}
    with MaskHooks(tiny.transformer, sites, ones):
        masked = _run(tiny)
    assert torch.equal(before, masked)


def test_hooks_leave_the_model_exactly_as_it_was(tiny, random_logits):
    sites = tiny.mask_sites()
    state = {k: v.clone() for k, v in tiny.transformer.state_dict().items()}
    before = _run(tiny)
    values = Masks(sites, random_logits(sites)).values(training=False)
    with MaskHooks(tiny.transformer, sites, values):
        masked = _run(tiny)
    assert not torch.equal(before, masked), "random masks should change the output"
    after = _run(tiny)
    assert torch.equal(before, after)
    for name, module in tiny.transformer.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {name}"
    for k, v in tiny.transformer.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_folded_binary_masks_equal_hooked(tiny, random_logits):
    sites = tiny.mask_sites()
    binary = binarize(random_logits(sites, seed=1))
    assert 0 < sparsity(sites, binary)["overall"] < 1
    with MaskHooks(tiny.transformer, sites, binary):
        hooked = _run(tiny)
    folded_model = copy.deepcopy(tiny.transformer)
    fold_into_weights(folded_model, sites, binary)
    folded = _run(tiny, folded_model)
    torch.testing.assert_close(folded, hooked, rtol=1e-5, atol=1e-5)  # fp32 tolerance
    assert not torch.equal(folded, _run(tiny))


def test_several_masks_fold_as_their_product(tiny, random_logits):
    """Two concepts' masks at once: folding their product equals hooking both, and removes the union."""
    from erase.masks import combine_binary

    sites = tiny.mask_sites()
    ffn_sites = [s for s in sites if s.group == "ffn"]
    first = binarize(random_logits(sites, seed=3))
    second = binarize(random_logits(ffn_sites, seed=4))  # covers fewer sites: the rest count as kept
    combined_sites, combined = combine_binary([(sites, first), (ffn_sites, second)])
    for s in ffn_sites:
        assert torch.equal(combined[s.name], first[s.name] * second[s.name])
    removed = sum(int((v == 0).sum()) for v in combined.values())
    assert removed > sum(int((v == 0).sum()) for v in first.values())
    with MaskHooks(tiny.transformer, sites, first), MaskHooks(tiny.transformer, ffn_sites, second):
        both_hooked = _run(tiny)
    folded_model = copy.deepcopy(tiny.transformer)
    fold_into_weights(folded_model, combined_sites, combined)
    torch.testing.assert_close(_run(tiny, folded_model), both_hooked, rtol=1e-5, atol=1e-5)


def test_dropping_masked_ffn_neurons_equals_hooked_and_shrinks(tiny, random_logits):
    sites = tiny.mask_sites()
    binary = binarize(random_logits(sites, seed=2))
    with MaskHooks(tiny.transformer, sites, binary):
        hooked = _run(tiny)
    pruned = copy.deepcopy(tiny.transformer)
    dropped = drop_masked_neurons(pruned, sites, binary)
    expected = sum(int((binary[s.name] == 0).sum()) for s in sites if s.group == "ffn")
    assert dropped == expected > 0
    n_before = sum(p.numel() for p in tiny.transformer.parameters())
    n_after = sum(p.numel() for p in pruned.parameters())
    hidden = tiny.transformer.config.num_attention_heads * tiny.transformer.config.attention_head_dim
    assert n_before - n_after == dropped * (2 * hidden + 1)  # a row + bias of the producer, a column of the output
    torch.testing.assert_close(_run(tiny, pruned), hooked, rtol=1e-5, atol=1e-5)


def test_fold_refuses_non_binary_masks(tiny):
    sites = tiny.mask_sites()[:1]
    with pytest.raises(MaskError, match="not binary"):
        fold_into_weights(copy.deepcopy(tiny.transformer), sites, {sites[0].name: torch.full((sites[0].size,), 0.5)})


def test_parametrisations():
    from erase.pipelines import MaskSite, Tap

    site = MaskSite("ffn.x", "ffn", 5, (Tap("x", "input"),))
    lam = torch.tensor([-4.0, -0.5, 0.0, 0.5, 3.0])
    hc = Masks([site], {"ffn.x": lam}, "hard_concrete")
    det = hc.values(training=False)["ffn.x"]
    assert det[-1] == 1.0 and det[0] == 0.0  # stretched and clamped: exact 0 and 1 are reachable
    noisy = hc.values(training=True, generator=torch.Generator().manual_seed(0))["ffn.x"]
    assert ((noisy >= 0) & (noisy <= 1)).all()
    sig = Masks([site], {"ffn.x": lam}, "sigmoid").values(training=True)["ffn.x"]
    torch.testing.assert_close(sig, torch.sigmoid(lam))
    binm = Masks([site], {"ffn.x": lam}, "binary")
    values = binm.values(training=True)["ffn.x"]
    assert values.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    values.sum().backward()
    assert (binm.logits["ffn.x"].grad > 0).all()  # straight-through gradient
    with pytest.raises(MaskError, match="unknown parametrisation"):
        Masks([site], {"ffn.x": lam}, "gumbel")


def test_binarize_scopes():
    logits = {"a": torch.tensor([3.0, -1.0, 2.0, 0.5]), "b": torch.tensor([-3.0, -2.0])}
    assert binarize(logits)["a"].tolist() == [1, 0, 1, 1]
    assert binarize(logits, threshold=1.0)["a"].tolist() == [1, 0, 1, 0]
    per_site = binarize(logits, scope="site", keep=0.5)
    assert per_site["a"].tolist() == [1, 0, 1, 0] and per_site["b"].tolist() == [0, 1]
    glob = binarize(logits, scope="global", keep=0.5)
    assert glob["a"].tolist() == [1, 0, 1, 1] and glob["b"].tolist() == [0, 0]
    with pytest.raises(MaskError, match="keep fraction"):
        binarize(logits, scope="global")


def test_sparsity_per_site_group_and_overall(tiny):
    sites = [s for s in tiny.mask_sites() if s.group in ("ffn", "norm")]
    binary = {s.name: torch.ones(s.size) for s in sites}
    binary[sites[0].name][:16] = 0
    report = sparsity(sites, binary)
    total = sum(s.size for s in sites)
    assert report["removed"] == 16 and report["entries"] == total
    assert report["overall"] == pytest.approx(16 / total)
    assert report["sites"][sites[0].name] == pytest.approx(16 / sites[0].size)
    assert report["groups"]["norm"] == 0


def test_select_sites_rejects_unknown_group(tiny):
    with pytest.raises(MaskError, match="'mlp' does not exist"):
        select_sites(tiny.mask_sites(), ["ffn", "mlp"])


def test_bf16_model_keeps_fp32_logits_and_gradients(random_logits):
    from erase.pipelines import load_generator

    gen = load_generator("flux-tiny", dtype="bf16")
    sites = gen.mask_sites()
    masks = Masks(sites, random_logits(sites))
    cond = gen.encode(["a cat"])
    with MaskHooks(gen.transformer, sites, masks.values(training=True)):
        final = sample(lambda x, s: gen.velocity(x, s, cond), gen.noise([0]), gen.sigmas(2))
        final.square().mean().backward()
    assert next(gen.transformer.parameters()).dtype == torch.bfloat16
    for lam in masks.logits.values():
        assert lam.dtype == torch.float32 and lam.grad.dtype == torch.float32
    assert any(lam.grad.abs().sum() > 0 for lam in masks.logits.values())


def test_mask_file_round_trips_exactly(tmp_path, tiny, random_logits):
    sites = tiny.mask_sites()
    masks = Masks(sites, random_logits(sites), "sigmoid")
    path = str(tmp_path / "m.safetensors")
    save_mask_file(path, masks, model_id="flux-tiny", model_sites=sites, concept="cat", threshold=0.25)
    loaded, meta = load_mask_file(path, sites, "flux-tiny")
    assert [s.name for s in loaded.sites] == [s.name for s in sites]
    for name in masks.logits:
        assert torch.equal(loaded.logits[name], masks.logits[name])
    assert meta["concept"] == "cat" and meta["parametrisation"] == "sigmoid" and float(meta["threshold"]) == 0.25
    assert meta["fingerprint"] == fingerprint(sites)
    with open(path, "rb") as f:
        assert b"pickle" not in f.read(64)


def test_mask_file_for_another_architecture_is_refused(tmp_path, tiny):
    from erase.pipelines import mask_sites

    sites = tiny.mask_sites()
    path = str(tmp_path / "m.safetensors")
    save_mask_file(path, Masks.create(sites), model_id="flux-tiny", model_sites=sites, concept="cat")
    schnell = mask_sites("flux.1-schnell")
    with pytest.raises(MaskError) as err:
        load_mask_file(path, schnell, "flux.1-schnell")
    text = str(err.value)
    assert "flux-tiny" in text and "flux.1-schnell" in text
    assert fingerprint(sites) in text and fingerprint(schnell) in text


def test_non_mask_files_are_refused(tmp_path, tiny):
    from safetensors.torch import save_file

    plain = str(tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(3)}, plain)
    with pytest.raises(MaskError, match="not an erase mask file"):
        load_mask_file(plain, tiny.mask_sites())
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 20)
    with pytest.raises(MaskError, match="not a readable"):
        load_mask_file(str(junk), tiny.mask_sites())
    with pytest.raises(MaskError, match="does not exist"):
        load_mask_file(str(tmp_path / "missing.safetensors"), tiny.mask_sites())
