"""FLUX.1 behind the generator interface: diffusers' components, our own differentiable loop.

diffusers' `FluxPipeline.__call__` runs under `no_grad`, so the pipeline object is used only as
the container of its components and for its prompt encoding and latent preparation; the
sampling loop is written out in `erase/sampler.py`.

Mask sites (docs/method.md, section 2): every tap is on an nn.Linear, so a binary mask folds into its weights.
- ffn:  the hidden units of `ff` and `ff_context` of each dual-stream block = input columns of
        `ff.net.2` (after GELU); 2 masks per dual-stream block.
- norm: the output of `norm1_context.linear` (text-stream shift/scale/gate) of each dual block.
- attn: the heads of every block: input columns of `attn.to_out.0` and `attn.to_add_out` in
        dual-stream blocks, the first `dim` input columns of `proj_out` in single-stream blocks
        (that Linear takes [attention output, MLP output] concatenated).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from erase.pipelines import MaskSite, ModelEntry, ModelError, Tap

# Real checkpoints: where the weights live on the hub, and how the model is sampled.
CHECKPOINTS = {
    "flux.1-schnell": dict(hub_id="black-forest-labs/FLUX.1-schnell", steps=4, guidance=0.0, size=1024, max_text=256),
    "flux.1-dev": dict(hub_id="black-forest-labs/FLUX.1-dev", steps=28, guidance=3.5, size=1024, max_text=512),
}

# Random configs of the same architecture. `vae_blocks` sets the VAE depth: 2 ** (len - 1) is
# its downscale factor. Text length and widths are small so they run on a CPU.
RANDOM_CONFIGS = {
    "flux-tiny": dict(
        transformer=dict(num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                         joint_attention_dim=32, pooled_projection_dim=16, in_channels=16, axes_dims_rope=(2, 2, 4)),
        vae_blocks=(8, 16), latent_channels=4, size=16, steps=4, max_text=64,
    ),
    # one block of each kind at FLUX.1's own width (3072), for checking the planner's bytes per token
    "flux-wide": dict(transformer=dict(num_layers=1, num_single_layers=1), vae_blocks=(16, 32), latent_channels=16,
                      size=128, steps=2, max_text=64),
    "flux-bench": dict(
        transformer=dict(num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=6,
                         joint_attention_dim=256, pooled_projection_dim=128, in_channels=64, axes_dims_rope=(8, 28, 28)),
        vae_blocks=(16, 32), latent_channels=16, size=64, steps=4, max_text=64,
    ),
}


def flux_mask_sites(transformer) -> list[MaskSite]:
    """Mask sites of a diffusers FluxTransformer2DModel, in the reference code's order."""
    cfg = transformer.config
    heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
    sites = []
    for i, block in enumerate(transformer.transformer_blocks):
        for ff in ("ff", "ff_context"):
            hidden = getattr(block, ff).net[2].in_features
            path = f"transformer_blocks.{i}.{ff}"
            sites.append(MaskSite(f"ffn.{path}", "ffn", hidden, (Tap(f"{path}.net.2", "input"),),
                                  producer=f"{path}.net.0.proj"))
    for i, block in enumerate(transformer.transformer_blocks):
        path = f"transformer_blocks.{i}.norm1_context.linear"
        sites.append(MaskSite(f"norm.transformer_blocks.{i}.norm1_context", "norm",
                              block.norm1_context.linear.out_features, (Tap(path, "output"),)))
    for i, _ in enumerate(transformer.transformer_blocks):
        path = f"transformer_blocks.{i}.attn"
        taps = (Tap(f"{path}.to_out.0", "input", 0, head_dim), Tap(f"{path}.to_add_out", "input", 0, head_dim))
        sites.append(MaskSite(f"attn.transformer_blocks.{i}", "attn", heads, taps))
    for i, _ in enumerate(transformer.single_transformer_blocks):
        tap = Tap(f"single_transformer_blocks.{i}.proj_out", "input", 0, head_dim)
        sites.append(MaskSite(f"attn.single_transformer_blocks.{i}", "attn", heads, (tap,)))
    return sites


def meta_transformer(model: str):
    from diffusers import FluxTransformer2DModel

    config = RANDOM_CONFIGS[model]["transformer"] if model in RANDOM_CONFIGS else {}
    if model == "flux.1-dev":
        config = dict(guidance_embeds=True)
    with torch.device("meta"):
        # The default arguments are the FLUX.1 architecture (19 dual, 38 single blocks, width 3072).
        return FluxTransformer2DModel(**config)


@dataclass
class FluxConditioning:
    prompt_embeds: torch.Tensor  # (B, text_len, joint_attention_dim), T5
    pooled: torch.Tensor  # (B, pooled_projection_dim), CLIP
    text_ids: torch.Tensor  # (text_len, 3), the same for every prompt
    BATCHED = ("prompt_embeds", "pooled")  # the fields with a row per prompt


class FluxGenerator:
    def __init__(self, pipe, model_id: str, *, size: int, default_steps: int, guidance: float,
                 max_text: int, device: str, dtype: torch.dtype):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.model_id = model_id
        self.height = self.width = size
        self.default_steps = default_steps
        self.guidance = guidance
        self.max_text = max_text
        self.device = torch.device(device)
        self.dtype = dtype
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.requires_grad_(False)
            module.eval()

    def mask_sites(self) -> list[MaskSite]:
        return flux_mask_sites(self.transformer)

    @torch.no_grad()
    def encode(self, prompts: list[str], text_length: int | None = None) -> FluxConditioning:
        """T5 and CLIP encodings, run wherever the encoders are (see text_encoders_to), on self.device;
        `text_length` T5 tokens per prompt (None: the model's)."""
        encoder_device = next(self.pipe.text_encoder_2.parameters()).device
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=encoder_device,
            max_sequence_length=text_length or self.max_text)
        return FluxConditioning(embeds.to(self.device, self.dtype), pooled.to(self.device, self.dtype),
                                text_ids.to(self.device))

    def text_encoders_to(self, device) -> None:
        """Move T5 and CLIP (training moves them off the GPU once its prompts are encoded)."""
        self.pipe.text_encoder.to(device)
        self.pipe.text_encoder_2.to(device)

    def noise(self, seeds: list[int]) -> torch.Tensor:
        """Packed starting latents, each drawn from its own CPU generator (same on every device)."""
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        channels = self.transformer.config.in_channels // 4
        latents, self._latent_ids = self.pipe.prepare_latents(
            len(seeds), channels, self.height, self.width, torch.float32, self.device, generators)
        return latents

    def _image_ids(self) -> torch.Tensor:
        if getattr(self, "_latent_ids", None) is None:
            self.noise([0])
        return self._latent_ids

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """Noise levels of FLUX's flow-match Euler schedule: num_steps + 1 values, 1 -> 0."""
        if num_steps < 1:
            raise ModelError(f"sampling steps must be at least 1, got {num_steps}")
        scheduler = self.pipe.scheduler
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            seq_len = (self.height // self.pipe.vae_scale_factor // 2) * (self.width // self.pipe.vae_scale_factor // 2)
            kwargs["mu"] = calculate_shift(
                seq_len, scheduler.config.get("base_image_seq_len", 256), scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, **kwargs)
        return scheduler.sigmas.to(torch.float32)

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: FluxConditioning) -> torch.Tensor:
        batch = latents.shape[0]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance, device=self.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=latents.to(self.dtype),
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled,
            # the transformer takes sigma in [0, 1]; the pipeline divides the scheduler's t by 1000
            timestep=sigma.expand(batch).to(self.dtype),
            img_ids=self._image_ids(),
            txt_ids=cond.text_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
        return out.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = self.pipe._unpack_latents(latents, self.height, self.width, self.pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return ((image.float() + 1) / 2).clamp(0, 1)


def load(model: str, model_path: str | None, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
         guidance: float | None = None) -> FluxGenerator:
    torch_dtype = dtype
    if model in RANDOM_CONFIGS:
        spec = RANDOM_CONFIGS[model]
        if model_path is not None:
            pipe = _from_pretrained(model_path, torch_dtype, local=True)
        else:
            pipe = build_random_pipeline(spec)
            if torch_dtype != torch.float32:
                pipe.to(dtype=torch_dtype)
        default_guidance = 0.0
    else:
        spec = CHECKPOINTS[model]
        pipe = _from_pretrained(model_path or spec["hub_id"], torch_dtype, local=model_path is not None)
        default_guidance = spec["guidance"]
    pipe.to(device)
    return FluxGenerator(pipe, model, size=spec["size"], default_steps=spec["steps"],
                         guidance=default_guidance if guidance is None else float(guidance),
                         max_text=spec["max_text"], device=device, dtype=torch_dtype)


def _from_pretrained(source: str, torch_dtype, *, local: bool):
    from diffusers import FluxPipeline

    if local and not os.path.isdir(source):
        raise ModelError(f"model path {source!r} is not a directory; pass --model-path DIR with a diffusers "
                         "FLUX.1 folder (model_index.json, transformer/, vae/, text_encoder/, ...)")
    if local and not os.path.isfile(os.path.join(source, "model_index.json")):
        raise ModelError(f"{source!r} has no model_index.json: it is not a diffusers pipeline folder; "
                         "download one with `hf download black-forest-labs/FLUX.1-schnell --local-dir DIR`")
    try:
        return FluxPipeline.from_pretrained(source, dtype=torch_dtype, local_files_only=local)
    except (OSError, ValueError) as err:
        where = "the folder" if local else "the hub (no network or no access?)"
        raise ModelError(f"could not load FLUX.1 weights from {where} {source!r}: {err}. "
                         "Pass --model-path DIR with a local copy of the weights.") from err


def byte_tokenizer(max_length: int):
    """A byte-level tokenizer built in code (no vocabulary files to download) for random configs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def random_twin(model: str) -> dict:
    """A checkpoint's config for random weights (no download): its own transformer at full size, a
    one-layer T5 and CLIP of the widths it reads, and a VAE of its latent shape with 8 channels a
    level. What its memory and time are made of is the transformer; the rest stands in."""
    transformer = meta_transformer(model).config
    return dict(transformer=dict(guidance_embeds=transformer.guidance_embeds), vae_blocks=(8, 8, 8, 8),
                latent_channels=16, **{k: CHECKPOINTS[model][k] for k in ("size", "steps", "max_text")})


def load_random(model: str, *, dtype: torch.dtype, device: str = "cpu", guidance: float | None = None) -> FluxGenerator:
    """A checkpoint's architecture with random weights, built on `device` in `dtype` directly (the
    12B transformer in fp32 first would need 48 GB more)."""
    spec = random_twin(model)
    default_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            pipe = build_random_pipeline(spec)
    finally:
        torch.set_default_dtype(default_dtype)
    pipe.to(device)
    return FluxGenerator(pipe, model, size=spec["size"], default_steps=spec["steps"],
                         guidance=CHECKPOINTS[model]["guidance"] if guidance is None else float(guidance),
                         max_text=spec["max_text"], device=device, dtype=dtype)


def build_random_pipeline(spec: dict | str, seed: int = 0):
    """A FluxPipeline of the FLUX.1 architecture from a config (RANDOM_CONFIGS, random_twin), random weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    spec = RANDOM_CONFIGS[spec] if isinstance(spec, str) else spec
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**spec["transformer"])
    tcfg = transformer.config  # the text encoders' widths are the ones it reads
    vocab_size = 256 + 3
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=tcfg["pooled_projection_dim"], intermediate_size=2 * tcfg["pooled_projection_dim"],
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=spec["max_text"],
        pad_token_id=0, bos_token_id=1, eos_token_id=1, projection_dim=tcfg["pooled_projection_dim"]))
    t5 = T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=tcfg["joint_attention_dim"], d_kv=8, d_ff=2 * tcfg["joint_attention_dim"],
        num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1))
    blocks = spec["vae_blocks"]
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=spec["latent_channels"], block_out_channels=blocks,
        down_block_types=("DownEncoderBlock2D",) * len(blocks), up_block_types=("UpDecoderBlock2D",) * len(blocks),
        layers_per_block=1, norm_num_groups=8, sample_size=spec["size"], use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=byte_tokenizer(spec["max_text"]),
        text_encoder_2=t5, tokenizer_2=byte_tokenizer(spec["max_text"]), transformer=transformer)


# ---------------------------------------------------------------- prompt sets and the registry entries

# Default prompt sets for an open-vocabulary model when the user gives no prompt files: a handful
# of templates around the concept, and everyday captions written for this project (the paper
# uses Conceptual Captions; any caption set works: pass your own with --neutral-prompts FILE).
CONCEPT_TEMPLATES = (
    "{c}",
    "a photo of {c}",
    "a painting of {c}",
    "a picture of {c} in a city street",
    "a close-up photo of {c}",
    "an illustration of {c} on a white background",
    "{c} in the style of a movie still",
    "a realistic image of {c}, natural light",
)

NEUTRAL_PROMPTS = (
    "a bowl of fruit on a wooden table",
    "a mountain lake at sunrise",
    "a red bicycle leaning against a brick wall",
    "a busy market street in the afternoon",
    "a cup of coffee next to an open book",
    "a lighthouse on a rocky coast",
    "a dog running on a beach",
    "a modern kitchen with white cabinets",
    "a field of sunflowers under a blue sky",
    "an old train station with people waiting",
    "a snowy forest path",
    "a plate of pasta with basil",
    "a city skyline at night",
    "a sailboat on a calm sea",
    "a cat sleeping on a sofa",
    "a vegetable garden in summer",
)


def concept_prompts(concept: str) -> list[str]:
    if not concept.strip():
        raise ModelError("the concept is empty; pass --concept with the words to erase, e.g. --concept 'Van Gogh'")
    return [t.format(c=concept) for t in CONCEPT_TEMPLATES]


def prompt_sets(concept: str) -> tuple[list[str], list[str]]:
    return concept_prompts(concept), list(NEUTRAL_PROMPTS)


def eval_sets(concept: str | None) -> dict:
    """The concept's templates and the neutral captions: an open vocabulary has no set of its own
    that names every concept, so evaluating needs the concept (or prompt files)."""
    if concept is None:
        raise ModelError("evaluating a FLUX.1 model needs the erased concept: pass --concept (or a mask file "
                         "that names it)")
    return {"concept": {concept: concept_prompts(concept)}, "neutral": {"": list(NEUTRAL_PROMPTS)}}


# The paper's Table 6 for FLUX.1-schnell (docs/method.md, section 5). "400 training steps" is read
# as 400 optimizer steps, each of a batch of 4 concept samples and 4 neutral ones, every sample
# unrolled through all its sampling steps: 3,200 unrolled samples a run. Read as 400 samples
# (100 steps of batch 4) it would cost a quarter of that.
PAPER_RECIPE = {"batch_size": 4, "lr_ffn": 0.5, "lr_norm": 0.5, "lr_attn": 0.0, "beta": 0.01, "optimizer": "adam",
                "weight_decay": 0.01, "steps": 400}

# The public reference code's configs/flux.yaml (docs/method.md, section 5): β 0.1, FFN and norm
# masks at 0.5, heads untrained, hard-concrete from logit 3 (noise bound 0.5 is the
# parametrisation's own), 5 unrolled steps in training (4 at inference, the model's default),
# batch 1 with 4-fold accumulation, about 80 optimizer steps, T5 length 512, one starting noise
# for every sample, and mask noise drawn at every hook call. Its per-block checkpointing is a
# memory setting, not part of the recipe: the planner (erase plan) switches it on where needed. Its target, a FlowEdit edit made with FLUX.1-dev, needs a substitution map: pass --target edit
# --substitute OLD=NEW (and --edit-model flux.1-dev) to have it too.
REFERENCE_RECIPE = {"beta": 0.1, "lr_ffn": 0.5, "lr_norm": 0.5, "lr_attn": 0.0, "parametrisation": "hard_concrete",
                    "init_logit": 3.0, "sampling_steps": 5, "batch_size": 1, "grad_accum": 4, "steps": 80,
                    "text_length": 512, "shared_noise": True, "mask_noise": "per_call"}


def _entry(name: str, description: str, default_dtype: str = "fp32") -> ModelEntry:
    return ModelEntry(name=name, description=description, load=partial(load, name),
                      load_random=partial(load_random, name) if name in CHECKPOINTS else None,
                      meta_transformer=partial(meta_transformer, name), mask_sites=flux_mask_sites,
                      prompt_sets=prompt_sets, eval_sets=eval_sets, recipes={"paper": PAPER_RECIPE, "reference": REFERENCE_RECIPE},
                      default_dtype=default_dtype,
                      # the checkpoints need an H100 per trial; the random configs are CPU stand-ins
                      gpus_per_worker=1 if name in CHECKPOINTS else 0)


# The checkpoints run in bf16 unless asked otherwise: in fp32 the transformer's weights alone are
# 48 GB, and a step of the recipe does not fit an 80 GB H100 (the README's FLUX.1 section).
# The random configs stay fp32: they stand in for FLUX.1 in tests and benchmarks on a CPU.
ENTRIES = [
    _entry("flux.1-schnell", "FLUX.1-schnell (12B, 4 steps, guidance-free); weights from the hub or --model-path",
           default_dtype="bf16"),
    _entry("flux.1-dev", "FLUX.1-dev (12B, guidance-distilled); weights from the hub or --model-path",
           default_dtype="bf16"),
    _entry("flux-tiny", "FLUX.1 architecture, tiny random config (tests)"),
    _entry("flux-bench", "FLUX.1 architecture, ~20M-parameter random config (benchmarks)"),
    _entry("flux-wide", "FLUX.1 architecture, one block of each kind at full width, random (the planner's check)",
           default_dtype="bf16"),
]
