"""What crosses a sweep's process boundaries, each once: plain values that travel as JSON.

    driver --StudySpec (spec.json)--> study process --StudySpec + datasets (with_parameters)-->
    Tune trial --TrialPlan (train_loop_config)--> Ray Train workers
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from erase.config import TrainConfig
from erase.errors import EraseError
from erase.pipelines import DEFAULT_MODEL
from erase.tracking import slug

DEFAULT_STATE_DIR = "erase-sweeps"  # relative to where `erase sweep` runs
RETIRED_KEYS = ("fail_once_at_step",)  # in the spec.json of sweeps started before the test reporter replaced it


class SweepError(EraseError):
    """The sweep cannot start as asked; the message says what to change."""


@dataclass
class StudySpec:
    """Everything one concept's study needs. The driver writes it; the study adds what it derives."""

    sweep_id: str
    concept: str
    model: str = DEFAULT_MODEL
    model_path: str | None = None
    space: str = "toy_fast"
    trials: int = 4
    max_concurrent: int = 1
    # Checkpoints and Tune's results: a folder every node sees, or a URI Ray accepts (s3://, gs://).
    storage: str = DEFAULT_STATE_DIR
    # The sweep's own files (spec.json, the study's log, progress and summary, the Optuna study, the
    # best mask): a local folder on the driver's machine. None: `storage`, which is then a folder.
    state_dir: str | None = None
    tracking_uri: str | None = None
    workers_per_trial: int = 1
    # Asked of Ray whatever the cluster has when the sweep starts: a pending request is the
    # autoscaler's demand. `accelerator` is the Ray resource they are asked as: "GPU" (the worker
    # then runs on CUDA), or a custom resource that stands in for GPUs on a test cluster (the
    # worker then runs on the CPU of the node that has it).
    gpus_per_worker: float = 0.0
    accelerator: str = "GPU"
    cpus_per_worker: float = 1.0
    pin_drivers: bool = False  # trial drivers ask for erase.sweep.trial.DRIVER_RESOURCE (the head's)
    dtype: str | None = None  # None: the model's default (bf16 for the FLUX.1 checkpoints)
    guidance: float | None = None
    report_every: int = 25
    grace_steps: int = 50
    prompts: str | None = None
    neutral_prompts: str | None = None
    eval_prompts: str | None = None
    prompt_column: str = "prompt"
    detector: dict | None = None
    seed: int = 0
    # "module:Class" of a reporter that wraps the Ray reporter in each Train worker: Class(reporter, plan).
    # The resilience tests inject a worker failure with one; production sweeps leave it None.
    reporter: str | None = None
    # set by the study process: the space's fixed settings and the hashes of its prompt sets
    fixed: dict = field(default_factory=dict)
    prompt_hashes: dict = field(default_factory=dict)

    @classmethod
    def read(cls, path: str) -> "StudySpec":
        """A study's spec.json. Keys that older versions wrote and this one no longer has are dropped."""
        with open(path) as f:
            values = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        if "use_gpu" in values:  # before GPUs were requested per worker, a sweep either used them or not
            values.setdefault("gpus_per_worker", 1.0 if values.pop("use_gpu") else 0.0)
        unknown = set(values) - known - set(RETIRED_KEYS)
        if unknown:
            raise SweepError(f"{path} has settings this version of erase does not know ({', '.join(sorted(unknown))}): "
                             "resume it with the version that started it")
        for key in ("storage", "state_dir"):  # sweeps started before paths were made absolute
            if values.get(key) and "://" not in values[key]:
                values[key] = os.path.abspath(values[key])
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def device(self) -> str:
        """Where a Train worker runs the model: CUDA when it holds real GPUs."""
        return "cuda" if self.gpus_per_worker > 0 and self.accelerator == "GPU" else "cpu"

    @property
    def study_dir(self) -> str:
        """The study's own files: always a local folder."""
        return join(self.state_dir or self.storage, self.sweep_id, slug(self.concept))

    @property
    def results_dir(self) -> str:
        """The study's checkpoints and Tune state: a folder or a URI."""
        return join(self.storage, self.sweep_id, slug(self.concept))

    @property
    def study_name(self) -> str:
        return f"{self.sweep_id}-{slug(self.concept)}"


@dataclass
class TrialPlan:
    """One trial, as its Ray Train workers receive it: the study, the resolved config, what was sampled."""

    study: StudySpec
    config: TrainConfig
    searched: dict  # the values Optuna drew for this trial
    trial_id: str
    trial_name: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrialPlan":
        return cls(**{**values, "study": StudySpec(**values["study"]), "config": TrainConfig(**values["config"])})


def state_folder(storage: str, state_dir: str | None) -> str | None:
    """Where a sweep keeps its own files: `state_dir`, else `storage` when that is a folder, else the
    local default (a URI storage keeps only checkpoints and results)."""
    if state_dir:
        return state_dir
    return DEFAULT_STATE_DIR if "://" in storage else None


def join(*parts: str) -> str:
    first, rest = parts[0], parts[1:]
    if "://" in first:
        return "/".join([first.rstrip("/"), *rest])
    return os.path.join(os.path.abspath(first), *rest)
