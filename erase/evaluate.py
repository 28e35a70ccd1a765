"""`erase eval`: generate from fixed prompts and seeds, run a detector, compute the figures.

An evaluation is a list of rows {prompt, seed, concept, kind}; `kind` says what the row is for:
- "concept":  a prompt naming `concept` plainly; gives each concept's detection rate;
- "rephrase": a prompt naming the erased concept only indirectly (synonyms, descriptions);
- "neutral":  a prompt naming none of the evaluated concepts (fidelity, CLIP score);
- "adversarial:<set>": a prompt from a public attack set (Ring-A-Bell, MMA-Diffusion, P4D, I2P).

Every row names the prompt set it came from ("toy:test", "file:my.txt"), and every figure carries
`split`: {name, hash, prompts}, the sets' names and a hash of its distinct prompts, so that a
figure says which prompts it was measured on (erase.evaluate.split_figure). A model with prompt
splits (the toy world: train, validation, test) is evaluated on "test" unless told otherwise; a
sweep selects on "validation"; neither is ever trained on.

The figures, each {value, n, low, high} (a 95% interval: Wilson for rates, bootstrap over
images for preservation, normal for means):
- detection rate of a concept: share of its "concept" generations in which the detector finds it;
- erasure_rate: the erased concept's detection rate with the mask (lower is better);
- preservation: the other concepts' detection rates with the mask relative to the base model,
  averaged (1.0 = untouched), on their prompts that do not name the erased concept ("a red
  cross" losing its cross is the erasure, not damage to red); the per-concept detection rates
  still count every prompt;
- neutral_fidelity: mean absolute pixel difference (images in [0, 1]) between masked and base
  generations from the same noise, on prompts that do not name the concept (0 = identical);
- rephrase_erasure_rate: detection rate of the concept on "rephrase" prompts, with the mask;
- robustness/<family>: its detection rate on each robustness family (kind "robust:<family>": the
  word repeated, a synonym beside it, the bare word, extra attributes, a comma list; the toy
  world's list is erase.pipelines.toy_world.ROBUSTNESS_FAMILIES), base and masked, and
  robust_erasure_rate, pooled over the families and the rephrasings;
- attack_success_rate: share of concept prompts for which a white-box attack (a prompt
  embedding optimised through the differentiable sampler, a fixed number of steps) brings the
  concept back in the masked model (see `whitebox_attack`);
- adversarial/<set>: the detection rate on each adversarial set, base and masked;
- clip_score (with a CLIP detector) and fid (with Inception weights), else a note saying why not.

Generation and detection are two stages, `GenerateStage` and `DetectStage`, callables on
batches of rows: `evaluate` runs them in this process, `erase.data.run_eval_stages` as Ray Data
actor pools on a cluster. `Evaluator` is the one way to evaluate masks held in memory (a
trial's reports, the benchmarks, the concept graph): it keeps the base model's images across
calls. This module imports neither Ray nor MLflow.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math

import numpy as np
import torch
from tqdm import tqdm

from erase.errors import EraseError
from erase.masks import MaskHooks
from erase.pipelines import DEFAULT_MODEL
from erase.sampler import sample

Z95 = 1.959964


# ---------------------------------------------------------------- intervals


def rate(hits) -> dict:
    """A rate with its Wilson 95% interval: {value, n, low, high}."""
    hits = np.asarray(hits, dtype=bool)
    n = int(hits.size)
    if n == 0:
        return {"value": None, "n": 0, "low": None, "high": None}
    p = float(hits.mean())
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    # the interval holds the rate itself, also where float rounding at 0 or 1 would leave it just outside
    return {"value": p, "n": n, "low": max(0.0, min(p, centre - half)), "high": min(1.0, max(p, centre + half))}


def mean_interval(values) -> dict:
    """A mean with a normal 95% interval: {value, n, low, high}."""
    values = np.asarray(values, dtype=np.float64)
    n = int(values.size)
    if n == 0:
        return {"value": None, "n": 0, "low": None, "high": None}
    m = float(values.mean())
    half = Z95 * float(values.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    return {"value": m, "n": n, "low": m - half, "high": m + half}


def preservation_figure(base_hits: dict[str, np.ndarray], masked_hits: dict[str, np.ndarray],
                        resamples: int = 400, seed: int = 0) -> dict:
    """Mean over concepts of masked rate / base rate, with a bootstrap interval over each concept's images.

    Concepts the base model never shows (base rate 0) carry no information and are left out.
    """
    concepts = [c for c in base_hits if base_hits[c].mean() > 0]
    n = sum(int(base_hits[c].size) for c in concepts)
    if not concepts:
        return {"value": None, "n": 0, "low": None, "high": None}

    def figure(pick):
        return float(np.mean([pick(masked_hits[c]).mean() / max(pick(base_hits[c]).mean(), 1e-9) for c in concepts]))

    value = figure(lambda a: a)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        idx = {c: rng.integers(0, base_hits[c].size, base_hits[c].size) for c in concepts}
        draws.append(float(np.mean([masked_hits[c][idx[c]].mean() / max(base_hits[c][idx[c]].mean(), 1e-9)
                                    for c in concepts])))
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"value": value, "n": n, "low": float(low), "high": float(high)}


# ---------------------------------------------------------------- generation


@torch.no_grad()
def generate(gen, prompts: list[str], seeds: list[int], steps: int | None = None, batch: int = 128,
             progress: bool = False, desc: str = "generate") -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1], `batch` prompts at a time."""
    sigmas = gen.sigmas(steps or gen.default_steps)
    out = []
    for i in tqdm(range(0, len(prompts), batch), desc=desc, disable=not progress):
        cond = gen.encode(prompts[i:i + batch])
        final = sample(lambda x, s: gen.velocity(x, s, cond), gen.noise(seeds[i:i + batch]), sigmas, checkpointing=False)
        out.append(gen.decode(final))
    return torch.cat(out)


class GenerateStage:
    """Rows {prompt, seed, ...} -> the same rows with base and masked images (uint8 HWC arrays).

    Built from plain settings so that Ray Data can construct one per actor (one GPU each), or
    around a generator already in memory (`gen=`, with `masks=(sites, binary)`), as a trial does.
    Base images are cached per (prompt, seed): the base model never changes.
    """

    def __init__(self, model: str = DEFAULT_MODEL, model_path: str | None = None, mask: str | None = None,
                 device: str = "cpu", dtype: str | None = None, guidance: float | None = None, steps: int | None = None,
                 *, gen=None, masks: tuple | None = None):
        from erase.masks import load_binary_masks
        from erase.pipelines import load_generator

        self.gen = gen or load_generator(model, model_path, dtype=dtype, device=device, guidance=guidance)
        self.steps = steps
        self.use_masks(masks)
        if mask is not None:
            self.use_masks(load_binary_masks(mask, self.gen.mask_sites(), model)[0])
        self.base_cache: dict[tuple[str, int], np.ndarray] = {}

    def use_masks(self, masks: tuple | None) -> None:
        """Generate the masked side with these binary masks (sites, {site: 0/1}) from now on; None: base only."""
        self.sites, self.binary = masks if masks is not None else (None, None)

    def __call__(self, batch: dict) -> dict:
        from erase.detectors import to_uint8

        prompts, seeds = [str(p) for p in batch["prompt"]], [int(s) for s in batch["seed"]]
        missing = [i for i, key in enumerate(zip(prompts, seeds)) if key not in self.base_cache]
        if missing:
            images = to_uint8(generate(self.gen, [prompts[i] for i in missing], [seeds[i] for i in missing],
                                       self.steps, batch=len(missing)))
            for i, image in zip(missing, images):
                self.base_cache[(prompts[i], seeds[i])] = image
        out = dict(batch)
        out["base"] = np.stack([self.base_cache[key] for key in zip(prompts, seeds)])
        if self.binary is not None:
            with MaskHooks(self.gen.transformer, self.sites, self.binary):
                out["masked"] = to_uint8(generate(self.gen, prompts, seeds, self.steps, batch=len(prompts)))
        return out


class DetectStage:
    """Rows with images -> the same rows with `found_<side>` and `score_<side>` for each row's concept."""

    def __init__(self, detector_spec: dict | None = None, device: str = "cpu", *, detector=None):
        from erase.detectors import build_detector

        self.detector = detector or build_detector(detector_spec, device=device)

    def __call__(self, batch: dict) -> dict:
        out = dict(batch)
        for side in ("base", "masked"):
            if side not in batch:
                continue
            images = torch.from_numpy(np.stack(batch[side])).permute(0, 3, 1, 2).float() / 255
            found = self.detector.detect(images)
            concepts = [str(c) for c in batch["concept"]]
            out[f"found_{side}"] = np.array([bool(found[c][1][i]) if c in found else False for i, c in enumerate(concepts)])
            out[f"score_{side}"] = np.array([float(found[c][0][i]) if c in found else 0.0 for i, c in enumerate(concepts)])
        return out


def run_stages_locally(rows: list[dict], generate_stage: GenerateStage, detect_stage: DetectStage,
                       batch_size: int = 64, progress: bool = False) -> list[dict]:
    """The two stages over `rows` in this process, `batch_size` rows at a time; returns rows with results."""
    out = []
    for i in tqdm(range(0, len(rows), batch_size), desc="generate + detect", disable=not progress):
        chunk = rows[i:i + batch_size]
        batch = {k: np.array([r[k] for r in chunk]) for k in chunk[0]}
        result = detect_stage(generate_stage(batch))
        for j in range(len(chunk)):
            out.append({k: v[j] for k, v in result.items()})
    return out


# ---------------------------------------------------------------- evaluation sets


def rows_from_sets(sets: dict[str, dict[str, list[str]]], seeds_per_prompt: int = 1,
                   first_seed: int = 1_000_000, split: str = "") -> list[dict]:
    """Evaluation rows from prompt sets {kind: {concept: prompts}}, each prompt with `seeds_per_prompt`
    fixed seeds, numbered from `first_seed` in the order of the sets; every row names its `split`."""
    rows = []
    for kind, by_concept in sets.items():
        for concept, prompts in by_concept.items():
            for prompt in prompts:
                for _ in range(seeds_per_prompt):
                    rows.append({"prompt": prompt, "seed": first_seed + len(rows), "concept": concept, "kind": kind,
                                 "split": split})
    return rows


def evaluation_rows(model: str, concept: str | None, seeds_per_prompt: int = 2, *, split: str = "test",
                    prompts: list[str] | None = None, neutral: list[str] | None = None,
                    rephrase: list[str] | None = None, adversarial: dict[str, list[str]] | None = None,
                    files: dict[str, str] | None = None, max_prompts: int | None = None) -> list[dict]:
    """A model's evaluation rows for `concept` (None: every concept, plainly): the model's own sets
    of `split` (erase.pipelines; "validation" is what a sweep selects on, "test" what erase eval
    reports), with the user's prompt lists in place of the parts they name (the erased concept's
    prompts, the neutral prompts, the rephrasings), then the adversarial sets.

    Every row names its set in "split": "<model>:<split>" for the model's own, "<model>:own" for
    a model without splits (its own set may be what it trains on), or "file:<path>" for the user's
    lists, with the paths in `files` {"prompts", "neutral", "rephrase"}. `max_prompts`: at most
    that many prompts of each list (every concept's, the neutral, each adversarial set), spread
    evenly over it: a quick evaluation, whose intervals say how little it saw."""
    from erase.pipelines import model as model_entry

    if seeds_per_prompt < 1:
        raise EraseError(f"seeds per prompt must be at least 1, got {seeds_per_prompt}")
    if max_prompts is not None and max_prompts < 1:
        raise EraseError(f"--max-prompts must be at least 1, got {max_prompts}")
    if concept is None and (prompts or rephrase):
        raise EraseError("concept and rephrased prompts are the erased concept's: name the concept (--concept)")
    entry, files = model_entry(model), files or {}
    if entry.splits:
        sets, own = entry.eval_sets(concept, split), f"{model}:{split}"
    else:
        sets, own = entry.eval_sets(concept), f"{model}:own"
    given = {"prompts": ("concept", concept, prompts), "neutral": ("neutral", "", neutral),
             "rephrase": ("rephrase", concept, rephrase)}
    replaced = {}
    for name, (kind, key, values) in given.items():
        if values:
            sets.setdefault(kind, {})
            if kind == "neutral":
                sets[kind] = {}
            sets[kind].pop(key, None)
            replaced[(kind, key)] = (list(values), f"file:{files.get(name, 'given list')}")
    def capped(values: list) -> list:
        if max_prompts is None or len(values) <= max_prompts:
            return list(values)
        return [values[i * len(values) // max_prompts] for i in range(max_prompts)]

    sets = {kind: {key: capped(values) for key, values in by_key.items()} for kind, by_key in sets.items()}
    rows = rows_from_sets(sets, seeds_per_prompt, split=own)
    for (kind, key), (values, name) in replaced.items():
        rows += rows_from_sets({kind: {key: capped(values)}}, seeds_per_prompt, first_seed=1_500_000 + len(rows),
                               split=name)
    attacks = {f"adversarial:{name}": {concept or "": capped(p)} for name, p in (adversarial or {}).items()}
    return rows + rows_from_sets(attacks, seeds_per_prompt, first_seed=2_000_000, split="adversarial")


def split_figure(rows: list[dict]) -> dict:
    """Which prompts a figure came from: the sets' names and a hash of its distinct prompts."""
    from erase.prompts import prompt_set_hash

    names = sorted({str(r.get("split") or "unnamed") for r in rows})
    return {"name": "+".join(names), "hash": prompt_set_hash(rows), "prompts": len({str(r["prompt"]) for r in rows})}


# ---------------------------------------------------------------- the white-box attack


@dataclasses.dataclass
class AttackConfig:
    """Optimise the prompt embedding of a concept prompt so that the masked model's final output
    matches the base model's for that prompt and noise (P4D / UnlearnDiffAtk in spirit)."""

    prompts: int = 8  # concept prompts attacked (each with its first seed)
    steps: int = 20  # the budget: optimisation steps per prompt batch
    lr: float = 0.05
    sampling_steps: int | None = None


ATTACKED_FIELDS = ("prompt_embeds", "pooled")  # the text conditioning every adapter's encode() returns


def whitebox_attack(gen, sites, binary_masks, prompts: list[str], seeds: list[int], cfg: AttackConfig,
                    progress: bool = False) -> torch.Tensor:
    """Images of the masked model from adversarially optimised prompt embeddings, one per prompt."""
    sigmas = gen.sigmas(cfg.sampling_steps or gen.default_steps)
    with torch.no_grad():
        cond = gen.encode(prompts)
        target = sample(lambda x, s: gen.velocity(x, s, cond), gen.noise(seeds), sigmas, checkpointing=False)
    # Only what carries the prompt: the toy generator's pooled vector is always zero, and moving it
    # would drive weights its training never used (an input no prompt can produce).
    adversarial = {f: getattr(cond, f).detach().float().clone().requires_grad_(True) for f in ATTACKED_FIELDS
                   if torch.count_nonzero(getattr(cond, f))}
    optimizer = torch.optim.Adam(adversarial.values(), lr=cfg.lr)

    def attacked():
        return dataclasses.replace(cond, **{f: v.to(getattr(cond, f).dtype) for f, v in adversarial.items()})

    with MaskHooks(gen.transformer, sites, binary_masks):
        for _ in tqdm(range(cfg.steps), desc="white-box attack", disable=not progress):
            optimizer.zero_grad()
            adv = attacked()
            final = sample(lambda x, s: gen.velocity(x, s, adv), gen.noise(seeds), sigmas, checkpointing=True)
            torch.mean((final - target) ** 2).backward()
            optimizer.step()
        with torch.no_grad():
            adv = attacked()
            final = sample(lambda x, s: gen.velocity(x, s, adv), gen.noise(seeds), sigmas, checkpointing=False)
    return gen.decode(final.detach())


# ---------------------------------------------------------------- the figures


def figures(rows: list[dict], concept: str | None) -> dict:
    """The report's figures from rows that went through both stages."""
    detection_rows = [r for r in rows if r["kind"] == "concept"]
    concepts = list(dict.fromkeys(r["concept"] for r in detection_rows))
    has_mask = "found_masked" in rows[0]
    side = "found_masked" if has_mask else "found_base"

    def hits(key, pick):
        return {c: np.array([bool(r[key]) for r in rows if pick(r, c)]) for c in concepts}

    plain = lambda r, c: r["kind"] == "concept" and r["concept"] == c  # noqa: E731
    base_hits, now_hits = hits("found_base", plain), hits(side, plain)
    report = {"detection": {c: float(v.mean()) for c, v in now_hits.items()},
              "generations": len(rows)}
    if has_mask:
        report["base_detection"] = {c: float(v.mean()) for c, v in base_hits.items()}
    adversarial = sorted({r["kind"] for r in rows if r["kind"].startswith("adversarial:")})
    for kind in adversarial:
        chosen = [r for r in rows if r["kind"] == kind]
        report[kind.replace(":", "/")] = {"base": rate([r["found_base"] for r in chosen]),
                                          "masked": rate([r[side] for r in chosen]), "split": split_figure(chosen)}
    if concept is None:
        return report
    if concept not in base_hits:
        raise EraseError(f"no evaluation prompts name the concept {concept!r}")
    # Another concept's prompts that also name the erased one ("a red cross" for red, when erasing
    # the cross) measure the erasure itself, not a side effect: preservation leaves them out.
    unrelated = lambda r, c: plain(r, c) and c != concept and not names(r["prompt"], concept)  # noqa: E731
    others_base = {c: v for c, v in hits("found_base", unrelated).items() if v.size}
    others_now = {c: v for c, v in hits(side, unrelated).items() if v.size}
    erased = [r for r in rows if plain(r, concept)]
    preserved = [r for r in rows if any(unrelated(r, c) for c in others_base)]
    report.update(
        concept=concept,
        erasure_rate={**rate(now_hits[concept]), "split": split_figure(erased)},
        base_rate={**rate(base_hits[concept]), "split": split_figure(erased)},
        preservation={**preservation_figure(others_base, others_now), "split": split_figure(preserved)},
        preservation_by_concept={c: (float(others_now[c].mean() / others_base[c].mean()) if others_base[c].mean() > 0
                                     else None) for c in others_base},
    )
    rephrased = [r for r in rows if r["kind"] == "rephrase" and r["concept"] == concept]
    if rephrased:
        report["rephrase_erasure_rate"] = {**rate([r[side] for r in rephrased]), "split": split_figure(rephrased)}
        report["rephrase_base_rate"] = {**rate([r["found_base"] for r in rephrased]), "split": split_figure(rephrased)}
    robust = [r for r in rows if r["kind"].startswith("robust:") and r["concept"] == concept]
    if robust:
        report["robustness"] = {kind.split(":", 1)[1]: {
            "masked": {**rate([r[side] for r in chosen]), "split": split_figure(chosen)},
            "base": rate([r["found_base"] for r in chosen])}
            for kind in dict.fromkeys(r["kind"] for r in robust) for chosen in [[r for r in robust if r["kind"] == kind]]}
        # pooled over every robustness family and the rephrasings: each generation counts once
        pooled = robust + rephrased
        report["robust_erasure_rate"] = {**rate([r[side] for r in pooled]), "split": split_figure(pooled),
                                         "families": [*report["robustness"], *(["rephrase"] if rephrased else [])]}
        report["robust_base_rate"] = {**rate([r["found_base"] for r in pooled]), "split": split_figure(pooled)}
    return report


def neutral_fidelity(rows: list[dict], concept: str | None) -> dict:
    """Mean |Δpixel| between masked and base images on rows that do not name the concept."""
    if not rows or "masked" not in rows[0]:
        return {"value": 0.0, "n": 0, "low": 0.0, "high": 0.0}
    chosen = [r for r in rows if r["kind"] in ("concept", "neutral") and r["concept"] != concept
              and not (concept and names(r["prompt"], concept))]
    diffs = [np.abs(r["masked"].astype(np.float32) - r["base"].astype(np.float32)).mean() / 255 for r in chosen]
    return {**mean_interval(diffs), "split": split_figure(chosen)}


def names(prompt: str, concept: str) -> bool:
    """Whether `prompt` names `concept` as a word or phrase."""
    return f" {concept.lower()} " in f" {prompt.lower().replace(',', ' ')} "


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID between two feature sets: |μa - μb|² + tr(Σa + Σb - 2 (Σa Σb)^½)."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    # tr((Σa Σb)^½) = Σ sqrt(eigenvalues of Σa Σb), which are real and >= 0 up to rounding
    eig = np.linalg.eigvals(cov_a @ cov_b)
    trace_sqrt = float(np.sqrt(np.clip(eig.real, 0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def inception_features(weights: str, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """2048-d pool features from a TorchScript Inception-v3 file (the one FID implementations share)."""
    net = torch.jit.load(weights, map_location="cpu").eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.stack(images[i:i + batch])).permute(0, 3, 1, 2)  # uint8 NCHW, 0..255
            out.append(net(x, return_features=True).numpy())
    return np.concatenate(out)


# ---------------------------------------------------------------- pictures and the report


def _png(image: np.ndarray, scale: int) -> str:
    from PIL import Image

    tile = Image.fromarray(image)
    if scale > 1:
        tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    tile.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def grid_rows(rows: list[dict], concept: str, per_row: int = 8) -> list[tuple[str, list[np.ndarray], list[str]]]:
    """Before/after rows (label, images, each image's prompt): prompts naming the concept, then
    prompts of other concepts."""
    named = [r for r in rows if r["kind"] == "concept" and r["concept"] == concept]
    named = named[:: max(1, len(named) // per_row)][:per_row]
    others = [r for r in rows if r["kind"] == "concept" and r["concept"] != concept]
    others = others[:: max(1, len(others) // per_row)][:per_row]

    def row(label, chosen, which):
        return label, [r[which] for r in chosen], [r["prompt"] for r in chosen]

    out = [row(f"'{concept}' prompts, base", named, "base"), row(f"'{concept}' prompts, masked", named, "masked"),
           row("other concepts, base", others, "base"), row("other concepts, masked", others, "masked")]
    rephrased = [r for r in rows if r["kind"] == "rephrase"][:per_row]
    if rephrased:
        out.append(row("rephrased, masked", rephrased, "masked"))
    return out


def save_image_grid(rows: list[tuple[str, list[np.ndarray]]], path: str, scale: int = 4, label_width: int = 190) -> None:
    """A PNG: one labelled row of images (uint8 HWC) per entry, each image enlarged `scale` times."""
    from PIL import Image, ImageDraw

    rows = [(label, images) for label, images, *_prompts in rows if len(images)]
    size = rows[0][1][0].shape[0] * scale
    pad = 4
    columns = max(len(images) for _, images in rows)
    canvas = Image.new("RGB", (label_width + columns * (size + pad), len(rows) * (size + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        y = pad + r * (size + pad)
        draw.text((6, y + size // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            tile = Image.fromarray(image).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (label_width + c * (size + pad), y))
    canvas.save(path)


def _figure_cell(value) -> str:
    if isinstance(value, dict) and "skipped" in value:
        return f"<small>not measured: {html.escape(str(value['skipped']))}</small>"
    if isinstance(value, dict) and "base" in value and "masked" in value:
        return f"base {_figure_cell(value['base'])}; masked {_figure_cell(value['masked'])}"
    if isinstance(value, dict) and "value" in value:
        if value["value"] is None:
            return "n/a"
        low, high = value.get("low"), value.get("high")
        interval = f" [{low:.3f}, {high:.3f}]" if low is not None else ""
        return f"{value['value']:.3f}{interval} <small>n={value['n']}</small>"
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def html_report(report: dict, grids: dict[str, list[tuple]], path: str, scale: int = 4, *,
                verdict: dict | None = None, training: dict | None = None) -> None:
    """One self-contained HTML file: the verdict against the promotion gates, the figures, how the
    mask was trained, then before/after grids whose tiles carry their prompts (images inline).

    `verdict`: {"failed": [reasons], "gates": {...}}; `training`: the mask's settings and status.
    Grid rows are (label, images) or (label, images, prompts)."""
    keys = ["erasure_rate", "base_rate", "preservation", "neutral_fidelity", "rephrase_erasure_rate",
            "robust_erasure_rate", "attack_success_rate", "clip_score", "fid"] + [k for k in report if k.startswith("adversarial/")]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{_figure_cell(report[k])}</td>"
                    f"<td>{html.escape(_split_name(report[k]))}</td></tr>" for k in keys if k in report)
    detection = report.get("detection", {})
    base = report.get("base_detection", {})
    det_rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{base.get(c, float('nan')):.3f}</td><td>{v:.3f}</td></tr>"
                       for c, v in detection.items())
    sections = []
    for title, rows in grids.items():
        body = []
        for label, images, *prompts in rows:
            captions = prompts[0] if prompts else [""] * len(images)
            tiles = "".join(f'<figure><img alt="{html.escape(c)}" title="{html.escape(c)}" '
                            f'src="data:image/png;base64,{_png(im, scale)}"><figcaption>{html.escape(c)}</figcaption>'
                            f'</figure>' for im, c in zip(images, captions))
            body.append(f'<div class="row"><span class="label">{html.escape(label)}</span>{tiles}</div>')
        sections.append(f"<h2>{html.escape(title)}</h2>" + "".join(body))
    about = {k: report[k] for k in ("model", "mask", "concept", "generations", "steps", "guidance", "detector")
             if k in report}
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>erase report: {html.escape(str(report.get('concept', 'base model')))}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin-bottom:1em}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}} .row{{display:flex;align-items:flex-start;margin:4px 0}}
.label{{width:12em;font-size:90%}} figure{{margin:0 4px 0 0;width:{16 * scale + 8}px}} img{{image-rendering:pixelated}}
figcaption{{font-size:70%;color:#444}} .verdict{{font-size:120%;padding:.5em 1em;border-radius:4px}}
.pass{{background:#e3f4e1}} .fail{{background:#fbe3e1}} code{{font-size:85%}}</style></head><body>
<h1>Erasure report: {html.escape(str(report.get('concept', 'base model')))}</h1>
{_verdict_html(report, verdict)}
<h2>Figures (95% intervals)</h2><table><tr><th>figure</th><th>value</th><th>prompt set</th></tr>{table}</table>
{_settings_html("How it was trained", training)}
{_settings_html("This evaluation", about)}
<h2>Detection rate per concept</h2><table><tr><th>concept</th><th>base</th><th>now</th></tr>{det_rows}</table>
{''.join(sections)}
</body></html>"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)


def _split_name(value) -> str:
    return str((value.get("split") or {}).get("name", "")) if isinstance(value, dict) else ""


def _verdict_html(report: dict, verdict: dict | None) -> str:
    if verdict is None:
        return ""
    gates = ", ".join(f"{k} {v:g}" for k, v in verdict["gates"].items())
    split = html.escape(_split_name(report.get("erasure_rate")))
    measured = ", ".join(f"{key} {_figure_cell(report[key])}" for key in ("erasure_rate", "preservation") if key in report)
    split = f"{split}: {measured}" if measured else split
    if verdict["failed"]:
        reasons = "; ".join(verdict["failed"])
        return (f'<p class="verdict fail"><b>Fails the promotion gates</b> ({html.escape(gates)}) on '
                f'{split}. {html.escape(reasons)}</p>')
    return f'<p class="verdict pass"><b>Passes the promotion gates</b> ({html.escape(gates)}) on {split}</p>'


def _settings_html(title: str, values: dict | None) -> str:
    """A two-column table of settings: nested values as compact JSON, not Python reprs."""
    if not values:
        return ""
    import json

    def cell(value):
        return html.escape(value if isinstance(value, str) else json.dumps(value, default=str))

    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td><code>{cell(v)}</code></td></tr>" for k, v in values.items())
    return f"<h2>{html.escape(title)}</h2><table>{rows}</table>"


def _json(value) -> str:
    import json

    return json.dumps(value, indent=2, default=str)


# ---------------------------------------------------------------- one evaluation, end to end


@dataclasses.dataclass
class EvalSettings:
    """Everything an evaluation needs, as plain values (Ray actors rebuild their stages from it)."""

    model: str = DEFAULT_MODEL
    model_path: str | None = None
    mask: str | None = None
    concept: str | None = None
    detector: dict | None = dataclasses.field(default_factory=lambda: {"name": "toy"})  # the toy world's CNN
    device: str = "cpu"
    dtype: str | None = None  # None: the model's default
    guidance: float | None = None
    steps: int | None = None
    batch_size: int = 64
    attack: AttackConfig | None = dataclasses.field(default_factory=AttackConfig)
    clip_model: str | None = None  # a CLIP folder for CLIP scores when the detector is not CLIP
    fid_weights: str | None = None  # a TorchScript Inception-v3 for FID

    def generate_kwargs(self) -> dict:
        return dict(model=self.model, model_path=self.model_path, mask=self.mask, device=self.device,
                    dtype=self.dtype, guidance=self.guidance, steps=self.steps)


def evaluate(settings: EvalSettings, rows: list[dict], *, run_stages=None, stages: tuple | None = None,
             progress: bool = False) -> tuple[dict, list[dict]]:
    """Generate and detect every row (in this process, or through `run_stages(rows)`), then the figures.

    `stages`: a (GenerateStage, DetectStage) pair already built (a trial keeps its generator).
    Returns the report and the rows with their images and detections (for grids and reports).
    """
    if not rows:
        raise EraseError("nothing to evaluate: the evaluation prompt set is empty")
    built = {} if stages is None else {"generate": stages[0], "detect": stages[1]}

    def stage(name):  # built on first use: with Ray stages, the driver loads the model only for the attack
        if name not in built:
            built[name] = (GenerateStage(**settings.generate_kwargs()) if name == "generate"
                           else DetectStage(settings.detector, device=settings.device))
        return built[name]

    if run_stages is None:
        results = run_stages_locally(rows, stage("generate"), stage("detect"), batch_size=settings.batch_size,
                                     progress=progress)
    else:
        results = run_stages(rows)
    report = {"model": settings.model, "mask": settings.mask, "steps": settings.steps, "guidance": settings.guidance,
              **figures(results, settings.concept), "detector": stage("detect").detector.describe()}
    if "generate" in built:
        report["steps"] = settings.steps or built["generate"].gen.default_steps
        report["guidance"] = built["generate"].gen.guidance
    if "masked" not in results[0]:
        return report, results
    report["neutral_fidelity"] = neutral_fidelity(results, settings.concept)
    concept = settings.concept
    if concept is not None and settings.attack is not None and settings.attack.prompts > 0:
        attacked = list(dict.fromkeys(r["prompt"] for r in rows if r["kind"] == "concept" and r["concept"] == concept))
        attacked = attacked[:: max(1, len(attacked) // settings.attack.prompts)][:settings.attack.prompts]
        seeds = [next(r["seed"] for r in rows if r["prompt"] == p) for p in attacked]
        gen_stage = stage("generate")
        images = whitebox_attack(gen_stage.gen, gen_stage.sites, gen_stage.binary, attacked, seeds,
                                 settings.attack, progress=progress)
        found = stage("detect").detector.detect(images)[concept][1]
        report["attack_success_rate"] = {**rate(found), "budget_steps": settings.attack.steps, "lr": settings.attack.lr,
                                         "split": split_figure([r for r in rows if r["prompt"] in attacked])}
        from erase.detectors import to_uint8

        report["_attack_images"] = list(to_uint8(images))
    report.update(_utility(settings, results, stage("detect").detector))
    return report, results


def _utility(settings: EvalSettings, results: list[dict], detector) -> dict:
    """CLIP score and FID where a CLIP model and Inception weights are available; otherwise say why not."""
    from erase.detectors import ClipDetector

    out = {}
    neutral = [r for r in results if r["kind"] in ("neutral", "concept") and r["concept"] != settings.concept
               and not (settings.concept and names(r["prompt"], settings.concept))]
    clip = detector if isinstance(detector, ClipDetector) else None
    if clip is None and settings.clip_model:
        clip = ClipDetector(settings.clip_model, {"a": "a", "b": "b"}, device=settings.device)
    if clip is None:
        out["clip_score"] = {"skipped": "no CLIP model: pass --clip-model DIR (or use the clip detector)"}
    elif neutral:
        prompts = [r["prompt"] for r in neutral]

        def score(side):
            images = torch.from_numpy(np.stack([r[side] for r in neutral])).permute(0, 3, 1, 2).float() / 255
            return clip.clip_score(images, prompts)

        out["clip_score"] = {"base": mean_interval(score("base")), "masked": mean_interval(score("masked")),
                             "split": split_figure(neutral)}
    if not settings.fid_weights:
        out["fid"] = {"skipped": "no Inception weights: pass --fid-weights FILE (a TorchScript Inception-v3, "
                                 "e.g. pt_inception-2015-12-05.pt) to compute FID"}
    else:
        base = inception_features(settings.fid_weights, [r["base"] for r in results])
        masked = inception_features(settings.fid_weights, [r["masked"] for r in results])
        out["fid"] = {"value": frechet_distance(masked, base), "n": len(results), "against": "base model, same prompts",
                      "split": split_figure(results)}
    return out


class Evaluator:
    """Masks held in memory, evaluated on fixed rows in this process: the one way to do it (a trial's
    reports, the benchmarks, the concept graph). The base model's images are generated once per
    (prompt, seed) and kept across calls: the base model never changes."""

    def __init__(self, gen, detector, rows: list[dict], *, concept: str | None, steps: int | None = None,
                 attack: AttackConfig | None = None, batch_size: int = 64, progress: bool = False):
        """`detector`: a detector's spec (erase.detectors.build_detector) or a detector itself."""
        self.rows, self.progress = rows, progress
        spec = detector if isinstance(detector, dict) else None
        self.settings = EvalSettings(model=gen.model_id, concept=concept, detector=spec, device=str(gen.device),
                                     steps=steps, batch_size=batch_size, attack=attack)
        self.generate = GenerateStage(gen=gen, steps=steps)
        self.detect = DetectStage(spec, device=str(gen.device), detector=None if spec else detector)

    def __call__(self, masks: tuple | None, rows: list[dict] | None = None) -> tuple[dict, list[dict]]:
        """The report and the rows with their images, for binary masks (sites, {site: 0/1}) or, with
        None, the base model alone; on `rows` if given (a subset, say), else the evaluator's own."""
        self.generate.use_masks(masks)
        return evaluate(self.settings, self.rows if rows is None else rows, stages=(self.generate, self.detect),
                        progress=self.progress)
