"""The `erase` command: one module per subcommand, each with its parser (`add`) and its handler (`run`).

Every subcommand has --help; human output by default, --json for machines. An error the user
can fix (erase.errors.EraseError: a bad name, path, prompt file or setting) prints one line
starting with `erase: error:` and exits 2; any other error is a bug and keeps its traceback
(exit 1); Ctrl-C at any point is one line and exit 130 (`erase train` first saves its last
logged mask and a resume point, `erase sweep` its studies' state). A run that stops on a non-finite loss exits 1 after saving the last
good mask, and a sweep in which no trial finished exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

COMMANDS = ("sweep", "promote", "masks", "serve", "train", "eval", "graph", "sites", "bench", "plan")

EXAMPLES = """examples (the toy world is the default model):
  erase sweep                                            a small sweep for 'striped' on a local Ray
  erase sweep --concepts striped,outlined --trials 8 --address auto
  erase promote --concept striped                        best run -> registry, alias production
  erase masks apply models:/erase-toy-striped@production --prompt "a striped red cross" --out out.png
  erase serve --mask models:/erase-toy-striped@production       follow the alias on Ray Serve, port 8000
  erase train --concept striped && erase eval --mask toy-striped.safetensors --report striped.html
  erase graph                                            concept graph of the toy world's objects
  erase sites --model flux.1-schnell --json
  erase masks import-reference ./reference_masks --model flux.1-schnell --out nudity.safetensors
"""


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The whole parser, or with `command` the full parser of that subcommand alone and the others
    by name and one line (what `erase --help` shows): building a subcommand's flags imports torch,
    which `erase --help` and `erase --version` should not wait for."""
    from erase import __version__

    parser = argparse.ArgumentParser(
        prog="erase", description="Minimalist concept erasure: learn sparse neuron masks that remove a concept "
        "from a frozen flow-matching text-to-image model.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"erase {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"erase.cli.{name}")
        if command in ("*", name):
            module.add(subparsers)
        else:
            subparsers.add_parser(name, help=module.__doc__.strip().partition("\n")[0], add_help=False)
    return parser


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand named in `argv` (the first word that is one), or None."""
    return next((word for word in argv if word in COMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    global INTERRUPTED
    argv = sys.argv[1:] if argv is None else argv
    INTERRUPTED = False
    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        args = build_parser(chosen_command(argv)).parse_args(argv)
        quiet_libraries()
        return args.run(args)
    except BaseException as err:
        return exit_code(err)
    finally:
        signal.signal(signal.SIGINT, previous)


def interrupted(signum, frame):
    """Ctrl-C: remember it (an interrupt inside an import can surface as another error, e.g. a
    RecursionError from numpy's import under diffusers), then interrupt as Python does."""
    global INTERRUPTED
    INTERRUPTED = True
    raise KeyboardInterrupt


INTERRUPTED = False


def exit_code(err: BaseException) -> int:
    """What an exception ending the command prints and returns: bad input (erase.errors.EraseError)
    one line and 2; Ctrl-C one line and 130; a SystemExit its own code; anything else is a bug and
    keeps its traceback (exit 1)."""
    from erase.errors import EraseError

    if isinstance(err, SystemExit):
        raise err
    if isinstance(err, KeyboardInterrupt) or INTERRUPTED:
        detail = str(err) if isinstance(err, KeyboardInterrupt) else ""
        print(f"erase: interrupted{': ' + detail if detail else ''}", file=sys.stderr)
        return 130
    if isinstance(err, EraseError):
        print(f"erase: error: {err}", file=sys.stderr)
        return 2
    raise err


def quiet_libraries() -> None:
    """Library chatter (torchvision hints, truncation notices) hides our own output; keep errors only."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
