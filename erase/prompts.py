"""Prompt sets for an erasure run: the concept's prompts (C_R), neutral prompts (C_N), targets.

Defaults for real text-to-image models are a handful of templates around the concept and a small
set of everyday captions written for this project (the paper uses Conceptual Captions; any
caption set works, pass your own with --neutral-prompts FILE).
"""

from __future__ import annotations

import os

from erase.errors import EraseError

CONCEPT_TEMPLATES = (
    "{c}",
    "a photo of {c}",
    "a painting of {c}",
    "a picture of {c} in a city street",
    "a close-up photo of {c}",
    "an illustration of {c} on a white background",
    "{c} in the style of a movie still",
    "a realistic image of {c}, natural light",
)

NEUTRAL_PROMPTS = (
    "a bowl of fruit on a wooden table",
    "a mountain lake at sunrise",
    "a red bicycle leaning against a brick wall",
    "a busy market street in the afternoon",
    "a cup of coffee next to an open book",
    "a lighthouse on a rocky coast",
    "a dog running on a beach",
    "a modern kitchen with white cabinets",
    "a field of sunflowers under a blue sky",
    "an old train station with people waiting",
    "a snowy forest path",
    "a plate of pasta with basil",
    "a city skyline at night",
    "a sailboat on a calm sea",
    "a cat sleeping on a sofa",
    "a vegetable garden in summer",
)


class PromptError(EraseError):
    """A prompt set is empty, unreadable or does not fit the target; the message says what to do."""


def concept_prompts(concept: str) -> list[str]:
    if not concept.strip():
        raise PromptError("the concept is empty; pass --concept with the words to erase, e.g. --concept 'Van Gogh'")
    return [t.format(c=concept) for t in CONCEPT_TEMPLATES]


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
    """The 'de-conceptualised' prompt: every key of `mapping` found in `prompt` replaced by its phrase."""
    out = prompt
    for old in sorted(mapping, key=len, reverse=True):  # longest first: "nude man" before "nude"
        out = out.replace(old, mapping[old])
    if out == prompt:
        keys = ", ".join(repr(k) for k in mapping)
        raise PromptError(f"substitute target: prompt {prompt!r} contains none of {keys}; "
                          "add a --substitute OLD=NEW entry for it or use --target empty")
    return " ".join(out.split())


def toy_prompt_sets(concept: str) -> tuple[list[str], list[str]]:
    """The toy world's sets: prompts naming the concept with every value of two other attributes,
    and as neutral prompts the same for every other concept of its group (none names it)."""
    from erase.pipelines import toy_world as world

    if concept not in world.all_concepts():
        groups = "; ".join(f"{g}: {', '.join(m)}" for g, m in world.GROUPS.items())
        raise PromptError(f"the toy world has no concept {concept!r}; its concepts are {groups}")
    group = world.GROUPS[world.group_of(concept)]
    neutral = [p for other in group if other != concept for p in world.concept_prompts(other)]
    return world.concept_prompts(concept), neutral


def default_prompt_sets(model: str, concept: str) -> tuple[list[str], list[str]]:
    """(concept prompts, neutral prompts) when the user gives no prompt files."""
    if model == "toy":
        return toy_prompt_sets(concept)
    return concept_prompts(concept), list(NEUTRAL_PROMPTS)
