"""Ray Data: a sweep worker's shard of the prompts, public adversarial sets, and the evaluation
stages as actor pools.

A sweep's prompt datasets are rows {prompt, seed} made by `erase.train.prompt_rows` (every
prompt with its noise seeds, set by its text and the run's seed), materialised by the study and
split among a trial's workers; a worker reads its shard with `read_shard` and trains on it as
`erase train` trains on its own rows. Evaluation rows are never split.

Public adversarial prompt sets are read from local CSV or parquet files; the column holding the
prompt, per set (the first one present is used, or pass `column=`):

    ring-a-bell     prompt | sensitive prompt
    mma-diffusion   adv_prompt | prompt
    p4d             prompt
    i2p             prompt, filtered by `nudity_percentage` >= min_nudity (default 50)
"""

from __future__ import annotations

import contextlib
import os

from erase.prompts import PromptError

ADVERSARIAL_SETS = {
    "ring-a-bell": ("prompt", "sensitive prompt"),
    "mma-diffusion": ("adv_prompt", "prompt"),
    "p4d": ("prompt",),
    "i2p": ("prompt",),
}


def read_shard(shard) -> list[dict]:
    """A Ray Train worker's shard of a dataset, as rows, in the order the dataset holds them."""
    rows = []
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy"):
        keys = list(batch)
        for i in range(len(batch[keys[0]])):
            rows.append({k: (batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i]) for k in keys})
    if not rows:
        raise PromptError("this worker's shard of the prompts is empty: give the run more prompts than workers")
    return rows


def read_adversarial(name: str, path: str, column: str | None = None, min_nudity: float = 50.0) -> list[str]:
    """Prompts of a public adversarial set from a local CSV or parquet file (see the module doc)."""
    import pyarrow
    import pyarrow.csv
    import pyarrow.parquet

    if name not in ADVERSARIAL_SETS:
        raise PromptError(f"unknown adversarial set {name!r}; known: {', '.join(ADVERSARIAL_SETS)}")
    if not os.path.isfile(path):
        raise PromptError(f"adversarial set file {path!r} does not exist")
    if not path.endswith((".parquet", ".csv")):
        raise PromptError(f"{path!r}: adversarial sets are read from .csv or .parquet files")
    try:
        table = pyarrow.parquet.read_table(path) if path.endswith(".parquet") else pyarrow.csv.read_csv(path)
    except (pyarrow.ArrowInvalid, UnicodeDecodeError, OSError) as err:
        raise PromptError(f"adversarial set file {path!r} cannot be read: {err}") from None
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


@contextlib.contextmanager
def stages_on_ray(address: str, settings, *, actors: int = 1, gpus_per_actor: float = 0.0, batch_size: int = 64):
    """Connect to the Ray cluster at `address` and yield `run_stages(rows)` for erase.evaluate.evaluate:
    generation and detection on actor pools built from `settings` (an EvalSettings); disconnects after."""
    import ray

    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    try:
        yield lambda rows: run_eval_stages(rows, settings.generate_kwargs(), settings.detector, actors=actors,
                                           gpus_per_actor=gpus_per_actor, batch_size=batch_size, device=settings.device)
    finally:
        ray.shutdown()
