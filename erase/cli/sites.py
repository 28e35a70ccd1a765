"""list a model's mask sites and sizes (no weights needed)

List the mask sites of a model, built on the meta device: no weights are loaded or
downloaded. Groups: ffn (FFN hidden units), norm (text-stream modulation), attn (attention
heads).
"""

from __future__ import annotations

import json

from erase.cli.common import add_model_args, add_parser


def add(subparsers) -> None:
    p = add_parser(subparsers, "sites", __doc__)
    add_model_args(p, path=False)
    p.add_argument("--all", action="store_true", help="also list every site, not only the group totals")
    p.add_argument("--json", action="store_true", help="print JSON: {model, fingerprint, groups: {g: {masks, "
                   "entries}}, sites}")
    p.set_defaults(run=run)


def run(args) -> int:
    from erase.masks import site_summary
    from erase.pipelines import mask_sites

    report = {"model": args.model, **site_summary(mask_sites(args.model))}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.model}  architecture {report['fingerprint']}")
    print(f"{'group':<6} {'masks':>6} {'entries':>10}")
    for g, v in report["groups"].items():
        print(f"{g:<6} {v['masks']:>6} {v['entries']:>10,}")
    if args.all:
        for s in report["sites"]:
            print(f"  {s['name']:<45} {s['size']:>8,}")
    return 0
