"""Prompt sets for an erasure run: the concept's prompts (C_R), neutral prompts (C_N), targets.

Prompt files are read here, whatever their type or filesystem; a model's own default sets come
from its registry entry (erase.pipelines): the toy world's prompts, or templates and everyday
captions for FLUX.1.
"""

from __future__ import annotations

import os
import re

from erase.errors import EraseError


class PromptError(EraseError):
    """A prompt set is empty, unreadable or does not fit the target; the message says what to do."""


# Prompt files by ending: text with one prompt per line, or a table with a prompt column.
PROMPT_FORMATS = {".txt": "text", ".csv": "csv", ".parquet": "parquet", ".jsonl": "json", ".json": "json"}


def read_prompts(path: str, what: str, column: str = "prompt") -> list[str]:
    """Prompts from a file, local or on any filesystem pyarrow understands (s3://, gs://):
    .txt one per line (blank lines and lines starting with # skipped), or the `column` of a
    .csv, .parquet or .jsonl table. Every prompt set of the project is read here."""
    import pyarrow

    if "://" not in path and not os.path.isfile(path):
        raise PromptError(f"{what} file {path!r} does not exist")
    fmt = next((f for ending, f in PROMPT_FORMATS.items() if path.lower().endswith(ending)), None)
    if fmt is None:
        raise PromptError(f"{what} file {path!r}: unknown type; use .txt (one per line), .csv, .parquet or .jsonl")
    try:
        prompts = _text_lines(path) if fmt == "text" else _table_column(path, fmt, column, what)
    except (UnicodeDecodeError, pyarrow.ArrowInvalid, OSError) as err:
        raise PromptError(f"{what} file {path!r} cannot be read: {err}. Save it as UTF-8 text (one prompt per "
                          "line) or as a .csv, .parquet or .jsonl table") from None
    if not prompts:
        raise PromptError(f"{what} file {path!r} has no prompts; put one prompt per line (or per row)")
    return prompts


def _text_lines(path: str) -> list[str]:
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(path) if "://" in path else (pyarrow.fs.LocalFileSystem(), path)
    with fs.open_input_stream(inner) as f:
        lines = f.read().decode("utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _table_column(path: str, fmt: str, column: str, what: str) -> list[str]:
    import pyarrow.dataset

    table = pyarrow.dataset.dataset(path, format=fmt).to_table()
    if column not in table.column_names:
        raise PromptError(f"{what} file {path!r} has no column {column!r}; its columns are: "
                          f"{', '.join(table.column_names)}")
    return [str(p).strip() for p in table.column(column).to_pylist() if p is not None and str(p).strip()]


def prompt_set_hash(prompts) -> str:
    """A short sha256 of a prompt set: its distinct prompt texts, sorted (rows {prompt, ...} or strings),
    so that the same set hashes alike however many noises or seeds each prompt has, in any order."""
    import hashlib

    texts = sorted({str(p["prompt"]) if isinstance(p, dict) else str(p) for p in prompts})
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()[:16]


def parse_substitutions(items: list[str] | None) -> dict[str, str]:
    """`OLD=NEW` pairs from the command line into a map."""
    mapping = {}
    for item in items or []:
        old, sep, new = item.partition("=")
        if not sep or not old.strip():
            raise PromptError(f"--substitute takes OLD=NEW (e.g. 'nude man=a man'), got {item!r}")
        mapping[old.strip()] = new.strip()
    return mapping


def substitute(prompt: str, mapping: dict[str, str]) -> str:
    """The 'de-conceptualised' prompt: every key of `mapping` found in `prompt` as a whole word or
    phrase replaced by its phrase."""
    out = prompt
    for old in sorted(mapping, key=len, reverse=True):  # longest first: "nude man" before "nude"
        # whole words only: the toy bar's synonym "strip" must not turn "striped" into "shapeed"
        # (a key that starts or ends with a space or a comma has its edge already)
        edges = (r"(?<!\w)" if old[:1].isalnum() else "", r"(?!\w)" if old[-1:].isalnum() else "")
        out = re.sub(edges[0] + re.escape(old) + edges[1], lambda _, new=mapping[old]: new, out)
    if out == prompt:
        keys = ", ".join(repr(k) for k in mapping)
        raise PromptError(f"substitute target: prompt {prompt!r} contains none of {keys}; "
                          "add a --substitute OLD=NEW entry for it or use --target empty")
    return " ".join(out.split())


def prompt_sets(model: str, concept: str, *, prompts: str | None = None, neutral: str | None = None,
                column: str = "prompt") -> tuple[list[str], list[str]]:
    """A run's (concept prompts, neutral prompts): the files where given, else the model's own sets."""
    from erase.pipelines import model as model_entry

    erase_prompts, neutral_prompts = model_entry(model).prompt_sets(concept)
    if prompts:
        erase_prompts = read_prompts(prompts, "concept prompt", column)
        warn_unknown_words(model, erase_prompts, f"--prompts {prompts}")
    if neutral:
        neutral_prompts = read_prompts(neutral, "neutral prompt", column)
        warn_unknown_words(model, neutral_prompts, f"--neutral-prompts {neutral}")
    return erase_prompts, neutral_prompts


def warn_unknown_words(model: str, prompts: list[str], source: str) -> None:
    """A warning on stderr when the model's text encoder has no token for some words of the user's
    prompts (the toy world knows its own few dozen words): such a prompt is generated, but from
    'unknown' tokens, and one made only of them shows nothing it asks for."""
    import sys

    from erase.pipelines import model as model_entry

    read_words = model_entry(model).read_words
    if read_words is None:
        return
    read = {prompt: read_words(prompt) for prompt in prompts}
    words = sorted({word for _, unknown in read.values() for word in unknown})
    if not words:
        return
    blind = [prompt for prompt, (known, _) in read.items() if not known]
    shown = ", ".join(map(repr, words[:12])) + (f" and {len(words) - 12} more" if len(words) > 12 else "")
    print(f"erase: warning: {model} has no token for {shown} in {sum(bool(u) for _, u in read.values())} of "
          f"{len(prompts)} prompts ({source}) and reads each as 'unknown'"
          + (f"; {len(blind)} prompts (e.g. {blind[0]!r}) have no word it knows and show nothing they ask for"
             if blind else "") + ". The README's toy-world section lists its words", file=sys.stderr)
