"""Masks for serving code: fold registered masks (or mask files) into a model the caller loaded.

    import torch, erase
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-schnell", dtype=torch.bfloat16).to("cuda")
    done = erase.apply_masks(pipe, "models:/erase-flux.1-schnell-nudity@production")
    image = pipe("a photo of a beach").images[0]

`apply_masks` takes a diffusers FLUX pipeline, its `FluxTransformer2DModel`, or a generator of
this project (the toy world's included), and one or several masks: files, `models:/NAME@ALIAS`,
`models:/NAME/VERSION` or `runs:/ID`. Every mask is checked as `erase masks apply` checks it:
a registry or run mask's sha256 against the one recorded when it was logged, and every mask's
architecture fingerprint against the model's own mask sites. Several masks combine as in the
command: a unit stays only if every mask keeps it. The masks are folded into the weights in
place (zeroed rows and columns: any dtype, any device), or with `drop_neurons=True` the masked
FFN hidden units are cut out of the Linear layers, a smaller and faster transformer whose
outputs equal the folded one's (erase.masks.drop_masked_neurons); other mask groups are folded.
"""

from __future__ import annotations

from erase.errors import EraseError
from erase.masks import drop_masked_neurons, fingerprint, fold_into_weights
from erase.registry import load_masks
from erase.tracking import connect_for


def apply_masks(model, masks: str | list[str], *, drop_neurons: bool = False,
                tracking_uri: str | None = None) -> dict:
    """Fold `masks` into `model`'s transformer (in place); returns what was done: each mask's source,
    concept, registry version and sha256 (`masks`), the mask entries removed, the FFN neurons dropped,
    and the architecture fingerprint the masks were checked against.

    `tracking_uri`: where models:/ and runs:/ masks are (default: $MLFLOW_TRACKING_URI, else ./mlflow.db).
    """
    from diffusers import FluxTransformer2DModel

    from erase.pipelines.flux import flux_mask_sites

    transformer = getattr(model, "transformer", model)
    if not isinstance(transformer, FluxTransformer2DModel):
        raise EraseError(f"apply_masks takes a diffusers FLUX pipeline, its FluxTransformer2DModel or an erase "
                         f"generator; got {type(model).__name__}")
    refs = [masks] if isinstance(masks, str) else list(masks)
    if not refs:
        raise EraseError("apply_masks: no masks given; pass a file or a models:/ URI")
    sites = flux_mask_sites(transformer)
    connect_for(refs, tracking_uri)
    mask_sites, combined, applied = load_masks(refs, sites, f"the given {type(transformer).__name__}")
    removed = sum(int((mask == 0).sum()) for mask in combined.values())
    dropped = 0
    if drop_neurons:
        dropped = drop_masked_neurons(transformer, mask_sites, combined)
    else:
        fold_into_weights(transformer, mask_sites, combined)
    return {"masks": applied, "removed_entries": removed, "dropped_neurons": dropped,
            "fingerprint": fingerprint(sites)}
