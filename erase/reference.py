"""Import masks saved by the paper's public code into the project's mask file.

That code saves FLUX.1 masks as three PyTorch files, each a list of per-layer λ tensors:
  ff.pt    38 x 12,288  hidden units of `ff` and `ff_context`, alternating, per dual-stream block
  norm.pt  19 x 18,432  output of `norm1_context.linear` per dual-stream block
  attn.pt  57 x 24      heads: the 19 dual-stream blocks, then the 38 single-stream blocks
This is exactly the order of `erase.pipelines.flux.flux_mask_sites`. Files are read with
`torch.load(weights_only=True)`: tensors only, never arbitrary pickled objects.
"""

from __future__ import annotations

import os

import torch

from erase.masks import MaskError, Masks

REFERENCE_FILES = {"ffn": "ff.pt", "norm": "norm.pt", "attn": "attn.pt"}


def read_reference_masks(folder: str, model_sites) -> Masks:
    if not os.path.isdir(folder):
        raise MaskError(f"{folder!r} is not a directory; pass the folder that holds ff.pt, norm.pt and attn.pt")
    found = {g: os.path.join(folder, f) for g, f in REFERENCE_FILES.items() if os.path.isfile(os.path.join(folder, f))}
    if not found:
        raise MaskError(f"{folder!r} holds none of {', '.join(REFERENCE_FILES.values())}")
    logits, sites = {}, []
    for group, path in found.items():
        try:
            layers = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # the weights-only unpickler refuses anything but tensors and containers
            raise MaskError(f"{path}: not a plain list of tensors (loaded with weights_only=True): {err}") from None
        group_sites = [s for s in model_sites if s.group == group]
        if not isinstance(layers, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in layers):
            raise MaskError(f"{path}: expected a list of per-layer tensors, got {type(layers).__name__}")
        if len(layers) != len(group_sites):
            raise MaskError(f"{path}: {len(layers)} layers, but the model has {len(group_sites)} {group} sites")
        for site, tensor in zip(group_sites, layers):
            if tensor.numel() != site.size:
                raise MaskError(f"{path}: layer for {site.name} has {tensor.numel()} entries, the site has {site.size}")
            logits[site.name] = tensor.detach().reshape(-1).float()
            sites.append(site)
    return Masks(sites, logits, "hard_concrete")
