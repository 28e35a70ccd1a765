"""Masks over a frozen model's units: parametrisation, hooks, binarisation, folding, the mask file.

A mask site (erase.pipelines.MaskSite) names where a vector of `size` entries multiplies activations.
Each entry has a logit λ, always fp32 even when the model runs in bf16. λ = 3 means "keep"
(mask ≈ 1); training pushes the logits of units that carry the concept below 0.

Parametrisations (docs/method.md, section 3):
- hard_concrete: m = clamp(sigmoid((log(u+e) - log(1-u+e) + λ) / T) * 1.2 - 0.1, 0, 1), u ~ U(0,1)
  while training (e = 0.5, T = 0.83); without noise at evaluation.
- sigmoid: m = sigmoid(λ).
- binary: m = 1[λ > 0], trained with a straight-through sigmoid gradient.
At inference every mask is binary: λ > threshold, or the top `keep` fraction per site or globally.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from erase.errors import EraseError
from erase.pipelines import SITE_GROUPS, MaskSite

PARAMETRISATIONS = ("hard_concrete", "sigmoid", "binary")
BINARIZE_SCOPES = ("threshold", "site", "global")
HARD_CONCRETE_TEMPERATURE = 0.83
HARD_CONCRETE_NOISE_BOUND = 0.5
STRETCH_LOW, STRETCH_HIGH = -0.1, 1.1
FILE_FORMAT = "erase.mask/1"


class MaskError(EraseError):
    """A mask, site selection or mask file cannot be used; the message says what to do."""


def select_sites(sites: list[MaskSite], groups) -> list[MaskSite]:
    """The sites of the chosen groups, with a clear error for a group the model does not have."""
    groups = list(groups)
    if not groups:
        raise MaskError(f"no site groups selected; choose from {', '.join(SITE_GROUPS)}")
    present = sorted({s.group for s in sites})
    for group in groups:
        if group not in present:
            raise MaskError(f"site group {group!r} does not exist in this model; it has: {', '.join(present)}")
    return [s for s in sites if s.group in groups]


class Masks:
    """The trainable logits of a set of sites."""

    def __init__(self, sites: list[MaskSite], logits: dict[str, torch.Tensor], parametrisation: str = "hard_concrete"):
        if parametrisation not in PARAMETRISATIONS:
            raise MaskError(f"unknown parametrisation {parametrisation!r}; use one of {', '.join(PARAMETRISATIONS)}")
        self.sites = list(sites)
        self.parametrisation = parametrisation
        self.logits = {}
        for site in self.sites:
            value = logits[site.name]
            if value.shape != (site.size,):
                raise MaskError(f"logits for {site.name} have shape {tuple(value.shape)}, the site has {site.size} entries")
            self.logits[site.name] = torch.nn.Parameter(value.detach().to(torch.float32).clone())

    @classmethod
    def create(cls, sites: list[MaskSite], parametrisation: str = "hard_concrete", init: float = 3.0,
               device: str | torch.device = "cpu") -> "Masks":
        logits = {s.name: torch.full((s.size,), float(init), device=device) for s in sites}
        return cls(sites, logits, parametrisation)

    def by_group(self) -> dict[str, list[torch.nn.Parameter]]:
        groups: dict[str, list[torch.nn.Parameter]] = {}
        for site in self.sites:
            groups.setdefault(site.group, []).append(self.logits[site.name])
        return groups

    def values(self, training: bool, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Mask values in [0, 1] (fp32, differentiable in λ); noisy only for hard-concrete training."""
        return {name: self.value(name, training, generator) for name in self.logits}

    def value(self, name: str, training: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """One site's mask values; the noise comes from `generator`, or torch's global CPU generator."""
        lam = self.logits[name]
        if self.parametrisation == "hard_concrete":
            if training:
                u = torch.rand(lam.shape, generator=generator, device="cpu").to(lam.device)
                e = HARD_CONCRETE_NOISE_BOUND
                noise = torch.log(u + e) - torch.log(1 - u + e)
            else:
                noise = torch.zeros_like(lam)
            s = torch.sigmoid((noise + lam) / HARD_CONCRETE_TEMPERATURE)
            return (s * (STRETCH_HIGH - STRETCH_LOW) + STRETCH_LOW).clamp(0.0, 1.0)
        if self.parametrisation == "sigmoid":
            return torch.sigmoid(lam)
        soft = torch.sigmoid(lam)  # binary, straight-through: forward 1[λ > 0], backward d sigmoid
        return (lam > 0).to(lam.dtype) + soft - soft.detach()

    def density(self) -> torch.Tensor:
        """Smooth share of kept entries, mean of sigmoid(λ): the quantity sparsity penalties act on."""
        total = sum(torch.sigmoid(lam).sum() for lam in self.logits.values())
        return total / sum(lam.numel() for lam in self.logits.values())

    @torch.no_grad()
    def binary(self, threshold: float = 0.0, scope: str = "threshold", keep: float | None = None) -> dict[str, torch.Tensor]:
        return binarize({k: v.detach() for k, v in self.logits.items()}, threshold=threshold, scope=scope, keep=keep)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.logits.items()}

    @torch.no_grad()
    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        for k, v in snapshot.items():
            self.logits[k].copy_(v)

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(v).all()) for v in self.logits.values())


class NoisePerCall:
    """Mask values with hard-concrete noise drawn anew at every hook call (the reference code's way),
    for `MaskHooks.using`. The noise comes from torch's global CPU generator, which
    torch.utils.checkpoint restores before it recomputes a step or a block: a recomputation draws
    exactly the noise its forward drew, so the gradient is the one of the forward's masks."""

    def __init__(self, masks: Masks):
        self.masks = masks

    def get(self, name: str, default=None):
        return self.masks.value(name, training=True) if name in self.masks.logits else default


def binarize(logits: dict[str, torch.Tensor], threshold: float = 0.0, scope: str = "threshold",
             keep: float | None = None) -> dict[str, torch.Tensor]:
    """0/1 masks: λ > threshold, or the `keep` fraction of largest λ per site ("site") or overall ("global")."""
    if scope not in BINARIZE_SCOPES:
        raise MaskError(f"unknown binarisation scope {scope!r}; use one of {', '.join(BINARIZE_SCOPES)}")
    if scope == "threshold":
        return {k: (v > threshold).to(torch.float32) for k, v in logits.items()}
    if keep is None or not 0.0 < keep <= 1.0:
        raise MaskError(f"binarisation scope {scope!r} needs a keep fraction in (0, 1], got {keep}")
    if scope == "site":
        return {k: _top_fraction(v, keep) for k, v in logits.items()}
    flat = torch.cat([v.flatten() for v in logits.values()])
    kept = _top_fraction(flat, keep)
    out, start = {}, 0
    for k, v in logits.items():
        out[k] = kept[start:start + v.numel()].view_as(v)
        start += v.numel()
    return out


def _top_fraction(values: torch.Tensor, keep: float) -> torch.Tensor:
    n_keep = max(1, math.ceil(keep * values.numel()))
    mask = torch.zeros_like(values, dtype=torch.float32)
    mask[torch.topk(values, n_keep).indices] = 1.0
    return mask


def sparsity(sites: list[MaskSite], binary: dict[str, torch.Tensor]) -> dict:
    """Share of removed (zero) entries per site, per group and overall."""
    per_site, group_zero, group_total = {}, {}, {}
    for site in sites:
        mask = binary[site.name]
        zeros = int((mask == 0).sum())
        per_site[site.name] = zeros / site.size
        group_zero[site.group] = group_zero.get(site.group, 0) + zeros
        group_total[site.group] = group_total.get(site.group, 0) + site.size
    total = sum(group_total.values())
    return {
        "overall": sum(group_zero.values()) / total if total else 0.0,
        "removed": sum(group_zero.values()),
        "entries": total,
        "groups": {g: group_zero[g] / group_total[g] for g in group_total},
        "sites": per_site,
    }


class MaskHooks:
    """Forward hooks that multiply each site's taps by `self.values[site]`; a context manager.

    Removing them leaves the model exactly as it was: hooks never touch weights or buffers.
    Sites without a value pass activations through unchanged.
    """

    def __init__(self, transformer: torch.nn.Module, sites: list[MaskSite], values: dict[str, torch.Tensor] | None = None,
                 *, checkpoint_blocks: bool = False):
        """`checkpoint_blocks`: also checkpoint every transformer block (diffusers' gradient checkpointing),
        recomputed with the masks of its forward, until the hooks are removed."""
        self.values = dict(values or {})
        self.handles = []
        self.transformer, self.checkpoint_blocks = transformer, checkpoint_blocks
        if checkpoint_blocks:
            if not hasattr(transformer, "enable_gradient_checkpointing"):
                raise MaskError(f"{type(transformer).__name__} has no per-block gradient checkpointing: turn it off")
            transformer.enable_gradient_checkpointing(self.checkpoint_block)
        modules = dict(transformer.named_modules())
        for site in sites:
            for tap in site.taps:
                if tap.module not in modules:
                    self.remove()
                    raise MaskError(f"site {site.name} taps module {tap.module!r}, which this model does not have")
                module = modules[tap.module]
                if tap.side == "input":
                    hook = module.register_forward_pre_hook(partial(self._on_input, site.name, tap))
                else:
                    hook = module.register_forward_hook(partial(self._on_output, site.name, tap))
                self.handles.append(hook)

    @contextmanager
    def using(self, values: dict[str, torch.Tensor]):
        """Apply `values` inside the block only. Velocity functions enter this themselves, so that a
        checkpointed step recomputed during backward sees the same masks as its forward."""
        saved, self.values = self.values, values
        try:
            yield self
        finally:
            self.values = saved

    def recompute_context(self):
        """torch.utils.checkpoint's context_fn: nothing around the forward, and around the recomputation
        during backward the mask values of that forward, whatever the hooks hold by then."""
        return nullcontext(), self.using(self.values)

    def checkpoint_block(self, module: torch.nn.Module, *args):
        """A transformer block checkpointed with its masks: diffusers' gradient_checkpointing_func."""
        return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=self.recompute_context)

    def _scale(self, x: torch.Tensor, name: str, tap) -> torch.Tensor:
        mask = self.values.get(name)
        if mask is None:
            return x
        mask = mask.to(device=x.device, dtype=x.dtype)
        if tap.repeat > 1:
            mask = mask.repeat_interleave(tap.repeat)
        width = x.shape[-1]
        if tap.offset or mask.numel() != width:
            before = mask.new_ones(tap.offset)
            after = mask.new_ones(width - tap.offset - mask.numel())
            mask = torch.cat([before, mask, after])
        return x * mask

    def _on_input(self, name, tap, module, args):
        return (self._scale(args[0], name, tap),) + tuple(args[1:])

    def _on_output(self, name, tap, module, args, output):
        return self._scale(output, name, tap)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.checkpoint_blocks:
            self.transformer.disable_gradient_checkpointing()
            self.checkpoint_blocks = False

    def __enter__(self) -> "MaskHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def combine_binary(binaries: list[tuple[list[MaskSite], dict[str, torch.Tensor]]]) -> tuple[list[MaskSite], dict[str, torch.Tensor]]:
    """Several binary masks applied together (several concepts erased at once): an entry is kept only if
    every mask keeps it, i.e. the masks multiply and the removed sets unite. Sites missing from a mask
    count as all-kept for it."""
    sites: dict[str, MaskSite] = {}
    combined: dict[str, torch.Tensor] = {}
    for mask_sites, binary in binaries:
        for site in mask_sites:
            sites.setdefault(site.name, site)
            value = binary[site.name].to(torch.float32)
            combined[site.name] = combined[site.name] * value if site.name in combined else value.clone()
    return list(sites.values()), combined


def _masked_channels(tap, removed: torch.Tensor) -> torch.Tensor:
    """Channel indices of the tap's Linear that carry removed mask entries."""
    offsets = torch.arange(tap.repeat, device=removed.device)
    return (tap.offset + removed[:, None] * tap.repeat + offsets[None, :]).flatten()


def _check_binary(name: str, mask: torch.Tensor) -> None:
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise MaskError(f"mask {name} is not binary: binarise it (threshold or keep fraction) before folding")


@torch.no_grad()
def fold_into_weights(transformer: torch.nn.Module, sites: list[MaskSite], binary: dict[str, torch.Tensor]) -> None:
    """Zero the weights that removed entries feed (in place): no hooks, no inference cost.

    Input-side taps zero the Linear's columns; output-side taps zero its rows and bias entries.
    """
    modules = dict(transformer.named_modules())
    for site in sites:
        mask = binary[site.name]
        _check_binary(site.name, mask)
        removed = torch.nonzero(mask == 0).flatten()
        if removed.numel() == 0:
            continue
        for tap in site.taps:
            linear = modules[tap.module]
            channels = _masked_channels(tap, removed.to(linear.weight.device))
            if tap.side == "input":
                linear.weight[:, channels] = 0
            else:
                linear.weight[channels, :] = 0
                if linear.bias is not None:
                    linear.bias[channels] = 0


@torch.no_grad()
def drop_masked_neurons(transformer: torch.nn.Module, sites: list[MaskSite], binary: dict[str, torch.Tensor]) -> int:
    """Physically remove masked FFN hidden units (smaller, faster model); returns how many went.

    Only FFN sites (those with a `producer` Linear) shrink; other groups are folded instead.
    Afterwards the model has a different architecture fingerprint, by design.
    """
    modules = dict(transformer.named_modules())
    dropped = 0
    for site in sites:
        mask = binary[site.name]
        _check_binary(site.name, mask)
        if site.producer is None:
            fold_into_weights(transformer, [site], binary)
            continue
        kept = torch.nonzero(mask != 0).flatten()
        dropped += site.size - kept.numel()
        producer = modules[site.producer]
        kept = kept.to(producer.weight.device)
        _replace(transformer, site.producer, _slice_linear(producer, rows=kept))
        for tap in site.taps:
            _replace(transformer, tap.module, _slice_linear(modules[tap.module], cols=kept))
    return dropped


def _slice_linear(linear: torch.nn.Linear, rows=None, cols=None) -> torch.nn.Linear:
    weight = linear.weight
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = linear.bias
    if bias is not None and rows is not None:
        bias = bias[rows]
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    new.requires_grad_(linear.weight.requires_grad)
    return new


def _replace(root: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)


# ---------------------------------------------------------------- the mask file


def fingerprint(sites: list[MaskSite]) -> str:
    """Architecture fingerprint: a hash of every site's name, group and size, in order."""
    text = json.dumps([[s.name, s.group, s.size] for s in sites])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_mask_file(path: str, masks: Masks, *, model_id: str, model_sites: list[MaskSite], concept: str,
                   threshold: float = 0.0, scope: str = "threshold", keep: float | None = None,
                   extra: dict | None = None) -> dict:
    """Write λ of every site as safetensors with the metadata needed to check and use it; returns the metadata."""
    from safetensors.torch import save_file

    from erase import __version__

    binary = masks.binary(threshold=threshold, scope=scope, keep=keep)
    meta = {
        "format": FILE_FORMAT,
        "model_id": model_id,
        "fingerprint": fingerprint(model_sites),
        "concept": concept,
        "parametrisation": masks.parametrisation,
        "threshold": repr(float(threshold)),
        "scope": scope,
        "keep": "" if keep is None else repr(float(keep)),
        "groups": json.dumps(sorted({s.group for s in masks.sites})),
        "sparsity": json.dumps(sparsity(masks.sites, binary)),
        "erase_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "extra": json.dumps(extra or {}),
    }
    tensors = {name: lam.detach().to("cpu", torch.float32).contiguous() for name, lam in masks.logits.items()}
    save_file(tensors, path, metadata=meta)
    return meta


def read_mask_metadata(path: str) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise MaskError(f"mask file {path!r} does not exist") from None
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise MaskError(f"{path!r} is not a readable safetensors mask file: {err}") from None
    if meta.get("format") != FILE_FORMAT:
        raise MaskError(f"{path!r} is not an erase mask file (metadata format {meta.get('format')!r}, "
                        f"expected {FILE_FORMAT!r}); reference-code .pt masks convert with `erase masks import-reference`")
    return meta


def load_mask_file(path: str, model_sites: list[MaskSite], model_id: str = "the model") -> tuple[Masks, dict]:
    """Read a mask file (tensors only, no pickle) and check it was made for this architecture."""
    from safetensors.torch import load_file

    meta = read_mask_metadata(path)
    expected = fingerprint(model_sites)
    by_name = {s.name: s for s in model_sites}
    logits = load_file(path)
    if meta["fingerprint"] != expected:
        raise MaskError(
            f"mask file {path!r} was made for {meta['model_id']} (architecture {meta['fingerprint']}) but "
            f"{model_id} has architecture {expected}: {_first_difference(logits, by_name)}. "
            "Use a mask trained on this model.")
    sites = [by_name[name] for name in by_name if name in logits]
    return Masks(sites, logits, meta["parametrisation"]), meta


def _first_difference(logits: dict[str, torch.Tensor], by_name: dict[str, MaskSite]) -> str:
    for name, value in logits.items():
        if name not in by_name:
            return f"its site {name} does not exist in the model"
        if value.numel() != by_name[name].size:
            return f"site {name} has {value.numel()} entries in the file, {by_name[name].size} in the model"
    return "the site lists differ outside the masked sites"


def load_binary_masks(path: str, model_sites: list[MaskSite], model_id: str = "the model") -> tuple[tuple, dict]:
    """A mask file as inference uses it: ((sites, {site: 0/1}), metadata), binarised the way the file says."""
    masks, meta = load_mask_file(path, model_sites, model_id)
    keep = float(meta["keep"]) if meta.get("keep") else None
    binary = masks.binary(threshold=float(meta["threshold"]), scope=meta.get("scope", "threshold"), keep=keep)
    return (masks.sites, binary), meta


def site_summary(sites: list[MaskSite]) -> dict:
    """Masks and entries per group, and the architecture's fingerprint, for listing a model's sites."""
    groups = {}
    for s in sites:
        g = groups.setdefault(s.group, {"masks": 0, "entries": 0})
        g["masks"] += 1
        g["entries"] += s.size
    return {"fingerprint": fingerprint(sites), "groups": groups,
            "sites": [{"name": s.name, "group": s.group, "size": s.size} for s in sites]}
