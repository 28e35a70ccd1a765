"""the registry's masks (list, show, apply) and mask files (inspect, import)

Registered masks: list them, show one version, generate with some folded into the weights.
Mask files: print one's metadata, convert the reference code's .pt masks.
"""

from __future__ import annotations

import json
import os

from erase.cli.common import TRACKING_URI_HELP, add_model_args, add_parser, add_run_args, comma_list, output_path


def add(subparsers) -> None:
    p = add_parser(subparsers, "masks", __doc__)
    actions = p.add_subparsers(dest="masks_command", metavar="ACTION", required=True)

    q = add_parser(actions, "list", run_list.__doc__)
    q.add_argument("--tracking-uri", help=TRACKING_URI_HELP)
    q.add_argument("--json", action="store_true", help="print the list as JSON")
    q.set_defaults(run=run_list)

    q = add_parser(actions, "show", run_show.__doc__)
    q.add_argument("ref", help="e.g. erase-toy-circle@production or erase-toy-circle/3")
    q.add_argument("--tracking-uri", help=TRACKING_URI_HELP)
    q.add_argument("--json", action="store_true", help="print the version as JSON")
    q.set_defaults(run=run_show)

    q = add_parser(actions, "apply", run_apply.__doc__)
    q.add_argument("masks", nargs="+", metavar="MASK_URI",
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID or a file")
    q.add_argument("--prompt", action="append", required=True, help="prompt to generate (repeatable)")
    q.add_argument("--out", required=True, metavar="PNG", help="image file: one image per prompt and seed, in a row")
    q.add_argument("--seeds", default="0", help="noise seeds, comma-separated")
    q.add_argument("--sampling-steps", type=int, help="sampling steps (default: the model's)")
    q.add_argument("--compare", action="store_true", help="add a row with the base model's images")
    q.add_argument("--tracking-uri", help=TRACKING_URI_HELP)
    add_model_args(q)
    add_run_args(q)
    q.add_argument("--json", action="store_true", help="print what was applied as JSON")
    q.set_defaults(run=run_apply)

    q = add_parser(actions, "inspect", run_inspect.__doc__)
    q.add_argument("file", help="a mask file (.safetensors)")
    q.add_argument("--json", action="store_true", help="print the metadata as JSON")
    q.set_defaults(run=run_inspect)

    q = add_parser(actions, "import-reference", run_import.__doc__)
    q.add_argument("folder", help="folder with ff.pt, norm.pt and/or attn.pt")
    q.add_argument("--model", default="flux.1-schnell", help="model the masks were trained on")
    q.add_argument("--concept", default="unknown", help="the concept the masks erase (stored in the metadata)")
    q.add_argument("--out", required=True, metavar="MASK", help="mask file to write")
    q.set_defaults(run=run_import)


def run_list(args) -> int:
    """registered masks: concepts, versions, aliases, key figures

    List the MLflow registry's masks (registered models named erase-<model>-<concept>).
    """
    from erase import registry
    from erase.tracking import NoStore, connect

    try:
        connect(args.tracking_uri, existing=True)
    except NoStore as err:
        print("[]" if args.json else f"no registered masks: {err}")
        return 0
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


def run_show(args) -> int:
    """one registered mask version: lineage, figures, aliases

    Show NAME (newest version), NAME@ALIAS or NAME/VERSION.
    """
    from erase import registry
    from erase.tracking import connect

    connect(args.tracking_uri, existing=True)
    info = registry.show(args.ref)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for key in ("name", "version", "aliases", "source", "run_id", "status", "description"):
        print(f"{key}: {info[key]}")
    for key, value in sorted(info["tags"].items()):
        print(f"  {key}: {value}")
    return 0


def run_apply(args) -> int:
    """generate with one or more masks folded into the weights

    Fold binary masks into the model's weights (no hooks, no inference cost) and generate.
    Several masks erase several concepts at once: an entry stays only if every mask keeps it
    (the removed units of all masks are removed). Every mask is checked, before the model
    loads: sha256 against the one recorded at logging, architecture fingerprint against the model.
    """
    from erase.detectors import to_uint8
    from erase.errors import EraseError
    from erase.evaluate import generate, save_image_grid
    from erase.masks import fold_into_weights
    from erase.pipelines import load_generator, mask_sites
    from erase.prompts import warn_unknown_words
    from erase.registry import load_masks
    from erase.tracking import connect_for

    try:
        seeds = [int(s) for s in comma_list(args.seeds)]
    except ValueError:
        seeds = []
    if not seeds:
        raise EraseError(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    output_path(args.out, "--out")
    warn_unknown_words(args.model, args.prompt, "--prompt")
    connect_for(args.masks, args.tracking_uri)
    sites, combined, applied = load_masks(args.masks, mask_sites(args.model), args.model)
    gen = load_generator(args.model, args.model_path, dtype=args.dtype, device=args.device, guidance=args.guidance)
    prompts = [p for p in args.prompt for _ in seeds]
    all_seeds = seeds * len(args.prompt)
    base = generate(gen, prompts, all_seeds, args.sampling_steps) if args.compare else None
    fold_into_weights(gen.transformer, sites, combined)
    images = generate(gen, prompts, all_seeds, args.sampling_steps)
    rows = [("masked: " + ", ".join(a["concept"] for a in applied), list(to_uint8(images)))]
    if base is not None:
        rows.insert(0, ("base model", list(to_uint8(base))))
    save_image_grid(rows, args.out, scale=max(1, 64 // images.shape[-1]))
    removed = sum(int((v == 0).sum()) for v in combined.values())
    report = {"out": args.out, "masks": applied, "prompts": args.prompt, "seeds": seeds, "removed_entries": removed}
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"wrote {args.out}: {len(prompts)} images with {len(applied)} mask(s) folded in "
              f"({removed:,} entries removed): " + ", ".join(f"{a['concept']} ({a['uri']})" for a in applied))
    return 0


def run_inspect(args) -> int:
    """print a mask file's metadata and sparsity

    Print the metadata a mask file carries: model, architecture fingerprint, concept,
    parametrisation, binarisation, sparsity per group, and how it was made.
    """
    from erase.masks import read_mask_metadata

    meta = read_mask_metadata(args.file)
    meta = {k: (json.loads(v) if k in ("groups", "sparsity", "extra") else v) for k, v in meta.items()}
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    for k, v in meta.items():
        if k == "sparsity":
            print(f"sparsity: {v['overall']:.4%} overall; " + ", ".join(f"{g} {x:.4%}" for g, x in v["groups"].items()))
        else:
            print(f"{k}: {v}")
    return 0


def run_import(args) -> int:
    """convert the paper's ff.pt/norm.pt/attn.pt into a mask file

    Read the reference code's per-layer λ lists (tensors only, weights_only) and write the
    project's safetensors mask file.
    """
    from erase.masks import save_mask_file
    from erase.pipelines import mask_sites
    from erase.reference import read_reference_masks

    output_path(args.out, "--out")
    sites = mask_sites(args.model)
    masks = read_reference_masks(args.folder, sites)
    meta = save_mask_file(args.out, masks, model_id=args.model, model_sites=sites, concept=args.concept,
                          extra={"imported_from": os.path.abspath(args.folder)})
    sp = json.loads(meta["sparsity"])
    print(f"wrote {args.out}: {len(masks.sites)} masks, {sp['entries']:,} entries, "
          f"removed {sp['overall']:.4%} at threshold 0")
    return 0
