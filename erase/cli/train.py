"""one erasure run in this process; writes a mask file and metrics JSON

Learn masks that erase --concept, backpropagating the MCE loss through every sampling step
(step-wise checkpointed). A run's settings come, each over the ones before, from the paper's
defaults (Table 6), the model's recipe defaults, --recipe, --config and the flags below.

Ctrl-C saves the last logged mask (one is logged every 10 steps) at MASK and a resume point
in MASK.resume/; the same command with --resume MASK.resume continues where it stopped
and ends with the mask of an uninterrupted run, to within float rounding.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from erase.cli.common import add_model_args, add_parser, add_run_args, output_path


def add(subparsers) -> None:
    from erase import config

    p = add_parser(subparsers, "train", __doc__)
    add_model_args(p)
    add_run_args(p)
    p.add_argument("--concept", required=True, help="the concept to erase, e.g. 'Van Gogh' or 'nudity'; for the toy "
                   "world one of its objects, colours, styles or backgrounds (e.g. circle, red, striped)")
    p.add_argument("--prompts", metavar="FILE", help="prompts naming the concept: .txt (one per line), .csv, .parquet "
                   "or .jsonl, local or s3:// / gs:// (default: the toy world's prompts for it, or templates "
                   "around --concept)")
    p.add_argument("--neutral-prompts", metavar="FILE", help="neutral prompts for the preservation term, one per "
                   "line or a table column (default: the toy world's prompts for the other concepts of its group, "
                   "or a small built-in caption set)")
    p.add_argument("--prompt-column", default="prompt", help="column holding the prompts in .csv/.parquet/.jsonl files")
    p.add_argument("--out", metavar="MASK", help="mask file to write (default: MODEL-CONCEPT.safetensors here)")
    p.add_argument("--metrics", metavar="FILE", help="metrics JSON to write (default: MASK with .json)")
    p.add_argument("--config", metavar="YAML", help="settings from a file: the keys a space's `fixed:` takes "
                   "(flags override them)")
    p.add_argument("--recipe", help="a named recipe of the model: settings between its defaults and --config "
                   "(FLUX.1: paper, the paper's Table 6; reference, the reference code's configs/flux.yaml; "
                   "docs/method.md)")
    config.add_flags(p)
    p.add_argument("--tracking-uri", help="also log the run to MLflow at this URI, e.g. sqlite:///mlflow.db or http://host:5000 (default: "
                   "no MLflow run; $MLFLOW_TRACKING_URI is not read here)")
    p.add_argument("--resume", metavar="FOLDER", help="continue an interrupted run from the resume point Ctrl-C left "
                   "(MASK.resume); give the same settings and prompts it ran with")
    p.add_argument("--json", action="store_true", help="print the metrics JSON instead of a summary")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    from erase import config
    from erase.masks import fingerprint
    from erase.pipelines import load_generator, mask_sites
    from erase.prompts import prompt_sets
    from erase.tracking import train_run
    from erase.trial import LocalReporter, run_trial

    erase_prompts, neutral = prompt_sets(args.model, args.concept, prompts=args.prompts, neutral=args.neutral_prompts,
                                         column=args.prompt_column)
    fixed = config.read_config_file(args.config) if args.config else {}
    cfg = config.resolve(args.model, args.concept, fixed=fixed, fixed_from=f"config file {args.config}",
                         flags={**config.flag_values(args), "recipe": args.recipe})
    out = output_path(args.out or f"{args.model}-{'-'.join(args.concept.split())}.safetensors".replace("/", "_"),
                      "--out")
    metrics_path = output_path(args.metrics or os.path.splitext(out)[0] + ".json", "--metrics")
    resume = resume_point(args.resume, args.model, cfg, erase_prompts, neutral) if args.resume else None
    logger = None
    if args.tracking_uri:
        logger = train_run(args.tracking_uri, args.model, cfg, erase_prompts, neutral,
                           run_name=f"train-{os.path.basename(out)}", fingerprint=fingerprint(mask_sites(args.model)))
    reporter = LocalReporter(out, metrics_path, model=args.model, logger=logger)
    try:
        gen = load_generator(args.model, args.model_path, dtype=args.dtype, device=args.device, guidance=args.guidance)
    except BaseException as err:  # the MLflow run exists already: end it, never leave it RUNNING
        reporter.fail(err)
        raise
    try:
        result = run_trial(gen, cfg, erase_prompts, neutral, reporter, progress=not args.quiet, resume=resume)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_message(reporter, cfg.log_every)) from None
    metrics = reporter.metrics
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print_summary(result, metrics, out, metrics_path)
    if args.resume and result.status == "finished":
        shutil.rmtree(args.resume)  # the run is whole again: its resume point is spent
    if result.status != "finished":
        print(f"erase: training {result.status}; the last good mask (after step {result.steps_done}) is saved at "
              f"{out}", file=sys.stderr)
        return 1
    return 0


def resume_point(folder: str, model: str, cfg, erase_prompts: list, neutral: list) -> dict:
    """The resume point in `folder`, checked against this run: the same model, settings and prompt sets."""
    from erase.errors import EraseError
    from erase.masks import read_mask_metadata
    from erase.trial import MASK_FILE, read_checkpoint, reproduction_record

    if not os.path.isdir(folder) or not os.path.exists(os.path.join(folder, MASK_FILE)):
        raise EraseError(f"--resume {folder!r} is not a resume point; an interrupted `erase train` leaves one "
                         "beside its mask, named MASK.resume")
    point, _ = read_checkpoint(folder)
    meta = read_mask_metadata(os.path.join(folder, MASK_FILE))
    if meta["model_id"] != model:
        raise EraseError(f"--resume {folder!r} was made on model {meta['model_id']!r}, not {model!r}; pass "
                         f"--model {meta['model_id']}")
    saved = json.loads(meta["extra"])["reproduce"]
    now = reproduction_record(cfg, erase_prompts, neutral)
    changed = sorted(key for key in set(saved["config"]) | set(now["config"])
                     if saved["config"].get(key) != now["config"].get(key))
    if changed:
        raise EraseError("--resume: this run's settings differ from the interrupted run's in "
                         + ", ".join(f"{k} ({saved['config'].get(k)!r} then, {now['config'].get(k)!r} now)" for k in changed)
                         + "; give the flags and --config it ran with")
    if saved["prompts_sha"] != now["prompts_sha"]:
        raise EraseError("--resume: the prompt sets differ from the interrupted run's; give the --prompts and "
                         "--neutral-prompts it ran with")
    return point


def interrupted_message(reporter, log_every: int) -> str:
    from erase.trial import resume_folder

    if reporter.latest is None:
        return f"nothing saved: no step was logged yet (one is logged every {log_every} steps)"
    folder = resume_folder(reporter.mask_path)
    return (f"the mask after step {reporter.latest.step} is saved at {reporter.mask_path}; continue with the same "
            f"command and --resume {folder}")


def print_summary(result, metrics: dict, out: str, metrics_path: str) -> None:
    sp, final = metrics["sparsity"], metrics["final"]
    print(f"concept {result.config.concept!r}: {result.status} after {result.steps_done} steps in {result.seconds:.1f}s")
    if final:
        print(f"  loss {final['loss']:.5g} (erase {final['erase_loss']:.5g}, preserve {final['preserve_loss']:.5g})")
    print(f"  removed {sp['removed']:,} of {sp['entries']:,} mask entries ({sp['overall']:.4%}); "
          + ", ".join(f"{g} {v:.4%}" for g, v in sp["groups"].items()))
    print(f"  mask: {out}\n  metrics: {metrics_path}")
    if result.learnt_target:
        print("  learnt target: " + ", ".join(f"{t['concept']} {t['weight']:.2f}" for t in result.learnt_target))
    if metrics.get("mlflow_run_id"):
        print(f"  MLflow run: {metrics['mlflow_run_id']}")
