"""register the best run's mask in the MLflow registry and move an alias

Register the best finished run of a concept (of one sweep with --sweep) as a new version of
the registered model erase-<model>-<concept>, with its figures and lineage, and move --alias
to it. Gates: erasure_rate at most max_erasure_rate, preservation at least min_preservation
(defaults 0.05 and 0.9, or --gates FILE); below them promotion is refused unless --force.
"""

from __future__ import annotations

import json

from erase.cli.common import TRACKING_URI_HELP, add_model_args, add_parser


def add(subparsers) -> None:
    p = add_parser(subparsers, "promote", __doc__)
    p.add_argument("--concept", required=True, help="the erased concept whose runs compete")
    add_model_args(p, path=False)
    p.add_argument("--sweep", help="only runs of this sweep id")
    p.add_argument("--metric", default="score", help="metric that picks the best run (higher is better)")
    p.add_argument("--alias", default="production", help="the alias to move to the new version")
    p.add_argument("--gates", metavar="YAML", help="gates file: {max_erasure_rate: 0.05, min_preservation: 0.9}")
    p.add_argument("--max-erasure-rate", type=float, help="override the gate")
    p.add_argument("--min-preservation", type=float, help="override the gate")
    p.add_argument("--force", action="store_true", help="promote even if the gates fail (recorded on the version)")
    p.add_argument("--tracking-uri", help=TRACKING_URI_HELP)
    p.add_argument("--json", action="store_true", help="print what was done as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from erase import registry
    from erase.tracking import connect

    connect(args.tracking_uri, existing=True)
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
