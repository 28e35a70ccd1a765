"""Generators behind one small interface, and the registry of models.

A generator adapter gives the method exactly what it needs and nothing more:

    gen.encode(prompts, text_length=None)
                                   -> conditioning for a batch of prompts (frozen text encoders): a
                                      dataclass whose BATCHED fields have a row per prompt;
                                      `text_length` tokens per prompt where the encoder allows it
    gen.noise(seeds)               -> starting latents x_T, one per seed, deterministic on any device
    gen.sigmas(num_steps)          -> the scheduler's noise levels, num_steps + 1 values ending at 0
    gen.velocity(x, sigma, cond)   -> the transformer's velocity prediction (fp32 out)
    gen.decode(latents)            -> images, float in [0, 1], shape (B, 3, H, W)
    gen.mask_sites()               -> the MaskSite list of its transformer
    gen.transformer                -> the module the masks hook into
    gen.model_id, gen.default_steps, gen.guidance, gen.device
    gen.text_encoders_to(device)   -> optional: move the text encoders (training moves big ones off
                                      the accelerator once its prompts are encoded)

A model is one `ModelEntry`: how to load it, how to build its architecture without weights,
where its masks go, and what the rest of the project asks of a model by name (recipe defaults,
default prompt and evaluation sets, detector, candidate vocabulary). The built-in entries live
beside their code (`toy.ENTRY`, `flux.ENTRIES`): adding a model means one file here and one
line in `_builtin_entries`, or `register(entry)` from anywhere before the model is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from erase.errors import EraseError

DEFAULT_MODEL = "toy"  # the embedded default: the toy world, whose weights ship with the package
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SITE_GROUPS = ("ffn", "norm", "attn")


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


def _no_defaults(concept: str | None) -> dict:
    return {}


@dataclass(frozen=True)
class ModelEntry:
    """Everything the project needs to know about one model, by name.

    Evaluation sets are {kind: {concept: prompts}} with kinds "concept" (prompts naming the
    concept plainly), "rephrase" (naming it indirectly) and "neutral" (concept ""): see
    erase.evaluate for what each kind measures.
    """

    name: str
    description: str
    load: Callable[..., object]  # (model_path, *, dtype: torch.dtype, device, guidance) -> a generator
    meta_transformer: Callable[[], torch.nn.Module]  # its transformer on the meta device: structure, no weights
    mask_sites: Callable[[torch.nn.Module], list]  # a transformer -> its MaskSite list
    prompt_sets: Callable[[str], tuple[list[str], list[str]]]  # concept -> (concept prompts, neutral prompts)
    eval_sets: Callable[..., dict]  # (concept or None: every concept, split) -> evaluation sets
    # the named prompt splits of the model's own sets ("train", "validation", "test"), if it has
    # any: eval_sets then takes a split. A model without splits evaluates on its one own set, which
    # may be what it trains on; a figure from it says so (erase.evaluate.evaluation_rows).
    splits: tuple[str, ...] = ()
    recipe_defaults: Callable[[str | None], dict] = _no_defaults  # settings that differ from TrainConfig's
    recipes: dict = field(default_factory=dict)  # named recipes: name -> settings
    detector: dict | None = None  # spec of the detector that knows this model's concepts, if any
    vocabulary: Callable[[str], list[str]] | None = None  # a concept -> candidates for the adaptive target
    # a concept -> every phrase that names it (synonyms, descriptions), which the adaptive target's
    # candidates replace; None: the concept's own words only
    phrasings: Callable[[str], list[str]] | None = None
    # a prompt -> (the words its text encoder has a token for, the ones it has not); None: it reads any text
    read_words: Callable[[str], tuple[list[str], list[str]]] | None = None
    sweep_concepts: tuple[str, ...] = ()  # what `erase sweep` erases when no --concepts are given
    graph_concepts: tuple[str, ...] = ()  # what `erase graph` erases when no --concepts are given
    concept_graph: str | None = None  # a concept graph (graph.json) made on this model's weights
    default_dtype: str = "fp32"  # the weights' dtype unless asked otherwise
    gpus_per_worker: int = 0  # what each sweep Train worker asks for unless --gpus-per-trial says otherwise
    load_random: Callable[..., object] | None = None  # (*, dtype, device, guidance) -> its architecture, random weights


_MODELS: dict[str, ModelEntry] = {}


def _builtin_entries() -> list[ModelEntry]:
    from erase.pipelines import flux, toy

    return [toy.ENTRY, *flux.ENTRIES]


def models() -> dict[str, ModelEntry]:
    """Every model by name: the built-in ones first, then any registered since."""
    if not _MODELS:
        for entry in _builtin_entries():
            _MODELS[entry.name] = entry
    return _MODELS


def register(entry: ModelEntry) -> None:
    """Make `entry` known by its name to every command and function that takes a model name."""
    if entry.name in models():
        raise ModelError(f"a model named {entry.name!r} is already registered")
    _MODELS[entry.name] = entry


def model(name: str) -> ModelEntry:
    known = models()
    if name not in known:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(known)}")
    return known[name]


def load_generator(name: str, model_path: str | None = None, *, dtype: str | None = None, device: str = "cpu",
                   guidance: float | None = None, random_weights: bool = False):
    """Build the generator of model `name`, with weights from `model_path` if given, or with
    `random_weights` (the architecture alone, nothing downloaded: for checks on new hardware).

    `dtype`: fp32, bf16 or fp16 for the model's weights (mask logits stay fp32 whatever it is);
    None takes the model's default: bf16 for the FLUX.1 checkpoints, fp32 for the others.

    `guidance`: classifier-free guidance scale for the toy world, embedded guidance for
    FLUX.1-dev; None keeps the model's default.
    """
    entry = model(name)
    dtype = dtype or entry.default_dtype
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if random_weights:
        if model_path is not None:
            raise ModelError("random weights need no --model-path: pass one or the other")
        if entry.load_random is None:
            raise ModelError(f"{name} has no random-weights build; models that have one: "
                             f"{', '.join(n for n, e in models().items() if e.load_random) or 'none'}")
        return entry.load_random(dtype=DTYPES[dtype], device=device, guidance=guidance)
    return entry.load(model_path, dtype=DTYPES[dtype], device=device, guidance=guidance)


def meta_transformer(name: str) -> torch.nn.Module:
    """The model's transformer built on the meta device: its structure, no weights, no memory."""
    return model(name).meta_transformer()


def mask_sites(name: str) -> list[MaskSite]:
    """The mask sites of model `name`, read off its architecture without loading weights."""
    entry = model(name)
    return entry.mask_sites(entry.meta_transformer())


def recipe_defaults(name: str, concept: str | None = None) -> dict:
    """The recipe settings in which model `name` differs from TrainConfig's own defaults (the paper's)."""
    return dict(model(name).recipe_defaults(concept))
