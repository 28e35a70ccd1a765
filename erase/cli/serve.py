"""serve images made with the masks behind registry aliases, on Ray Serve; follows the aliases

Start a Ray Serve application whose replica generates with the masks that --mask aliases point
to, folded into the weights. Every --poll-seconds it checks the aliases; when `erase promote`
moved one, the new version is fetched and checked (sha256, fingerprint) and swapped in without
dropping a request. A version that fails its check is refused: at start the server does not
start, later it keeps the last good masks and says so in each response's `warning`.
Requests: POST / with JSON {"prompt": ..., "seed": 0}; the answer has the image as a base64 PNG
(`image_png`) and the mask versions that made it (`versions`). Ctrl-C stops it.
"""

from __future__ import annotations

import os
import time

from erase.cli.common import TRACKING_URI_HELP, add_model_args, add_parser


def add(subparsers) -> None:
    p = add_parser(subparsers, "serve", __doc__)
    add_model_args(p)
    p.add_argument("--mask", action="append", required=True, metavar="URI", help="a registry alias to follow, "
                   "models:/NAME@ALIAS (repeatable: the masks combine; a unit stays only if every mask keeps it)")
    p.add_argument("--poll-seconds", type=float, default=30.0, help="how often the aliases are checked")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy listens on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--address", help="a Ray cluster to deploy on, e.g. auto (default: start a local Ray)")
    p.add_argument("--device", default="cpu", help="torch device of the replica, e.g. cuda")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs the replica asks Ray for (1 on a GPU cluster)")
    p.add_argument("--tracking-uri", help=TRACKING_URI_HELP)
    p.set_defaults(run=run)


def run(args) -> int:
    from erase.errors import EraseError
    from erase.registry import resolve_version
    from erase.tracking import connect

    uri = connect(args.tracking_uri, existing=True)  # absolute: the replica runs in another folder
    for ref in args.mask:
        if not ref.startswith("models:/") or "@" not in ref:
            raise EraseError(f"--mask {ref!r}: erase serve follows registry aliases, models:/NAME@ALIAS; a file "
                             "cannot move (fold it with erase.apply_masks in your own server)")
        resolve_version(ref)  # an unknown name or alias fails here, before Ray starts
    import ray
    from ray import serve

    from erase.deployment import application

    ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    model_path = os.path.abspath(args.model_path) if args.model_path else None
    serve.run(application(args.model, args.mask, tracking_uri=uri, poll_seconds=args.poll_seconds,
                          model_path=model_path, device=args.device, num_gpus=args.gpus), name="erase",
              route_prefix="/")
    print(f"serving {', '.join(args.mask)} on http://{args.host}:{args.port}/ (POST JSON {{\"prompt\": ..., "
          f"\"seed\": 0}}); aliases checked every {args.poll_seconds:g} s; Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()
