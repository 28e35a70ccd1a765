"""`erase bench`: time and peak memory of one MCE optimisation step.

Each row (sampling steps x checkpointing on/off) runs the real recipe, `erase.train.train`, in
a fresh subprocess so rows cannot share allocator state. The first optimisation step fills the
target cache and is not timed; the next `repeats` steps are, and the row reports the fastest.
Peak memory is measured over those timed steps, above what was resident before them:
on CUDA torch's peak allocated bytes; on a CPU the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs), which also counts allocator slack, so CPU figures are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from erase.adaptive import concept_phrasings
from erase.config import default_value, resolve
from erase.errors import EraseError


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    return _rss_mb("VmRSS")


def _peak(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _rss_mb("VmHWM")


def measure_row(model: str, steps: int, checkpointing: bool, *, batch_size: int = 1, sites=("ffn", "norm"),
                repeats: int = 2, device: str = "cpu", model_path: str | None = None,
                block_checkpointing: bool = False) -> dict:
    """One row, measured in this process."""
    from erase.pipelines import load_generator
    from erase.train import train

    gen = load_generator(model, model_path, device=device)
    cfg = resolve(model, "bench", flags={"sites": tuple(sites), "steps": 1 + repeats, "batch_size": batch_size,
                                         "sampling_steps": steps, "checkpointing": checkpointing, "log_every": 1,
                                         "block_checkpointing": block_checkpointing,
                                         "lr_attn": 0.5 if "attn" in sites else 0.0,
                                         "noises_per_prompt": 1})  # one noise: later steps reuse cached targets
    marks: list[float] = []
    baseline: list[float] = []

    def on_log(row, state):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        if len(marks) == 1:  # after the untimed first step: start measuring
            baseline.append(_reset_peak(device))
            marks[0] = time.perf_counter()

    # one prompt per term, so every step after the first reuses the cached targets
    train(gen, cfg, ["a photo of a cat"] * batch_size, ["a bowl of fruit on a table"] * batch_size,
          progress=False, on_log=on_log)
    peak = _peak(device) - baseline[0]
    seconds = min(b - a for a, b in zip(marks, marks[1:]))
    return {"steps": steps, "checkpointing": checkpointing, "seconds": round(seconds, 4), "peak_mb": round(peak, 1)}


# glibc keeps freed heap pages for reuse: the first (untimed) step's activations would be reused by
# the next without raising the resident set, and a CPU peak would read ~0. With a fixed mmap
# threshold every allocation over 64 KiB is its own mapping, returned when freed, so the resident
# set follows the live bytes. (No effect on CUDA figures.)
ROW_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def run(model: str = "flux-bench", steps_list=(1, 2, 4, 8), *, batch_size: int = 1, sites=("ffn", "norm"),
        repeats: int = 2, device: str = "cpu", model_path: str | None = None, progress: bool = True) -> dict:
    """All rows, each in its own subprocess; returns the report with ratios against the bars."""
    from tqdm import tqdm

    from erase.pipelines import load_generator

    gen = load_generator(model, model_path, device="cpu")
    params = sum(p.numel() for p in gen.transformer.parameters())
    del gen
    jobs = [(s, c) for s in steps_list for c in (True, False)]
    rows = []
    for steps, ckpt in tqdm(jobs, desc="bench rows", disable=not progress):
        spec = dict(model=model, steps=steps, checkpointing=ckpt, batch_size=batch_size, sites=list(sites),
                    repeats=repeats, device=device, model_path=model_path)
        proc = subprocess.run([sys.executable, "-m", "erase.bench", "--row", json.dumps(spec)],
                              capture_output=True, text=True, env={**os.environ, **ROW_ENV})
        if proc.returncode != 0:
            raise RuntimeError(f"bench row {spec} failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"model": model, "transformer_params": params, "device": device, "batch_size": batch_size,
            "sites": list(sites), "repeats": repeats, "rows": rows, "ratios": ratios(rows)}


def ratios(rows: list[dict]) -> dict:
    """The issue's bars: checkpointed memory growth with steps, checkpointed time over plain."""
    by = {(r["steps"], r["checkpointing"]): r for r in rows}
    steps = sorted({r["steps"] for r in rows})
    out = {"time_checkpointed_over_plain": {}, "peak_checkpointed_over_plain": {}}
    for s in steps:
        if (s, True) in by and (s, False) in by:
            out["time_checkpointed_over_plain"][str(s)] = round(by[s, True]["seconds"] / by[s, False]["seconds"], 3)
            plain_peak = by[s, False]["peak_mb"]
            if plain_peak > 0:
                out["peak_checkpointed_over_plain"][str(s)] = round(by[s, True]["peak_mb"] / plain_peak, 3)
    lo, hi = steps[0], steps[-1]
    if (lo, True) in by and (hi, True) in by and by[lo, True]["peak_mb"] > 0:
        out[f"peak_checkpointed_{hi}_over_{lo}_steps"] = round(by[hi, True]["peak_mb"] / by[lo, True]["peak_mb"], 3)
    return out


# ---------------------------------------------------------------- the GPU check of the recipes


def check_recipes(model: str, recipes: list[str], *, device: str = "cpu", random_weights: bool = False,
                  model_path: str | None = None, steps: int = 3, gpu_memory_gb: float | None = None,
                  progress: bool = True) -> dict:
    """A few optimisation steps of each recipe as a run takes them (the planner's memory setting),
    each timed and measured beside the planner's prediction. Seconds per step are the fastest step
    after the first (which fills the target cache); the peak is over the whole run, weights included.

    On CUDA the peak is torch's peak allocated bytes and the memory is the device's; on a CPU (the
    twin that the tests run, on flux-bench) the peak resident set, and `gpu_memory_gb` or 80 GiB.
    `before_gb` is what was in use before the recipe's first step: the weights (and on a CPU the
    process itself, which the planner does not count).
    """
    from dataclasses import replace

    from erase.config import recipe_settings
    from erase.pipelines import load_generator
    from erase.plan import plan
    from erase.prompts import prompt_sets
    from erase.train import train

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EraseError(f"no CUDA device here ({device}): this check runs on a GPU. Its CPU twin: "
                         "erase bench --recipe paper --device cpu --model flux-bench")
    for recipe in recipes:
        recipe_settings(model, recipe)  # an unknown recipe fails before any weights are built
    if steps < 2:
        raise EraseError(f"--check-steps must be at least 2 (the first fills the target cache), got {steps}")
    gen = load_generator(model, model_path, device=device, random_weights=random_weights)
    if gpu_memory_gb is None:
        gpu_memory_gb = (torch.cuda.get_device_properties(device).total_memory / 2**30
                         if device.startswith("cuda") else 80.0)
    erase_prompts, neutral_prompts = prompt_sets(model, "cat")
    rows = []
    for recipe in recipes:
        cfg = resolve(model, "cat", flags={"recipe": recipe, "steps": steps, "log_every": 1})
        predicted = plan(model, cfg, gpu_memory_gb, device=device)
        cfg = replace(cfg, **predicted["setting"])
        marks: list[float] = []

        def on_log(row, state, marks=marks):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

        baseline = _reset_peak(device)
        train(gen, cfg, erase_prompts, neutral_prompts, progress=progress, on_log=on_log)
        peak = _peak(device) / 1024
        rows.append({"recipe": recipe, "setting": predicted["setting"], "fits": predicted["fits"],
                     "seconds_per_step": round(min(b - a for a, b in zip(marks, marks[1:])), 3),
                     "peak_gb": round(peak, 3), "before_gb": round(baseline / 1024, 3),
                     "predicted_peak_gb": predicted["peak_gb"], "predicted_gpu_minutes": predicted["gpu_minutes"],
                     "steps": steps, "samples_per_step": cfg.batch_size * cfg.grad_accum})
    return {"model": model, "device": device, "random_weights": random_weights, "gpu_memory_gb": gpu_memory_gb,
            "peak": "torch.cuda.max_memory_allocated" if device.startswith("cuda") else "peak resident set (VmHWM)",
            "recipes": rows}


# ---------------------------------------------------------------- inference with masks (--inference)


# The reference code's released FLUX.1 masks remove these shares of each site's units (docs/method.md,
# section 3; `erase masks import-reference` reproduces them): image-stream FFN, text-stream FFN, norm.
PAPER_SPARSITY = {"ff": 0.476, "ff_context": 0.783, "norm": 0.177}
INFERENCE_VARIANTS = ("base", "hooks", "folded", "dropped")


def paper_sparsity_masks(sites: list, seed: int = 0) -> dict[str, torch.Tensor]:
    """Binary masks that remove PAPER_SPARSITY's share of every ffn and norm site's units, chosen at random."""
    g = torch.Generator().manual_seed(seed)
    binary = {}
    for site in sites:
        kind = "norm" if site.group == "norm" else "ff_context" if site.name.endswith("ff_context") else "ff"
        if site.group not in ("ffn", "norm"):
            continue
        mask = torch.ones(site.size)
        mask[torch.randperm(site.size, generator=g)[: round(PAPER_SPARSITY[kind] * site.size)]] = 0
        binary[site.name] = mask
    return binary


def measure_inference(model: str, variant: str, *, images: int = 3, device: str = "cpu",
                      model_path: str | None = None) -> dict:
    """Seconds per image (the fastest of `images` timed ones, after an untimed one) and the peak memory
    above the loaded model, for one variant: the base model, the masks as forward hooks, folded into the
    weights, or the masked FFN neurons dropped. Also the first timed image, for the equality checks."""
    from erase.evaluate import generate
    from erase.masks import MaskHooks, drop_masked_neurons, fold_into_weights
    from erase.pipelines import load_generator

    gen = load_generator(model, model_path, device=device)
    sites = gen.mask_sites()
    binary = {} if variant == "base" else paper_sparsity_masks(sites)
    mask_sites = [s for s in sites if s.name in binary]
    hooks, dropped = None, 0
    if variant == "hooks":
        hooks = MaskHooks(gen.transformer, mask_sites, binary)
    elif variant == "folded":
        fold_into_weights(gen.transformer, mask_sites, binary)
    elif variant == "dropped":
        dropped = drop_masked_neurons(gen.transformer, mask_sites, binary)
    params = sum(p.numel() for p in gen.transformer.parameters())
    prompt = ["a photo of a cat"]
    generate(gen, prompt, [0])  # untimed: first-call allocations and caches
    baseline = _reset_peak(device)
    seconds, first = [], None
    for seed in range(images):
        started = time.perf_counter()
        image = generate(gen, prompt, [seed])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        first = image if first is None else first
    peak = _peak(device) - baseline
    if hooks is not None:
        hooks.remove()
    ffn_units = sum(s.size for s in sites if s.group == "ffn")
    return {"model": model, "variant": variant, "seconds_per_image": round(min(seconds), 4),
            "peak_mb": round(peak, 1), "transformer_params": params, "dropped_neurons": dropped,
            "dropped_share_of_ffn": round(dropped / ffn_units, 4), "image": first[0].flatten().tolist()}


def run_inference(models=("flux-bench", "toy"), *, images: int = 3, device: str = "cpu",
                  progress: bool = True) -> dict:
    """Every (model, variant) in its own subprocess; per model the ratios to the base model and how far
    the hooked and dropped models' images are from the folded one's (max absolute pixel difference)."""
    from tqdm import tqdm

    jobs = [(m, v) for m in models for v in INFERENCE_VARIANTS]
    rows = []
    for model, variant in tqdm(jobs, desc="inference rows", disable=not progress):
        spec = {"kind": "inference", "model": model, "variant": variant, "images": images, "device": device}
        proc = subprocess.run([sys.executable, "-m", "erase.bench", "--row", json.dumps(spec)],
                              capture_output=True, text=True, env={**os.environ, **ROW_ENV})
        if proc.returncode != 0:
            raise RuntimeError(f"bench row {spec} failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    report = {"device": device, "images": images, "sparsity": PAPER_SPARSITY, "models": {}}
    for model in models:
        by = {r["variant"]: r for r in rows if r["model"] == model}
        folded = torch.tensor(by["folded"]["image"])
        report["models"][model] = {
            "variants": {v: {k: x for k, x in r.items() if k not in ("image", "model", "variant")} for v, r in by.items()},
            "time_over_base": {v: round(by[v]["seconds_per_image"] / by["base"]["seconds_per_image"], 3) for v in by},
            "params_over_base": {v: round(by[v]["transformer_params"] / by["base"]["transformer_params"], 3) for v in by},
            "max_abs_difference_to_folded": {v: float((torch.tensor(by[v]["image"]) - folded).abs().max())
                                             for v in ("hooks", "dropped")},
        }
    return report


def _main_row(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m erase.bench")
    parser.add_argument("--row", required=True, help="JSON spec of one row (internal: used by `erase bench`)")
    spec = json.loads(parser.parse_args(argv).row)
    import logging

    logging.disable(logging.WARNING)
    measure = measure_inference if spec.pop("kind", "step") == "inference" else measure_row
    print(json.dumps(measure(**spec)))


if __name__ == "__main__":
    _main_row(sys.argv[1:])


# ---------------------------------------------------------------- target strategies (AGE)


def match_beta(erase_at, tried: list[dict], level: float, tolerance: float, max_runs: int) -> list[dict]:
    """Move β until the erasure rate (`erase_at(beta)["erasure_rate"]["value"]`) is within `tolerance`
    of `level`; `tried` holds the runs so far. Smaller β erases harder, so β is divided by 4 while
    the rate is above the level and multiplied by 4 while it is below, until the level is bracketed;
    then the bracket is bisected in log space. At most `max_runs` runs in all. Appends to and returns `tried`."""
    too_hard, too_weak = None, None  # the largest β that erased below the level, the smallest above it
    while abs(_rate(tried[-1]) - level) > tolerance and len(tried) < max_runs:
        beta = tried[-1]["beta"]
        if _rate(tried[-1]) < level:
            too_hard = beta if too_hard is None else max(too_hard, beta)
        else:
            too_weak = beta if too_weak is None else min(too_weak, beta)
        if too_weak is None:
            beta = too_hard * 4
        elif too_hard is None:
            beta = too_weak / 4
        else:
            beta = (too_hard * too_weak) ** 0.5
        tried.append(erase_at(beta))
    return tried


def matching_level(first_rates: dict[str, float], level: float | None = None) -> float:
    """The erasure rate the strategies are matched at: `level` if given, else the strongest
    strategy's rate at the first β (the lowest: the level that matters for erasure)."""
    if level is None:
        return min(first_rates.values())
    if not 0.0 <= level <= 1.0:
        raise EraseError(f"the erasure level is a rate between 0 and 1, got {level} (5% is 0.05)")
    return level


def hardest_common_level(strategies: dict) -> float:
    """The lowest erasure rate every strategy reached in its runs: the level to match at when one of
    them cannot reach the default (e.g. an adaptive target that stops erasing harder as β falls)."""
    return max(min(run["erasure_rate"] for run in s["runs"]) for s in strategies.values())


def graph_neighbours(concept: str, path: str | None = None, model: str = "toy", n: int = 3) -> list[str]:
    """The `n` concepts that erasing `concept` hurts most, read off a concept graph (erase graph's
    graph.json; by default the one made on the model's weights)."""
    from erase.graph import nearest_neighbours, read_graph
    from erase.pipelines import model as model_entry

    path = path or model_entry(model).concept_graph
    if path is None:
        raise EraseError(f"{model} ships no concept graph: run `erase graph` and pass its graph.json with --graph")
    delta = read_graph(path)
    if concept not in delta:
        raise EraseError(f"the concept graph in {path} has no row for {concept!r}; it has {', '.join(delta)}")
    return nearest_neighbours(delta, concept, n)


def toy_erasure(concept: str, seeds_per_prompt: int):
    """What the toy benchmarks erase with: the generator, the concept's prompt sets, and an Evaluator
    on the toy world's evaluation rows (`seeds_per_prompt` each) with its own detector."""
    from erase.evaluate import Evaluator, evaluation_rows
    from erase.pipelines import load_generator
    from erase.pipelines import model as model_entry
    from erase.prompts import prompt_sets

    erase_prompts, neutral = prompt_sets("toy", concept)  # a concept of the toy world, or a clear error
    gen = load_generator("toy")
    evaluator = Evaluator(gen, model_entry("toy").detector, evaluation_rows("toy", concept, seeds_per_prompt),
                          concept=concept)
    return gen, erase_prompts, neutral, evaluator


def compare_targets(concept: str, neighbours: list[str], *, steps: int | None = None, beta: float | None = None,
                    seed: int = 0, seeds_per_prompt: int = 4, substitute_phrase: str = "shape",
                    strategies=("empty", "substitute", "adaptive", "edit"), match: bool = False, level: float | None = None,
                    tolerance: float = 0.02, max_runs: int = 5, progress: bool = True) -> dict:
    """Erase `concept` from the toy world once per target strategy (same settings, seeds and prompts)
    and measure its erasure and the preservation of its nearest neighbours in the concept graph.

    `match`: compare at equal erasure. The strategies erase by different amounts at the same β,
    and any strategy keeps its neighbours better by erasing less. So every strategy's β is moved
    (`match_beta`: factors of 4, then bisection in log space; up to `max_runs` runs) until its
    erasure rate is within `tolerance` of `level`: by default the strongest eraser's rate at the
    first β, the level that matters for erasure. The run closest to the level is reported and
    every run is listed; a strategy that cannot reach the level shows it in its runs.
    """
    from erase.train import train

    gen, erase_prompts, neutral, evaluator = toy_erasure(concept, seeds_per_prompt)
    # the recipe's settings for this concept, as `erase train` would use them: its β, its noises per
    # prompt and, for a colour or style, its substitution (the word dropped); otherwise every
    # phrasing of the concept becomes `substitute_phrase` (the erase prompts name it in all of them)
    beta = default_value("toy", "beta", concept) if beta is None else beta
    steps = default_value("toy", "steps", concept) if steps is None else steps
    substitutions = (default_value("toy", "substitutions", concept)
                     or dict.fromkeys(concept_phrasings("toy", concept), substitute_phrase))

    def erase_once(strategy: str, run_beta: float) -> dict:
        cfg = resolve("toy", concept, flags={"target": strategy, "beta": run_beta, "steps": steps, "seed": seed,
                                             "substitutions": substitutions})
        result = train(gen, cfg, erase_prompts, neutral, progress=progress)
        report, _ = evaluator((result.masks.sites, result.masks.binary()))
        # None: the neighbour was not measured (no prompt of it left, or a base rate of 0)
        kept = {n: report["preservation_by_concept"].get(n) for n in neighbours}
        measured = [v for v in kept.values() if v is not None]
        run = {"beta": run_beta, "erasure_rate": report["erasure_rate"], "base_rate": report["base_rate"],
               "preservation": report["preservation"],
               "neighbour_preservation": kept, "neighbour_mean": sum(measured) / len(measured) if measured else None,
               "seconds": round(result.seconds, 1), "learnt_target": result.learnt_target}
        # one line per run on stderr, with or without --json: a benchmark of an hour or more shows
        # where it is, and an interrupted one leaves what it measured in the log
        print(f"bench targets: {concept} {strategy} beta {run_beta:.4g}: {json.dumps(run, default=str)}",
              file=sys.stderr, flush=True)
        return run

    out = {"concept": concept, "neighbours": neighbours, "steps": steps, "beta": beta, "seed": seed,
           "substitute": ", ".join(f"{k}={v!r}" for k, v in substitutions.items()), "matched_erasure": match}
    runs = {strategy: [erase_once(strategy, beta)] for strategy in strategies}
    if match:
        level = matching_level({s: _rate(r[0]) for s, r in runs.items()}, level)
        out["erasure_level"] = level
        for strategy, tried in runs.items():
            match_beta(lambda b, s=strategy: erase_once(s, b), tried, level, tolerance, max_runs)
    out["strategies"] = {strategy: _closest(tried, level if match else None) for strategy, tried in runs.items()}
    if match:
        rates = [_rate(r) for r in out["strategies"].values()]
        out["erasure_spread"] = max(rates) - min(rates)
        out["equal_erasure"] = out["erasure_spread"] <= tolerance
    return out


def _rate(run: dict) -> float:
    return run["erasure_rate"]["value"]


def _closest(tried: list[dict], level: float | None) -> dict:
    """The run whose erasure rate is closest to `level` (the first run without one), with every run listed."""
    best = min(tried, key=lambda r: abs(_rate(r) - level)) if level is not None else tried[0]
    return {**best, "runs": [{"beta": r["beta"], "erasure_rate": _rate(r), "neighbour_mean": r["neighbour_mean"]}
                             for r in tried]}


# ---------------------------------------------------------------- search efficiency (sweeps)

GRID_BETAS = (0.1, 0.01, 1e-3, 1e-4, 1e-5)  # the reference code's hand-written grid, times the learning rates
PAPER_BETA = 0.01  # the paper's default β, the scale the reference grid was written for


def grid_betas(model: str) -> list[float]:
    """The reference grid moved to `model`'s β scale: GRID_BETAS x (its recipe β / the paper's).

    The toy world's loss has another scale than FLUX.1's (its recipe β is 0.25, not 0.01), so the FLUX
    grid taken as it is would test only βs at which the toy loses most of what it should keep."""
    scale = default_value(model, "beta") / PAPER_BETA
    return [float(f"{b * scale:.6g}") for b in GRID_BETAS]


def _best_so_far(points: list[dict]) -> list[dict]:
    """[{steps, score}] in the order spent -> [{steps: cumulative, best: best score so far}]."""
    curve, spent, best = [], 0, float("-inf")
    for p in points:
        spent += int(p["steps"])
        best = max(best, p["score"] if p["score"] is not None else float("-inf"))
        curve.append({"steps": spent, "best": best if best > float("-inf") else None})
    return curve


def compare_search(concept: str, *, steps: int = 100, lrs=(0.5, 1.0), trials: int = 10, storage: str,
                   tracking_uri: str | None = None, progress: bool = True, on_sweep_progress=None) -> dict:
    """The best objective as a function of erasure steps spent: the reference code's grid
    (`grid_betas` x `lrs`, each run to `steps`) against `erase sweep` (Optuna + ASHA, `trials`
    trials in the same box). Same objective, evaluation prompts and seeds; only optimisation
    steps count as compute (both evaluate; the sweep more often, to let ASHA stop trials)."""
    grid = _grid_runs(concept, grid_betas("toy"), lrs, steps, progress)
    summary = _sweep_in_the_grids_box(concept, grid_betas("toy"), lrs, steps, trials, storage, tracking_uri,
                                      on_sweep_progress)
    done = sorted(summary["trials"], key=lambda t: t.get("ended_at") or 0)
    sweep = [{"config": t["config"], "steps": t["step"] or 0, "status": t["status"], "erasure_rate": t["erasure_rate"],
              "preservation": t["preservation"], "score": t["score"]} for t in done]
    grid_curve, sweep_curve = _best_so_far(grid), _best_so_far(sweep)
    grid_best, grid_steps = grid_curve[-1]["best"], grid_curve[-1]["steps"]
    reached = next((p["steps"] for p in sweep_curve if p["best"] is not None and grid_best is not None
                    and p["best"] >= grid_best), None)
    return {"concept": concept, "steps_per_run": steps, "grid": {"runs": grid, "curve": grid_curve},
            "optuna_asha": {"runs": sweep, "curve": sweep_curve, "sweep_id": summary["sweep_id"],
                            "sweep_cost": summary.get("sweep_cost")},
            "grid_best": grid_best, "grid_steps": grid_steps, "optuna_best": sweep_curve[-1]["best"] if sweep else None,
            "optuna_steps": sweep_curve[-1]["steps"] if sweep else 0, "optuna_steps_to_grid_best": reached,
            "bar_met": reached is not None and reached <= grid_steps / 3}


def _grid_runs(concept: str, betas: list[float], lrs, steps: int, progress: bool) -> list[dict]:
    """One erasure per (β, learning rate) of the grid, each scored on the sweep's evaluation rows."""
    from erase.train import train
    from erase.trial import trial_figures

    gen, erase_prompts, neutral, evaluator = toy_erasure(concept, seeds_per_prompt=1)  # the sweep's evaluation rows
    grid = []
    for beta in betas:
        for lr in lrs:
            cfg = resolve("toy", concept, flags={"beta": beta, "lr_ffn": lr, "lr_norm": lr, "steps": steps,
                                                 "batch_size": 4, "sites": ("ffn", "norm")})  # the sweep's target too
            result = train(gen, cfg, erase_prompts, neutral, progress=progress)
            found = trial_figures(evaluator((result.masks.sites, result.masks.binary()))[0])
            grid.append({"config": {"beta": beta, "lr": lr}, "steps": steps, "erasure_rate": found["erasure_rate"],
                         "preservation": found.get("preservation"), "score": found["score"]})
    return grid


def _sweep_in_the_grids_box(concept: str, betas: list[float], lrs, steps: int, trials: int, storage: str,
                            tracking_uri: str | None, on_progress) -> dict:
    """`erase sweep` over the grid's range of β and learning rates; returns the study's summary."""
    import tempfile

    from erase.sweep import plan, run_sweep

    space = {"description": "compare_search: the grid's box",
             "fixed": {"batch_size": 4, "sites": "ffn,norm", "steps": steps},
             "search": {"beta": {"distribution": "loguniform", "low": min(betas), "high": max(betas)}}}
    for name in ("lr_ffn", "lr_norm"):
        if min(lrs) < max(lrs):
            space["search"][name] = {"distribution": "loguniform", "low": min(lrs), "high": max(lrs)}
        else:  # one learning rate: nothing to search
            space["fixed"][name] = lrs[0]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(space, f)  # JSON is YAML
    grace = max(1, steps // 5)
    try:
        specs = plan("toy", [concept], f.name, trials, storage, tracking_uri=tracking_uri, report_every=grace,
                     grace_steps=grace)
        (summary,) = run_sweep(specs, on_progress=on_progress)
    finally:
        os.unlink(f.name)
    return summary
