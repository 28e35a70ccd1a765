"""The concept graph (AGE's finding, METHOD.md section 2): erase each concept, measure every other.

    Δ(c_e, c_j) = G_0(c_j) - G_{c_e}(c_j)

G(c) is the share of generations for prompts naming c in which the detector finds c, before
(G_0) and after erasing c_e, over the prompts for c that do not also name c_e: a striped cross
that loses its cross is the erasure itself, not a side effect on `striped` (the toy world
detects a style only on an object), so both G_0 and G_{c_e} leave those prompts out. The
diagonal is the erasure itself; a large off-diagonal entry means c_j is a neighbour of c_e
that erasure hurts. `erase graph` runs the erasures as a sweep (one study per concept, fixed
settings from a space file) and then evaluates every mask on every concept; the matrix is
written as a table (JSON, Markdown) and a heatmap PNG.
"""

from __future__ import annotations

import numpy as np


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
    from erase.evaluate import DetectStage, GenerateStage, figures, run_stages_locally
    from erase.masks import binary_from_file_meta, load_mask_file

    stage = GenerateStage(model, model_path, device=device)  # base images are cached across masks
    detect = DetectStage(detector, device=device)
    base = figures(run_stages_locally(rows, stage, detect, progress=progress), None)["detection"]
    base_by_erased, erased = {}, {}
    for concept, path in mask_files.items():
        masks, meta = load_mask_file(path, stage.gen.mask_sites(), model)
        stage.sites, stage.binary = masks.sites, binary_from_file_meta(masks, meta)
        kept_rows = rows_for_side_effects(rows, concept)
        measured = figures(run_stages_locally(kept_rows, stage, detect, progress=progress), None)
        base_by_erased[concept], erased[concept] = measured["base_detection"], measured["detection"]
    return base, base_by_erased, erased
