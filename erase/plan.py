"""Will a FLUX.1 run fit in GPU memory, and what will it cost? Measured block by block, then added up.

The model of memory. One optimisation step of `erase.train.train` holds, at its peak:

    weights      the transformer and the VAE in the run's dtype. The text encoders (T5-XXL, CLIP-L)
                 are needed only to encode the prompts, once each (EncodingCache), and are moved off
                 the GPU after: they count in a separate "encoding" peak, transformer + encoders.
    activations  what autograd saves for the backward of ONE sampling step of ONE micro-batch:
                 step-wise checkpointing (erase/sampler.py) recomputes a step at a time, and each term
                 (erase, neutral) and each micro-batch of m samples backpropagates on its own. Per
                 sample that is tokens x (n_dual x dual + n_single x single) bytes, where `dual` and
                 `single` are the bytes per token that one block of each kind saves (measured below).
                 With per-block checkpointing (MaskHooks(checkpoint_blocks=True)) a block keeps only
                 its inputs, the hidden and text states (tokens x width x dtype bytes), until the
                 backward recomputes it: all blocks' inputs, plus one block's activations, are alive.
                 Without step-wise checkpointing every sampling step's activations are alive at once.
    transients   the gradients and temporaries of one block's backward (measured), on top.
    small stuff  the saved step inputs (sampling steps x m latents), the mask logits and their Adam
                 state, the cached targets and text encodings.

and the predicted peak is their sum plus an allocator margin (ALLOCATOR_MARGIN). GB here are GiB
(2**30 bytes), as torch and nvidia-smi count them.

The bytes per token are measured, not guessed: one block of each kind is built at the model's real
width with random weights in the run's dtype on the run's device (the meta device allocates nothing,
so it cannot), its mask taps active with mask values that require grad as in training, and the
storages that autograd saves during its forward are counted (each once, parameters excluded), at
two token counts. scaled_dot_product_attention saves O(tokens) on CPU and GPU (flash kernels: the
output and the log-sum-exp, not the tokens² scores), so the bytes grow linearly in the tokens.

FLOPs are counted with torch's FlopCounterMode on the meta-device transformer at the real token
count: a forward, and a backward for input gradients only (the weights are frozen). On the meta
device attention runs as its math decomposition, whose backward is 2x the forward's attention
FLOPs; a flash kernel's recomputes the scores (2.5x), so the attention backward is counted a little
low (about 4% of a FLUX.1 step's FLOPs).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import cache

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from erase.config import TrainConfig
from erase.errors import EraseError
from erase.masks import MaskHooks
from erase.pipelines import DTYPES
from erase.pipelines import model as model_entry

GIB = 2**30
ALLOCATOR_MARGIN = 0.10  # fragmentation and rounding of the caching allocator, on the whole peak
H100_BF16_FLOPS = 989e12  # H100 SXM, bf16 dense tensor-core peak (NVIDIA's datasheet, without sparsity)
DEFAULT_UTILISATION = 0.5
DEFAULT_GPU_MEMORY_GB = 80.0
# Parameter counts of FLUX.1's frozen companions, counted on the meta device from their published
# configs: the T5-XXL encoder (google/t5-v1_1-xxl, FLUX.1's text_encoder_2), CLIP-L's text model
# (openai/clip-vit-large-patch14, text_encoder) and FLUX.1's AutoencoderKL (16 latent channels).
T5_XXL_ENCODER_PARAMS = 4_762_310_656
CLIP_L_TEXT_PARAMS = 123_060_480
FLUX_VAE_PARAMS = 83_819_683
T5_WIDTH = 4096
# Where each measurement is taken: (image tokens, text tokens), the real ratio's shape at small size.
MEASURE_AT = ((128, 32), (256, 64))
# Outside the blocks a step saves, per image token, norm_out's LayerNorm input and scaled output and
# proj_out's input (diffusers' FluxTransformer2DModel.forward): 3 x width x dtype bytes.
OUTSIDE_BLOCKS_WIDTHS = 3


class PlanError(EraseError):
    """A plan cannot be made for this input; the message says what to pass instead."""


# ---------------------------------------------------------------- what the model is


def flux_spec(name: str) -> dict:
    """The sampling spec of a FLUX.1 model (size, steps, max_text, vae_scale), or a PlanError."""
    from erase.pipelines import flux

    model_entry(name)  # an unknown name: the registry's own error, which lists the models
    if name in flux.CHECKPOINTS:
        return {**flux.CHECKPOINTS[name], "vae_scale": 8}
    if name in flux.RANDOM_CONFIGS:
        spec = flux.RANDOM_CONFIGS[name]
        return {**spec, "vae_scale": 2 ** (len(spec["vae_blocks"]) - 1)}
    raise PlanError(f"plan supports FLUX.1 models ({', '.join([*flux.CHECKPOINTS, *flux.RANDOM_CONFIGS])}); "
                    f"{name!r} has no dual- and single-stream blocks the planner knows")


def check_budget(gpu_memory_gb: float, utilisation: float) -> None:
    if not gpu_memory_gb > 0:
        raise PlanError(f"--gpu-memory is the GPU's memory in GB and must be > 0, got {gpu_memory_gb}")
    if not 0 < utilisation <= 1:
        raise PlanError(f"--utilisation is the share of the GPU's peak FLOP/s reached, in (0, 1], got {utilisation}")


def run_dtype(name: str, dtype: str | None = None) -> str:
    dtype = dtype or model_entry(name).default_dtype
    if dtype not in DTYPES:
        raise PlanError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return dtype


def token_counts(name: str, cfg: TrainConfig) -> tuple[int, int]:
    """(image tokens, text tokens) of one sample: (size / vae_scale / 2)² packed latents, T5 length."""
    spec = flux_spec(name)
    side = spec["size"] // spec["vae_scale"] // 2
    return side * side, getattr(cfg, "text_length", None) or spec["max_text"]


def sampling_steps(name: str, cfg: TrainConfig) -> int:
    return cfg.sampling_steps or flux_spec(name)["steps"]


@cache
def transformer_facts(name: str) -> dict:
    """{config, params, site_sizes}: the meta-device transformer's config, its parameter count and the
    mask entries of each site group, read once per process."""
    from erase.pipelines import mask_sites

    transformer = model_entry(name).meta_transformer()
    sizes: dict[str, int] = {}
    for site in mask_sites(name):
        sizes[site.group] = sizes.get(site.group, 0) + site.size
    return {"config": transformer.config, "params": sum(p.numel() for p in transformer.parameters()),
            "site_sizes": sizes}


def trained_groups(cfg: TrainConfig) -> tuple[str, ...]:
    """The site groups that carry masks in training: the selected ones with a learning rate."""
    return tuple(sorted(g for g in cfg.sites if cfg.lr(g) > 0))


# ---------------------------------------------------------------- measuring one block


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under it that are still alive, and their peak: each op's outputs
    counted once per storage, released when the storage dies. Any device, no allocator involved."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = storage.data_ptr()
        if key == 0 or key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.now += self.live[key]
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.now


def _one_block(kind: str, config, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A module holding one block of `kind` where a FluxTransformer2DModel holds it (so that the mask
    sites' paths match), random weights in `dtype` on `device`, frozen."""
    from diffusers.models.transformers import transformer_flux as flux_blocks

    heads, head_dim = config.num_attention_heads, config.attention_head_dim
    width = heads * head_dim
    with torch.device("meta"):  # built without memory, then given it once, in the run's dtype
        holder = torch.nn.Module()
        dual = [flux_blocks.FluxTransformerBlock(width, heads, head_dim)] if kind == "dual" else []
        single = [flux_blocks.FluxSingleTransformerBlock(width, heads, head_dim)] if kind == "single" else []
        holder.transformer_blocks = torch.nn.ModuleList(dual)
        holder.single_transformer_blocks = torch.nn.ModuleList(single)
    holder = holder.to(dtype).to_empty(device=device)
    holder.config = config
    with torch.no_grad():
        for p in holder.parameters():
            p.uniform_(-0.02, 0.02)
    return holder.requires_grad_(False)


def _block_inputs(config, image: int, text: int, dtype: torch.dtype, device: str) -> dict:
    """A block's arguments as FluxTransformer2DModel.forward builds them, the states requiring grad (as
    they do from the second sampling step on, and inside every block after a masked one)."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    width = config.num_attention_heads * config.attention_head_dim
    rotary = FluxPosEmbed(theta=10000, axes_dim=config.axes_dims_rope)(torch.zeros(text + image, 3, device=device))
    return {"hidden_states": torch.randn(1, image, width, dtype=dtype, device=device, requires_grad=True),
            "encoder_hidden_states": torch.randn(1, text, width, dtype=dtype, device=device, requires_grad=True),
            "temb": torch.randn(1, width, dtype=dtype, device=device), "image_rotary_emb": rotary}


def measure_block(kind: str, config, dtype: torch.dtype, device: str, groups: tuple[str, ...],
                  sizes: tuple[tuple[int, int], ...]) -> list[dict]:
    """At each (image, text) token count of `sizes`: {saved, backward}, the bytes one block's forward saves
    for backward (each storage once; weights, temb and rotary embeddings, shared by every block,
    excluded), and the peak above that while its backward runs (the output's gradient, the block's
    gradients and temporaries). Mask taps of `groups` active, their values requiring grad."""
    from erase.pipelines.flux import flux_mask_sites

    holder = _one_block(kind, config, dtype, device)
    block = (holder.transformer_blocks if kind == "dual" else holder.single_transformer_blocks)[0]
    sites = [s for s in flux_mask_sites(holder) if s.group in groups]
    values = {s.name: torch.ones(s.size, device=device, requires_grad=True) for s in sites}
    with MaskHooks(holder, sites, values):
        return [_saved_and_backward(block, holder, _block_inputs(config, image, text, dtype, device), values)
                for image, text in sizes]


def _saved_and_backward(block, holder, inputs: dict, values: dict) -> dict:
    shared = {t.untyped_storage().data_ptr() for t in [*holder.parameters(), inputs["temb"], *inputs["image_rotary_emb"]]}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in shared:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    live = LiveBytes()
    with live:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            outputs = block(**inputs)
        live.reset_peak()
        start = live.now
        gradients = [torch.ones_like(o) for o in outputs]
        torch.autograd.backward(outputs, gradients, inputs=[inputs["hidden_states"], inputs["encoder_hidden_states"],
                                                            *values.values()])
    return {"saved": sum(saved.values()), "backward": live.peak - start}


@dataclass(frozen=True)
class BlockMemory:
    """Bytes per token of one block of each kind (and per sample, whatever the tokens), in one dtype."""

    dual: int  # saved by one dual-stream block's forward, per token
    single: int  # saved by one single-stream block's forward, per token
    dual_backward: int  # the peak above that during one dual block's backward, per token
    single_backward: int
    dual_fixed: int  # per sample: modulation vectors and the like
    single_fixed: int


def _per_token(first: dict, second: dict, tokens: tuple[int, int], key: str) -> tuple[int, int]:
    """(bytes per token, bytes per sample) of the line through two measurements."""
    slope = (second[key] - first[key]) / (tokens[1] - tokens[0])
    return round(slope), max(0, round(first[key] - slope * tokens[0]))


@cache
def block_memory(name: str, dtype: str, device: str = "cpu", groups: tuple[str, ...] = ("ffn", "norm")) -> BlockMemory:
    """Measured at the model's real width, at the two token counts MEASURE_AT; cached in this process."""
    config = transformer_facts(name)["config"]
    tokens = tuple(image + text for image, text in MEASURE_AT)
    found = {}
    for kind in ("dual", "single"):
        first, second = measure_block(kind, config, DTYPES[dtype], device, groups, MEASURE_AT)
        found[kind], found[f"{kind}_fixed"] = _per_token(first, second, tokens, "saved")
        found[f"{kind}_backward"], _ = _per_token(first, second, tokens, "backward")
    return BlockMemory(**found)


# ---------------------------------------------------------------- FLOPs


@cache
def sample_step_flops(name: str, image: int, text: int) -> tuple[int, int]:
    """(forward, backward) FLOPs of one sample through one sampling step of the transformer, counted on
    the meta device; the backward forms input gradients only, the weights being frozen."""
    from torch.utils.flop_counter import FlopCounterMode

    transformer = model_entry(name).meta_transformer().requires_grad_(False)
    config = transformer.config
    latents = torch.zeros(1, image, config.in_channels, device="meta", requires_grad=True)
    guidance = torch.ones(1, device="meta") if config.guidance_embeds else None
    with FlopCounterMode(display=False) as forward:
        out = transformer(hidden_states=latents, encoder_hidden_states=torch.zeros(1, text, config.joint_attention_dim,
                          device="meta"), pooled_projections=torch.zeros(1, config.pooled_projection_dim, device="meta"),
                          timestep=torch.ones(1, device="meta"), img_ids=torch.zeros(image, 3, device="meta"),
                          txt_ids=torch.zeros(text, 3, device="meta"), guidance=guidance, return_dict=False)[0]
    with FlopCounterMode(display=False) as backward:
        out.backward(torch.ones_like(out))
    return forward.get_total_flops(), backward.get_total_flops()


def term_flops(steps: int, forward: float, backward: float, step_checkpointing: bool, block_checkpointing: bool,
               chains: int = 1, backwards: int = 1) -> float:
    """FLOPs of one sample of a term: `chains` unrolled forwards, and `backwards` backward passes, each with
    its recomputations: step-wise, of all but the last step; per block, of every step's blocks."""
    recomputed = ((steps - 1) if step_checkpointing else 0) + (steps if block_checkpointing else 0)
    return chains * steps * forward + backwards * (recomputed * forward + steps * backward)


def run_flops(name: str, cfg: TrainConfig, block_checkpointing: bool) -> dict:
    """FLOPs of the whole run: the terms that backpropagate, and the cached targets' no-grad forwards."""
    image, text = token_counts(name, cfg)
    forward, backward = sample_step_flops(name, image, text)
    steps = sampling_steps(name, cfg)
    one_term = term_flops(steps, forward, backward, cfg.checkpointing, block_checkpointing)
    per_sample = 2 * one_term  # the erase term and the neutral term
    samples = cfg.steps * cfg.grad_accum * cfg.batch_size
    erase_rows, neutral_rows = 8 * cfg.noises_per_prompt, 16 * cfg.noises_per_prompt  # FLUX's default prompt sets
    cached = min(neutral_rows, samples)
    if cfg.target == "adaptive":
        # the target term, not cached: two chains unrolled (the original model's and the masked one's,
        # both depending on the candidates' logits), backpropagated into those logits through both and
        # into the masks through the masked one again
        per_sample += term_flops(steps, forward, backward, cfg.checkpointing, block_checkpointing, chains=2,
                                 backwards=3)
    else:
        cached += min(erase_rows, samples)
    training = samples * per_sample
    targets = cached * steps * forward
    return {"training": training, "targets": targets, "total": training + targets}


def gpu_minutes(flops: float, utilisation: float = DEFAULT_UTILISATION) -> float:
    return flops / (H100_BF16_FLOPS * utilisation) / 60
# ---------------------------------------------------------------- memory of one optimisation step


def weight_bytes(name: str, dtype: str) -> dict:
    """{transformer, vae, text_encoders}: their parameters x the dtype's bytes."""
    item = DTYPES[dtype].itemsize
    transformer = transformer_facts(name)["params"]
    vae, encoders = _companion_params(name)
    return {"transformer": transformer * item, "vae": vae * item, "text_encoders": encoders * item}


def _companion_params(name: str) -> tuple[int, int]:
    """(VAE, text encoders) parameters: FLUX.1's published ones, or a random config's, counted on meta."""
    from erase.pipelines import flux

    if name in flux.CHECKPOINTS:
        return FLUX_VAE_PARAMS, T5_XXL_ENCODER_PARAMS + CLIP_L_TEXT_PARAMS
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # it seeds torch: leave the caller's RNG be
        pipe = flux.build_random_pipeline(name)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    return count(pipe.vae), count(pipe.text_encoder) + count(pipe.text_encoder_2)


def state_bytes(name: str, cfg: TrainConfig, dtype: str) -> int:
    """The small stuff: mask logits (fp32) with their gradient, two Adam moments, the sampled values, their
    leaves and the leaves' gradients (7 copies); the cached target latents (fp32) and text encodings."""
    config = transformer_facts(name)["config"]
    image, text = token_counts(name, cfg)
    entries = sum(transformer_facts(name)["site_sizes"].get(g, 0) for g in trained_groups(cfg))
    rows = (8 + 16) * cfg.noises_per_prompt  # FLUX's default prompt sets: concept templates, neutral captions
    targets = rows * image * config.in_channels * 4
    encodings = (8 + 16 + 1) * text * config.joint_attention_dim * DTYPES[dtype].itemsize
    return 7 * 4 * entries + targets + encodings


def activation_bytes(name: str, cfg: TrainConfig, memory: BlockMemory, dtype: str, micro_batch: int,
                     block_checkpointing: bool) -> dict:
    """{kept, working, step_inputs, total}: what is alive at the peak of one term's backward for a
    micro-batch: the activations kept for backward, the working set of the block being backpropagated
    (with per-block checkpointing: its recomputed activations too), the saved step inputs."""
    config = transformer_facts(name)["config"]
    item, (image, text) = DTYPES[dtype].itemsize, token_counts(name, cfg)
    tokens, width = image + text, config.num_attention_heads * config.attention_head_dim
    blocks = config.num_layers + config.num_single_layers
    outside = OUTSIDE_BLOCKS_WIDTHS * width * item * image
    dual, single = memory.dual * tokens + memory.dual_fixed, memory.single * tokens + memory.single_fixed
    if block_checkpointing:  # every block's inputs (its hidden and text states), one block at work
        kept = blocks * tokens * width * item + outside
        working = max(dual + memory.dual_backward * tokens, single + memory.single_backward * tokens)
    else:
        kept = config.num_layers * dual + config.num_single_layers * single + outside
        working = max(memory.dual_backward, memory.single_backward) * tokens
    steps = sampling_steps(name, cfg)
    steps_alive = 1 if cfg.checkpointing else steps
    chains = 2 if cfg.target == "adaptive" else 1  # the adaptive target term unrolls the original model too
    rotary = 2 * tokens * config.attention_head_dim * 4  # cos and sin, fp32, shared by the micro-batch
    latent = image * config.in_channels * 4  # fp32
    step_inputs = micro_batch * (steps + 1) * latent  # the checkpointed steps' inputs and the loss's difference
    total = chains * steps_alive * (micro_batch * kept + rotary) + micro_batch * working + step_inputs
    return {"kept": chains * steps_alive * micro_batch * kept, "working": micro_batch * working,
            "step_inputs": step_inputs, "total": total}


def candidate_settings(cfg: TrainConfig) -> list[tuple[int, bool]]:
    """(micro-batch, per-block checkpointing) to try: the divisors of the batch, largest first, without and
    with per-block checkpointing. The adaptive target runs each batch whole."""
    sizes = [d for d in range(cfg.batch_size, 0, -1) if cfg.batch_size % d == 0]
    if cfg.target == "adaptive":
        sizes = [cfg.batch_size]
    return [(m, blocks) for blocks in (False, True) for m in sizes]


def _setting_row(name: str, cfg: TrainConfig, memory: BlockMemory, dtype: str, fixed: dict, micro_batch: int,
                 block_checkpointing: bool, utilisation: float) -> dict:
    """One setting's predicted peaks (GiB, with the margin) and cost."""
    activations = activation_bytes(name, cfg, memory, dtype, micro_batch, block_checkpointing)
    training = (fixed["training"] + activations["total"]) * (1 + ALLOCATOR_MARGIN)
    flops = run_flops(name, cfg, block_checkpointing)["total"]
    return {"micro_batch": micro_batch, "block_checkpointing": block_checkpointing,
            "peak_gb": round(max(training, fixed["encoding"] * (1 + ALLOCATOR_MARGIN)) / GIB, 3),
            "training_peak_gb": round(training / GIB, 3), "activations_gb": round(activations["total"] / GIB, 4),
            "flops_per_run": flops, "gpu_minutes": round(gpu_minutes(flops, utilisation), 2)}


def _cheapest(rows: list[dict], gpu_memory_gb: float) -> tuple[dict, bool]:
    """The row with the fewest FLOPs that fits (ties: the larger micro-batch), else the smallest peak."""
    fitting = [r for r in rows if r["peak_gb"] <= gpu_memory_gb]
    if fitting:
        return min(fitting, key=lambda r: (r["flops_per_run"], -r["micro_batch"])), True
    return min(rows, key=lambda r: (r["peak_gb"], r["flops_per_run"])), False


def plan(name: str, cfg: TrainConfig, gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB,
         utilisation: float = DEFAULT_UTILISATION, device: str = "cpu", dtype: str | None = None) -> dict:
    """The plan of a run of `cfg` on `name`: every candidate setting's peak and cost, and the cheapest
    that fits in `gpu_memory_gb` (GiB). Bad input fails before anything is measured."""
    check_budget(gpu_memory_gb, utilisation)
    flux_spec(name)
    dtype = run_dtype(name, dtype)
    memory = block_memory(name, dtype, device, trained_groups(cfg))
    weights, state = weight_bytes(name, dtype), state_bytes(name, cfg, dtype)
    fixed = {"training": weights["transformer"] + weights["vae"] + state, "encoding": sum(weights.values())}
    if cfg.target == "adaptive":  # it encodes the candidates' mixtures as it learns them: the encoders stay
        fixed["training"] += weights["text_encoders"]
    if cfg.target == "edit" and cfg.edit_model not in (None, name):  # the editing model, loaded beside it
        fixed["training"] += sum(weight_bytes(cfg.edit_model, run_dtype(cfg.edit_model, dtype)).values())
    rows = [_setting_row(name, cfg, memory, dtype, fixed, m, blocks, utilisation)
            for m, blocks in candidate_settings(cfg)]
    chosen, fits = _cheapest(rows, gpu_memory_gb)
    requested = _setting_row(name, cfg, memory, dtype, fixed, cfg.micro_batch or cfg.batch_size,
                             cfg.block_checkpointing, utilisation)
    image, text = token_counts(name, cfg)
    forward, backward = sample_step_flops(name, image, text)
    whole = chosen["micro_batch"] == cfg.batch_size
    return {
        "model": name, "device": device, "dtype": dtype, "fits": fits, "peak_gb": chosen["peak_gb"],
        "setting": {"micro_batch": None if whole else chosen["micro_batch"],
                    "block_checkpointing": chosen["block_checkpointing"]},
        "gpu_memory_gb": gpu_memory_gb, "training_peak_gb": chosen["training_peak_gb"],
        "encoding_peak_gb": round(fixed["encoding"] * (1 + ALLOCATOR_MARGIN) / GIB, 3),
        "gpu_minutes": chosen["gpu_minutes"], "flops_per_run": chosen["flops_per_run"],
        "activation_bytes_per_token": {"dual": memory.dual, "single": memory.single},
        "backward_bytes_per_token": {"dual": memory.dual_backward, "single": memory.single_backward},
        "tokens": {"image": image, "text": text, "total": image + text},
        "weights_gb": {k: round(v / GIB, 3) for k, v in weights.items()}, "state_gb": round(state / GIB, 4),
        "flops_per_sample_step": {"forward": forward, "backward": backward},
        "run": {"steps": cfg.steps, "grad_accum": cfg.grad_accum, "batch_size": cfg.batch_size,
                "sampling_steps": sampling_steps(name, cfg), "checkpointing": cfg.checkpointing, "target": cfg.target,
                "sites": list(trained_groups(cfg))},
        "candidates": rows, "requested": requested,
        "assumptions": {"utilisation": utilisation, "h100_bf16_flops": H100_BF16_FLOPS,
                        "allocator_margin": ALLOCATOR_MARGIN, "gb": "GiB, 2**30 bytes",
                        "measured_on": device},
    }


def choose_setting(cfg: TrainConfig, gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB, device: str = "cpu", *,
                   model: str, dtype: str | None = None) -> dict:
    """The cheapest setting of `cfg` on `model` that fits in `gpu_memory_gb`, as TrainConfig fields:
    {micro_batch: m, or None for the whole batch; block_checkpointing}. When nothing fits, the
    smallest-memory one (see `plan` for the figures)."""
    return dict(plan(model, cfg, gpu_memory_gb, device=device, dtype=dtype)["setting"])


def advice(report: dict) -> str:
    """What to change when nothing fits."""
    budget = report["gpu_memory_gb"]
    if report["encoding_peak_gb"] > budget:
        return (f"the text encoders beside the transformer need {report['encoding_peak_gb']:.1f} GB to encode the "
                f"prompts: use a GPU with more memory (--gpu-memory), or a smaller dtype (--dtype)")
    lowest = min(report["candidates"], key=lambda r: r["training_peak_gb"])
    hints = ["use a GPU with more memory (--gpu-memory)", "fewer text tokens"]
    if not report["run"]["checkpointing"]:
        hints.insert(0, "turn step-wise checkpointing back on (drop --no-checkpointing)")
    return (f"even one sample at a time with per-block checkpointing needs {lowest['training_peak_gb']:.1f} GB "
            f"of {budget:g}: " + ", or ".join(hints))
