"""predict a FLUX.1 run's peak GPU memory and cost, and the cheapest setting that fits

Measures, on --device, the activation bytes per token of one dual-stream and one single-stream
block at the model's real width (random weights: nothing is downloaded), adds up one optimisation
step's peak for every micro-batch (divisors of the batch) with and without per-block
checkpointing, counts the run's FLOPs on the meta device, and picks the setting with the fewest
FLOPs that fits in --gpu-memory. The run's settings come as for `erase train`: the model's
defaults, --recipe, --config and the flags below.
"""

from __future__ import annotations

import json

from erase.cli.common import add_model_args, add_parser


def add(subparsers) -> None:
    from erase import config
    from erase.pipelines import DTYPES

    p = add_parser(subparsers, "plan", __doc__)
    add_model_args(p, path=False, default="flux.1-schnell")
    p.add_argument("--recipe", help="a named recipe of the model (FLUX.1: paper, the paper's Table 6; "
                   "reference, the reference code's)")
    p.add_argument("--config", metavar="YAML", help="settings from a file, as for erase train (flags override them)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB", help="the GPU's memory, GiB")
    p.add_argument("--utilisation", type=float, default=0.5, help="share of the H100's 989 TFLOP/s bf16 peak "
                   "reached, for the GPU-minutes")
    p.add_argument("--device", default="cpu", help="torch device the blocks are measured on")
    p.add_argument("--dtype", choices=list(DTYPES), help="the model's dtype (default: the model's: bf16 for the "
                   "FLUX.1 checkpoints, fp32 for the random configs)")
    config.add_flags(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from erase import config, plan

    plan.check_budget(args.gpu_memory, args.utilisation)
    plan.flux_spec(args.model)
    fixed = config.read_config_file(args.config) if args.config else {}
    cfg = config.resolve(args.model, "plan", fixed=fixed, fixed_from=f"config file {args.config}",
                         flags={**config.flag_values(args), "recipe": args.recipe})
    report = plan.plan(args.model, cfg, args.gpu_memory, args.utilisation, device=args.device, dtype=args.dtype)
    report["recipe"] = args.recipe
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_plan(report)
    return 0


def print_plan(report: dict) -> None:
    from erase.plan import advice

    run, tokens, weights = report["run"], report["tokens"], report["weights_gb"]
    per_token = report["activation_bytes_per_token"]
    print(f"{report['model']}{', recipe ' + report['recipe'] if report['recipe'] else ''}: batch {run['batch_size']}, "
          f"{run['sampling_steps']} sampling steps, {tokens['image']} image + {tokens['text']} text tokens, "
          f"{report['dtype']} (blocks measured on {report['device']})")
    print(f"  activations per token: dual block {per_token['dual']:,} B, single block {per_token['single']:,} B")
    print(f"  weights {weights['transformer'] + weights['vae']:.1f} GB (transformer, VAE); encoding the prompts "
          f"{report['encoding_peak_gb']:.1f} GB (with the text encoders, {weights['text_encoders']:.1f} GB)")
    print(f"  {'micro-batch':>11} {'block ckpt':>10} {'peak GB':>8} {'PFLOP/run':>10} {'GPU-min':>8}")
    for row in report["candidates"]:
        mark = " <- chosen" if (row["micro_batch"], row["block_checkpointing"]) == _chosen(report) else ""
        print(f"  {row['micro_batch']:>11} {'on' if row['block_checkpointing'] else 'off':>10} {row['peak_gb']:>8.1f} "
              f"{row['flops_per_run'] / 1e15:>10.1f} {row['gpu_minutes']:>8.1f}{mark}")
    setting, assumptions = report["setting"], report["assumptions"]
    batch = setting["micro_batch"] or f"{run['batch_size']} (the whole batch)"
    verdict = "fits" if report["fits"] else "does NOT fit"
    print(f"chosen: --micro-batch {batch}, block checkpointing {'on' if setting['block_checkpointing'] else 'off'}: "
          f"{report['peak_gb']:.1f} GB of {report['gpu_memory_gb']:g} ({verdict}), {report['gpu_minutes']:.0f} "
          f"H100-minutes at {assumptions['utilisation']:.0%} of {assumptions['h100_bf16_flops'] / 1e12:.0f} TFLOP/s")
    print(f"  peaks include a {assumptions['allocator_margin']:.0%} allocator margin; GB are GiB")
    if not report["fits"]:
        print(f"  to fit: {advice(report)}")


def _chosen(report: dict) -> tuple[int, bool]:
    setting = report["setting"]
    return setting["micro_batch"] or report["run"]["batch_size"], setting["block_checkpointing"]
