"""`erase eval`: generate from fixed prompts and seeds, run the detector, compute the figures.

Definitions (the toy world; the evaluation issue adds NudeNet, CLIP and intervals):
- detection rate of a concept: share of generations, for prompts naming it, in which the
  detector finds it (a colour or style only counts on an image with an object);
- erasure_rate: the erased concept's detection rate with the mask (lower is better);
- preservation: every other concept's detection rate with the mask relative to the base
  model's, averaged (1.0 = untouched); per concept and per group as well;
- neutral_fidelity: mean absolute pixel difference (images in [0, 1]) between masked and base
  generations from the same noise, over prompts that do not name the concept.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from erase.masks import MaskHooks
from erase.sampler import sample


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


def toy_eval_set(seeds_per_prompt: int, first_seed: int = 1_000_000, kind: str = "canonical"):
    """Every concept's prompts (world.concept_prompts), each with fixed seeds; returns prompts, seeds, concept of each."""
    from pipelines import toy_world as world

    prompts, seeds, concepts = [], [], []
    for concept in world.all_concepts():
        for prompt in world.concept_prompts(concept, kind):
            for k in range(seeds_per_prompt):
                prompts.append(prompt)
                seeds.append(first_seed + len(seeds))
                concepts.append(concept)
    return prompts, seeds, concepts


def detection_rates(found: list[dict], concepts: list[str]) -> dict[str, float]:
    from pipelines import toy_world as world

    hits: dict[str, list[bool]] = {}
    for attrs, concept in zip(found, concepts):
        attribute = world.attribute_of(concept)
        # an empty background has no colour or style: those heads only count when an object is there
        present = attribute in ("object", "background") or attrs["object"] != world.NOTHING
        hits.setdefault(concept, []).append(present and attrs[attribute] == concept)
    return {c: float(np.mean(v)) for c, v in hits.items()}


def evaluate_toy(gen, detector, *, binary_masks: dict | None = None, sites=None, concept: str | None = None,
                 seeds_per_prompt: int = 2, steps: int | None = None, progress: bool = False,
                 keep_images: bool = False) -> dict:
    """The report (see the module doc); `keep_images` adds the generations under "_images" for pictures."""
    from pipelines import toy_world as world

    if concept is not None and concept not in world.all_concepts():
        raise ValueError(f"the toy world has no concept {concept!r}; concepts: {', '.join(world.all_concepts())}")
    prompts, seeds, concepts = toy_eval_set(seeds_per_prompt)
    base_images = generate(gen, prompts, seeds, steps, progress=progress, desc="base model")
    base = detection_rates(detector.predict(base_images), concepts)
    report = {"model": gen.model_id, "steps": steps or gen.default_steps, "guidance": gen.guidance,
              "seeds_per_prompt": seeds_per_prompt, "generations": len(prompts), "detection": base}
    if binary_masks is None:
        if concept is not None:
            report["erasure_rate"] = base[concept]
            report["preservation"] = 1.0
        return report
    with MaskHooks(gen.transformer, sites, binary_masks):
        masked_images = generate(gen, prompts, seeds, steps, progress=progress, desc="masked model")
    masked = detection_rates(detector.predict(masked_images), concepts)
    report.update(detection=masked, base_detection=base)
    if concept is not None:
        others = [c for c in masked if c != concept]
        relative = {c: (masked[c] / base[c] if base[c] > 0 else 1.0) for c in others}
        same_group = [c for c in others if world.group_of(c) == world.group_of(concept)]
        keep = [i for i, c in enumerate(concepts) if c != concept and not _names(prompts[i], concept)]
        diff = (masked_images[keep] - base_images[keep]).abs().mean().item()
        report.update(
            concept=concept,
            erasure_rate=masked[concept],
            base_rate=base[concept],
            preservation=float(np.mean(list(relative.values()))),
            preservation_same_group=float(np.mean([relative[c] for c in same_group])),
            worst_same_group=min(same_group, key=lambda c: relative[c]),
            preservation_by_concept=relative,
            neutral_fidelity={"mean_abs_pixel_diff": diff, "n": len(keep)},
        )
        if keep_images:
            report["_images"] = {"prompts": prompts, "concepts": concepts, "base": base_images, "masked": masked_images}
    return report


def grid_rows(report_images: dict, concept: str, per_row: int = 8) -> list[tuple[str, torch.Tensor]]:
    """Rows for a before/after picture: prompts naming the concept, then other concepts of its group."""
    from pipelines import toy_world as world

    prompts, concepts = report_images["prompts"], report_images["concepts"]
    named = [i for i, c in enumerate(concepts) if c == concept][:: max(1, len(world.STYLES))][:per_row]
    group = world.GROUPS[world.group_of(concept)]
    others = [i for i, c in enumerate(concepts) if c in group and c != concept]
    others = others[:: max(1, len(others) // per_row)][:per_row]
    base, masked = report_images["base"], report_images["masked"]
    return [(f"'{concept}' prompts, base", base[named]), (f"'{concept}' prompts, masked", masked[named]),
            ("other prompts, base", base[others]), ("other prompts, masked", masked[others])]


def save_image_grid(rows: list[tuple[str, torch.Tensor]], path: str, scale: int = 4, label_width: int = 190) -> None:
    """A PNG: one labelled row of images per entry, each image enlarged `scale` times."""
    from PIL import Image, ImageDraw

    size = rows[0][1].shape[-1] * scale
    pad = 4
    columns = max(len(images) for _, images in rows)
    canvas = Image.new("RGB", (label_width + columns * (size + pad), len(rows) * (size + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        y = pad + r * (size + pad)
        draw.text((6, y + size // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            pixels = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            tile = Image.fromarray(pixels).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (label_width + c * (size + pad), y))
    canvas.save(path)


def _names(prompt: str, concept: str) -> bool:
    return concept in prompt.split()
