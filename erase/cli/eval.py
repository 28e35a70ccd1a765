"""erasure, preservation, fidelity and robustness figures of a mask, with a report

Generate from fixed prompts and seeds with and without the mask, run a detector, and report
(each with n, a 95% interval and the prompt set it came from): erasure_rate, preservation,
neutral_fidelity, rephrase_erasure_rate, each robustness family and robust_erasure_rate (the
word repeated, a synonym beside it, the bare word, extra attributes, a comma list),
attack_success_rate, adversarial sets, CLIP score and FID where available. The toy world brings
its own prompts (its test split, which no mask trains or is selected on) and detector; for
FLUX.1 pass --prompts and a --detector. With --address the generation and detection run as Ray Data actor pools.
"""

from __future__ import annotations

import json

from erase.cli import common


def add(subparsers) -> None:
    p = common.add_parser(subparsers, "eval", __doc__)
    common.add_model_args(p)
    common.add_run_args(p)
    p.add_argument("--mask", metavar="MASK", help="mask to evaluate: a file, models:/NAME@ALIAS, models:/NAME/VERSION "
                   "or runs:/RUN_ID (default: the base model alone)")
    p.add_argument("--concept", help="the erased concept (default: the mask file's)")
    common.add_detector_args(p, "of the figures")
    p.add_argument("--prompts", "--eval-prompts", dest="prompts", metavar="FILE", help="prompts naming the concept "
                   "(.txt, .csv, .parquet, .jsonl); they replace the model's own for it, and its figures say so")
    p.add_argument("--prompt-column", default="prompt", help="column of --prompts and --neutral-prompts tables")
    p.add_argument("--neutral-prompts", metavar="FILE", help="prompts naming no evaluated concept (default: a small "
                   "built-in caption set for real models)")
    p.add_argument("--rephrase-prompts", metavar="FILE", help="prompts naming the concept only indirectly "
                   "(the toy world ships its own)")
    p.add_argument("--adversarial", action="append", metavar="SET=FILE", help="a public adversarial set from a local "
                   "CSV/parquet file: ring-a-bell, mma-diffusion, p4d, i2p (repeatable)")
    p.add_argument("--min-nudity", type=float, default=50.0, help="I2P: keep prompts with nudity_percentage >= this")
    p.add_argument("--split", choices=("test", "validation"), default="test", help="which of the model's own prompt "
                   "splits to evaluate on (the toy world's: never trained on; a sweep selects on validation)")
    p.add_argument("--seeds-per-prompt", type=int, default=2, help="fixed seeds per prompt")
    p.add_argument("--max-prompts", type=int, metavar="N", help="a quick look: at most N prompts of each set (each "
                   "concept's, the neutral, each adversarial set), spread over it; the intervals widen to match "
                   "(default: every prompt)")
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
    p.add_argument("--tracking-uri", help="log the report to MLflow at this URI (to the mask's run when it came from the "
                   "registry); a models:/ or runs:/ --mask reads this, else $MLFLOW_TRACKING_URI, else ./mlflow.db")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from erase.tracking import log_evaluation

    for path, flag in ((args.out, "--out"), (args.grid, "--grid"), (args.report, "--report")):
        common.output_path(path, flag)
    settings, provenance = _settings(args)
    report, results = _evaluate(args, settings, _rows(args, settings.concept))
    attack_images = report.pop("_attack_images", None)
    if provenance:
        report["mask"] = provenance
    pictures = _pictures(args, report, results, attack_images, settings.mask)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if (provenance or {}).get("run_id"):
        log_evaluation(provenance["run_id"], report, pictures)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print_report(report)
    return 0


def _settings(args):
    """The evaluation's settings and, with --mask, where the mask came from (fetched and checked first)."""
    from erase.detectors import detector_spec
    from erase.errors import EraseError
    from erase.evaluate import AttackConfig, EvalSettings
    from erase.masks import read_mask_metadata

    mask_path, provenance, concept = None, None, args.concept
    if args.mask:
        from erase.registry import fetch_mask
        from erase.tracking import connect_for

        connect_for([args.mask], args.tracking_uri)

        mask_path, provenance = fetch_mask(args.mask)
        concept = concept or read_mask_metadata(mask_path)["concept"]
    if (args.grid or args.report) and not (mask_path and concept):
        raise EraseError("--grid and --report need --mask (and a concept): they show base and masked generations")
    attack = AttackConfig(prompts=args.attack_prompts, steps=args.attack_steps, lr=args.attack_lr,
                          sampling_steps=args.sampling_steps)
    settings = EvalSettings(model=args.model, model_path=args.model_path, mask=mask_path, concept=concept,
                            detector=detector_spec(args.model, args.detector, args.detector_config, args.model_path),
                            device=args.device, dtype=args.dtype, guidance=args.guidance, steps=args.sampling_steps,
                            batch_size=args.batch_size, attack=attack, clip_model=args.clip_model,
                            fid_weights=args.fid_weights)
    return settings, provenance


def _rows(args, concept):
    """The evaluation rows: the model's own sets, with the user's prompt files in place of the parts they name."""
    from erase.data import read_adversarial
    from erase.errors import EraseError
    from erase.evaluate import evaluation_rows
    from erase.prompts import read_prompts, warn_unknown_words

    adversarial = {}
    for item in args.adversarial or []:
        name, sep, path = item.partition("=")
        if not sep:
            raise EraseError(f"--adversarial takes SET=FILE (e.g. i2p=i2p.csv), got {item!r}")
        adversarial[name] = read_adversarial(name, path, min_nudity=args.min_nudity)

    def read(path, what):
        if not path:
            return None
        prompts = read_prompts(path, what, args.prompt_column)
        warn_unknown_words(args.model, prompts, path)
        return prompts

    return evaluation_rows(args.model, concept, args.seeds_per_prompt, split=args.split,
                           prompts=read(args.prompts, "concept prompt"), neutral=read(args.neutral_prompts, "neutral prompt"),
                           rephrase=read(args.rephrase_prompts, "rephrase prompt"), adversarial=adversarial,
                           files={"prompts": args.prompts, "neutral": args.neutral_prompts,
                                  "rephrase": args.rephrase_prompts}, max_prompts=args.max_prompts)


def _evaluate(args, settings, rows):
    """In this process, or with --address on a Ray cluster's actor pools."""
    from erase.data import stages_on_ray
    from erase.evaluate import evaluate

    if not args.address:
        return evaluate(settings, rows, progress=not args.json)
    with common.ray_output_off_stdout(args.json), stages_on_ray(args.address, settings, actors=args.actors,
                                                         gpus_per_actor=args.gpus_per_actor,
                                                         batch_size=args.batch_size) as run_stages:
        return evaluate(settings, rows, run_stages=run_stages, progress=not args.json)


def _pictures(args, report: dict, results: list[dict], attack_images, mask_path: str | None) -> list[str]:
    """The --grid PNG and the --report HTML, if asked for; returns the files written."""
    from erase.evaluate import grid_rows, html_report, save_image_grid

    if not (args.grid or args.report):
        return []
    concept = report["concept"]
    grid = grid_rows(results, concept)
    if attack_images:
        grid.append(("white-box attack, masked", attack_images))
    written = []
    if args.grid:
        save_image_grid(grid, args.grid)
        report["grid"] = args.grid
        written.append(args.grid)
    if args.report:
        html_report(report, {f"'{concept}': base vs masked": grid}, args.report, verdict=_verdict(report),
                    training=_training(mask_path))
        report["report"] = args.report
        written.append(args.report)
    return written


def _verdict(report: dict) -> dict:
    """The promotion gates' verdict on this evaluation's erasure and preservation (the default gates)."""
    from erase.registry import GATES, check_gates

    figures = {key: (report.get(key) or {}).get("value") for key in ("erasure_rate", "preservation")}
    return {"failed": check_gates(figures, GATES), "gates": dict(GATES)}


def _training(mask_path: str | None) -> dict | None:
    """How the mask was trained, from its file: status, steps, and the settings that differ from none."""
    from erase.masks import read_mask_metadata

    if not mask_path:
        return None
    meta = read_mask_metadata(mask_path)
    extra = json.loads(meta.get("extra") or "{}")
    made = extra.get("reproduce") or {}
    settings = {k: v for k, v in (made.get("config") or {}).items() if v not in (None, "", [], {})}
    return {"status": extra.get("status", "unknown"), "steps done": extra.get("steps_done"),
            "created": meta.get("created"), "threads": made.get("threads"), **settings}


def print_report(report: dict) -> None:
    print(f"{report['model']}: {report['generations']} generations, {report['steps']} steps, guidance {report['guidance']}")
    base = report.get("base_detection")
    print(f"{'concept':<14} {'detection':>9}" + (f" {'base':>6}" if base else ""))
    for c, r in report["detection"].items():
        print(f"{c:<14} {r:>9.3f}" + (f" {base[c]:>6.3f}" if base else ""))
    for key in ("erasure_rate", "base_rate", "preservation", "neutral_fidelity", "rephrase_erasure_rate",
                "robust_erasure_rate", "attack_success_rate"):
        if key in report:
            print(f"{key + ':':<24} {common.figure(report[key])}  [{report[key].get('split', {}).get('name', '')}]")
    for family, value in report.get("robustness", {}).items():
        print(f"{'  ' + family + ':':<24} base {common.figure(value['base'])}; masked {common.figure(value['masked'])}")
    for key, value in report.items():
        if key.startswith("adversarial/"):
            print(f"{key + ':':<24} base {common.figure(value['base'])}; masked {common.figure(value['masked'])}")
    for key in ("clip_score", "fid"):
        if key in report:
            value = report[key]
            both = f"base {common.figure(value.get('base'))}; masked {common.figure(value.get('masked'))}"
            text = value.get("skipped") or (common.figure(value) if "n" in value else both)
            print(f"{key + ':':<24} {text}")
    for key in ("grid", "report"):
        if key in report:
            print(f"{key}: {report[key]}")
