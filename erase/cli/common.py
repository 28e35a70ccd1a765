"""What several subcommands share: the help format, the model and device flags, and the output helpers."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time


TRACKING_URI_HELP = ("MLflow tracking and registry URI, e.g. http://host:5000 (default: $MLFLOW_TRACKING_URI, "
                     "else sqlite:///./mlflow.db with artifacts in ./mlartifacts)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help, once: not when the help states it already, nor when it is
    None or False (an absent value or an off switch says nothing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default:" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: {action.default})" if text else f"(default: {action.default})"


def add_parser(subparsers, name: str, doc: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose --help is `doc`: its first line the one-line help, the rest the description
    (a command module passes its docstring)."""
    import inspect

    help, _, rest = inspect.cleandoc(doc).partition("\n")
    return subparsers.add_parser(name, help=help, description=description or rest.strip() or help,
                                 formatter_class=HelpFormatter)


def add_model_args(p: argparse.ArgumentParser, *, path: bool = True, default: str | None = None) -> None:
    from erase.pipelines import DEFAULT_MODEL, models

    p.add_argument("--model", default=default or DEFAULT_MODEL, help=f"model name: {', '.join(models())}")
    if path:
        p.add_argument("--model-path", metavar="DIR", help="local diffusers folder with the model's weights "
                       "(default: download from the hub for real checkpoints; random configs need none)")


def add_run_args(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    from erase.pipelines import DTYPES

    p.add_argument("--dtype", choices=list(DTYPES), help="the model's dtype; mask logits stay fp32 (default: the "
                   "model's: bf16 for the FLUX.1 checkpoints, fp32 for the toy world and the random configs)")
    if device:
        p.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1")
    p.add_argument("--guidance", type=float, help="guidance scale: classifier-free for the toy world, embedded "
                   "for FLUX.1-dev (default: the model's)")


def add_detector_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--detector", choices=["toy", "nudenet", "clip"], help=f"detector {what} (default: the model's "
                   "own, the toy world's CNN; required for FLUX.1)")
    p.add_argument("--detector-config", metavar="YAML", help="detector options: nudenet {classes: nine|strict|[labels], "
                   "threshold}; clip {model: DIR, labels: {concept: text}, threshold, template}")


def output_path(path: str | None, flag: str) -> str | None:
    """`path` if a file can be written there (its folder exists), checked before any heavy work."""
    from erase.errors import EraseError

    if path is not None:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise EraseError(f"output folder {folder!r} does not exist; create it or choose another {flag}")
        if os.path.isdir(path):
            raise EraseError(f"{flag} {path!r} is a folder; name a file")
        if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            raise EraseError(f"{flag} {path!r} cannot be written (no permission); choose another place")
    return path


def output_folder(path: str, flag: str) -> str:
    """`path` if a folder can be made or written there, checked before any heavy work."""
    from erase.errors import EraseError

    if os.path.exists(path) and not os.path.isdir(path):
        raise EraseError(f"{flag} {path!r} is a file; name a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK):
        raise EraseError(f"{flag} {path!r} cannot be written ({existing!r}: no permission); choose another place")
    return path


def comma_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def figure(value) -> str:
    """A figure {value, n, low, high} as 'value [low, high] (n=N)'."""
    if not isinstance(value, dict) or value.get("value") is None:
        return "n/a"
    return f"{value['value']:.3f} [{value['low']:.3f}, {value['high']:.3f}] (n={value['n']})"


def number(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def progress_printer(out):
    """A sweep's on_progress callback: one timestamped line per study on `out` whenever its line changes."""
    shown = {}

    def show(progress):
        for p in progress:
            best = p.get("best")
            line = (f"  {p['concept']}: {p['running']} running, {p['done']}/{p['total']} done"
                    + (f", {p['errored']} errored" if p.get("errored") else "")
                    + (f"; best report so far: score {best['score']:.3f} (erasure_rate {best['erasure_rate']:.3f}, "
                       f"preservation {best['preservation']:.3f}, step {best['step']})" if best else ""))
            if shown.get(p["concept"]) != line:
                shown[p["concept"]] = line
                print(time.strftime("%H:%M:%S") + line, file=out, flush=True)

    return show


@contextlib.contextmanager
def ray_output_off_stdout(enabled: bool = True):
    """Send file descriptor 1 to stderr while Ray runs; yields a stream to the real stdout.

    A Ray driver prints raylet warnings on stdout even with log_to_driver=False; stdout is
    for our progress lines and, with --json, for the JSON alone.
    """
    if not enabled:
        yield sys.stdout
        return
    sys.stdout.flush()
    real_stdout = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    try:
        yield real_stdout
    finally:
        sys.stdout.flush()
        real_stdout.flush()
        os.dup2(real_stdout.fileno(), 1)
        real_stdout.close()
