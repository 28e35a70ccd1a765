"""The `erase` command. Every subcommand has --help; human output by default, --json for machines.

Errors the user can fix (bad names, paths, prompts, settings) print one line starting with
`erase: error:` and exit 2; a run that stops on a non-finite loss exits 1 after saving the
last good mask.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipelines import MODELS, SITE_GROUPS

EXAMPLES = """examples:
  erase sites --model flux.1-schnell --json
  erase train --model flux.1-schnell --model-path ./FLUX.1-schnell --concept "Van Gogh" --out vangogh.safetensors
  erase bench --json
  erase masks import-reference ./reference_masks --model flux.1-schnell --out nudity.safetensors
"""


def _add_model_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    names = ", ".join(MODELS)
    p.add_argument("--model", default=default, required=default is None,
                   help=f"model name: {names}")
    p.add_argument("--model-path", metavar="DIR", help="local diffusers folder with the model's weights "
                   "(default: download from the hub for real checkpoints; random configs need none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="erase", description="Minimalist concept erasure: learn sparse neuron masks that remove a concept "
        "from a frozen flow-matching text-to-image model.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("sites", help="list a model's mask sites and sizes (no weights needed)",
                       description="List the mask sites of a model, built on the meta device: no weights are "
                       "loaded or downloaded. Groups: ffn (FFN hidden units), norm (text-stream modulation), "
                       "attn (attention heads).")
    p.add_argument("--model", default="toy", help=f"model name: {', '.join(MODELS)}")
    p.add_argument("--all", action="store_true", help="also list every site, not only the group totals")
    p.add_argument("--json", action="store_true", help="print JSON: {model, fingerprint, groups: {g: {masks, entries}}, sites}")

    p = sub.add_parser("train", help="one erasure run in this process; writes a mask file and metrics JSON",
                       description="Learn masks that erase --concept, backpropagating the MCE loss through every "
                       "sampling step (step-wise checkpointed). Defaults are the paper's (Table 6).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(p, default="toy")
    _add_run_args(p)
    p.add_argument("--concept", required=True, help="the concept to erase, e.g. 'Van Gogh' or 'nudity'; "
                   "for the toy world one of its objects, colours, styles or backgrounds (e.g. circle, red, striped)")
    p.add_argument("--prompts", metavar="FILE", help="prompts naming the concept, one per line "
                   "(default: the toy world's prompts for it, or templates around --concept)")
    p.add_argument("--neutral-prompts", metavar="FILE", help="neutral prompts for the preservation term, one per "
                   "line (default: the toy world's prompts for the other concepts of its group, or a small "
                   "built-in caption set)")
    p.add_argument("--out", metavar="MASK", help="mask file to write (default: MODEL-CONCEPT.safetensors here)")
    p.add_argument("--metrics", metavar="FILE", help="metrics JSON to write (default: MASK with .json)")
    p.add_argument("--sites", default="ffn,norm", help=f"site groups to mask, comma-separated from {','.join(SITE_GROUPS)}")
    p.add_argument("--parametrisation", default="hard_concrete", choices=["hard_concrete", "sigmoid", "binary"])
    p.add_argument("--init-logit", type=float, default=3.0, help="initial λ (3: mask ≈ 1)")
    p.add_argument("--target", default="empty", choices=["empty", "substitute"],
                   help="what the concept maps onto: the empty prompt's output, or a substituted prompt's")
    p.add_argument("--substitute", action="append", metavar="OLD=NEW", help="for --target substitute: replace "
                   "OLD in each concept prompt by NEW (repeatable), e.g. 'Van Gogh=a painter'")
    p.add_argument("--beta", type=float, default=0.01, help="weight of the preservation term (smaller: stronger erasure)")
    p.add_argument("--lr-ffn", type=float, default=0.5)
    p.add_argument("--lr-norm", type=float, default=0.5)
    p.add_argument("--lr-attn", type=float, default=0.0, help="0 leaves attention heads unmasked (the paper's default)")
    p.add_argument("--optimizer", default="adamw", choices=["adam", "adamw"])
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--steps", type=int, default=400, help="optimisation steps")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per term per step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimisation step")
    p.add_argument("--sampling-steps", type=int, help="unrolled sampling steps (default: the model's)")
    p.add_argument("--noises-per-prompt", type=int, default=1, help="fixed starting noises per prompt")
    p.add_argument("--sparsity-weight", type=float, default=0.0, help="weight of the explicit sparsity penalty")
    p.add_argument("--target-sparsity", type=float, help="with --sparsity-weight: penalise only the removed share "
                   "above this budget (default: penalise every removed unit, L1)")
    p.add_argument("--no-checkpointing", action="store_true", help="plain full backprop (memory grows with steps)")
    p.add_argument("--threshold", type=float, default=0.0, help="binarisation threshold on λ")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the metrics JSON instead of a summary")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("eval", help="detection, erasure and preservation figures of a mask (toy world)",
                       description="Generate from the world's prompts with fixed seeds and run the detector. "
                       "Prints each concept's detection rate under `detection`; with --mask and --concept also "
                       "`erasure_rate`, `preservation` (other concepts' detection relative to the base model, "
                       "averaged; 1.0 = untouched) and `neutral_fidelity`.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(p, default="toy")
    _add_run_args(p)
    p.add_argument("--mask", metavar="MASK", help="mask file to evaluate (default: the base model alone)")
    p.add_argument("--concept", help="the erased concept (default: the mask file's)")
    p.add_argument("--seeds-per-prompt", type=int, default=2, help="fixed seeds per prompt")
    p.add_argument("--sampling-steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--grid", metavar="PNG", help="with --mask: write base and masked generations side by side")
    p.add_argument("--out", metavar="JSON", help="also write the report to this file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("bench", help="time and peak memory of one optimisation step, checkpointed and plain",
                       description="Run the erasure step on a random model for several sampling-step counts, "
                       "with step-wise checkpointing on and off, each row in a fresh process.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(p, default="flux-bench")
    p.add_argument("--steps", default="1,2,4,8", help="sampling-step counts, comma-separated")
    p.add_argument("--sites", default="ffn,norm", help="site groups to mask")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="timed optimisation steps per row (the fastest counts)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON with a list `rows` of {steps, checkpointing, seconds, peak_mb}")

    p = sub.add_parser("masks", help="mask files: import the reference code's masks, inspect a file")
    msub = p.add_subparsers(dest="masks_command", metavar="ACTION", required=True)
    q = msub.add_parser("import-reference", help="convert the paper's ff.pt/norm.pt/attn.pt into a mask file",
                        description="Read the reference code's per-layer λ lists (tensors only, weights_only) and "
                        "write the project's safetensors mask file.")
    q.add_argument("folder", help="folder with ff.pt, norm.pt and/or attn.pt")
    q.add_argument("--model", default="flux.1-schnell", help="model the masks were trained on")
    q.add_argument("--concept", default="unknown", help="the concept the masks erase (stored in the metadata)")
    q.add_argument("--out", required=True, metavar="MASK")
    q = msub.add_parser("inspect", help="print a mask file's metadata and sparsity")
    q.add_argument("file")
    q.add_argument("--json", action="store_true")
    return parser


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="model dtype (mask logits stay fp32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1")
    p.add_argument("--guidance", type=float, help="guidance scale: classifier-free for the toy world, embedded "
                   "for FLUX.1-dev (default: the model's)")


def _groups(text: str) -> tuple[str, ...]:
    return tuple(g.strip() for g in text.split(",") if g.strip())


def cmd_sites(args) -> int:
    from erase.masks import fingerprint
    from pipelines import mask_sites

    sites = mask_sites(args.model)
    groups = {}
    for s in sites:
        g = groups.setdefault(s.group, {"masks": 0, "entries": 0})
        g["masks"] += 1
        g["entries"] += s.size
    report = {"model": args.model, "fingerprint": fingerprint(sites), "groups": groups,
              "sites": [{"name": s.name, "group": s.group, "size": s.size} for s in sites]}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.model}  architecture {report['fingerprint']}")
    print(f"{'group':<6} {'masks':>6} {'entries':>10}")
    for g, v in groups.items():
        print(f"{g:<6} {v['masks']:>6} {v['entries']:>10,}")
    if args.all:
        for s in sites:
            print(f"  {s.name:<45} {s.size:>8,}")
    return 0


def cmd_train(args) -> int:
    from erase.masks import save_mask_file
    from erase.prompts import default_prompt_sets, parse_substitutions, read_prompt_file
    from erase.train import TrainConfig, TrainingStopped, train
    from pipelines import load_generator

    erase_prompts, neutral = default_prompt_sets(args.model, args.concept)
    if args.prompts:
        erase_prompts = read_prompt_file(args.prompts, "concept prompt")
    if args.neutral_prompts:
        neutral = read_prompt_file(args.neutral_prompts, "neutral prompt")
    cfg = TrainConfig(
        concept=args.concept, sites=_groups(args.sites), parametrisation=args.parametrisation,
        init_logit=args.init_logit, target=args.target, substitutions=parse_substitutions(args.substitute),
        beta=args.beta, lr_ffn=args.lr_ffn, lr_norm=args.lr_norm, lr_attn=args.lr_attn, optimizer=args.optimizer,
        weight_decay=args.weight_decay, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        sampling_steps=args.sampling_steps, noises_per_prompt=args.noises_per_prompt,
        sparsity_weight=args.sparsity_weight, target_sparsity=args.target_sparsity,
        checkpointing=not args.no_checkpointing, threshold=args.threshold, seed=args.seed)
    cfg.validate()  # before loading a model: bad settings fail in a second, not after minutes
    if args.out is None:
        args.out = f"{args.model}-{'-'.join(args.concept.split())}.safetensors".replace("/", "_")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"output folder {out_dir!r} does not exist; create it or choose another --out")
    gen = load_generator(args.model, args.model_path, dtype=args.dtype, device=args.device, guidance=args.guidance)
    stopped = None
    try:
        result = train(gen, cfg, erase_prompts, neutral, progress=not args.quiet)
    except TrainingStopped as err:
        stopped, result = err, err.result
    metrics = result.metrics()
    metrics.update(model=args.model, concept=args.concept, mask_file=os.path.abspath(args.out))
    save_mask_file(args.out, result.masks, model_id=args.model, model_sites=gen.mask_sites(), concept=args.concept,
                   threshold=cfg.threshold, extra={"status": result.status, "steps_done": result.steps_done})
    metrics_path = args.metrics or os.path.splitext(args.out)[0] + ".json"
    with open(metrics_path, "w") as f:
        json.dump(metrics, f, indent=2)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        sp = metrics["sparsity"]
        final = metrics["final"]
        print(f"concept {args.concept!r}: {result.status} after {result.steps_done} steps in {result.seconds:.1f}s")
        if final:
            print(f"  loss {final['loss']:.5g} (erase {final['erase_loss']:.5g}, preserve {final['preserve_loss']:.5g})")
        print(f"  removed {sp['removed']:,} of {sp['entries']:,} mask entries ({sp['overall']:.4%}); "
              + ", ".join(f"{g} {v:.4%}" for g, v in sp["groups"].items()))
        print(f"  mask: {args.out}\n  metrics: {metrics_path}")
    if stopped is not None:
        print(f"erase: training stopped: {stopped}; the last good mask (after step {result.steps_done}) "
              f"is saved at {args.out}", file=sys.stderr)
        return 1
    return 0


def cmd_eval(args) -> int:
    from erase.evaluate import evaluate_toy
    from erase.masks import binary_from_file_meta, load_mask_file
    from pipelines import ModelError, load_generator

    if args.model != "toy":
        raise ModelError(f"`erase eval` needs a detector for the concepts; so far only the toy world has one "
                         f"(NudeNet and CLIP detectors for {args.model} come with the evaluation work)")
    if args.seeds_per_prompt < 1:
        raise ValueError(f"--seeds-per-prompt must be at least 1, got {args.seeds_per_prompt}")
    from pipelines.toy import load_detector

    gen = load_generator(args.model, args.model_path, dtype=args.dtype, device=args.device, guidance=args.guidance)
    detector = load_detector(args.model_path, device=args.device)
    binary, sites, concept = None, None, args.concept
    if args.mask:
        masks, meta = load_mask_file(args.mask, gen.mask_sites(), args.model)
        binary, sites = binary_from_file_meta(masks, meta), masks.sites
        concept = concept or meta["concept"]
    if args.grid and not (args.mask and concept):
        raise ValueError("--grid needs --mask (and a concept): it shows base and masked generations side by side")
    report = evaluate_toy(gen, detector, binary_masks=binary, sites=sites, concept=concept,
                          seeds_per_prompt=args.seeds_per_prompt, steps=args.sampling_steps, progress=not args.json,
                          keep_images=bool(args.grid))
    if args.mask:
        report["mask"] = args.mask
    if args.grid:
        from erase.evaluate import grid_rows, save_image_grid

        save_image_grid(grid_rows(report.pop("_images"), concept), args.grid)
        report["grid"] = args.grid
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']}: {report['generations']} generations, {report['steps']} steps, guidance {report['guidance']}")
    base = report.get("base_detection")
    print(f"{'concept':<12} {'detection':>9}" + (f" {'base':>6}" if base else ""))
    for c, rate in report["detection"].items():
        print(f"{c:<12} {rate:>9.3f}" + (f" {base[c]:>6.3f}" if base else ""))
    if "erasure_rate" in report:
        print(f"erasure_rate ({concept}): {report['erasure_rate']:.3f}   preservation: {report['preservation']:.3f}")
    if "neutral_fidelity" in report:
        nf = report["neutral_fidelity"]
        print(f"preservation within its group: {report['preservation_same_group']:.3f} "
              f"(worst: {report['worst_same_group']});  neutral fidelity: mean |Δpixel| {nf['mean_abs_pixel_diff']:.4f}")
    return 0


def cmd_bench(args) -> int:
    from erase import bench

    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    if not steps or min(steps) < 1:
        raise ValueError(f"--steps takes positive step counts like 1,2,4,8, got {args.steps!r}")
    report = bench.run(args.model, steps, batch_size=args.batch_size, sites=_groups(args.sites),
                       repeats=args.repeats, device=args.device, model_path=args.model_path, progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']} ({report['transformer_params'] / 1e6:.1f}M transformer parameters) on {report['device']}, "
          f"batch {report['batch_size']}, sites {','.join(report['sites'])}")
    print(f"{'steps':>5} {'checkpointing':>13} {'seconds':>9} {'peak MB':>9}")
    for r in report["rows"]:
        print(f"{r['steps']:>5} {str(r['checkpointing']):>13} {r['seconds']:>9.3f} {r['peak_mb']:>9.1f}")
    for name, value in report["ratios"].items():
        print(f"{name}: {value}")
    return 0


def cmd_masks(args) -> int:
    from erase.masks import read_mask_metadata, save_mask_file
    from erase.reference import read_reference_masks
    from pipelines import mask_sites

    if args.masks_command == "import-reference":
        sites = mask_sites(args.model)
        masks = read_reference_masks(args.folder, sites)
        meta = save_mask_file(args.out, masks, model_id=args.model, model_sites=sites, concept=args.concept,
                              extra={"imported_from": os.path.abspath(args.folder)})
        sp = json.loads(meta["sparsity"])
        print(f"wrote {args.out}: {len(masks.sites)} masks, {sp['entries']:,} entries, "
              f"removed {sp['overall']:.4%} at threshold 0")
        return 0
    meta = read_mask_metadata(args.file)
    meta = {k: (json.loads(v) if k in ("groups", "sparsity", "extra") else v) for k, v in meta.items()}
    if args.json:
        print(json.dumps(meta, indent=2))
    else:
        for k, v in meta.items():
            if k == "sparsity":
                print(f"sparsity: {v['overall']:.4%} overall; " + ", ".join(f"{g} {x:.4%}" for g, x in v["groups"].items()))
            else:
                print(f"{k}: {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from erase.masks import MaskError
    from erase.prompts import PromptError
    from erase.train import TrainError
    from pipelines import ModelError

    handlers = {"sites": cmd_sites, "train": cmd_train, "eval": cmd_eval, "bench": cmd_bench, "masks": cmd_masks}
    try:
        return handlers[args.command](args)
    except (ModelError, MaskError, PromptError, TrainError, FileNotFoundError, ValueError) as err:
        print(f"erase: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("erase: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """Library chatter (torchvision hints, truncation notices) hides our own output; keep errors only."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


if __name__ == "__main__":
    sys.exit(main())
