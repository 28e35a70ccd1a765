"""search erasure hyperparameters on Ray Tune + Optuna, one study per concept

Ray Tune + Optuna over a search space (erase/spaces/), one Optuna study per concept, with
ASHA stopping trials early on score = max(0, 1 - erasure_rate / base_rate) * preservation.
Each trial is a Ray Train run whose worker asks for a GPU (FLUX.1 checkpoints) or a CPU (the
toy world) whether or not one is up yet, so an autoscaling cluster scales up for it; every
trial is an MLflow run. With no flags: a small sweep of the toy world's 'striped' on a local
Ray. Ctrl-C stops cleanly; --resume ID continues without losing finished trials. On a
cluster: --address auto, --storage on shared storage or a URI (README, "Run on a cluster").
--dry-run checks the concepts, the space and the prompt files and says what would run, without
starting Ray.
"""

from __future__ import annotations

import json
import os
import sys

from erase.cli import common


def add(subparsers) -> None:
    p = common.add_parser(subparsers, "sweep", __doc__)
    common.add_model_args(p)
    p.add_argument("--concepts", help="comma-separated concepts, one study each (toy default: striped, the "
                   "concept its masks erase best)")
    p.add_argument("--space", default="toy_fast", help="search space: a shipped name (default, flux_nudity, toy_fast, "
                   "toy_adaptive, concept_graph; see erase/spaces/) or a YAML file")
    p.add_argument("--trials", type=int, default=4, help="trials per concept")
    p.add_argument("--address", help="Ray cluster to use, e.g. auto (default: start a local Ray)")
    p.add_argument("--storage", default="erase-sweeps", help="checkpoints and Tune state: a folder (on a cluster, one "
                   "every node sees, e.g. /mnt/erase/sweeps) or a URI Ray accepts (s3://, gs://). A folder also "
                   "keeps the sweep's own files (default: ./erase-sweeps)")
    p.add_argument("--state-dir", help="the sweep's own files (specs, study logs, progress, summaries, the Optuna "
                   "study, the best mask): a local folder (default: --storage when it is a folder, else "
                   "./erase-sweeps)")
    p.add_argument("--resume", metavar="SWEEP_ID", help="continue an interrupted sweep (its saved settings are used)")
    p.add_argument("--tracking-uri", help=common.TRACKING_URI_HELP)
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial (>1: data-parallel)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each Train worker reserves")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs each trial asks Ray for, shared among its workers, "
                   "whether or not any are up yet: pending trials are the autoscaler's demand (default: 1 per "
                   "worker for the FLUX.1 checkpoints, 0 for the toy world and the random configs)")
    p.add_argument("--max-concurrent", type=int, help="trials at once over all studies (default: the most GPUs the "
                   "autoscaler may bring up, else the GPUs up now, per trial's GPUs; CPU trials: one per core "
                   "locally, per --cpus-per-worker on a cluster)")
    p.add_argument("--report-every", type=int, default=25, help="optimisation steps between reports, evaluations "
                   "and checkpoints (ASHA decides on these)")
    p.add_argument("--grace-steps", type=int, default=50, help="ASHA: steps every trial runs before it can be stopped")
    p.add_argument("--prompts", metavar="FILE", help="concept prompts (.parquet, .csv, .jsonl, .txt; local or s3://)")
    p.add_argument("--neutral-prompts", metavar="FILE", help="neutral prompts, same formats")
    p.add_argument("--eval-prompts", metavar="FILE", help="prompts naming the concept that trials are "
                   "evaluated, stopped and selected on; never the training prompts (default: the model's validation "
                   "split, or for a model without splits its own set)")
    p.add_argument("--prompt-column", default="prompt", help="column holding the prompts in table files")
    common.add_detector_args(p, "for the trials' figures")
    common.add_run_args(p, device=False)  # a trial's device is its worker's: a GPU where the cluster has them
    p.add_argument("--dry-run", action="store_true", help="check the concepts, the space file and the prompt files, "
                   "print what would run, and stop (no Ray, no MLflow, nothing written)")
    p.add_argument("--json", action="store_true", help="print the summaries (with --dry-run: the plan) as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from erase.detectors import detector_spec
    from erase.pipelines import model as model_entry
    from erase.sweep import plan, run_sweep

    default_concepts = [] if args.resume else list(model_entry(args.model).sweep_concepts)
    concepts = common.comma_list(args.concepts) or default_concepts
    detector = None if args.resume else detector_spec(args.model, args.detector, args.detector_config, args.model_path)
    specs = plan(args.model, concepts, args.space, args.trials, args.storage, resume=args.resume,
                 state_dir=args.state_dir, model_path=args.model_path, tracking_uri=args.tracking_uri, workers_per_trial=args.workers_per_trial,
                 cpus_per_worker=args.cpus_per_worker, gpus_per_trial=args.gpus_per_trial, dtype=args.dtype, guidance=args.guidance,
                 report_every=args.report_every, grace_steps=args.grace_steps, prompts=args.prompts,
                 neutral_prompts=args.neutral_prompts, eval_prompts=args.eval_prompts, prompt_column=args.prompt_column,
                 detector=detector)
    if args.dry_run:
        return print_plan(specs, args.json)
    if not args.json:
        print(f"sweep {specs[0].sweep_id}: {len(specs)} stud{'y' if len(specs) == 1 else 'ies'} "
              f"({', '.join(s.concept for s in specs)}), space {specs[0].space}, {specs[0].trials} trials each; "
              f"state in {os.path.dirname(specs[0].study_dir)}"
              + (f", checkpoints in {os.path.dirname(specs[0].results_dir)}" if specs[0].state_dir else ""), flush=True)
    with common.ray_output_off_stdout() as out:
        progress = None if args.json else common.progress_printer(out)
        summaries = run_sweep(specs, address=args.address, max_concurrent=args.max_concurrent, on_progress=progress)
    if args.json:
        print(json.dumps(summaries, indent=2, default=str))
        return no_trial_finished(summaries)
    for summary in summaries:
        print_summary(summary)
    cost = summaries[0].get("sweep_cost") or {}
    if cost.get("overhead"):
        print(f"\nwall time {cost['wall_seconds']:.0f} s; the trials' own compute {cost['trial_compute_seconds']:.0f} s "
              f"on {cost['slots']} slot(s): orchestration overhead x{cost['overhead']:.2f} (1.00 = none)")
    if no_trial_finished(summaries):
        return 1
    print(f"\npromote the best with: erase promote --concept {summaries[0]['concept']} --sweep {specs[0].sweep_id}")
    return 0


def print_plan(specs, as_json: bool) -> int:
    """--dry-run: the studies, the space's searched and fixed settings, and the prompt sets, all checked."""
    from erase import config
    from erase.spaces import load_space

    space = load_space(specs[0].space, config.FILE_KEYS)
    first = specs[0]
    prompts = {"prompts": first.prompts, "neutral_prompts": first.neutral_prompts, "eval_prompts": first.eval_prompts}
    plan = {"concepts": [s.concept for s in specs], "model": first.model, "trials_per_concept": first.trials,
            "space": space.path, "search": space.search, "fixed": space.fixed,
            "prompt_files": {k: v for k, v in prompts.items() if v}, "detector": first.detector}
    if as_json:
        print(json.dumps(plan, indent=2, default=str))
        return 0
    print(f"checked, nothing run: {len(specs)} stud{'y' if len(specs) == 1 else 'ies'} ({', '.join(plan['concepts'])}) "
          f"on {first.model}, {first.trials} trials each, space {space.path}")
    for key, spec in space.search.items():
        bounds = spec.get("choices") or [spec.get("low"), spec.get("high")]
        print(f"  search {key}: {spec['distribution']} {bounds}")
    for key, value in space.fixed.items():
        print(f"  fixed  {key}: {value}")
    for key, path in plan["prompt_files"].items():
        print(f"  --{key.replace('_', '-')} {path}: readable, not empty")
    if not plan["prompt_files"]:
        print(f"  prompts: the model's own sets (training, validation and test splits)")
    return 0


def print_summary(summary: dict) -> None:
    """A study's trials, best first, and its best finished trial."""
    print(f"\n{summary['concept']}: objective {summary['objective']}")
    print("  (score, erasure and preservation on the validation split, what the sweep selects on)")
    print(f"  {'trial':<28} {'status':<9} {'score':>6} {'erasure':>8} {'preserv.':>8} {'step':>5}")
    for t in sorted(summary["trials"], key=lambda t: -(t["score"] or -1)):
        score, erasure, kept = (common.number(t[k]) for k in ("score", "erasure_rate", "preservation"))
        print(f"  {t['trial'][:28]:<28} {t['status']:<9} {score:>6} {erasure:>8} {kept:>8} {t['step'] or '-':>5}")
    best = summary.get("best")
    if best:
        print(f"  best finished trial: {best['trial']}, score {best['score']:.3f}, erasure_rate "
              f"{best['erasure_rate']:.3f}, preservation {best['preservation']:.3f}")
        if best.get("test_score") is not None:
            interval = (f" [{best['test_erasure_rate_low']:.3f}, {best['test_erasure_rate_high']:.3f}] of "
                        f"{int(best['test_erasure_n'])} generations" if best.get("test_erasure_n") else "")
            print(f"  on the test split (held out, not selected on): score {best['test_score']:.3f}, erasure_rate "
                  f"{best['test_erasure_rate']:.3f}{interval}, preservation {best['test_preservation']:.3f}, "
                  f"robust_erasure_rate {common.number(best.get('test_robust_erasure_rate'))}")
        print("  hyperparameters: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in best["config"].items()))
        print(f"  mask: {best.get('mask_file')}   MLflow run: {best.get('mlflow_run_id')}")
    else:
        print("  no trial finished")
    print(f"  Optuna study {summary['optuna_study']} in {summary['optuna_storage']}")


def no_trial_finished(summaries: list[dict]) -> int:
    """1 (and say where to look) when a study has no finished trial: a sweep that produced nothing is a failure."""
    empty = [s for s in summaries if not s.get("best")]
    for s in empty:
        print(f"erase: error: no trial of {s['concept']!r} finished; the errors are in "
              f"{os.path.join(s['study_dir'], 'study.log')}", file=sys.stderr)
    return 1 if empty else 0
