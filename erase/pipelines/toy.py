"""The toy world's generator and detector behind the same interface as FLUX.1.

Generator: diffusers' FluxTransformer2DModel (a small config: 2 dual-stream and 4 single-stream
blocks, FLUX.1's 1 : 2) conditioned by the world's own small text encoder, frozen at its random
initialisation as FLUX.1's T5 is frozen, on 16x16 RGB pixels packed 2x2 into 64 tokens of 12 channels exactly as
FLUX packs its latents (there is no VAE: pixels are the latents). Sampled with the same
flow-match Euler schedule as FLUX.1-schnell. Mask sites, the unrolled sampler and every
command work on it unchanged.

Detector: a small CNN naming each attribute (object, colour, style, background) of an image,
the toy world's NudeNet / CLIP classifier.

The trained weights ship in erase/pipelines/toy_weights/ (safetensors); `python -m erase.toy_train`
retrains them from a seed. One step in five of the generator's training removed every unit of the
default mask sites and asked for the default look, so that what a prompt asks for passes through
units a mask can remove, as in FLUX.1 (docs/toy_generator_variants.md).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from erase.pipelines import MaskSite, ModelEntry, ModelError
from erase.pipelines import toy_world as world
from erase.pipelines.flux import flux_mask_sites

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "toy_weights")
GENERATOR_FILE = os.path.join(WEIGHTS_DIR, "generator.safetensors")
DETECTOR_FILE = os.path.join(WEIGHTS_DIR, "detector.safetensors")

TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=12, num_layers=2, num_single_layers=4, attention_head_dim=32,
                          num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
                          axes_dims_rope=(8, 12, 12))
TEXT_CONFIG = dict(width=64, layers=2, heads=4, max_len=20)
TEXT_ENCODER = "frozen"  # how the shipped text encoder was trained (toy_train --text-encoder)
REMOVAL_EVERY = 5  # every 5th generator step trained with the default sites removed (toy_train --removal-every)
GENERATOR_STEPS = 3200  # generator steps of the shipped weights (toy_train --generator-steps)
DEFAULT_STEPS = 4
DEFAULT_GUIDANCE = 1.0  # 1.0 = guidance-free; the shipped figures say which default was chosen
# The recipe's defaults for this world (`erase train --model toy`), where they differ from the
# paper's; recipe_defaults() adds what depends on the kind of concept. Its loss has another scale
# than FLUX.1's: on the test split, 200 steps at beta 0.25 erase striped to 0.000 with every other
# concept at 0.97 of its rate or more (docs/toy_world.md, "Erasure with the defaults"). Each prompt gets 4
# starting noises rather than 1: with one, the masks fit that noise.
RECIPE_DEFAULTS = {"beta": 0.25, "steps": 200, "noises_per_prompt": 4}
# beta by the kind of concept, where it differs from RECIPE_DEFAULTS' (docs/toy_generator_variants.md,
# "Erasure on D"; chosen on test-split probes, since the validation split, about 44 generations of
# the concept, told the candidates apart by no more than a generation or two):
# - a colour erases at every beta tried (0.000 from 0.25 to 2), but its neighbours in RGB pay below
#   2: erasing red kept purple at 0.77 of its rate at 0.25, and blue kept it at 0.75 at 0.5;
# - an object, mapped onto the other objects in every phrasing, erased to 0.093 at 0.25, 0.047 at
#   0.1 (every other concept 0.96 or more) and 0.012 at 0.05 (yellow down to 0.88).
BETA_BY_ATTRIBUTE = {"colour": 2.0, "object": 0.1, "background": 0.1}


def prompt_words(prompt: str) -> list[str]:
    """The words the toy text encoder reads a prompt as: lower case, commas as spaces."""
    return prompt.lower().replace(",", " ").split()


@functools.cache
def known_words() -> frozenset[str]:
    return frozenset(world.vocabulary())


def read_words(prompt: str) -> tuple[list[str], list[str]]:
    """(known, unknown): the words of `prompt` the toy text encoder has a token for, and the ones it
    reads as 'unknown'."""
    vocabulary = known_words()
    words = prompt_words(prompt)
    return [w for w in words if w in vocabulary], [w for w in words if w not in vocabulary]


class ToyTextEncoder(nn.Module):
    """Word-level tokens -> a small Transformer; returns per-token embeddings and a (zero) pooled vector."""

    def __init__(self, vocab: list[str], width: int, layers: int, heads: int, max_len: int):
        super().__init__()
        self.vocab = list(vocab)
        self.index = {w: i + 3 for i, w in enumerate(self.vocab)}  # 0 pad, 1 unknown, 2 start
        self.max_len = max_len
        self.embed = nn.Embedding(len(self.vocab) + 3, width)
        self.position = nn.Parameter(torch.zeros(max_len, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.pooled_dim = TRANSFORMER_CONFIG["pooled_projection_dim"]

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.max_len, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = prompt_words(prompt)[: self.max_len - 1]
            ids[row, 0] = 2
            for col, word in enumerate(words, start=1):
                ids[row, col] = self.index.get(word, 1)
        return ids

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(ids) + self.position[: ids.shape[1]]
        h = self.norm(self.encoder(h, src_key_padding_mask=ids == 0))
        # The pooled vector is all zeros: the prompt reaches the transformer through its tokens
        # only. FLUX's pooled CLIP vector feeds every block's modulation, a path no mask site
        # covers; a first toy generator that used it drew colour from it (README, the toy world).
        return h, h.new_zeros(h.shape[0], self.pooled_dim)


class ToyDetector(nn.Module):
    """A CNN with one head per attribute; logits in world.ATTRIBUTES order."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(128, len(world.detector_classes(a))) for a in world.ATTRIBUTES])

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        h = self.features(images * 2 - 1)
        return [head(h) for head in self.heads]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[dict[str, str]]:
        """Images (B, 3, 16, 16) in [0, 1] -> the name of each attribute per image ("nothing": no object)."""
        logits = self(images.float())
        names = {a: world.detector_classes(a) for a in world.ATTRIBUTES}
        picks = [lg.argmax(-1).tolist() for lg in logits]
        return [{a: names[a][picks[i][n]] for i, a in enumerate(world.ATTRIBUTES)} for n in range(images.shape[0])]


def pack(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 16, 16) in [0, 1] -> (B, 64, 12) in [-1, 1], 2x2 patches as FLUX packs latents."""
    b, c, h, w = images.shape
    x = images * 2 - 1
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(latents: torch.Tensor) -> torch.Tensor:
    b, n, ch = latents.shape
    side = int(round(n ** 0.5))
    x = latents.view(b, side, side, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return ((x.reshape(b, ch // 4, side * 2, side * 2) + 1) / 2).clamp(0, 1)


def image_ids() -> torch.Tensor:
    side = world.SIZE // 2
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    return ids.reshape(side * side, 3)


def architecture(folder: str | None = None) -> tuple[dict, dict]:
    """The transformer and text-encoder configs of the weights in `folder` (the shipped ones by
    default): its config.json, written by toy_train, or the module's constants for a folder
    without one."""
    path = os.path.join(folder or WEIGHTS_DIR, "config.json")
    if not os.path.isfile(path):
        return dict(TRANSFORMER_CONFIG), dict(TEXT_CONFIG)
    with open(path) as f:
        config = json.load(f)
    transformer = dict(config["transformer"])
    transformer["axes_dims_rope"] = tuple(transformer["axes_dims_rope"])
    return transformer, dict(config["text"])


def build_models(seed: int = 0, transformer_config: dict | None = None, text_config: dict | None = None):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**(transformer_config or TRANSFORMER_CONFIG))
    text = ToyTextEncoder(world.vocabulary(), **(text_config or TEXT_CONFIG))
    return transformer, text


@dataclass
class ToyConditioning:
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor
    uncond_embeds: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None
    BATCHED = ("prompt_embeds", "pooled", "uncond_embeds", "uncond_pooled")  # the fields with a row per prompt


class ToyGenerator:
    model_id = "toy"

    def __init__(self, transformer, text_encoder, *, guidance: float = DEFAULT_GUIDANCE, default_steps: int = DEFAULT_STEPS,
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer = transformer.to(device)
        if dtype != torch.float32:
            self.transformer.to(dtype=dtype)
        self.text_encoder = text_encoder.to(device)
        for module in (self.transformer, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # FLUX.1-schnell's schedule
        self.guidance = guidance
        self.default_steps = default_steps
        self.device = torch.device(device)
        self.dtype = dtype
        self._image_ids = image_ids().to(device)
        self._text_ids = torch.zeros(text_encoder.max_len, 3, device=device)

    def mask_sites(self) -> list[MaskSite]:
        return flux_mask_sites(self.transformer)

    @torch.no_grad()
    def encode(self, prompts: list[str], text_length: int | None = None) -> ToyConditioning:
        if text_length is not None:
            raise ModelError(f"the toy world's text encoder reads whole prompts: drop text_length ({text_length})")
        embeds, pooled = self.text_encoder(self.text_encoder.tokenize(list(prompts)).to(self.device))
        cond = ToyConditioning(embeds.to(self.dtype), pooled.to(self.dtype), self._text_ids)
        if self.guidance != 1.0:  # the empty prompt (an empty background) is the negative side
            u_embeds, u_pooled = self.text_encoder(self.text_encoder.tokenize([""] * len(prompts)).to(self.device))
            cond.uncond_embeds, cond.uncond_pooled = u_embeds.to(self.dtype), u_pooled.to(self.dtype)
        return cond

    def noise(self, seeds: list[int]) -> torch.Tensor:
        shape = (64, 12)
        return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]).to(self.device)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        if num_steps < 1:
            raise ModelError(f"sampling steps must be at least 1, got {num_steps}")
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device=self.device)
        return self.scheduler.sigmas.to(torch.float32)

    def _transformer(self, latents, sigma, embeds, pooled):
        return self.transformer(hidden_states=latents.to(self.dtype), encoder_hidden_states=embeds,
                                pooled_projections=pooled, timestep=sigma.expand(latents.shape[0]).to(self.dtype),
                                img_ids=self._image_ids, txt_ids=self._text_ids, return_dict=False)[0].float()

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: ToyConditioning) -> torch.Tensor:
        if cond.uncond_embeds is None:
            return self._transformer(latents, sigma, cond.prompt_embeds, cond.pooled)
        # classifier-free guidance: one batched pass for conditional and unconditional
        both = self._transformer(torch.cat([latents, latents]), sigma, torch.cat([cond.prompt_embeds, cond.uncond_embeds]),
                                 torch.cat([cond.pooled, cond.uncond_pooled]))
        v_cond, v_uncond = both.chunk(2)
        return v_uncond + self.guidance * (v_cond - v_uncond)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return unpack(latents.float())


def shipped_figures() -> dict:
    path = os.path.join(WEIGHTS_DIR, "figures.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def load(model_path: str | None = None, *, guidance: float | None = None, device: str = "cpu",
         dtype: torch.dtype = torch.float32) -> ToyGenerator:
    """The shipped toy generator (or one retrained into `model_path`)."""
    from safetensors.torch import load_file

    folder = model_path or WEIGHTS_DIR
    path = os.path.join(folder, "generator.safetensors")
    if not os.path.isfile(path):
        raise ModelError(f"no toy generator weights at {path}; retrain them with "
                         f"`python -m erase.toy_train --out {folder}`")
    transformer, text = build_models(0, *architecture(folder))
    state = load_file(path)
    transformer.load_state_dict({k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")})
    text.load_state_dict({k[len("text."):]: v for k, v in state.items() if k.startswith("text.")})
    if guidance is None:
        guidance = shipped_figures().get("default_guidance", DEFAULT_GUIDANCE)
    return ToyGenerator(transformer, text, guidance=guidance, device=device, dtype=dtype)


def load_detector(model_path: str | None = None, device: str = "cpu") -> ToyDetector:
    from safetensors.torch import load_file

    path = os.path.join(model_path or WEIGHTS_DIR, "detector.safetensors")
    if not os.path.isfile(path):
        raise ModelError(f"no toy detector weights at {path}; retrain with `python -m erase.toy_train`")
    detector = ToyDetector()
    detector.load_state_dict(load_file(path))
    return detector.to(device).eval()


# ---------------------------------------------------------------- the registry entry


def meta_transformer() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**architecture()[0])


def check_concept(concept: str) -> None:
    if concept not in world.all_concepts():
        groups = "; ".join(f"{g}: {', '.join(m)}" for g, m in world.GROUPS.items())
        raise ModelError(f"the toy world has no concept {concept!r}; its concepts are {groups}")


def prompt_sets(concept: str) -> tuple[list[str], list[str]]:
    """The train split (toy_world.split_prompts): every prompt of the concept there, in every
    phrasing, and as neutral prompts the same for every other concept of its group (none of them
    names it). Validation and test prompts are never trained on."""
    check_concept(concept)
    group = world.GROUPS[world.group_of(concept)]
    neutral = [p for other in group if other != concept for p in world.split_prompts(other, "train")]
    return world.split_prompts(concept, "train"), neutral


def eval_sets(concept: str | None, split: str = "test") -> dict:
    """Prompts of `split` (validation: what a sweep selects on; test: what erase eval reports):
    every concept's plain prompts (all of the erased concept's, a fixed sample of the others'),
    and with a concept its synonyms and descriptions and, on the test split, each robustness
    family (toy_world.ROBUSTNESS_FAMILIES) as kind "robust:<family>"."""
    if split not in world.SPLITS[1:]:
        raise ModelError(f"the toy world evaluates on its validation or test split, not {split!r}")
    if concept is not None:
        check_concept(concept)
    sets = {"concept": {c: world.split_prompts(c, split, ("canonical",),
                                               None if c == concept else world.PER_OTHER_CONCEPT[split])
                        for c in world.all_concepts()}}
    if concept is not None:
        sets["rephrase"] = {concept: world.split_prompts(concept, split, ("synonym", "indirect"), world.PER_FAMILY)}
        if split == "test":
            for family in world.ROBUSTNESS_FAMILIES:
                sets[f"robust:{family}"] = {concept: world.robustness_prompts(concept, family, split)}
    return sets


def recipe_defaults(concept: str | None) -> dict:
    """RECIPE_DEFAULTS, and the target a mask can reach for the kind of concept. Masks can only
    remove, and this generator with the masked units removed draws the default look (any object,
    grey, solid): the empty background the `empty` target asks for is out of their reach.
    - A colour or style: the substitute target with the word dropped (the reference code's
      'de-conceptualised' prompt), drawn in the default look (grey, solid).
    - An object (or a background): the adaptive target (AGE), a learnt mixture of the other
      objects. Dropping the word ('a red shape') draws any object, the erased one too, about one
      time in six."""
    defaults = dict(RECIPE_DEFAULTS)
    if concept not in world.all_concepts():
        return defaults
    attribute = world.attribute_of(concept)
    if attribute in ("colour", "style"):
        # every phrasing: the erasure prompts name the concept by its synonyms and descriptions too
        defaults.update(target="substitute", substitutions={word: "" for _, word in world.phrasings(concept)})
    if attribute in ("object", "background"):
        defaults.update(target="adaptive")
    if attribute in BETA_BY_ATTRIBUTE:
        defaults.update(beta=BETA_BY_ATTRIBUTE[attribute])
    return defaults


def vocabulary(concept: str) -> list[str]:
    """The adaptive target's candidates: the other concepts of the erased one's group, so that an
    object maps onto an object. (With every toy concept, "cross"'s nearest words were backgrounds
    and styles, and a prompt naming no object erased little: docs/toy_world.md, Adaptive targets.)"""
    if concept in world.all_concepts():
        return list(world.GROUPS[world.group_of(concept)])
    return world.all_concepts()


def phrasings(concept: str) -> list[str]:
    """The words that name `concept`: its canonical word, synonyms and descriptions."""
    if concept in world.all_concepts():
        return [word for _, word in world.phrasings(concept)]
    return [concept]


def _load(model_path: str | None, *, dtype: torch.dtype, device: str, guidance: float | None) -> ToyGenerator:
    return load(model_path, guidance=guidance, device=device, dtype=dtype)


ENTRY = ModelEntry(
    name="toy",
    description="the toy world that ships with the project: 16x16 shapes, trained weights included (the default)",
    load=_load, meta_transformer=meta_transformer, mask_sites=flux_mask_sites, prompt_sets=prompt_sets,
    eval_sets=eval_sets, splits=world.SPLITS, recipe_defaults=recipe_defaults, detector={"name": "toy"}, vocabulary=vocabulary,
    phrasings=phrasings, read_words=read_words,
    sweep_concepts=("striped",),  # the concept its masks erase best (README, "The toy world")
    graph_concepts=world.OBJECTS,
    concept_graph=os.path.join(WEIGHTS_DIR, "concept_graph.json"),
)
