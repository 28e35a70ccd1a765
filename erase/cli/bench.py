"""time and peak memory of one optimisation step, checkpointed and plain; the GPU check of the recipes

Run the erasure step on a random model for several sampling-step counts, with step-wise
checkpointing on and off, each row in a fresh process. Or, with --inference, what masks cost or
save when generating: the base model, masks as hooks, folded, and with neurons dropped. Or, with --recipe, a few steps of the
named recipes beside the planner's prediction (erase bench --recipe paper,reference --device cuda
--model flux.1-schnell --random-weights on an H100). Or, with --targets or --search, the toy
world's benchmarks of the target strategies and of the search.
"""

from __future__ import annotations

import json
import sys

from erase.cli.common import TRACKING_URI_HELP, add_model_args, add_parser, comma_list, number, progress_printer, ray_output_off_stdout


def add(subparsers) -> None:
    p = add_parser(subparsers, "bench", __doc__)
    add_model_args(p, default="flux-bench")
    p.add_argument("--sampling-steps", default="1,2,4,8", metavar="COUNTS", help="the sampling-step counts to time, "
                   "comma-separated (what `erase train --sampling-steps` sets; optimisation steps are --train-steps)")
    p.add_argument("--sites", default="ffn,norm", help="site groups to mask")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per term per step")
    p.add_argument("--repeats", type=int, default=2, help="timed optimisation steps per row (the fastest counts)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--recipe", metavar="NAMES", help="instead: the GPU check. A few optimisation steps of each "
                   "named recipe (comma-separated, e.g. paper,reference) at the model's resolution, with the memory "
                   "setting the planner picks (erase plan): seconds per step and peak memory beside the planner's "
                   "prediction. For the cluster: --device cuda --model flux.1-schnell --random-weights; its CPU twin: "
                   "--device cpu --model flux-bench")
    p.add_argument("--random-weights", action="store_true", help="with --recipe: build the checkpoint's architecture "
                   "with random weights (nothing downloaded)")
    p.add_argument("--check-steps", type=int, default=3, help="with --recipe: optimisation steps per recipe (the first "
                   "fills the target cache and is not timed)")
    p.add_argument("--gpu-memory", type=float, metavar="GB", help="with --recipe: the memory the planner fits the "
                   "setting to (default: the CUDA device's; 80 on a CPU)")
    p.add_argument("--targets", metavar="CONCEPT", help="instead: compare the target strategies (--strategies) erasing "
                   "this toy-world concept, same settings and seeds, reporting the preservation of its three nearest "
                   "neighbours in the concept graph")
    p.add_argument("--strategies", default="empty,substitute,adaptive,edit", help="with --targets: the target "
                   "strategies compared, comma-separated (edit: FlowEdit with the toy world itself, towards the "
                   "substituted prompt)")
    p.add_argument("--graph", metavar="JSON", help="with --targets: the concept graph (erase graph's graph.json) that "
                   "names the neighbours (default: the one made on the toy world's shipped weights)")
    p.add_argument("--match-erasure", action="store_true", help="with --targets: compare at equal erasure: move each "
                   "strategy's beta (x4 or /4, then bisected) until its erasure rate is within 2 points of the level "
                   "(up to 5 runs each; every run is listed)")
    p.add_argument("--erasure-level", type=float, metavar="RATE", help="with --match-erasure: the erasure rate to "
                   "match (default: the strongest strategy's rate at the recipe's beta; when a strategy cannot reach "
                   "it, the output names the hardest rate every strategy reached)")
    p.add_argument("--search", metavar="CONCEPT", help="instead: the best objective against erasure steps spent, "
                   "the reference code's grid (beta in 0.1..1e-5, moved to the model's beta scale: 10..1e-3 for the toy "
                   "world; times --lrs) against erase sweep (Optuna + ASHA, --trials trials in the same box), erasing "
                   "this toy-world concept")
    p.add_argument("--lrs", default="0.5,1.0", help="with --search: the grid's learning rates (lr_ffn = lr_norm)")
    p.add_argument("--trials", type=int, default=10, help="with --search: the sweep's trials")
    p.add_argument("--storage", default="erase-sweeps", help="with --search: the sweep's state folder")
    p.add_argument("--tracking-uri", help="with --search: " + TRACKING_URI_HELP)
    p.add_argument("--train-steps", type=int, help="optimisation steps per erasure (default: the recipe's, "
                   "200 for the toy world, with --targets; 100 with --search)")
    p.add_argument("--inference", nargs="?", const="flux-bench,toy", metavar="MODELS", help="instead: seconds per "
                   "image and peak memory of the base model, the masks as hooks, folded, and with the masked FFN "
                   "neurons dropped, at the reference code's released mask sparsity (47.6%% of ff units, 78.3%% of "
                   "ff_context, 17.7%% of norm), each in a fresh process; --repeats images are timed (default "
                   "models: flux-bench,toy)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (the step benchmark: a list `rows` "
                   "of {steps, checkpointing, seconds, peak_mb})")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.inference:
        return run_inference(args)
    if args.recipe:
        return run_recipes(args)
    if args.targets:
        return run_targets(args)
    if args.search:
        return run_search(args)
    return run_steps(args)


def run_steps(args) -> int:
    from erase import bench
    from erase.errors import EraseError

    try:
        steps = [int(s) for s in comma_list(args.sampling_steps)]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise EraseError(f"--sampling-steps takes positive step counts like 1,2,4,8, got {args.sampling_steps!r}")
    report = bench.run(args.model, steps, batch_size=args.batch_size, sites=tuple(comma_list(args.sites)),
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


def run_inference(args) -> int:
    from erase import bench
    from erase.pipelines import model

    models = comma_list(args.inference)
    for name in models:
        model(name)  # an unknown model fails here, before any row
    report = bench.run_inference(models, images=args.repeats, device=args.device, progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"inference on {report['device']}, masks at the reference code's released sparsity {report['sparsity']}; "
          f"the fastest of {report['images']} images")
    for name, m in report["models"].items():
        print(f"{name}: {'variant':<8} {'s/image':>9} {'x base':>7} {'peak MB':>8} {'params x base':>14} "
              f"{'dropped':>8} {'max diff to folded':>19}")
        for variant, row in m["variants"].items():
            diff = m["max_abs_difference_to_folded"].get(variant)
            print(f"{'':<{len(name) + 2}}{variant:<8} {row['seconds_per_image']:>9.4f} {m['time_over_base'][variant]:>7.3f} "
                  f"{row['peak_mb']:>8.1f} {m['params_over_base'][variant]:>14.3f} {row['dropped_neurons']:>8} "
                  f"{'' if diff is None else f'{diff:.2e}':>19}")
    return 0


def run_recipes(args) -> int:
    from erase import bench

    report = bench.check_recipes(args.model, comma_list(args.recipe), device=args.device,
                                 random_weights=args.random_weights, model_path=args.model_path,
                                 steps=args.check_steps, gpu_memory_gb=args.gpu_memory, progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']} on {report['device']}{' (random weights)' if report['random_weights'] else ''}, "
          f"fitted to {report['gpu_memory_gb']:.0f} GB; peak: {report['peak']}")
    print(f"{'recipe':<10} {'setting':<28} {'s/step':>8} {'peak GB':>8} {'predicted':>10} {'GPU-min/run':>12}")
    for r in report["recipes"]:
        blocks = "checkpointed" if r["setting"]["block_checkpointing"] else "plain"
        setting = f"micro-batch {r['setting']['micro_batch'] or 'whole'}, blocks {blocks}"
        print(f"{r['recipe']:<10} {setting:<28} {r['seconds_per_step']:>8.3f} {r['peak_gb']:>8.2f} "
              f"{r['predicted_peak_gb']:>10.2f} {r['predicted_gpu_minutes']:>12.1f}")
    return 0


def run_targets(args) -> int:
    from erase import bench
    from erase.config import TARGETS
    from erase.errors import EraseError

    if args.erasure_level is not None:
        if not args.match_erasure:
            raise EraseError("--erasure-level is the rate --match-erasure matches at: pass both")
        bench.matching_level({}, args.erasure_level)  # a rate out of [0, 1] fails before any training
    strategies = tuple(comma_list(args.strategies))
    unknown = [s for s in strategies if s not in TARGETS]
    if unknown or not strategies:
        raise EraseError(f"--strategies takes targets from {', '.join(TARGETS)}, got {args.strategies!r}")
    neighbours = bench.graph_neighbours(args.targets, args.graph)
    report = bench.compare_targets(args.targets, neighbours, steps=args.train_steps, match=args.match_erasure,
                                   level=args.erasure_level, strategies=strategies, progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print_targets(report)
    return 0


def print_targets(report: dict) -> None:
    from erase.bench import hardest_common_level

    neighbours = report["neighbours"]  # the ones it was measured on, whatever the graph says now

    def fixed(value) -> str:
        return f"{'n/a':>10}" if value is None else f"{value:>10.3f}"

    print(f"erasing {report['concept']!r} ({report['steps']} steps, beta {report['beta']}); nearest neighbours in "
          f"the concept graph: {', '.join(neighbours)}")
    print(f"{'target':<11} {'erasure_rate':>14} {'preservation':>13} " + " ".join(f"{n:>10}" for n in neighbours)
          + f" {'neighbours':>10}")
    for name, r in report["strategies"].items():
        print(f"{name:<11} {r['erasure_rate']['value']:>14.3f} {r['preservation']['value']:>13.3f} "
              + " ".join(fixed(r["neighbour_preservation"][n]) for n in neighbours) + f" {fixed(r['neighbour_mean'])}")
        if r["learnt_target"]:
            print("            learnt target: " + ", ".join(f"{t['concept']} {t['weight']:.2f}"
                                                           for t in r["learnt_target"]))
        if len(r["runs"]) > 1:
            print("            beta tried: " + ", ".join(f"{t['beta']:.3g} -> {t['erasure_rate']:.3f}"
                                                         for t in r["runs"]) + f"; reported: beta {r['beta']:.3g}")
    if report["matched_erasure"]:
        verdict = "equal" if report["equal_erasure"] else "NOT equal"
        print(f"erasure rates {verdict} within 2 points (spread {report['erasure_spread']:.3f}, "
              f"level {report['erasure_level']:.3f})")
        if not report["equal_erasure"]:
            print(f"the hardest erasure every strategy reached is {hardest_common_level(report['strategies']):.3f}: "
                  "compare there with --erasure-level RATE")


def run_search(args) -> int:
    from erase import bench
    from erase.errors import EraseError

    try:
        lrs = [float(v) for v in comma_list(args.lrs)]
    except ValueError:
        lrs = []
    if not lrs or min(lrs) <= 0 or args.trials < 1:
        raise EraseError("--lrs takes positive learning rates like 0.5,1.0 and --trials a positive count")
    with ray_output_off_stdout():
        report = bench.compare_search(args.search, steps=args.train_steps or 100, lrs=lrs, trials=args.trials,
                                      storage=args.storage, tracking_uri=args.tracking_uri, progress=not args.json,
                                      on_sweep_progress=None if args.json else progress_printer(sys.stderr))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    fmt = number
    for name in ("grid", "optuna_asha"):
        print(f"{name}: best objective after n erasure steps")
        print("  " + "  ".join(f"{p['steps']}:{fmt(p['best'])}" for p in report[name]["curve"]))
    print(f"grid best {fmt(report['grid_best'])} after {report['grid_steps']} steps; Optuna + ASHA best "
          f"{fmt(report['optuna_best'])} after {report['optuna_steps']} steps; reached the grid's best after "
          f"{report['optuna_steps_to_grid_best'] or 'never'} steps (bar: at most a third, {report['grid_steps'] / 3:.0f})")
    return 0
