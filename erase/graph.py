"""The concept graph (AGE's finding, docs/method.md): erase each concept, measure every other.

    Δ(c_e, c_j) = G_0(c_j) - G_{c_e}(c_j)

G(c) is the share of generations for prompts naming c in which the detector finds c, before
(G_0) and after erasing c_e, over the prompts for c that do not also name c_e: a striped cross
that loses its cross is the erasure itself, not a side effect on `striped` (the toy world
detects a style only on an object), so both G_0 and G_{c_e} leave those prompts out. The
diagonal is the erasure itself; a large off-diagonal entry means c_j is a neighbour of c_e
that erasure hurts. `erase graph` runs the erasures as a sweep (one study per concept, fixed
settings from a space file: `plan`, `run`) and then evaluates every mask on every concept
(`measure`); the matrix is written as a table (JSON, Markdown) and a heatmap PNG.
"""

from __future__ import annotations

import json
import os

import numpy as np

from erase.errors import EraseError


def side_effects(base: dict[str, dict[str, float]], erased: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Δ[c_e][c_j] from each erasure's base and masked detection rates (both on the same rows)."""
    return {ce: {cj: base[ce][cj] - rates[cj] for cj in base[ce]} for ce, rates in erased.items()}


def rows_for_side_effects(rows: list[dict], erased: str) -> list[dict]:
    """The erased concept's own prompts, and every other concept's prompts that do not name it."""
    from erase.evaluate import names

    return [r for r in rows if r["concept"] == erased or not names(r["prompt"], erased)]


def nearest_neighbours(delta: dict[str, dict[str, float]], concept: str, n: int = 3) -> list[str]:
    """The n concepts erasing `concept` hurts most (largest Δ off the diagonal)."""
    row = {c: v for c, v in delta[concept].items() if c != concept}
    return sorted(row, key=lambda c: -row[c])[:n]


def markdown_table(delta: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(delta.values())))
    lines = ["| erased \\ measured | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for ce, row in delta.items():
        lines.append(f"| **{ce}** | " + " | ".join(f"{row[c]:+.2f}" for c in columns) + " |")
    return "\n".join(lines)


def heatmap(delta: dict[str, dict[str, float]], path: str, cell: int = 56,
            title: str = "side effect = base detection - detection after erasure") -> None:
    """The matrix as a PNG: rows = erased concept, columns = measured concept, red = detection lost."""
    from PIL import Image, ImageDraw

    rows, columns = list(delta), list(next(iter(delta.values())))
    left, top = 110, 80
    width, height = left + cell * len(columns) + 20, top + cell * len(rows) + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill="black")
    # PIL's built-in font has no Greek letters: plain words only
    draw.text((10, 28), "rows: erased concept; columns: measured concept, on its prompts not naming the erased one; "
              "red = detection lost", fill="gray")
    for j, c in enumerate(columns):
        draw.text((left + j * cell + 4, top - 18), c[:9], fill="black")
    for i, ce in enumerate(rows):
        draw.text((10, top + i * cell + cell // 2 - 6), ce[:14], fill="black")
        for j, cj in enumerate(columns):
            v = float(np.clip(delta[ce][cj], -1, 1))
            if v >= 0:  # lost detection: white -> red
                colour = (255, int(255 * (1 - v)), int(255 * (1 - v)))
            else:  # gained: white -> blue
                colour = (int(255 * (1 + v)), int(255 * (1 + v)), 255)
            x, y = left + j * cell, top + i * cell
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=colour, outline=(200, 200, 200))
            draw.text((x + 8, y + cell // 2 - 6), f"{delta[ce][cj]:+.2f}", fill="black" if abs(v) < 0.6 else "white")
    image.save(path)


def measure(model: str, mask_files: dict[str, str], rows: list[dict], detector: dict, *, model_path: str | None = None,
            device: str = "cpu", progress: bool = False) -> tuple[dict, dict[str, dict], dict[str, dict]]:
    """Detection rates of every concept: the base model's on all rows; then for each erased concept,
    base and masked on `rows_for_side_effects` (same seeds)."""
    from erase.evaluate import Evaluator
    from erase.masks import load_binary_masks
    from erase.pipelines import load_generator

    gen = load_generator(model, model_path, device=device)
    evaluator = Evaluator(gen, detector, rows, concept=None, progress=progress)
    base = evaluator(None)[0]["detection"]
    base_by_erased, erased = {}, {}
    for concept, path in mask_files.items():
        masks, _ = load_binary_masks(path, gen.mask_sites(), model)
        measured, _ = evaluator(masks, rows_for_side_effects(rows, concept))
        base_by_erased[concept], erased[concept] = measured["base_detection"], measured["detection"]
    return base, base_by_erased, erased


def plan(model: str, concepts: list[str], *, space: str, storage: str, tracking_uri: str | None = None,
         model_path: str | None = None, seeds_per_prompt: int = 2) -> list:
    """The graph's sweep: one study per concept (the model's graph concepts by default), one trial each.
    Everything `run` will need is checked here, before any erasure."""
    from erase.pipelines import model as model_entry
    from erase.sweep import plan as plan_sweep

    entry = model_entry(model)
    if entry.detector is None:
        raise EraseError(f"`erase graph` measures with the model's own detector, and {model} has none; other "
                         "models need a CLIP label set (run erase sweep per concept and erase eval --detector clip)")
    concepts = concepts or list(entry.graph_concepts)
    if len(concepts) < 2:
        raise EraseError("a concept graph needs at least two concepts")
    if seeds_per_prompt < 1:
        raise EraseError(f"--seeds-per-prompt must be at least 1, got {seeds_per_prompt}")
    return plan_sweep(model, concepts, space, 1, storage, model_path=model_path, tracking_uri=tracking_uri,
                      report_every=1000, detector=entry.detector)


def run(specs: list, *, seeds_per_prompt: int, out_dir: str, address: str | None = None, on_progress=None,
        progress: bool = False) -> dict:
    """Erase every concept of the planned sweep, measure every mask on every concept, and write
    graph.json, graph.md and graph.png into `out_dir`; returns what graph.json holds."""
    from erase.evaluate import evaluation_rows
    from erase.sweep import run_sweep

    model, concepts, sweep_id = specs[0].model, [s.concept for s in specs], specs[0].sweep_id
    masks = {}
    for summary in run_sweep(specs, address=address, on_progress=on_progress):
        if not summary.get("best") or not summary["best"].get("mask_file"):
            raise EraseError(f"the erasure of {summary['concept']!r} did not finish; see {summary['study_dir']}")
        masks[summary["concept"]] = summary["best"]["mask_file"]
    rows = [r for r in evaluation_rows(model, None, seeds_per_prompt) if r["concept"] in concepts]
    base, base_by_erased, erased = measure(model, masks, rows, specs[0].detector, model_path=specs[0].model_path,
                                           progress=progress)
    delta = side_effects(base_by_erased, erased)
    result = {"sweep_id": sweep_id, "concepts": concepts, "base_detection": base,
              "base_detection_without_erased": base_by_erased, "detection_after": erased, "delta": delta,
              "masks": masks, "seeds_per_prompt": seeds_per_prompt,
              "neighbours": {c: nearest_neighbours(delta, c) for c in concepts}}
    write_graph(result, out_dir)
    return result


def write_graph(result: dict, out_dir: str) -> None:
    """graph.json (all of `result`), graph.md (the table) and graph.png (the heatmap) in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "graph.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out_dir, "graph.md"), "w") as f:
        f.write(f"Side effect Δ(erased, measured) = base detection - detection after erasure, on the measured "
                f"concept's prompts that do not name the erased one (sweep {result['sweep_id']}, "
                f"{result['seeds_per_prompt']} seeds per prompt)\n\n{markdown_table(result['delta'])}\n")
    heatmap(result["delta"], os.path.join(out_dir, "graph.png"))


def read_graph(path: str) -> dict[str, dict[str, float]]:
    """The side-effect matrix Δ of a graph.json that `run` wrote."""
    if not os.path.isfile(path):
        raise EraseError(f"concept graph {path!r} does not exist: run `erase graph` first or pass --graph")
    try:
        with open(path) as f:
            return json.load(f)["delta"]
    except (ValueError, KeyError) as err:
        raise EraseError(f"{path} is not a concept graph written by `erase graph` ({err})") from None
