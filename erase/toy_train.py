"""Retrain the toy world's detector and generator from a seed, check them, and write the weights.

    python -m erase.toy_train --seed 0 --out erase/pipelines/toy_weights

1. Detector: a CNN on freshly rendered images of every combination; accuracy per attribute on
   new renders.
2. Generator: rectified flow matching (x_σ = (1-σ)·x0 + σ·ε, velocity target ε - x0, σ drawn
   uniformly) on training combinations only; 10% of examples are the empty prompt with an
   empty background, which makes classifier-free guidance (and the `empty` target) available.
3. Quality on the held-out (object, colour) combinations at the default step count, guidance-free
   and with guidance; the default guidance is the smallest that meets the bar (1.0 = none).
Figures go to figures.json next to the weights.

With `--removal-every N`, every Nth generator step is taken with every unit of the default mask
sites removed (the text stream's modulation and the dual-stream blocks' MLPs set to zero), toward
images of the default look: any object, grey, solid, on any background, whatever the prompt says.
The generator learns that without those units the prompt is not heard, so what a prompt asks for
has to pass through the units a mask can remove (docs/toy_generator_variants.md).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from erase.config import TrainConfig
from erase.masks import MaskHooks, select_sites
from erase.pipelines import toy
from erase.pipelines import toy_world as world
from erase.pipelines.flux import flux_mask_sites

TEXT_ENCODER_MODES = ("joint", "frozen")


def render_batch(rng, n, exclude_held_out):
    images, prompts, labels = [], [], []
    for _ in range(n):
        image, prompt, attrs = world.training_example(rng, exclude_held_out)
        images.append(image)
        prompts.append(prompt)
        labels.append(world.label_indices(attrs))
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return images, prompts, torch.tensor(labels)


def default_look_batch(rng, n):
    """Images of what a prompt that names nothing draws: any object, grey, solid, any background."""
    images = []
    for _ in range(n):
        attrs = world.random_attributes(rng, exclude_held_out=False)
        images.append(world.render(attrs["object"], world.DEFAULT_COLOUR, world.DEFAULT_STYLE, attrs["background"], rng))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def detector_accuracy(detector, seed: int, n: int = 3000) -> dict[str, float]:
    """Per-attribute accuracy on fresh renders with an object (empty backgrounds only count for the object head)."""
    rng = np.random.default_rng(seed)
    images, _, labels = render_batch(rng, n, exclude_held_out=False)
    blank = labels[:, 0] == len(world.OBJECTS)
    with torch.no_grad():
        logits = detector(images)
    acc = {}
    for i, a in enumerate(world.ATTRIBUTES):
        keep = torch.ones_like(blank) if a in ("object", "background") else ~blank  # an empty image has no colour or style
        acc[a] = float((logits[i].argmax(-1) == labels[:, i])[keep].float().mean())
    return acc


def train_detector(seed: int, steps: int, batch: int = 128, progress: bool = True) -> toy.ToyDetector:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    detector = toy.ToyDetector()
    opt = torch.optim.AdamW(detector.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in tqdm(range(steps), desc="detector", disable=not progress):
        images, _, labels = render_batch(rng, batch, exclude_held_out=False)
        blank = labels[:, 0] == len(world.OBJECTS)
        logits = detector(images)
        # an empty background has no colour or style to name: only its object ("nothing") and background heads learn
        loss = sum(torch.nn.functional.cross_entropy(lg[~blank] if a in ("colour", "style") else lg,
                                                     labels[~blank, i] if a in ("colour", "style") else labels[:, i])
                   for i, (a, lg) in enumerate(zip(world.ATTRIBUTES, logits)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return detector.eval()


def train_generator(seed: int, steps: int, batch: int = 64, lr: float = 1e-3, progress: bool = True,
                    transformer_config: dict | None = None, text_config: dict | None = None,
                    text_encoder: str = "joint", removal_every: int = 0):
    """text_encoder "joint" trains the text encoder with the generator; "frozen" keeps it at its
    random initialisation, as FLUX.1 keeps T5 (trained on text alone) fixed, so that turning
    its features into what the image needs is the transformer's own work. With `removal_every`
    N > 0, every Nth step removes every unit of the default mask sites and trains toward the
    default look (default_look_batch) for the same prompts."""
    transformer, text = toy.build_models(seed, transformer_config, text_config)
    rng = np.random.default_rng(seed + 1)
    if text_encoder not in TEXT_ENCODER_MODES:
        raise ValueError(f"text_encoder must be one of {TEXT_ENCODER_MODES}, got {text_encoder!r}")
    if removal_every < 0:
        raise ValueError(f"removal_every must be 0 (off) or a positive step interval, got {removal_every}")
    text.requires_grad_(text_encoder == "joint")
    params = [p for p in (*transformer.parameters(), *text.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warmup = max(1, min(200, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    ids, txt_ids = toy.image_ids(), torch.zeros(text.max_len, 3)
    gen = torch.Generator().manual_seed(seed + 2)
    default_sites = select_sites(flux_mask_sites(transformer), TrainConfig.sites)  # the default site groups
    removed = {site.name: torch.zeros(site.size) for site in default_sites}
    bar = tqdm(range(steps), desc="generator", disable=not progress)
    for step in bar:
        images, prompts, _ = render_batch(rng, batch, exclude_held_out=True)
        removal_step = removal_every > 0 and (step + 1) % removal_every == 0
        if removal_step:
            images = default_look_batch(rng, batch)
        x0 = toy.pack(images)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.rand(batch, generator=gen)  # uniform: few-step sampling visits σ from 1 down to 1/steps
        x = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        embeds, pooled = text(text.tokenize(prompts))
        with MaskHooks(transformer, default_sites, removed if removal_step else {}):
            v = transformer(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=sigma,
                            img_ids=ids, txt_ids=txt_ids, return_dict=False)[0]
        loss = torch.mean((v - (noise - x0)) ** 2)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return transformer.eval(), text.eval()


@torch.no_grad()
def generate(gen: toy.ToyGenerator, prompts: list[str], seeds: list[int], batch: int = 256) -> torch.Tensor:
    """Sample at the default step count (the Euler loop written out: no gradients needed here)."""
    sigmas = gen.sigmas(gen.default_steps)
    out = []
    for i in range(0, len(prompts), batch):
        cond = gen.encode(prompts[i:i + batch])
        x = gen.noise(seeds[i:i + batch])
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + (sigma_next - sigma) * gen.velocity(x, sigma, cond)
        out.append(gen.decode(x))
    return torch.cat(out)


def held_out_quality(gen: toy.ToyGenerator, detector: toy.ToyDetector, seeds_per_prompt: int = 4) -> dict:
    prompts, expected = [], []
    for obj, colour in world.HELD_OUT:
        for style in world.STYLES:
            for bg in world.BACKGROUNDS:
                for _ in range(seeds_per_prompt):
                    prompts.append(world.make_prompt({"object": obj, "colour": colour, "style": style, "background": bg}))
                    expected.append({"object": obj, "colour": colour, "style": style, "background": bg})
    seeds = list(range(900_000, 900_000 + len(prompts)))
    found = detector.predict(generate(gen, prompts, seeds))
    acc = {a: float(np.mean([f[a] == e[a] for f, e in zip(found, expected)])) for a in world.ATTRIBUTES}
    return {"n": len(prompts), "accuracy": acc}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m erase.toy_train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=toy.WEIGHTS_DIR, help="folder for generator/detector safetensors and figures.json")
    parser.add_argument("--detector-steps", type=int, default=1500)
    parser.add_argument("--generator-steps", type=int, default=toy.GENERATOR_STEPS)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--guidances", default="1.0,1.5,2.0,3.0", help="guidance scales to check, smallest first")
    parser.add_argument("--dual-blocks", type=int, default=toy.TRANSFORMER_CONFIG["num_layers"],
                        help="dual-stream blocks (FLUX.1 has 19)")
    parser.add_argument("--single-blocks", type=int, default=toy.TRANSFORMER_CONFIG["num_single_layers"],
                        help="single-stream blocks (FLUX.1 has 38)")
    parser.add_argument("--text-encoder", choices=TEXT_ENCODER_MODES, default=toy.TEXT_ENCODER,
                        help="joint: trained with the generator; frozen: kept at its random initialisation")
    parser.add_argument("--removal-every", type=int, default=toy.REMOVAL_EVERY,
                        help="every Nth generator step removes every unit of the default mask sites and trains toward "
                             "the default look (0: never)")
    parser.add_argument("--detector-from", default=None,
                        help="copy the detector of this weights folder instead of training one (for generator variants)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op torch threads (default: every core)")
    args = parser.parse_args(argv)
    if args.removal_every < 0:
        parser.error(f"--removal-every must be 0 (never) or a positive step interval, got {args.removal_every}")
    if args.dual_blocks < 1 or args.single_blocks < 0:
        parser.error(f"--dual-blocks must be at least 1 (the mask sites are in them) and --single-blocks at least 0, "
                     f"got {args.dual_blocks} and {args.single_blocks}")
    transformer_config = dict(toy.TRANSFORMER_CONFIG, num_layers=args.dual_blocks, num_single_layers=args.single_blocks)
    from safetensors.torch import save_file

    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    started = time.time()
    detector = toy.load_detector(args.detector_from) if args.detector_from else train_detector(args.seed, args.detector_steps)
    det_acc = detector_accuracy(detector, args.seed + 100)
    save_file({k: v.contiguous() for k, v in detector.state_dict().items()}, os.path.join(args.out, "detector.safetensors"))
    print("detector accuracy", det_acc, flush=True)
    det_seconds = time.time() - started
    transformer, text = train_generator(args.seed, args.generator_steps, args.batch,
                                        transformer_config=transformer_config, text_encoder=args.text_encoder,
                                        removal_every=args.removal_every)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump({"transformer": transformer_config, "text": toy.TEXT_CONFIG, "text_encoder": args.text_encoder,
                   "removal_every": args.removal_every}, f, indent=2)
    state = {f"transformer.{k}": v.contiguous() for k, v in transformer.state_dict().items()}
    state.update({f"text.{k}": v.contiguous() for k, v in text.state_dict().items()})
    save_file(state, os.path.join(args.out, "generator.safetensors"))
    gen_seconds = time.time() - started - det_seconds
    quality, default = {}, None
    for g in [float(x) for x in args.guidances.split(",")]:
        gen = toy.ToyGenerator(transformer, text, guidance=g)
        quality[str(g)] = held_out_quality(gen, detector)
        print("guidance", g, quality[str(g)], flush=True)
        acc = quality[str(g)]["accuracy"]
        if default is None and acc["object"] >= 0.9 and acc["colour"] >= 0.9:
            default = g
    figures = {
        "seed": args.seed, "command": f"python -m erase.toy_train --seed {args.seed} --detector-steps "
        f"{args.detector_steps} --generator-steps {args.generator_steps} --batch {args.batch} --dual-blocks "
        f"{args.dual_blocks} --single-blocks {args.single_blocks} --text-encoder {args.text_encoder} "
        f"--removal-every {args.removal_every}"
        + (f" --detector-from {args.detector_from}" if args.detector_from else ""),
        "detector_accuracy_fresh_renders": det_acc,
        "held_out_combinations": [list(p) for p in world.HELD_OUT],
        "held_out_quality_by_guidance": quality, "default_steps": toy.DEFAULT_STEPS,
        "default_guidance": default if default is not None else max(quality, key=lambda k: quality[k]["accuracy"]["object"]),
        "meets_bar": default is not None,
        "minutes": {"detector": round(det_seconds / 60, 1), "generator": round(gen_seconds / 60, 1),
                    "total": round((time.time() - started) / 60, 1)},
        "transformer_params": sum(p.numel() for p in transformer.parameters()),
        "text_encoder_params": sum(p.numel() for p in text.parameters()),
    }
    if isinstance(figures["default_guidance"], str):
        figures["default_guidance"] = float(figures["default_guidance"])
    with open(os.path.join(args.out, "figures.json"), "w") as f:
        json.dump(figures, f, indent=2)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
