"""The `erase` command: one module per subcommand, each with its parser (`add`) and its handler (`run`).

Every subcommand has --help; human output by default, --json for machines. An error the user
can fix (erase.errors.EraseError: a bad name, path, prompt file or setting) prints one line
starting with `erase: error:` and exits 2; any other error is a bug and keeps its traceback
(exit 1); Ctrl-C exits 130. A run that stops on a non-finite loss exits 1 after saving the last
good mask, and a sweep in which no trial finished exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ("sweep", "promote", "masks", "train", "eval", "graph", "sites", "bench", "plan")

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="erase", description="Minimalist concept erasure: learn sparse neuron masks that remove a concept "
        "from a frozen flow-matching text-to-image model.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"erase.cli.{name}").add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from erase.errors import EraseError

    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        return args.run(args)
    except EraseError as err:  # bad input: one line; anything else is a bug and keeps its traceback (exit 1)
        print(f"erase: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"erase: interrupted{': ' + str(err) if str(err) else ''}", file=sys.stderr)
        return 130


def quiet_libraries() -> None:
    """Library chatter (torchvision hints, truncation notices) hides our own output; keep errors only."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
