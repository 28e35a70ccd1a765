"""The `erase` command. Every subcommand has --help; human output by default, --json for machines.

Errors the user can fix (bad names, paths, prompts, settings) print one line starting with
`erase: error:` and exit 2; a run that stops on a non-finite loss exits 1 after saving the
last good mask.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from erase import config
from erase.errors import EraseError
from erase.pipelines import models

EXAMPLES = """examples (the toy world is the default model):
  erase sweep                                            a small sweep for 'striped' on a local Ray
  erase sweep --concepts striped,outlined --trials 8 --address auto
  erase promote --concept striped                        best run -> registry, alias production
  erase masks apply models:/erase-toy-striped@production --prompt "a striped red cross" --out out.png
  erase train --concept striped && erase eval --mask toy-striped.safetensors --report striped.html
  erase graph                                            concept graph of the toy world's objects
  erase sites --model flux.1-schnell --json
  erase masks import-reference ./reference_masks --model flux.1-schnell --out nudity.safetensors
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help, once: not when the help states it already, nor when it is
    None or False (an absent value or an off switch says nothing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default:" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {action.default})" if text else f"(default: {action.default})"


def _add_model_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    names = ", ".join(models())
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

    p = sub.add_parser("sweep", help="search erasure hyperparameters on Ray Tune + Optuna, one study per concept",
                       description="Ray Tune + Optuna over a search space (erase/spaces/), one Optuna study per concept, "
                       "ASHA early stopping on score = " + "max(0, 1 - erasure_rate / base_rate) * preservation. "
                       "Each trial is a Ray Train run (one worker per GPU, the CPU otherwise), every trial an MLflow "
                       "run. With no flags: a small sweep of the toy world's 'striped' on a local Ray. Ctrl-C stops "
                       "cleanly; --resume ID continues without losing finished trials.",
                       formatter_class=HelpFormatter)
    _add_model_args(p, default="toy")
    p.add_argument("--concepts", help="comma-separated concepts, one study each (toy default: striped, the "
                   "concept its masks erase best)")
    p.add_argument("--space", default="toy_fast", help="search space: a shipped name (default, flux_nudity, toy_fast, "
                   "toy_adaptive, concept_graph; see erase/spaces/) or a YAML file")
    p.add_argument("--trials", type=int, default=4, help="trials per concept")
    p.add_argument("--address", help="Ray cluster to use, e.g. auto (default: start a local Ray)")
    p.add_argument("--storage", default="erase-sweeps", help="folder for Tune/Train state, checkpoints and study logs")
    p.add_argument("--resume", metavar="SWEEP_ID", help="continue an interrupted sweep (its saved settings are used)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///./mlflow.db with ./mlartifacts)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial (>1: data-parallel)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--report-every", type=int, default=25, help="optimisation steps between reports, evaluations "
                   "and checkpoints (ASHA decides on these)")
    p.add_argument("--grace-steps", type=int, default=50, help="ASHA: steps every trial runs before it can be stopped")
    p.add_argument("--prompts", metavar="FILE", help="concept prompts (.parquet, .csv, .jsonl, .txt; local or s3://)")
    p.add_argument("--neutral-prompts", metavar="FILE", help="neutral prompts, same formats")
    p.add_argument("--eval-prompts", metavar="FILE", help="evaluation prompts naming the concept (default: --prompts)")
    p.add_argument("--prompt-column", default="prompt", help="column holding the prompts in table files")
    p.add_argument("--detector", choices=["toy", "nudenet", "clip"], help="detector for the trials' figures "
                   "(default: toy for the toy world)")
    p.add_argument("--detector-config", metavar="YAML", help="detector options (see erase eval --help)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--json", action="store_true", help="print the summaries as JSON")

    p = sub.add_parser("promote", help="register the best run's mask in the MLflow registry and move an alias",
                       description="Register the best finished run of a concept (of one sweep with --sweep) as a new "
                       "version of the registered model erase-<model>-<concept>, with its figures and lineage, and "
                       "move --alias to it. Gates: erasure_rate at most max_erasure_rate, preservation at least "
                       "min_preservation (defaults 0.05 and 0.9, or --gates FILE); below them promotion is refused "
                       "unless --force.", formatter_class=HelpFormatter)
    p.add_argument("--concept", required=True)
    p.add_argument("--model", default="toy", help=f"base model: {', '.join(models())}")
    p.add_argument("--sweep", help="only runs of this sweep id")
    p.add_argument("--metric", default="score", help="metric that picks the best run (higher is better)")
    p.add_argument("--alias", default="production")
    p.add_argument("--gates", metavar="YAML", help="gates file: {max_erasure_rate: 0.05, min_preservation: 0.9}")
    p.add_argument("--max-erasure-rate", type=float, help="override the gate")
    p.add_argument("--min-preservation", type=float, help="override the gate")
    p.add_argument("--force", action="store_true", help="promote even if the gates fail (recorded on the version)")
    p.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: sqlite:///./mlflow.db)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("graph", help="concept graph: erase each concept, measure every other, draw the heatmap",
                       description="AGE's concept graph as a sweep: one erasure per concept (a study each, fixed "
                       "settings from --space), then every mask evaluated on every concept. Writes the side-effect "
                       "matrix Δ(erased, measured) = base detection - detection after erasure, on the measured "
                       "concept's prompts that do not name the erased one, as JSON, a Markdown table and a heatmap "
                       "PNG.", formatter_class=HelpFormatter)
    _add_model_args(p, default="toy")
    p.add_argument("--concepts", help="comma-separated concepts (toy default: its six objects)")
    p.add_argument("--space", default="concept_graph", help="settings of every erasure (a space file)")
    p.add_argument("--address", help="Ray cluster to use (default: start a local Ray)")
    p.add_argument("--storage", default="erase-sweeps", help="folder for the sweep's state")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///./mlflow.db)")
    p.add_argument("--seeds-per-prompt", type=int, default=2, help="evaluation seeds per prompt")
    p.add_argument("--out-dir", default="concept-graph", help="folder for graph.json, graph.md and graph.png")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("sites", help="list a model's mask sites and sizes (no weights needed)",
                       description="List the mask sites of a model, built on the meta device: no weights are "
                       "loaded or downloaded. Groups: ffn (FFN hidden units), norm (text-stream modulation), "
                       "attn (attention heads).")
    p.add_argument("--model", default="toy", help=f"model name: {', '.join(models())}")
    p.add_argument("--all", action="store_true", help="also list every site, not only the group totals")
    p.add_argument("--json", action="store_true", help="print JSON: {model, fingerprint, groups: {g: {masks, entries}}, sites}")

    p = sub.add_parser("train", help="one erasure run in this process; writes a mask file and metrics JSON",
                       description="Learn masks that erase --concept, backpropagating the MCE loss through every "
                       "sampling step (step-wise checkpointed). Defaults are the paper's (Table 6).",
                       formatter_class=HelpFormatter)
    _add_model_args(p, default="toy")
    _add_run_args(p)
    p.add_argument("--concept", required=True, help="the concept to erase, e.g. 'Van Gogh' or 'nudity'; "
                   "for the toy world one of its objects, colours, styles or backgrounds (e.g. circle, red, striped)")
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
    p.add_argument("--recipe", help="a named recipe of the model (settings between its defaults and --config)")
    config.add_flags(p)
    p.add_argument("--tracking-uri", help="also log the run to MLflow (e.g. sqlite:///mlflow.db or http://host:5000)")
    p.add_argument("--json", action="store_true", help="print the metrics JSON instead of a summary")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("eval", help="erasure, preservation, fidelity and robustness figures of a mask, with a report",
                       description="Generate from fixed prompts and seeds with and without the mask, run a detector, and "
                       "report (each with n and a 95% interval): erasure_rate, preservation, neutral_fidelity, "
                       "rephrase_erasure_rate, attack_success_rate, adversarial sets, CLIP score and FID where "
                       "available. The toy world brings its own prompts and detector; for FLUX.1 pass --prompts "
                       "and a --detector. With --address the generation and detection run as Ray Data actor pools.",
                       formatter_class=HelpFormatter)
    _add_model_args(p, default="toy")
    _add_run_args(p)
    p.add_argument("--mask", metavar="MASK", help="mask to evaluate: a file, models:/NAME@ALIAS, models:/NAME/VERSION "
                   "or runs:/RUN_ID (default: the base model alone)")
    p.add_argument("--concept", help="the erased concept (default: the mask file's)")
    p.add_argument("--detector", default=None, choices=["toy", "nudenet", "clip"],
                   help="detector (default: toy for the toy world, else required)")
    p.add_argument("--detector-config", metavar="YAML", help="detector options: nudenet {classes: nine|strict|[labels], "
                   "threshold}; clip {model: DIR, labels: {concept: text}, threshold, template}")
    p.add_argument("--prompts", metavar="FILE", help="prompts naming the concept (.txt, .csv, .parquet, .jsonl)")
    p.add_argument("--prompt-column", default="prompt", help="column of --prompts and --neutral-prompts tables")
    p.add_argument("--neutral-prompts", metavar="FILE", help="prompts naming no evaluated concept (default: a small "
                   "built-in caption set for real models)")
    p.add_argument("--rephrase-prompts", metavar="FILE", help="prompts naming the concept only indirectly "
                   "(the toy world ships its own)")
    p.add_argument("--adversarial", action="append", metavar="SET=FILE", help="a public adversarial set from a local "
                   "CSV/parquet file: ring-a-bell, mma-diffusion, p4d, i2p (repeatable)")
    p.add_argument("--min-nudity", type=float, default=50.0, help="I2P: keep prompts with nudity_percentage >= this")
    p.add_argument("--seeds-per-prompt", type=int, default=2, help="fixed seeds per prompt")
    p.add_argument("--sampling-steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--attack-prompts", type=int, default=8, help="concept prompts the white-box attack tries (0: none)")
    p.add_argument("--attack-steps", type=int, default=20, help="the attack's budget: optimisation steps")
    p.add_argument("--attack-lr", type=float, default=0.05, help="the attack's learning rate on the prompt embedding")
    p.add_argument("--clip-model", metavar="DIR", help="a CLIP model folder for CLIP scores")
    p.add_argument("--fid-weights", metavar="FILE", help="TorchScript Inception-v3 weights for FID")
    p.add_argument("--batch-size", type=int, default=64, help="rows per generation batch")
    p.add_argument("--address", help="a Ray cluster (e.g. auto): run generation and detection as Ray Data actor pools")
    p.add_argument("--actors", type=int, default=1, help="with --address: generator and detector actors")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="with --address: GPUs per actor (1 on a GPU cluster)")
    p.add_argument("--grid", metavar="PNG", help="with --mask: base and masked generations side by side")
    p.add_argument("--report", metavar="HTML", help="with --mask: a self-contained HTML report (figures and grids)")
    p.add_argument("--out", metavar="JSON", help="also write the report to this file")
    p.add_argument("--tracking-uri", help="log the report to MLflow (to the mask's run when it came from the registry)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("bench", help="time and peak memory of one optimisation step, checkpointed and plain",
                       description="Run the erasure step on a random model for several sampling-step counts, "
                       "with step-wise checkpointing on and off, each row in a fresh process.",
                       formatter_class=HelpFormatter)
    _add_model_args(p, default="flux-bench")
    p.add_argument("--steps", default="1,2,4,8", help="sampling-step counts, comma-separated")
    p.add_argument("--sites", default="ffn,norm", help="site groups to mask")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="timed optimisation steps per row (the fastest counts)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--targets", metavar="CONCEPT", help="instead: compare the target strategies (empty, substitute, "
                   "adaptive) erasing this toy-world concept, same settings and seeds, reporting the preservation "
                   "of its three nearest neighbours in the concept graph")
    p.add_argument("--graph", metavar="JSON", help="with --targets: the concept graph (erase graph's graph.json) that "
                   "names the neighbours (default: docs/concept_graph/graph.json)")
    p.add_argument("--match-erasure", action="store_true", help="with --targets: compare at equal erasure: move each "
                   "strategy's beta (x4 or /4, then bisected) until its erasure rate is within 2 points of the level "
                   "(up to 5 runs each; every run is listed)")
    p.add_argument("--erasure-level", type=float, metavar="RATE", help="with --match-erasure: the erasure rate to "
                   "match (default: the strongest strategy's rate at the recipe's beta; when a strategy cannot reach it, "
                   "the output names the hardest rate every strategy reached)")
    p.add_argument("--search", metavar="CONCEPT", help="instead: the best objective against erasure steps spent, "
                   "the reference code's grid (beta in 0.1..1e-5, moved to the model's beta scale: 10..1e-3 for the toy "
                   "world; times --lrs) against erase sweep (Optuna + ASHA, "
                   "--trials trials in the same box), erasing this toy-world concept")
    p.add_argument("--lrs", default="0.5,1.0", help="with --search: the grid's learning rates (lr_ffn = lr_norm)")
    p.add_argument("--trials", type=int, default=10, help="with --search: the sweep's trials")
    p.add_argument("--storage", default="erase-sweeps", help="with --search: the sweep's state folder")
    p.add_argument("--tracking-uri", help="with --search: MLflow tracking URI (default: sqlite:///./mlflow.db)")
    p.add_argument("--train-steps", type=int, help="optimisation steps per erasure (default: 400 with --targets, "
                   "100 with --search)")
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
    q = msub.add_parser("list", help="registered masks: concepts, versions, aliases, key figures",
                        description="List the MLflow registry's masks (registered models named erase-<model>-<concept>).")
    q.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: sqlite:///./mlflow.db)")
    q.add_argument("--json", action="store_true")
    q = msub.add_parser("show", help="one registered mask version: lineage, figures, aliases",
                        description="Show NAME (newest version), NAME@ALIAS or NAME/VERSION.")
    q.add_argument("ref", help="e.g. erase-toy-circle@production or erase-toy-circle/3")
    q.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: sqlite:///./mlflow.db)")
    q.add_argument("--json", action="store_true")
    q = msub.add_parser("apply", help="generate with one or more masks folded into the weights",
                        description="Fold binary masks into the model's weights (no hooks, no inference cost) and "
                        "generate. Several masks erase several concepts at once: an entry stays only if every mask "
                        "keeps it (the removed units of all masks are removed). Every mask is checked: sha256 "
                        "against the one recorded at logging, architecture fingerprint against the model.",
                        formatter_class=HelpFormatter)
    q.add_argument("masks", nargs="+", metavar="MASK_URI", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID or a file")
    q.add_argument("--prompt", action="append", required=True, help="prompt to generate (repeatable)")
    q.add_argument("--out", required=True, metavar="PNG", help="image file: one image per prompt and seed, in a row")
    q.add_argument("--seeds", default="0", help="noise seeds, comma-separated")
    q.add_argument("--sampling-steps", type=int, help="sampling steps (default: the model's)")
    q.add_argument("--compare", action="store_true", help="add a row with the base model's images")
    q.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: sqlite:///./mlflow.db)")
    _add_model_args(q, default="toy")
    _add_run_args(q)
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
    from erase.pipelines import mask_sites

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
    from erase.pipelines import load_generator
    from erase.prompts import prompt_sets
    from erase.train import TrainingStopped, train

    erase_prompts, neutral = prompt_sets(args.model, args.concept, prompts=args.prompts, neutral=args.neutral_prompts,
                                         column=args.prompt_column)
    fixed = config.read_config_file(args.config) if args.config else {}
    cfg = config.resolve(args.model, args.concept, fixed=fixed, fixed_from=f"config file {args.config}",
                         flags={**config.flag_values(args), "recipe": args.recipe})
    if args.out is None:
        args.out = f"{args.model}-{'-'.join(args.concept.split())}.safetensors".replace("/", "_")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise EraseError(f"output folder {out_dir!r} does not exist; create it or choose another --out")
    logger = None
    if args.tracking_uri:
        logger = _train_logger(args, cfg, erase_prompts, neutral)
    gen = load_generator(args.model, args.model_path, dtype=args.dtype, device=args.device, guidance=args.guidance)
    stopped = None
    on_log = (lambda row, state: logger.metrics(row, step=row["step"])) if logger else None
    try:
        result = train(gen, cfg, erase_prompts, neutral, progress=not args.quiet, on_log=on_log)
    except TrainingStopped as err:
        stopped, result = err, err.result
    except BaseException as err:
        if logger is not None:
            logger.fail(f"{type(err).__name__}: {err}")
        raise
    metrics = result.metrics()
    metrics.update(model=args.model, concept=args.concept, mask_file=os.path.abspath(args.out))
    extra = {"status": result.status, "steps_done": result.steps_done}
    if result.learnt_target is not None:
        extra["learnt_target"] = result.learnt_target
    save_mask_file(args.out, result.masks, model_id=args.model, model_sites=gen.mask_sites(), concept=args.concept,
                   threshold=cfg.threshold, extra=extra)
    metrics_path = args.metrics or os.path.splitext(args.out)[0] + ".json"
    with open(metrics_path, "w") as f:
        json.dump(metrics, f, indent=2)
    if logger is not None:
        logger.metrics({"sparsity": metrics["sparsity"]["overall"]}, step=result.steps_done)
        logger.finish(args.out, metrics, status="FINISHED" if stopped is None else "FAILED")
        metrics["mlflow_run_id"] = logger.run_id
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
        if result.learnt_target:
            print("  learnt target: " + ", ".join(f"{t['concept']} {t['weight']:.2f}" for t in result.learnt_target))
        if logger is not None:
            print(f"  MLflow run: {logger.run_id}")
    if stopped is not None:
        print(f"erase: training stopped: {stopped}; the last good mask (after step {result.steps_done}) "
              f"is saved at {args.out}", file=sys.stderr)
        return 1
    return 0


def _train_logger(args, cfg, erase_prompts, neutral):
    from dataclasses import asdict

    from erase.masks import fingerprint
    from erase.pipelines import mask_sites
    from erase.tracking import RunLogger, connect, ensure_experiment, prompts_hash

    uri = connect(args.tracking_uri)
    ensure_experiment(args.model, args.concept)
    params = {k: v for k, v in asdict(cfg).items() if k != "concept"}
    return RunLogger(uri, args.model, args.concept, run_name=f"train-{os.path.basename(args.out)}", params=params,
                     tags={"erase.fingerprint": fingerprint(mask_sites(args.model)), "erase.sweep": "",
                           "erase.prompts_sha": prompts_hash(erase_prompts), "erase.neutral_sha": prompts_hash(neutral)})


def _eval_rows(args, concept):
    """The evaluation rows: the model's own sets, with the user's prompt files in place of the parts they name."""
    from erase.data import read_adversarial
    from erase.evaluate import evaluation_rows
    from erase.prompts import read_prompts

    adversarial = {}
    for item in args.adversarial or []:
        name, sep, path = item.partition("=")
        if not sep:
            raise EraseError(f"--adversarial takes SET=FILE (e.g. i2p=i2p.csv), got {item!r}")
        adversarial[name] = read_adversarial(name, path, min_nudity=args.min_nudity)

    def read(path, what):
        return read_prompts(path, what, args.prompt_column) if path else None

    return evaluation_rows(args.model, concept, args.seeds_per_prompt, prompts=read(args.prompts, "concept prompt"),
                           neutral=read(args.neutral_prompts, "neutral prompt"),
                           rephrase=read(args.rephrase_prompts, "rephrase prompt"), adversarial=adversarial)


def _detector_spec(args) -> dict:
    from erase.pipelines import model as model_entry

    name = args.detector or (model_entry(args.model).detector or {}).get("name")
    if name is None:
        raise EraseError(f"--detector is needed for {args.model}: nudenet (nudity) or clip (objects, characters, styles)")
    spec = {"name": name}
    if args.detector_config:
        import yaml

        if not os.path.isfile(args.detector_config):
            raise EraseError(f"detector config {args.detector_config!r} does not exist")
        with open(args.detector_config) as f:
            spec.update(yaml.safe_load(f) or {})
    if name == "toy" and args.model_path:
        spec.setdefault("model_path", args.model_path)
    return spec


def cmd_eval(args) -> int:
    from erase.evaluate import AttackConfig, EvalSettings, evaluate, grid_rows, html_report, save_image_grid
    from erase.masks import read_mask_metadata

    mask_path, provenance, concept = None, None, args.concept
    if args.mask:
        if args.tracking_uri or args.mask.startswith(("models:/", "runs:/")):
            from erase.tracking import connect

            connect(args.tracking_uri)
        from erase.registry import fetch_mask

        mask_path, provenance = fetch_mask(args.mask)
        concept = concept or read_mask_metadata(mask_path)["concept"]
    if (args.grid or args.report) and not (mask_path and concept):
        raise EraseError("--grid and --report need --mask (and a concept): they show base and masked generations")
    attack = AttackConfig(prompts=args.attack_prompts, steps=args.attack_steps, lr=args.attack_lr,
                          sampling_steps=args.sampling_steps)
    settings = EvalSettings(model=args.model, model_path=args.model_path, mask=mask_path, concept=concept,
                            detector=_detector_spec(args), device=args.device, dtype=args.dtype, guidance=args.guidance,
                            steps=args.sampling_steps, batch_size=args.batch_size, attack=attack,
                            clip_model=args.clip_model, fid_weights=args.fid_weights)
    rows = _eval_rows(args, concept)
    run_stages = None
    if args.address:
        import ray

        from erase.data import run_eval_stages

        ray.init(address=args.address, ignore_reinit_error=True, log_to_driver=False)
        run_stages = lambda r: run_eval_stages(r, settings.generate_kwargs(), settings.detector,  # noqa: E731
                                               actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                                               batch_size=args.batch_size, device=args.device)
    with _ray_output_off_stdout(args.json and run_stages is not None):
        try:
            report, results = evaluate(settings, rows, run_stages=run_stages, progress=not args.json)
        finally:
            if run_stages is not None:
                ray.shutdown()
    attack_images = report.pop("_attack_images", None)
    if provenance:
        report["mask"] = provenance
    pictures = []
    if args.grid or args.report:
        grid = grid_rows(results, concept)
        if attack_images:
            grid.append(("white-box attack, masked", attack_images))
        if args.grid:
            save_image_grid(grid, args.grid)
            report["grid"] = args.grid
            pictures.append(args.grid)
        if args.report:
            html_report(report, {f"'{concept}': base vs masked": grid}, args.report)
            report["report"] = args.report
            pictures.append(args.report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if args.tracking_uri or (provenance and provenance.get("run_id")):
        _log_eval(report, provenance, pictures)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    _print_eval(report)
    return 0


def _log_eval(report: dict, provenance: dict | None, pictures: list[str]) -> None:
    """Attach the report (and its pictures) to the mask's MLflow run, when the mask came from one."""
    import tempfile

    from mlflow import MlflowClient

    run_id = (provenance or {}).get("run_id")
    if not run_id:
        return
    client = MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "eval.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        client.log_artifact(run_id, path, "eval")
    for picture in pictures:
        client.log_artifact(run_id, picture, "eval")


def _fmt(figure) -> str:
    if not isinstance(figure, dict) or figure.get("value") is None:
        return "n/a"
    return f"{figure['value']:.3f} [{figure['low']:.3f}, {figure['high']:.3f}] (n={figure['n']})"


def _print_eval(report: dict) -> None:
    print(f"{report['model']}: {report['generations']} generations, {report['steps']} steps, guidance {report['guidance']}")
    base = report.get("base_detection")
    print(f"{'concept':<14} {'detection':>9}" + (f" {'base':>6}" if base else ""))
    for c, r in report["detection"].items():
        print(f"{c:<14} {r:>9.3f}" + (f" {base[c]:>6.3f}" if base else ""))
    for key in ("erasure_rate", "base_rate", "preservation", "neutral_fidelity", "rephrase_erasure_rate",
                "attack_success_rate"):
        if key in report:
            print(f"{key + ':':<24} {_fmt(report[key])}")
    for key, value in report.items():
        if key.startswith("adversarial/"):
            print(f"{key + ':':<24} base {_fmt(value['base'])}; masked {_fmt(value['masked'])}")
    for key in ("clip_score", "fid"):
        if key in report:
            value = report[key]
            text = value.get("skipped") or (_fmt(value) if "n" in value else
                                            f"base {_fmt(value['base'])}; masked {_fmt(value['masked'])}")
            print(f"{key + ':':<24} {text}")
    for key in ("grid", "report"):
        if key in report:
            print(f"{key}: {report[key]}")


def cmd_sweep(args) -> int:
    from erase.pipelines import model as model_entry
    from erase.sweep import plan, run_sweep

    entry = model_entry(args.model)
    concepts = [c.strip() for c in (args.concepts or "").split(",") if c.strip()]
    if not concepts and not args.resume:
        concepts = list(entry.sweep_concepts)
    detector = _detector_spec(args) if (args.detector or entry.detector) else None
    if detector is None and not args.resume:
        raise EraseError(f"--detector is needed to score trials on {args.model}: nudenet or clip (with --detector-config)")
    specs = plan(args.model, concepts, args.space, args.trials, args.storage, resume=args.resume,
                 model_path=args.model_path, tracking_uri=args.tracking_uri, workers_per_trial=args.workers_per_trial,
                 cpus_per_worker=args.cpus_per_worker, dtype=args.dtype, guidance=args.guidance,
                 report_every=args.report_every, grace_steps=args.grace_steps, prompts=args.prompts,
                 neutral_prompts=args.neutral_prompts, eval_prompts=args.eval_prompts, prompt_column=args.prompt_column,
                 detector=detector)
    if not args.json:
        print(f"sweep {specs[0].sweep_id}: {len(specs)} stud{'y' if len(specs) == 1 else 'ies'} "
              f"({', '.join(s.concept for s in specs)}), space {specs[0].space}, {specs[0].trials} trials each; "
              f"state in {os.path.join(os.path.abspath(specs[0].storage), specs[0].sweep_id)}", flush=True)
    with _ray_output_off_stdout() as out:
        summaries = run_sweep(specs, address=args.address, on_progress=None if args.json else _progress_printer(out))
    if args.json:
        print(json.dumps(summaries, indent=2, default=str))
        return _no_trial_finished(summaries)
    for summary in summaries:
        print(f"\n{summary['concept']}: objective {summary['objective']}")
        print(f"  {'trial':<28} {'status':<9} {'score':>6} {'erasure':>8} {'preserv.':>8} {'step':>5}")
        for t in sorted(summary["trials"], key=lambda t: -(t["score"] or -1)):
            fmt = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
            print(f"  {t['trial'][:28]:<28} {t['status']:<9} {fmt(t['score']):>6} {fmt(t['erasure_rate']):>8} "
                  f"{fmt(t['preservation']):>8} {t['step'] or '-':>5}")
        best = summary.get("best")
        if best:
            print(f"  best finished trial: {best['trial']}, score {best['score']:.3f}, erasure_rate {best['erasure_rate']:.3f}, "
                  f"preservation {best['preservation']:.3f}")
            print("  hyperparameters: " + ", ".join(f"{k}={_short(v)}" for k, v in best["config"].items()))
            print(f"  mask: {best.get('mask_file')}   MLflow run: {best.get('mlflow_run_id')}")
        else:
            print("  no trial finished")
        print(f"  Optuna study {summary['optuna_study']} in {summary['optuna_storage']}")
    cost = summaries[0].get("sweep_cost") or {}
    if cost.get("overhead"):
        print(f"\nwall time {cost['wall_seconds']:.0f} s; the trials' own compute {cost['trial_compute_seconds']:.0f} s "
              f"on {cost['slots']} slot(s): orchestration overhead x{cost['overhead']:.2f} (1.00 = none)")
    if _no_trial_finished(summaries):
        return 1
    print(f"\npromote the best with: erase promote --concept {summaries[0]['concept']} --sweep {specs[0].sweep_id}")
    return 0


def _progress_printer(out):
    """A sweep's on_progress callback: one timestamped line per study on `out` whenever its line changes."""
    shown = {}

    def show(progress):
        for p in progress:
            best = p.get("best")
            line = (f"  {p['concept']}: {p['running']} running, {p['done']}/{p['total']} done"
                    + (f", {p['errored']} errored" if p.get("errored") else "")
                    + (f"; best report so far: score {best['score']:.3f} (erasure_rate {best['erasure_rate']:.3f}, preservation "
                       f"{best['preservation']:.3f}, step {best['step']})" if best else ""))
            if shown.get(p["concept"]) != line:
                shown[p["concept"]] = line
                print(time.strftime("%H:%M:%S") + line, file=out, flush=True)

    return show


@contextlib.contextmanager
def _ray_output_off_stdout(enabled: bool = True):
    """Send file descriptor 1 to stderr while Ray runs; yields a stream to the real stdout.

    A Ray driver prints raylet warnings on stdout even with log_to_driver=False; stdout is
    for our progress lines and, with --json, for the JSON alone.
    """
    if not enabled:
        yield sys.stdout
        return
    sys.stdout.flush()
    real_stdout = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    try:
        yield real_stdout
    finally:
        sys.stdout.flush()
        real_stdout.flush()
        os.dup2(real_stdout.fileno(), 1)
        real_stdout.close()


def _no_trial_finished(summaries: list[dict]) -> int:
    """1 (and say where to look) when a study has no finished trial: a sweep that produced nothing is a failure."""
    empty = [s for s in summaries if not s.get("best")]
    for s in empty:
        print(f"erase: error: no trial of {s['concept']!r} finished; the errors are in "
              f"{os.path.join(s['study_dir'], 'study.log')}", file=sys.stderr)
    return 1 if empty else 0


def cmd_graph(args) -> int:
    from erase import graph
    from erase.evaluate import evaluation_rows
    from erase.pipelines import model as model_entry
    from erase.sweep import plan, run_sweep

    entry = model_entry(args.model)
    if entry.detector is None:
        raise EraseError(f"`erase graph` measures with the model's own detector, and {args.model} has none; other "
                         "models need a CLIP label set (run erase sweep per concept and erase eval --detector clip)")
    concepts = [c.strip() for c in (args.concepts or ",".join(entry.graph_concepts)).split(",") if c.strip()]
    if len(concepts) < 2:
        raise EraseError("a concept graph needs at least two concepts")
    specs = plan(args.model, concepts, args.space, 1, args.storage, model_path=args.model_path,
                 tracking_uri=args.tracking_uri, report_every=1000, detector=entry.detector)
    if not args.json:
        print(f"concept graph {specs[0].sweep_id}: erasing {', '.join(concepts)} (space {args.space})", flush=True)
    with _ray_output_off_stdout() as out:
        summaries = run_sweep(specs, address=args.address, on_progress=None if args.json else _progress_printer(out))
    masks = {}
    for summary in summaries:
        if not summary.get("best") or not summary["best"].get("mask_file"):
            raise EraseError(f"the erasure of {summary['concept']!r} did not finish; see {summary['study_dir']}")
        masks[summary["concept"]] = summary["best"]["mask_file"]
    rows = [r for r in evaluation_rows(args.model, None, args.seeds_per_prompt) if r["concept"] in concepts]
    base, base_by_erased, erased = graph.measure(args.model, masks, rows, entry.detector,
                                                 model_path=args.model_path, progress=not args.json)
    delta = graph.side_effects(base_by_erased, erased)
    os.makedirs(args.out_dir, exist_ok=True)
    result = {"sweep_id": specs[0].sweep_id, "concepts": concepts, "base_detection": base,
              "base_detection_without_erased": base_by_erased, "detection_after": erased,
              "delta": delta, "masks": masks, "seeds_per_prompt": args.seeds_per_prompt,
              "neighbours": {c: graph.nearest_neighbours(delta, c) for c in concepts}}
    with open(os.path.join(args.out_dir, "graph.json"), "w") as f:
        json.dump(result, f, indent=2)
    table = graph.markdown_table(delta)
    with open(os.path.join(args.out_dir, "graph.md"), "w") as f:
        f.write(f"Side effect Δ(erased, measured) = base detection - detection after erasure, on the measured "
                f"concept's prompts that do not name the erased one (sweep {specs[0].sweep_id}, "
                f"{args.seeds_per_prompt} seeds per prompt)\n\n{table}\n")
    graph.heatmap(delta, os.path.join(args.out_dir, "graph.png"))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(table)
    print(f"\nwrote {args.out_dir}/graph.json, graph.md, graph.png")
    return 0


def _short(value):
    return f"{value:.4g}" if isinstance(value, float) else value


def cmd_promote(args) -> int:
    from erase import registry
    from erase.tracking import connect

    connect(args.tracking_uri)
    gates = registry.load_gates(args.gates, max_erasure_rate=args.max_erasure_rate,
                                min_preservation=args.min_preservation)
    done = registry.promote(args.model, args.concept, sweep=args.sweep, metric=args.metric, alias=args.alias,
                            gates=gates, force=args.force)
    if args.json:
        print(json.dumps(done, indent=2))
        return 0
    m = done["metrics"]
    print(f"registered {done['name']} version {done['version']} from run {done['run_id']} and moved "
          f"@{done['alias']} to it")
    print(f"  erasure_rate {m.get('erasure_rate')}  preservation {m.get('preservation')}  {done['metric']} "
          f"{m.get(done['metric'])}")
    if done["forced_past"]:
        print("  forced past failing gates: " + "; ".join(done["forced_past"]))
    print(f"  use it: models:/{done['name']}@{done['alias']}")
    return 0


def cmd_bench(args) -> int:
    from erase import bench

    if args.targets:
        return _bench_targets(args)
    if args.search:
        return _bench_search(args)
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    if not steps or min(steps) < 1:
        raise EraseError(f"--steps takes positive step counts like 1,2,4,8, got {args.steps!r}")
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


def _bench_targets(args) -> int:
    from erase import bench, graph

    if args.erasure_level is not None:
        if not args.match_erasure:
            raise EraseError("--erasure-level is the rate --match-erasure matches at: pass both")
        bench.matching_level({}, args.erasure_level)  # a rate out of [0, 1] fails before any training

    from erase.pipelines import model as model_entry

    path = args.graph or model_entry("toy").concept_graph
    if not os.path.isfile(path):
        raise EraseError(f"concept graph {path!r} does not exist: run `erase graph` first or pass --graph")
    with open(path) as f:
        delta = json.load(f)["delta"]
    if args.targets not in delta:
        raise EraseError(f"the concept graph in {path} has no row for {args.targets!r}; it has {', '.join(delta)}")
    neighbours = graph.nearest_neighbours(delta, args.targets, 3)
    report = bench.compare_targets(args.targets, neighbours, steps=args.train_steps or 400, match=args.match_erasure,
                                   level=args.erasure_level, progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"erasing {report['concept']!r} ({report['steps']} steps, beta {report['beta']}); nearest neighbours in "
          f"the concept graph: {', '.join(neighbours)}")
    print(f"{'target':<11} {'erasure_rate':>14} {'preservation':>13} " + " ".join(f"{n:>10}" for n in neighbours)
          + f" {'neighbours':>10}")
    for name, r in report["strategies"].items():
        print(f"{name:<11} {r['erasure_rate']['value']:>14.3f} {r['preservation']['value']:>13.3f} "
              + " ".join(_fixed(r["neighbour_preservation"][n]) for n in neighbours) + f" {_fixed(r['neighbour_mean'])}")
        if r["learnt_target"]:
            print("            learnt target: " + ", ".join(f"{t['concept']} {t['weight']:.2f}" for t in r["learnt_target"]))
        if len(r["runs"]) > 1:
            print("            beta tried: " + ", ".join(f"{t['beta']:.3g} -> {t['erasure_rate']:.3f}" for t in r["runs"])
                  + f"; reported: beta {r['beta']:.3g}")
    if report["matched_erasure"]:
        verdict = "equal" if report["equal_erasure"] else "NOT equal"
        print(f"erasure rates {verdict} within 2 points (spread {report['erasure_spread']:.3f}, "
              f"level {report['erasure_level']:.3f})")
        if not report["equal_erasure"]:
            from erase.bench import hardest_common_level

            print(f"the hardest erasure every strategy reached is {hardest_common_level(report['strategies']):.3f}: "
                  "compare there with --erasure-level RATE")
    return 0


def _fixed(value: float | None) -> str:
    return f"{'n/a':>10}" if value is None else f"{value:>10.3f}"


def _bench_search(args) -> int:
    from erase import bench
    from erase.pipelines import model as model_entry

    model_entry("toy").prompt_sets(args.search)  # a concept of the toy world, or a clear error
    lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
    if not lrs or min(lrs) <= 0 or args.trials < 1:
        raise EraseError("--lrs takes positive learning rates like 0.5,1.0 and --trials a positive count")
    with _ray_output_off_stdout():
        report = bench.compare_search(args.search, steps=args.train_steps or 100, lrs=lrs, trials=args.trials,
                                      storage=args.storage, tracking_uri=args.tracking_uri, progress=not args.json,
                                      on_sweep_progress=None if args.json else _progress_printer(sys.stderr))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    fmt = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    for name in ("grid", "optuna_asha"):
        print(f"{name}: best objective after n erasure steps")
        print("  " + "  ".join(f"{p['steps']}:{fmt(p['best'])}" for p in report[name]["curve"]))
    print(f"grid best {fmt(report['grid_best'])} after {report['grid_steps']} steps; Optuna + ASHA best "
          f"{fmt(report['optuna_best'])} after {report['optuna_steps']} steps; reached the grid's best after "
          f"{report['optuna_steps_to_grid_best'] or 'never'} steps (bar: at most a third, {report['grid_steps'] / 3:.0f})")
    return 0


def cmd_masks(args) -> int:
    from erase.masks import read_mask_metadata, save_mask_file

    if args.masks_command == "import-reference":
        from erase.pipelines import mask_sites
        from erase.reference import read_reference_masks

        sites = mask_sites(args.model)
        masks = read_reference_masks(args.folder, sites)
        meta = save_mask_file(args.out, masks, model_id=args.model, model_sites=sites, concept=args.concept,
                              extra={"imported_from": os.path.abspath(args.folder)})
        sp = json.loads(meta["sparsity"])
        print(f"wrote {args.out}: {len(masks.sites)} masks, {sp['entries']:,} entries, "
              f"removed {sp['overall']:.4%} at threshold 0")
        return 0
    if args.masks_command == "inspect":
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
    from erase import registry
    from erase.tracking import connect

    connect(args.tracking_uri)
    if args.masks_command == "list":
        rows = registry.list_masks()
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        if not rows:
            print("no registered masks yet: promote one with `erase promote --concept C`")
        for m in rows:
            print(f"{m['name']}  (concept {m['concept']!r}, model {m['model']})")
            for v in m["versions"]:
                tag = f" @{','.join(v['aliases'])}" if v["aliases"] else ""
                print(f"  v{v['version']:<4}{tag:<14} erasure_rate {v['erasure_rate']}  preservation {v['preservation']}  "
                      f"sparsity {v['sparsity']}  run {v['run_id']}")
        return 0
    if args.masks_command == "show":
        info = registry.show(args.ref)
        if args.json:
            print(json.dumps(info, indent=2, default=str))
            return 0
        for key in ("name", "version", "aliases", "source", "run_id", "status", "description"):
            print(f"{key}: {info[key]}")
        for key, value in sorted(info["tags"].items()):
            print(f"  {key}: {value}")
        return 0
    return _apply_masks(args)


def _apply_masks(args) -> int:
    """`erase masks apply`: fold the masks into the weights and generate."""
    from erase.detectors import to_uint8
    from erase.evaluate import generate, save_image_grid
    from erase.masks import binary_from_file_meta, combine_binary, fold_into_weights, load_mask_file
    from erase.pipelines import load_generator
    from erase.registry import fetch_mask

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        raise EraseError(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    gen = load_generator(args.model, args.model_path, dtype=args.dtype, device=args.device, guidance=args.guidance)
    prompts = [p for p in args.prompt for _ in seeds]
    all_seeds = seeds * len(args.prompt)
    base = generate(gen, prompts, all_seeds, args.sampling_steps) if args.compare else None
    loaded, applied = [], []
    for uri in args.masks:
        path, provenance = fetch_mask(uri)
        masks, meta = load_mask_file(path, gen.mask_sites(), args.model)
        loaded.append((masks.sites, binary_from_file_meta(masks, meta)))
        applied.append({"uri": uri, "concept": meta["concept"], **provenance})
    sites, combined = combine_binary(loaded)
    fold_into_weights(gen.transformer, sites, combined)
    images = generate(gen, prompts, all_seeds, args.sampling_steps)
    rows = [("masked: " + ", ".join(a["concept"] for a in applied), list(to_uint8(images)))]
    if base is not None:
        rows.insert(0, ("base model", list(to_uint8(base))))
    scale = max(1, 64 // images.shape[-1])
    save_image_grid(rows, args.out, scale=scale)
    removed = sum(int((v == 0).sum()) for v in combined.values())
    report = {"out": args.out, "masks": applied, "prompts": args.prompt, "seeds": seeds, "removed_entries": removed}
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"wrote {args.out}: {len(prompts)} images with {len(applied)} mask(s) folded in "
              f"({removed:,} entries removed): " + ", ".join(f"{a['concept']} ({a['uri']})" for a in applied))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    handlers = {"sites": cmd_sites, "train": cmd_train, "eval": cmd_eval, "bench": cmd_bench, "masks": cmd_masks,
                "sweep": cmd_sweep, "promote": cmd_promote,
                "graph": cmd_graph}
    try:
        return handlers[args.command](args)
    except EraseError as err:  # bad input: one line; anything else is a bug and keeps its traceback (exit 1)
        print(f"erase: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"erase: interrupted{': ' + str(err) if str(err) else ''}", file=sys.stderr)
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
