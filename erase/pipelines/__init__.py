"""Generators behind one small interface, and where their mask sites are.

A generator adapter gives the method exactly what it needs and nothing more:

    gen.encode(prompts)            -> conditioning for a batch of prompts (frozen text encoders)
    gen.noise(seeds)               -> starting latents x_T, one per seed, deterministic on any device
    gen.sigmas(num_steps)          -> the scheduler's noise levels, num_steps + 1 values ending at 0
    gen.velocity(x, sigma, cond)   -> the transformer's velocity prediction (fp32 out)
    gen.decode(latents)            -> images, float in [0, 1], shape (B, 3, H, W)
    gen.mask_sites()               -> the MaskSite list of its transformer
    gen.transformer                -> the module the masks hook into
    gen.model_id, gen.default_steps

Adding a model means adding one file here and one entry in `MODELS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erase.errors import EraseError


class ModelError(EraseError):
    """A model name, path or config the user gave cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Tap:
    """Where a mask multiplies activations: the input or output channels of one nn.Linear.

    Channels `offset + i * repeat + r` for r < repeat carry mask entry i (repeat > 1 for
    attention heads, where one entry covers a head's `head_dim` channels).
    """

    module: str  # dotted path inside the transformer, e.g. "transformer_blocks.0.ff.net.2"
    side: str  # "input": mask the Linear's input channels; "output": its output channels
    offset: int = 0
    repeat: int = 1


@dataclass(frozen=True)
class MaskSite:
    """One mask: `size` entries, applied at every tap (one head mask taps both attention streams)."""

    name: str  # unique, e.g. "ffn.transformer_blocks.0.ff"
    group: str  # "ffn", "norm" or "attn"
    size: int
    taps: tuple[Tap, ...]
    # For FFN sites: the Linear whose output rows produce the masked hidden units, so that
    # masked neurons can be physically removed (both that Linear's rows and the taps' columns).
    producer: str | None = None


SITE_GROUPS = ("ffn", "norm", "attn")

# name -> (module that builds it, description). Real checkpoints load weights; random configs
# are for tests and benchmarks (random weights, nothing to download).
MODELS = {
    "toy": "the toy world that ships with the project: 16x16 shapes, trained weights included (the default)",
    "flux.1-schnell": "FLUX.1-schnell (12B, 4 steps, guidance-free); weights from the hub or --model-path",
    "flux.1-dev": "FLUX.1-dev (12B, guidance-distilled); weights from the hub or --model-path",
    "flux-tiny": "FLUX.1 architecture, tiny random config (tests)",
    "flux-bench": "FLUX.1 architecture, ~20M-parameter random config (benchmarks)",
}


def recipe_defaults(model: str, concept: str | None = None) -> dict:
    """Recipe settings that differ by model: the paper's (Table 6) for FLUX.1, the toy world's own.

    The toy world's loss has another scale than FLUX.1's latents (pixels in [-1, 1], objects
    covering a quarter of the image), so the paper's β = 0.01 lets the erase term wipe out every
    object; its default was chosen from measured runs (pipelines/toy.py). A toy colour or style
    maps onto its prompt with the word dropped (the reference code's 'de-conceptualised' prompt),
    which the world draws in its default look (grey, solid): masks can only remove, and removing
    a colour leaves that look, not the empty background the `empty` target asks for.
    """
    _check_name(model)
    if model == "toy":
        from erase.pipelines import toy_world
        from erase.pipelines.toy import RECIPE_DEFAULTS

        defaults = dict(RECIPE_DEFAULTS)
        if concept in toy_world.all_concepts() and toy_world.attribute_of(concept) in ("colour", "style"):
            defaults.update(target="substitute", substitutions={concept: ""})
        return defaults
    return {"beta": 0.01}


def _check_name(model: str) -> None:
    if model not in MODELS:
        known = ", ".join(MODELS)
        raise ModelError(f"unknown model {model!r}; known models: {known}")


def load_generator(model: str, model_path: str | None = None, *, dtype: str = "fp32", device: str = "cpu",
                   guidance: float | None = None):
    """Build the generator `model` (a name from MODELS), with weights from `model_path` if given.

    `guidance`: classifier-free guidance scale for the toy world, embedded guidance for
    FLUX.1-dev; None keeps the model's default.
    """
    _check_name(model)
    from erase.pipelines import flux

    if model == "toy":
        from erase.pipelines import toy

        if dtype not in flux.DTYPES:
            raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(flux.DTYPES)}")
        return toy.load(model_path, guidance=guidance, device=device, dtype=flux.DTYPES[dtype])
    return flux.load(model, model_path, dtype=dtype, device=device, guidance=guidance)


def meta_transformer(model: str):
    """The model's transformer built on the meta device: its structure, no weights, no memory."""
    _check_name(model)
    from erase.pipelines import flux

    if model == "toy":
        from diffusers import FluxTransformer2DModel

        from erase.pipelines.toy import TRANSFORMER_CONFIG

        with torch.device("meta"):
            return FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    return flux.meta_transformer(model)


def mask_sites(model: str):
    """The mask sites of `model`, read off its architecture without loading weights."""
    from erase.pipelines import flux

    return flux.flux_mask_sites(meta_transformer(model))
