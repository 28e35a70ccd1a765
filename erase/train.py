"""The MCE recipe: learn sparse masks that erase one concept (METHOD.md section 1).

    L = mean ||F_θ(x_T, c_R) - target(x_T, c_R)||²  +  β · mean ||F_θ(x_T, c_N) - F_θ'(x_T, c_N)||²
        + optional sparsity penalty

F is the whole sampler (every step, unrolled), θ the masked and θ' the original model. The
targets do not depend on the masks, so each (prompt, noise seed) target is computed once, with
the hooks off, and cached. One mask sample (hard-concrete noise) serves both terms of a step.

The recipe is one function, `train`, read top to bottom: setup, loop, result. It imports neither
Ray nor MLflow; orchestration passes `on_log` to see progress.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

from erase.masks import MaskHooks, Masks, select_sites, sparsity
from erase.prompts import PromptError, substitute
from erase.sampler import sample

TARGETS = ("empty", "substitute")
OPTIMIZERS = ("adam", "adamw")


class TrainError(ValueError):
    """The run's settings or inputs cannot work; the message says what to change."""


class TrainingStopped(RuntimeError):
    """The loss or the masks became non-finite; `result` holds the last good masks."""

    def __init__(self, message: str, result: "TrainResult"):
        super().__init__(message)
        self.result = result


@dataclass
class TrainConfig:
    concept: str
    sites: tuple[str, ...] = ("ffn", "norm")
    parametrisation: str = "hard_concrete"
    init_logit: float = 3.0
    target: str = "empty"  # "empty" or "substitute"
    substitutions: dict[str, str] = field(default_factory=dict)
    beta: float = 0.01
    lr_ffn: float = 0.5
    lr_norm: float = 0.5
    lr_attn: float = 0.0
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    steps: int = 400
    batch_size: int = 4
    grad_accum: int = 1
    sampling_steps: int | None = None  # None: the generator's default
    noises_per_prompt: int = 1
    # Explicit sparsity control on the smooth removed share 1 - mean(sigmoid(λ)):
    # weight * removed (L1), or weight * max(0, removed - target_sparsity) (a budget).
    sparsity_weight: float = 0.0
    target_sparsity: float | None = None
    checkpointing: bool = True
    threshold: float = 0.0
    seed: int = 0
    log_every: int = 10

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, f"steps must be at least 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"gradient accumulation must be at least 1, got {self.grad_accum}"),
            (self.noises_per_prompt >= 1, f"noises per prompt must be at least 1, got {self.noises_per_prompt}"),
            (self.beta >= 0, f"beta must be >= 0, got {self.beta}"),
            (min(self.lr_ffn, self.lr_norm, self.lr_attn) >= 0, "learning rates must be >= 0"),
            (self.sparsity_weight >= 0, f"sparsity weight must be >= 0, got {self.sparsity_weight}"),
            (self.target_sparsity is None or 0 <= self.target_sparsity < 1,
             f"target sparsity must be in [0, 1), got {self.target_sparsity}"),
            (self.target in TARGETS, f"unknown target {self.target!r}; use one of {', '.join(TARGETS)}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}"),
            (self.target != "substitute" or bool(self.substitutions),
             "target 'substitute' needs a map: pass --substitute OLD=NEW (e.g. 'nude man=a man')"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)
        if all(self.lr(g) == 0 for g in self.sites):
            raise TrainError(f"every selected site group ({', '.join(self.sites)}) has learning rate 0: nothing would train")

    def lr(self, group: str) -> float:
        return {"ffn": self.lr_ffn, "norm": self.lr_norm, "attn": self.lr_attn}[group]


@dataclass
class TrainResult:
    masks: Masks
    config: TrainConfig
    history: list[dict]
    status: str  # "finished" or "stopped: ..."
    seconds: float
    steps_done: int

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
        }


def _cycle(examples: list[tuple[str, int]], batch_size: int, seed: int):
    """Endless shuffled batches of (prompts, seeds); a short list simply repeats."""
    rng = random.Random(seed)
    order: list[tuple[str, int]] = []
    while True:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(examples)
                rng.shuffle(order)
            batch.append(order.pop())
        yield [p for p, _ in batch], [s for _, s in batch]


class TargetCache:
    """Final latents of the original model, F_θ'(x_T, prompt), computed once per (prompt, seed)."""

    def __init__(self, gen, sigmas: torch.Tensor, hooks: MaskHooks):
        self.gen, self.sigmas, self.hooks = gen, sigmas, hooks
        self.cache: dict[tuple[str, int], torch.Tensor] = {}

    @torch.no_grad()
    def get(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        missing = [(p, s) for p, s in zip(prompts, seeds) if (p, s) not in self.cache]
        missing = list(dict.fromkeys(missing))
        if missing:
            saved, self.hooks.values = self.hooks.values, {}  # the original model: no masks
            try:
                cond = self.gen.encode([p for p, _ in missing])
                noise = self.gen.noise([s for _, s in missing])
                final = sample(lambda x, sigma: self.gen.velocity(x, sigma, cond), noise, self.sigmas, checkpointing=False)
            finally:
                self.hooks.values = saved
            for key, latent in zip(missing, final):
                self.cache[key] = latent
        return torch.stack([self.cache[(p, s)] for p, s in zip(prompts, seeds)])


def sparsity_penalty(masks: Masks, cfg: TrainConfig) -> torch.Tensor:
    if cfg.sparsity_weight == 0:
        return torch.zeros(())
    removed = 1 - masks.density()
    if cfg.target_sparsity is None:
        return cfg.sparsity_weight * removed
    return cfg.sparsity_weight * torch.relu(removed - cfg.target_sparsity)


def train(gen, cfg: TrainConfig, erase_prompts: list[str], neutral_prompts: list[str], *,
          progress: bool = True, on_log: Callable[[dict, Masks], None] | None = None,
          init_logits: dict[str, torch.Tensor] | None = None, start_step: int = 0) -> TrainResult:
    """Run MCE on `gen`; raises TrainingStopped (with the last good masks) on a non-finite loss."""
    # ---- setup
    cfg.validate()
    if not erase_prompts:
        raise PromptError(f"no prompts for the concept {cfg.concept!r}: the erase prompt list is empty")
    if not neutral_prompts:
        raise PromptError("no neutral prompts: the preservation prompt list is empty")
    if cfg.target == "substitute":
        target_prompt = {p: substitute(p, cfg.substitutions) for p in erase_prompts}
    else:
        target_prompt = {p: "" for p in erase_prompts}
    sites = select_sites(gen.mask_sites(), cfg.sites)
    sites = [s for s in sites if cfg.lr(s.group) > 0]
    masks = Masks.create(sites, cfg.parametrisation, cfg.init_logit, device=gen.device)
    if init_logits is not None:
        masks.restore(init_logits)
    opt_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_class([{"params": params, "lr": cfg.lr(group)} for group, params in masks.by_group().items()],
                          weight_decay=cfg.weight_decay)
    sigmas = gen.sigmas(cfg.sampling_steps or gen.default_steps)
    erase_examples = [(p, cfg.seed * 100_003 + i * cfg.noises_per_prompt + k)
                      for i, p in enumerate(erase_prompts) for k in range(cfg.noises_per_prompt)]
    neutral_examples = [(p, cfg.seed * 100_003 + 50_000 + i * cfg.noises_per_prompt + k)
                        for i, p in enumerate(neutral_prompts) for k in range(cfg.noises_per_prompt)]
    erase_batches = _cycle(erase_examples, cfg.batch_size, cfg.seed)
    neutral_batches = _cycle(neutral_examples, cfg.batch_size, cfg.seed + 1)
    mask_noise = torch.Generator("cpu").manual_seed(cfg.seed)
    hooks = MaskHooks(gen.transformer, sites)
    targets = TargetCache(gen, sigmas, hooks)
    history: list[dict] = []
    started = time.perf_counter()
    status, steps_done = "finished", start_step

    def mse_of_final(prompts, seeds, target):
        cond = gen.encode(prompts)
        final = sample(lambda x, sigma: gen.velocity(x, sigma, cond), gen.noise(seeds), sigmas, cfg.checkpointing)
        return torch.mean((final - target) ** 2)

    # ---- loop
    with hooks:
        bar = tqdm(range(start_step, cfg.steps), desc=f"erase {cfg.concept}", disable=not progress, unit="step")
        for step in bar:
            last_good = masks.snapshot()
            optimizer.zero_grad(set_to_none=True)
            totals = {"loss": 0.0, "erase_loss": 0.0, "preserve_loss": 0.0, "penalty": 0.0}
            for _ in range(cfg.grad_accum):
                e_prompts, e_seeds = next(erase_batches)
                n_prompts, n_seeds = next(neutral_batches)
                e_target = targets.get([target_prompt[p] for p in e_prompts], e_seeds)
                n_target = targets.get(n_prompts, n_seeds)
                hooks.values = masks.values(training=True, generator=mask_noise)
                erase_loss = mse_of_final(e_prompts, e_seeds, e_target)
                preserve_loss = mse_of_final(n_prompts, n_seeds, n_target)
                penalty = sparsity_penalty(masks, cfg)
                loss = erase_loss + cfg.beta * preserve_loss + penalty
                if not torch.isfinite(loss):
                    masks.restore(last_good)
                    status = f"stopped: non-finite loss at step {step}"
                    break
                (loss / cfg.grad_accum).backward()
                for key, value in (("loss", loss), ("erase_loss", erase_loss),
                                   ("preserve_loss", preserve_loss), ("penalty", penalty)):
                    totals[key] += float(value.detach()) / cfg.grad_accum
            if status != "finished":
                break
            optimizer.step()
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
                    on_log(row, masks)
        bar.close()

    # ---- result
    result = TrainResult(masks, cfg, history, status, time.perf_counter() - started, steps_done)
    if status != "finished":
        raise TrainingStopped(status, result)
    return result
