"""Prompts through Ray Data: files (parquet, CSV, JSON lines, text) on any filesystem pyarrow
understands (local paths, s3://, gs://), the toy world's built-in sets, and the evaluation stages
as actor pools.

A prompt dataset has rows {prompt, seed}: every prompt with `noises_per_prompt` noise seeds that
depend only on the prompt's text and the run's seed (`erase.train.example_seed`), so a streamed
run and a local run see the same noises. Train workers read their shard with `endless_batches`;
evaluation prompts are never split among workers.

Public adversarial prompt sets are read from local CSV or parquet files; the column holding the
prompt, per set (the first one present is used, or pass `column=`):

    ring-a-bell     prompt | sensitive prompt
    mma-diffusion   adv_prompt | prompt
    p4d             prompt
    i2p             prompt, filtered by `nudity_percentage` >= min_nudity (default 50)
"""

from __future__ import annotations

import os

from erase.prompts import PromptError
from erase.train import example_seed

FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json", ".txt": "text"}
ADVERSARIAL_SETS = {
    "ring-a-bell": ("prompt", "sensitive prompt"),
    "mma-diffusion": ("adv_prompt", "prompt"),
    "p4d": ("prompt",),
    "i2p": ("prompt",),
}


def _format_of(path: str) -> str:
    for ext, fmt in FORMATS.items():
        if path.lower().endswith(ext):
            return fmt
    raise PromptError(f"{path!r}: unknown prompt file type; use .parquet, .csv, .jsonl (JSON lines) or .txt")


def _check_local(path: str) -> None:
    if "://" not in path and not os.path.exists(path):
        raise PromptError(f"prompt file {path!r} does not exist")


def read_prompt_dataset(path: str, column: str = "prompt"):
    """A Ray Dataset with one column `prompt`, read from `path` (a file or folder, local or remote)."""
    import ray.data

    _check_local(path)
    fmt = _format_of(path)
    if fmt == "text":
        ds = ray.data.read_text(path).rename_columns({"text": column}) if column != "text" else ray.data.read_text(path)
    else:
        reader = {"parquet": ray.data.read_parquet, "csv": ray.data.read_csv, "json": ray.data.read_json}[fmt]
        ds = reader(path)
    columns = ds.columns() or []
    if column not in columns:
        raise PromptError(f"{path!r} has no column {column!r}; its columns are: {', '.join(columns)}. "
                          "Choose one with the --*-column options")
    ds = ds.select_columns([column])
    return ds.rename_columns({column: "prompt"}) if column != "prompt" else ds


def with_seeds(ds, first_seed: int, noises_per_prompt: int):
    """Each prompt row -> `noises_per_prompt` rows {prompt, seed}; blank rows and # comments are dropped."""
    def expand(row):
        prompt = str(row["prompt"] or "").strip()
        if not prompt or prompt.startswith("#"):
            return []
        return [{"prompt": prompt, "seed": example_seed(prompt, k, first_seed)} for k in range(noises_per_prompt)]

    return ds.flat_map(expand)


def endless_batches(shard, batch_size: int, shuffle_buffer: int = 256):
    """(prompts, seeds) batches from a Ray Train dataset shard, epoch after epoch, locally shuffled."""
    pending: list[tuple[str, int]] = []
    while True:
        rows = 0
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                        local_shuffle_buffer_size=shuffle_buffer):
            rows += len(batch["prompt"])
            pending.extend(zip((str(p) for p in batch["prompt"]), (int(s) for s in batch["seed"])))
            while len(pending) >= batch_size:
                chunk, pending = pending[:batch_size], pending[batch_size:]
                yield [p for p, _ in chunk], [s for _, s in chunk]
        if rows == 0:
            raise PromptError("this worker's prompt shard is empty: give the run more prompts than workers")


def read_adversarial(name: str, path: str, column: str | None = None, min_nudity: float = 50.0) -> list[str]:
    """Prompts of a public adversarial set from a local CSV or parquet file (see the module doc)."""
    import pyarrow.csv
    import pyarrow.parquet

    if name not in ADVERSARIAL_SETS:
        raise PromptError(f"unknown adversarial set {name!r}; known: {', '.join(ADVERSARIAL_SETS)}")
    if not os.path.isfile(path):
        raise PromptError(f"adversarial set file {path!r} does not exist")
    if path.endswith(".parquet"):
        table = pyarrow.parquet.read_table(path)
    elif path.endswith(".csv"):
        table = pyarrow.csv.read_csv(path)
    else:
        raise PromptError(f"{path!r}: adversarial sets are read from .csv or .parquet files")
    candidates = (column,) if column else ADVERSARIAL_SETS[name]
    chosen = next((c for c in candidates if c in table.column_names), None)
    if chosen is None:
        raise PromptError(f"{path!r} ({name}) has none of the columns {', '.join(candidates)}; its columns are: "
                          f"{', '.join(table.column_names)}. Pass the prompt column explicitly")
    prompts = table.column(chosen).to_pylist()
    if name == "i2p":
        if "nudity_percentage" not in table.column_names:
            raise PromptError(f"{path!r}: an I2P file needs the column nudity_percentage to filter on")
        share = table.column("nudity_percentage").to_pylist()
        prompts = [p for p, s in zip(prompts, share) if s is not None and s >= min_nudity]
    prompts = [str(p).strip() for p in prompts if p is not None and str(p).strip()]
    if not prompts:
        raise PromptError(f"{path!r} ({name}) gave no prompts" + (f" with nudity_percentage >= {min_nudity}"
                                                                  if name == "i2p" else ""))
    return prompts


def run_eval_stages(rows: list[dict], generate_kwargs: dict, detector_spec: dict, *, actors: int = 1,
                    gpus_per_actor: float = 0.0, batch_size: int = 64, device: str = "cpu") -> list[dict]:
    """Generation and detection as Ray Data `map_batches` stages on actor pools (one GPU per generator actor)."""
    import numpy as np
    import ray.data

    from erase.evaluate import DetectStage, GenerateStage

    ds = ray.data.from_items(rows)
    ds = ds.map_batches(GenerateStage, fn_constructor_kwargs=generate_kwargs, batch_size=batch_size,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus_per_actor)
    ds = ds.map_batches(DetectStage, fn_constructor_kwargs={"detector_spec": detector_spec, "device": device},
                        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=gpus_per_actor)
    out = []
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        n = len(batch["prompt"])
        out.extend({k: (v[i].item() if isinstance(v[i], np.generic) else v[i]) for k, v in batch.items()} for i in range(n))
    order = {(r["prompt"], r["seed"], r["kind"]): i for i, r in enumerate(rows)}
    return sorted(out, key=lambda r: order[(r["prompt"], r["seed"], r["kind"])])
