"""The MCE recipe: learn sparse masks that erase one concept (docs/method.md).

    L = mean ||F_θ(x_T, c_R) - target(x_T, c_R)||²  +  β · mean ||F_θ(x_T, c_N) - F_θ'(x_T, c_N)||²
        + optional sparsity penalty

F is the whole sampler (every step, unrolled), θ the masked and θ' the original model. The
targets do not depend on the masks, so each (prompt, noise seed) target is computed once, with
the hooks off, and cached. One mask sample (hard-concrete noise) serves both terms of a step.

The recipe is one function, `train`, read top to bottom: setup, loop, result. It imports neither
Ray nor MLflow; orchestration passes `on_log` to see progress.
"""

from __future__ import annotations

import copy
import random
import sys
import time
import zlib
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator, Union

import torch
from tqdm import tqdm

from erase.adaptive import AdaptiveConfig, AdaptiveTarget, concept_phrasings, names_concept
from erase.config import MAX_NOISES_PER_PROMPT, TrainConfig
from erase.flowedit import edit_noise_seeds, edit_start, flowedit
from erase.masks import MaskHooks, Masks, NoisePerCall, select_sites, sparsity
from erase.pipelines import ModelError, load_generator
from erase.prompts import PromptError, substitute
from erase.sampler import sample


class TrainingStopped(RuntimeError):
    """The loss or the masks became non-finite; `result` holds the last good masks."""

    def __init__(self, message: str, result: "TrainResult"):
        super().__init__(message)
        self.result = result


@dataclass
class TrainResult:
    masks: Masks
    config: TrainConfig
    history: list[dict]
    status: str  # "finished" or "stopped: ..."
    seconds: float
    steps_done: int
    learnt_target: list[dict] | None = None  # adaptive target: top candidates with their weights

    def metrics(self) -> dict:
        binary = self.masks.binary(threshold=self.config.threshold)
        last = self.history[-1] if self.history else {}
        return {
            "status": self.status,
            "steps_done": self.steps_done,
            "seconds": round(self.seconds, 3),
            "final": last,
            "sparsity": sparsity(self.masks.sites, binary),
            "history": self.history,
            "config": asdict(self.config),
            **({"learnt_target": self.learnt_target} if self.learnt_target is not None else {}),
        }



def example_seed(prompt: str, k: int, first_seed: int) -> int:
    """The k-th noise seed of a prompt: set by its text and the run's seed alone, not by its position,
    so a streamed dataset (Ray Data) and a local list give every prompt the same noises."""
    return first_seed + zlib.crc32(prompt.encode("utf-8")) * MAX_NOISES_PER_PROMPT + k


def prompt_rows(prompts: list[str], first_seed: int, noises_per_prompt: int = 1, shared_noise: bool = False) -> list[dict]:
    """Training examples: each prompt with `noises_per_prompt` fixed noise seeds, as rows {prompt, seed};
    with `shared_noise`, every prompt with the one seed `first_seed`."""
    if shared_noise:
        return [{"prompt": p, "seed": first_seed} for p in prompts]
    return [{"prompt": p, "seed": example_seed(p, k, first_seed)} for p in prompts for k in range(noises_per_prompt)]


def first_seeds(cfg: "TrainConfig") -> tuple[int, int]:
    """Seed offsets of the erase and of the neutral examples, set by cfg.seed (one seed for both when
    every sample shares its starting noise)."""
    if cfg.shared_noise:
        return cfg.seed * 1_000_003, cfg.seed * 1_000_003
    return cfg.seed * 1_000_003, cfg.seed * 1_000_003 + 500_009


def cycle_batches(rows: list[dict], batch_size: int, shuffle_seed: int) -> Iterator[tuple[list[str], list[int]]]:
    """Endless shuffled batches of (prompts, seeds); a short list simply repeats."""
    rng = random.Random(shuffle_seed)
    order: list[dict] = []
    while True:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(rows)
                rng.shuffle(order)
            batch.append(order.pop())
        yield [r["prompt"] for r in batch], [int(r["seed"]) for r in batch]


class EncodingCache:
    """Each prompt's conditioning, encoded once: the text encoders are frozen, and on FLUX.1 they are
    the biggest part of a forward that does not depend on the masks. A batch's conditioning is
    assembled from the prompts' rows (the fields a conditioning names in BATCHED)."""

    def __init__(self, gen, text_length: int | None = None):
        self.gen, self.text_length, self.rows, self.template = gen, text_length, {}, None

    @torch.no_grad()
    def __call__(self, prompts: list[str]):
        missing = [p for p in dict.fromkeys(prompts) if p not in self.rows]
        if missing:
            length = {} if self.text_length is None else {"text_length": self.text_length}
            cond = self.gen.encode(missing, **length)
            batched = [f for f in type(cond).BATCHED if getattr(cond, f) is not None]
            for i, prompt in enumerate(missing):
                self.rows[prompt] = {f: getattr(cond, f)[i:i + 1] for f in batched}
            self.template = cond
        fields = self.rows[prompts[0]]
        return replace(self.template, **{f: torch.cat([self.rows[p][f] for p in prompts]) for f in fields})


class TargetCache:
    """Final latents of the original model, F_θ'(x_T, prompt), computed once per (prompt, seed)."""

    def __init__(self, gen, sigmas: torch.Tensor, hooks: MaskHooks, encode):
        self.gen, self.sigmas, self.hooks, self.encode = gen, sigmas, hooks, encode
        self.cache: dict[tuple[str, int], torch.Tensor] = {}

    @torch.no_grad()
    def get(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        missing = [(p, s) for p, s in zip(prompts, seeds) if (p, s) not in self.cache]
        missing = list(dict.fromkeys(missing))
        if missing:
            with self.hooks.using({}):  # the original model: no masks
                cond = self.encode([p for p, _ in missing])
                noise = self.gen.noise([s for _, s in missing])
                final = sample(lambda x, sigma: self.gen.velocity(x, sigma, cond), noise, self.sigmas, checkpointing=False)
            for key, latent in zip(missing, final):
                self.cache[key] = latent
        return torch.stack([self.cache[(p, s)] for p, s in zip(prompts, seeds)])


class EditTargetCache:
    """FlowEdit targets (erase/flowedit.py), once per (concept prompt, seed): the original model's image
    of the prompt, edited by `editor` (the model itself or another of the same latent space) from the
    prompt towards its substituted prompt."""

    def __init__(self, sources: TargetCache, editor, encode, cfg: TrainConfig):
        self.sources, self.editor, self.encode = sources, editor, encode
        self.sigmas = editor.sigmas(cfg.edit_steps or editor.default_steps)
        self.start = edit_start(len(self.sigmas) - 1, cfg.edit_strength)
        self.average, self.substitutions = cfg.edit_average, cfg.substitutions
        self.cache: dict[tuple[str, int], torch.Tensor] = {}

    @torch.no_grad()
    def get(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        missing = list(dict.fromkeys((p, s) for p, s in zip(prompts, seeds) if (p, s) not in self.cache))
        if missing:
            m_prompts, m_seeds = [p for p, _ in missing], [s for _, s in missing]
            source = self.sources.get(m_prompts, m_seeds)
            source_cond = self.encode(m_prompts)
            target_cond = self.encode([substitute(p, self.substitutions) for p in m_prompts])
            with self.sources.hooks.using({}):  # the editor is unmasked (it may be the model being erased)
                edited = flowedit(lambda x, sigma: self.editor.velocity(x, sigma, source_cond),
                                  lambda x, sigma: self.editor.velocity(x, sigma, target_cond),
                                  source, self.sigmas, start=self.start, average=self.average,
                                  noise=lambda step, k: self.editor.noise(edit_noise_seeds(m_seeds, step, k)))
            for key, latent in zip(missing, edited):
                self.cache[key] = latent
        return torch.stack([self.cache[(p, s)] for p, s in zip(prompts, seeds)])


def edit_model(gen, cfg: TrainConfig):
    """The model that edits for the edit target: `gen` itself, or cfg.edit_model loaded beside it,
    which must draw latents of the same shape."""
    if cfg.edit_model is None or cfg.edit_model == gen.model_id:
        return gen
    editor = load_generator(cfg.edit_model, device=str(gen.device))
    if editor.noise([0]).shape != gen.noise([0]).shape:
        raise ModelError(f"edit model {cfg.edit_model} draws latents of shape {tuple(editor.noise([0]).shape)}, "
                         f"{gen.model_id} of {tuple(gen.noise([0]).shape)}: an edit model must share the latent "
                         "space and resolution of the erased one")
    return editor


class TextEncodersOff:
    """The text encoders moved off the accelerator while the loop runs, once every prompt it needs is
    encoded (FLUX.1's T5 is 9.5 GB in bf16), and back afterwards; a no-op for a generator that keeps
    them on its device anyway (no `text_encoders_to`)."""

    def __init__(self, gen, encode: EncodingCache, prompts: list[str]):
        self.gen, self.encode, self.prompts = gen, encode, prompts

    def __enter__(self):
        if hasattr(self.gen, "text_encoders_to"):
            self.encode(self.prompts)
            self.gen.text_encoders_to("cpu")
        return self

    def __exit__(self, *exc):
        if hasattr(self.gen, "text_encoders_to"):
            self.gen.text_encoders_to(self.gen.device)


def step_masks(masks: Masks, cfg: TrainConfig, generator: torch.Generator):
    """(values, applied, inputs) of one step: the mask values drawn for it, what the hooks apply, and what
    each term backpropagates into.

    One draw per step (mask_noise per_step): each term backpropagates on its own into leaf copies of
    the values, so that one term's activations are alive at a time; their gradients reach the logits
    once, at the end of the step, through `values`. A draw per hook call (per_call): the hooks draw
    from the logits themselves, and each term backpropagates into the logits directly (no `values`).
    """
    if cfg.mask_noise == "per_call":
        return {}, NoisePerCall(masks), list(masks.logits.values())
    values = masks.values(training=True, generator=generator)
    leaves = {name: v.detach().requires_grad_(True) for name, v in values.items()}
    return values, leaves, list(leaves.values())


def sparsity_penalty(masks: Masks, cfg: TrainConfig) -> torch.Tensor:
    if cfg.sparsity_weight == 0:
        return torch.zeros(())
    removed = 1 - masks.density()
    if cfg.target_sparsity is None:
        return cfg.sparsity_weight * removed
    return cfg.sparsity_weight * torch.relu(removed - cfg.target_sparsity)


# A prompt source: a list of prompts, each of which gets cfg.noises_per_prompt fixed seeds, or a
# list of rows {prompt, seed} that have theirs already (a sweep worker's shard of the prompt
# dataset, made from the same prompt_rows). Either way the rows are cycled in shuffled batches.
PromptSource = Union[list[str], list[dict]]


@dataclass
class TrainState:
    """What a checkpoint needs to resume a run exactly: passed to `on_log` after every logged step."""

    masks: Masks
    optimizer: torch.optim.Optimizer
    step: int
    history: list[dict]
    adaptive: AdaptiveTarget | None = None
    rng: dict | None = None  # the random generators' states: the mask noise's and torch's global CPU one

    def resume_point(self) -> dict:
        """A copy: an optimizer's state_dict holds its live moment tensors, which the next steps change in place."""
        point = {"logits": self.masks.snapshot(), "optimizer": self.optimizer.state_dict(),
                 "step": self.step, "history": list(self.history)}
        if self.rng is not None:
            point["rng"] = self.rng
        if self.adaptive is not None:
            point["adaptive"] = self.adaptive.state()
        return copy.deepcopy(point)


def _rows(source: PromptSource, if_empty: str, cfg: TrainConfig, first_seed: int) -> list[dict]:
    if not source:
        raise PromptError(if_empty)
    if isinstance(source[0], dict):
        return list(source)
    return prompt_rows(list(source), first_seed, cfg.noises_per_prompt, cfg.shared_noise)


def _average_across_workers(masks: Masks) -> None:
    """Data-parallel runs (several Ray Train workers on one trial): average the mask gradients, so every
    worker takes the same step. A no-op in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for lam in masks.logits.values():
        if lam.grad is not None:
            dist.all_reduce(lam.grad)
            lam.grad /= dist.get_world_size()


def train(gen, cfg: TrainConfig, erase_prompts: PromptSource, neutral_prompts: PromptSource, *,
          progress: bool = True, on_log: Callable[[dict, TrainState], None] | None = None,
          resume: dict | None = None) -> TrainResult:
    """Run MCE on `gen`; raises TrainingStopped (with the last good masks) on a non-finite loss.

    `resume` is a `TrainState.resume_point()` (mask logits, optimizer state, step, history, random
    states): the run continues from there and ends with the masks of an uninterrupted run (bit for bit in
    one process; in another, within float rounding: 6e-6 in the logits measured on flux-tiny).
    """
    # ---- setup
    cfg.validate()
    erase_seed, neutral_seed = first_seeds(cfg)
    erase_rows = _rows(erase_prompts, f"no prompts for the concept {cfg.concept!r}: the erase prompt list is empty",
                       cfg, erase_seed)
    neutral_rows = _rows(neutral_prompts, "no neutral prompts: the preservation prompt list is empty", cfg, neutral_seed)
    phrases = concept_phrasings(gen.model_id, cfg.concept)
    if cfg.target == "adaptive":  # its candidates replace the concept's words, so only prompts with one serve
        named = [r for r in erase_rows if names_concept(r["prompt"], phrases)]
        if named and len(named) < len(erase_rows):
            print(f"erase: adaptive target: training on the {len(named)} of {len(erase_rows)} concept rows whose "
                  f"prompt names {cfg.concept!r} by one of {', '.join(map(repr, phrases))} (the candidates replace "
                  "it)", file=sys.stderr)
            erase_rows = named
    erase_batches = cycle_batches(erase_rows, cfg.batch_size, cfg.seed)
    neutral_batches = cycle_batches(neutral_rows, cfg.batch_size, cfg.seed + 1)
    target_prompts: dict[str, str] = {}

    def target_prompt(prompt: str) -> str:
        if prompt not in target_prompts:
            if cfg.target in ("substitute", "edit"):  # edit: the prompt the image is edited towards
                target_prompts[prompt] = substitute(prompt, cfg.substitutions)
            elif cfg.target == "adaptive":  # the concept must be there to be replaced by the candidates
                if not names_concept(prompt, phrases):
                    raise PromptError(f"adaptive target: prompt {prompt!r} contains none of "
                                      f"{', '.join(map(repr, phrases))}; every concept prompt must name the concept "
                                      "so that candidates can replace it")
                target_prompts[prompt] = prompt
            else:
                target_prompts[prompt] = ""
        return target_prompts[prompt]

    for row in erase_rows:  # a prompt the substitution map misses fails now, not mid-run
        target_prompt(row["prompt"])
    sites = select_sites(gen.mask_sites(), cfg.sites)
    sites = [s for s in sites if cfg.lr(s.group) > 0]
    masks = Masks.create(sites, cfg.parametrisation, cfg.init_logit, device=gen.device)
    opt_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_class([{"params": params, "lr": cfg.lr(group)} for group, params in masks.by_group().items()],
                          weight_decay=cfg.weight_decay)
    adaptive = None
    if cfg.target == "adaptive":
        adaptive = AdaptiveTarget(gen, cfg.concept, gen.model_id, AdaptiveConfig(
            k=cfg.adaptive_k, temperature=cfg.adaptive_temperature, hard=cfg.adaptive_hard, top_k=cfg.adaptive_top_k,
            lr=cfg.adaptive_lr, lam=cfg.adaptive_lambda, vocabulary=cfg.vocabulary), seed=cfg.seed)
    editor = edit_model(gen, cfg) if cfg.target == "edit" else None
    history: list[dict] = []
    start_step = 0
    if resume is not None:
        masks.restore(resume["logits"])
        optimizer.load_state_dict(resume["optimizer"])
        history, start_step = list(resume["history"]), int(resume["step"])
        if adaptive is not None and "adaptive" in resume:
            adaptive.load_state(resume["adaptive"])
    for _ in range(start_step * cfg.grad_accum):  # the batches the steps before drew
        next(erase_batches), next(neutral_batches)
    sigmas = gen.sigmas(cfg.sampling_steps or gen.default_steps)
    mask_noise = torch.Generator("cpu").manual_seed(cfg.seed + start_step)
    saved_rng = (resume or {}).get("rng")  # resume points written before they kept it: a fresh seed per step
    if saved_rng is not None:
        mask_noise.set_state(saved_rng["mask_noise"])
    hooks = MaskHooks(gen.transformer, sites, checkpoint_blocks=cfg.block_checkpointing)
    encode = EncodingCache(gen, cfg.text_length)
    targets = TargetCache(gen, sigmas, hooks, encode)
    edits = None
    if editor is not None:
        edits = EditTargetCache(targets, editor, encode if editor is gen else EncodingCache(editor, cfg.text_length), cfg)
    # Every prompt the loop encodes, so that the encoders can leave the accelerator first; the adaptive
    # target encodes its candidates' mixtures as it learns them, and keeps them.
    loop_prompts = [r["prompt"] for r in erase_rows + neutral_rows] + [target_prompt(r["prompt"]) for r in erase_rows]
    encoders = TextEncodersOff(gen, encode, loop_prompts) if adaptive is None else nullcontext()
    started = time.perf_counter()
    status, steps_done = "finished", start_step

    def final_latent(cond, seeds, values):
        """F(x_T, cond) with the masks `values` ({} = the original model; NoisePerCall: drawn at every hook
        call), set inside each step so that checkpointed recomputation during backward uses the same masks."""
        def velocity(x, sigma):
            with hooks.using(values):
                return gen.velocity(x, sigma, cond)

        return sample(velocity, gen.noise(seeds), sigmas, cfg.checkpointing)

    def backward_mse(prompts, seeds, target, applied, inputs, weight) -> torch.Tensor:
        """mean ||F(x_T, c) - target||² over the batch with the masks `applied`, backpropagated times `weight`
        into `inputs`, a micro-batch at a time: only one micro-batch's activations are alive at once. Its value."""
        size, micro = len(prompts), cfg.micro_batch or len(prompts)
        total = torch.zeros(())
        for i in range(0, size, micro):
            part = slice(i, i + micro)
            mse = torch.mean((final_latent(encode(prompts[part]), seeds[part], applied) - target[part]) ** 2)
            mse = mse * (len(prompts[part]) / size)  # every sample has as many entries: the batch's mean
            if torch.isfinite(mse):
                (weight * mse).backward(inputs=inputs)
            total = total + mse.detach()
        return total


    # ---- loop
    with hooks, encoders, torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + start_step)  # the global CPU generator: NoisePerCall's mask noise
        if saved_rng is not None:
            torch.set_rng_state(saved_rng["torch"])
        bar = tqdm(range(start_step, cfg.steps), desc=f"erase {cfg.concept}", disable=not progress, unit="step",
                   initial=start_step, total=cfg.steps)
        for step in bar:
            last_good = masks.snapshot()
            optimizer.zero_grad(set_to_none=True)
            totals = {"loss": 0.0, "erase_loss": 0.0, "preserve_loss": 0.0, "penalty": 0.0}
            if adaptive is not None:
                totals["target_preserve_loss"] = 0.0
                adaptive.optimizer.zero_grad(set_to_none=True)
            for _ in range(cfg.grad_accum):
                e_prompts, e_seeds = next(erase_batches)
                n_prompts, n_seeds = next(neutral_batches)
                values, applied, inputs = step_masks(masks, cfg, mask_noise)
                parts = {}
                if edits is not None:
                    e_target = edits.get(e_prompts, e_seeds)
                elif adaptive is None:
                    e_target = targets.get([target_prompt(p) for p in e_prompts], e_seeds)
                else:
                    # AGE: the target is the original model's output for the candidates' mixture; π ascends
                    # the target's preservation term, the masks descend it (weighted by λ)
                    t_cond = adaptive.conditioning([target_prompt(p) for p in e_prompts], adaptive.weights())
                    t_original = final_latent(t_cond, e_seeds, {})
                    target_term = torch.mean((final_latent(t_cond, e_seeds, applied) - t_original) ** 2)
                    (pi_grad,) = torch.autograd.grad(target_term / cfg.grad_accum, adaptive.logits, retain_graph=True)
                    adaptive.logits.grad = pi_grad if adaptive.logits.grad is None else adaptive.logits.grad + pi_grad
                    if torch.isfinite(target_term):
                        (cfg.adaptive_lambda * target_term / cfg.grad_accum).backward(inputs=inputs)
                    parts["target_preserve_loss"] = target_term.detach()
                    e_target = t_original.detach()
                parts["erase_loss"] = backward_mse(e_prompts, e_seeds, e_target, applied, inputs, 1 / cfg.grad_accum)
                n_target = targets.get(n_prompts, n_seeds)
                parts["preserve_loss"] = backward_mse(n_prompts, n_seeds, n_target, applied, inputs,
                                                      cfg.beta / cfg.grad_accum)
                parts["penalty"] = sparsity_penalty(masks, cfg)
                parts["loss"] = (parts["erase_loss"] + cfg.beta * parts["preserve_loss"] + parts["penalty"].detach()
                                 + cfg.adaptive_lambda * parts.get("target_preserve_loss", 0.0))
                if not torch.isfinite(parts["loss"]):
                    masks.restore(last_good)
                    status = f"stopped: non-finite loss at step {step}"
                    break
                # per step: the leaves' gradients, through the values, into the logits (per call: done already)
                grads = {name: applied[name].grad for name in values if applied[name].grad is not None}
                if grads:
                    torch.autograd.backward([values[name] for name in grads], list(grads.values()))
                if parts["penalty"].requires_grad:
                    (parts["penalty"] / cfg.grad_accum).backward()
                for key, value in parts.items():
                    totals[key] += float(value.detach()) / cfg.grad_accum
            if status != "finished":
                break
            _average_across_workers(masks)
            optimizer.step()
            if adaptive is not None:
                adaptive.optimizer.step()
            if not masks.is_finite():
                masks.restore(last_good)
                status = f"stopped: non-finite mask logits after step {step}"
                break
            steps_done = step + 1
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                removed = sparsity(sites, masks.binary(threshold=cfg.threshold))["overall"]
                row = {"step": step + 1, **{k: round(v, 6) for k, v in totals.items()}, "sparsity": removed}
                history.append(row)
                bar.set_postfix(loss=f"{totals['loss']:.4g}", sparsity=f"{removed:.4f}")
                if on_log is not None:
                    rng = {"mask_noise": mask_noise.get_state(), "torch": torch.get_rng_state()}
                    on_log(row, TrainState(masks, optimizer, step + 1, history, adaptive, rng))
        bar.close()

    # ---- result
    result = TrainResult(masks, cfg, history, status, time.perf_counter() - started, steps_done,
                         adaptive.report() if adaptive is not None else None)
    if status != "finished":
        raise TrainingStopped(status, result)
    return result
