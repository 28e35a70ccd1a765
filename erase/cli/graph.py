"""concept graph: erase each concept, measure every other, draw the heatmap

AGE's concept graph as a sweep: one erasure per concept (a study each, fixed settings from
--space), then every mask evaluated on every concept. Writes the side-effect matrix
Δ(erased, measured) = base detection - detection after erasure, on the measured concept's
prompts that do not name the erased one, as JSON, a Markdown table and a heatmap PNG.
"""

from __future__ import annotations

import json

from erase.cli.common import (TRACKING_URI_HELP, add_model_args, add_parser, comma_list, output_folder,
                              progress_printer, ray_output_off_stdout)


def add(subparsers) -> None:
    p = add_parser(subparsers, "graph", __doc__)
    add_model_args(p)
    p.add_argument("--concepts", help="comma-separated concepts (toy default: its six objects)")
    p.add_argument("--space", default="concept_graph", help="settings of every erasure (a space file)")
    p.add_argument("--address", help="Ray cluster to use (default: start a local Ray)")
    p.add_argument("--storage", default="erase-sweeps", help="folder for the sweep's state")
    p.add_argument("--tracking-uri", help=TRACKING_URI_HELP)
    p.add_argument("--seeds-per-prompt", type=int, default=2, help="evaluation seeds per prompt")
    p.add_argument("--out-dir", default="concept-graph", help="folder for graph.json, graph.md and graph.png")
    p.add_argument("--json", action="store_true", help="print graph.json's content")
    p.set_defaults(run=run)


def run(args) -> int:
    from erase import graph

    output_folder(args.out_dir, "--out-dir")
    specs = graph.plan(args.model, comma_list(args.concepts), space=args.space, storage=args.storage,
                       tracking_uri=args.tracking_uri, model_path=args.model_path,
                       seeds_per_prompt=args.seeds_per_prompt)
    if not args.json:
        print(f"concept graph {specs[0].sweep_id}: erasing {', '.join(s.concept for s in specs)} (space {args.space})",
              flush=True)
    with ray_output_off_stdout() as out:
        result = graph.run(specs, seeds_per_prompt=args.seeds_per_prompt, out_dir=args.out_dir, address=args.address,
                           on_progress=None if args.json else progress_printer(out), progress=not args.json)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(graph.markdown_table(result["delta"]))
    print(f"\nwrote {args.out_dir}/graph.json, graph.md, graph.png")
    return 0
