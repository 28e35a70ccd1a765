"""One trial of an erasure: train, evaluate at every report, and hand each report to a reporter.

    run_trial(gen, cfg, erase_prompts, neutral_prompts, reporter, evaluator=None, resume=None)

Every `cfg.log_every` steps the recipe (erase/train.py) logs a row, and the row becomes a
`Report`: the row, the masks, the point to resume from and, with an evaluator, the figures on
the evaluator's rows with the trial's score. After the last step, or when the loss turns
non-finite, one final report carries the last good masks and the result. A reporter decides
what reports become:

- `LocalReporter` (`erase train`): at the end the mask file and its metrics JSON, and with an
  MLflow run, every row logged to it and the run finished with the mask;
- `erase.sweep.trial.RayReporter` (a sweep's Ray Train worker): a checkpoint per report
  (`Report.write_checkpoint`: the mask file, the resume point, the MLflow run id), MLflow
  metrics, and `ray.train.report`, on which Tune's ASHA and Optuna decide.

This module imports neither Ray nor MLflow.

The objective a sweep optimises, and the one number ASHA stops trials on:

    score = max(0, 1 - erasure_rate / base_rate) * preservation

1 = the concept never shows and every other concept is as it was; 0 = nothing erased or
everything broken. Both parts are reported beside it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import torch

from erase.config import TrainConfig
from erase.masks import Masks, save_mask_file
from erase.train import TrainingStopped, TrainResult, train

SCORE_FORMULA = "max(0, 1 - erasure_rate / base_rate) * preservation"
MASK_FILE, STATE_FILE, RUN_FILE = "mask.safetensors", "state.pt", "run.json"  # a checkpoint's payload


def score(erasure_rate: float, base_rate: float, preservation: float) -> float:
    """The scalar objective (see the module doc)."""
    if base_rate <= 0:
        return 0.0
    return max(0.0, 1.0 - erasure_rate / base_rate) * preservation


@dataclass
class Report:
    """One report of a trial: what the recipe logged at `step`, and what was measured then."""

    step: int
    row: dict  # the recipe's log row: losses and sparsity
    metrics: dict  # the row's numbers, and with an evaluator the figures and the score
    masks: Masks
    resume_point: dict | None  # train()'s TrainState.resume_point() at this step
    mask_file_meta: dict  # what save_mask_file needs besides the masks: model, sites, concept, threshold
    reproduce: dict  # what the mask file records to make it again (reproduction_record)
    final: bool = False
    status: str = "finished"  # "finished", or "stopped: ..." when the loss turned non-finite
    figures: dict | None = None  # the evaluator's report
    results: list[dict] | None = None  # the evaluated rows with their images (final report only)
    result: TrainResult | None = None  # the run's result (final report only)

    def save_mask(self, path: str, extra: dict) -> dict:
        return save_mask_file(path, self.masks, **self.mask_file_meta, extra={**extra, "reproduce": self.reproduce})

    def write_checkpoint(self, folder: str, *, metrics: dict, run_id: str | None, extra: dict) -> None:
        """The resume point of the trial into `folder`: its mask file, optimizer state and history, and its run."""
        self.save_mask(os.path.join(folder, MASK_FILE), extra)
        torch.save(self.resume_point, os.path.join(folder, STATE_FILE))
        with open(os.path.join(folder, RUN_FILE), "w") as f:
            json.dump({"mlflow_run_id": run_id, "metrics": metrics}, f)


def read_checkpoint(folder: str) -> tuple[dict, dict]:
    """(resume point, {mlflow_run_id, metrics}) of a checkpoint folder that `Report.write_checkpoint` wrote."""
    resume = torch.load(os.path.join(folder, STATE_FILE), weights_only=True)  # tensors and containers only
    with open(os.path.join(folder, RUN_FILE)) as f:
        return resume, json.load(f)


class Reporter(Protocol):
    def report(self, report: Report) -> None: ...

    def fail(self, error: BaseException) -> None:
        """The trial raised `error` (it is raised on after this)."""


def run_trial(gen, cfg: TrainConfig, erase_prompts: list, neutral_prompts: list, reporter: Reporter, *,
              evaluator=None, tester=None, resume: dict | None = None, progress: bool = False) -> TrainResult:
    """Train with a report every `cfg.log_every` steps and a final one; returns the recipe's result.

    `evaluator`: an erase.evaluate.Evaluator whose rows every report is measured on (a sweep's
    selection rows), or None to report the training rows alone. `tester`: one more Evaluator,
    on held-out test rows, measured on the final report only: its figures are the metrics
    `test_<figure>` that the promotion gates judge, and no selection sees them. `resume`: a resume point from a
    checkpoint (`read_checkpoint`). A non-finite loss ends the trial with its last good masks
    (the final report says so in its status); any other error reaches the reporter and is raised.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    mask_file_meta = dict(model_id=gen.model_id, model_sites=gen.mask_sites(), concept=cfg.concept,
                          threshold=cfg.threshold)
    reproduce = reproduction_record(cfg, erase_prompts, neutral_prompts)
    latest = {"point": resume}

    def make_report(row: dict, masks: Masks, final: bool = False, result: TrainResult | None = None) -> Report:
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        figures = results = None
        if evaluator is not None:
            figures, results = evaluator((masks.sites, masks.binary(threshold=cfg.threshold)))
            metrics.update(trial_figures(figures))
        if final and tester is not None:
            test, _ = tester((masks.sites, masks.binary(threshold=cfg.threshold)))
            metrics.update({f"test_{k}": v for k, v in trial_figures(test).items()})
            # the held-out erasure with its interval and n, so the sweep's summary can say how sure it is
            erasure = test.get("erasure_rate") or {}
            if erasure.get("n"):  # no concept rows: no interval, and metrics must stay numbers
                metrics.update(test_erasure_rate_low=erasure["low"], test_erasure_rate_high=erasure["high"],
                               test_erasure_n=erasure["n"])
            figures = {**(figures or {}), "test": test}
        metrics["step"] = int(row["step"])
        return Report(int(row["step"]), row, metrics, masks, latest["point"], mask_file_meta, reproduce, final=final,
                      status=result.status if result else "finished", figures=figures,
                      results=results if final else None, result=result)

    def on_log(row, state) -> None:
        latest["point"] = state.resume_point()
        if state.step < cfg.steps:  # the last step is reported once, after training
            reporter.report(make_report(row, state.masks))

    try:
        cfg = planned_memory(cfg, gen.model_id, gen.device)  # inside: a failure here reaches the reporter too
        try:
            result = train(gen, cfg, erase_prompts, neutral_prompts, progress=progress, on_log=on_log, resume=resume)
        except TrainingStopped as stopped:  # non-finite: the last good masks end the trial, and say so
            result = stopped.result
        last = result.history[-1] if result.history else {}
        reporter.report(make_report({**last, "step": result.steps_done}, result.masks, final=True, result=result))
    except BaseException as err:
        reporter.fail(err)
        raise
    return result


def reproduction_record(cfg: TrainConfig, erase_prompts: list, neutral_prompts: list) -> dict:
    """Everything a mask file records to be made again bit for bit: the whole configuration (its seed
    included), the prompt sets' hashes, the thread count and the versions of the project and torch."""
    from erase import __version__
    from erase.prompts import prompt_set_hash

    return {"config": json.loads(json.dumps(asdict(cfg), default=str)), "seed": cfg.seed,
            "prompts_sha": {"erase": prompt_set_hash(erase_prompts), "neutral": prompt_set_hash(neutral_prompts)},
            "threads": torch.get_num_threads(), "erase_version": __version__, "torch": torch.__version__}


def planned_memory(cfg: TrainConfig, model: str, device) -> TrainConfig:
    """`cfg` with the planner's cheapest memory setting that fits the GPU (erase plan: micro-batch,
    per-block checkpointing), when it runs on CUDA, the planner knows the model and no layer of the
    configuration chose either setting; else `cfg` as it is. Says what it chose on stderr."""
    from erase.plan import PlanError, flux_spec, plan

    if not cfg.plan_memory or torch.device(device).type != "cuda":
        return cfg
    try:
        flux_spec(model)
    except PlanError:
        return cfg
    memory_gb = torch.cuda.get_device_properties(device).total_memory / 2**30
    chosen = plan(model, cfg, memory_gb, device=str(device))
    setting = chosen["setting"]
    print(f"erase: memory setting from the planner: micro-batch {setting['micro_batch'] or 'the whole batch'}, "
          f"per-block checkpointing {'on' if setting['block_checkpointing'] else 'off'}; predicted peak "
          f"{chosen['peak_gb']:.1f} of {memory_gb:.0f} GiB{'' if chosen['fits'] else ' (does not fit: see erase plan)'}",
          file=sys.stderr)
    return replace(cfg, **setting)


def trial_figures(figures: dict) -> dict:
    """The numbers a trial reports from an evaluation: erasure, its base rate, preservation, fidelity, score."""
    value = {key: figures[key]["value"] for key in ("erasure_rate", "base_rate", "preservation", "neutral_fidelity",
                                                    "rephrase_erasure_rate", "robust_erasure_rate") if key in figures}
    value["score"] = score(value["erasure_rate"], value["base_rate"] or 0.0, value["preservation"] or 0.0)
    return {k: v for k, v in value.items() if v is not None}


class LocalReporter:
    """`erase train`'s reporter: at the end the mask file and its metrics JSON; with an MLflow run
    (erase.tracking.RunLogger), every row logged to it and the run finished with the mask."""

    def __init__(self, mask_path: str, metrics_path: str, *, model: str, logger=None):
        self.mask_path, self.metrics_path, self.model, self.logger = mask_path, metrics_path, model, logger
        self.metrics: dict | None = None  # the run's metrics, once it ended
        self.latest: Report | None = None  # the last report before the end: what Ctrl-C saves

    def report(self, report: Report) -> None:
        if self.logger is not None:
            self.logger.metrics(report.row, step=report.step)
        if not report.final:
            self.latest = report
            return
        result = report.result
        metrics = {**result.metrics(), "model": self.model, "concept": result.config.concept,
                   "mask_file": os.path.abspath(self.mask_path)}
        extra = {"status": result.status, "steps_done": result.steps_done}
        if result.learnt_target is not None:
            extra["learnt_target"] = result.learnt_target
        report.save_mask(self.mask_path, extra)
        with open(self.metrics_path, "w") as f:
            json.dump(metrics, f, indent=2)
        if self.logger is not None:
            self.logger.metrics({"sparsity": metrics["sparsity"]["overall"]}, step=result.steps_done)
            self.logger.finish(self.mask_path, metrics, status="FINISHED" if result.status == "finished" else "FAILED")
            metrics["mlflow_run_id"] = self.logger.run_id
        self.metrics = metrics

    def fail(self, error: BaseException) -> None:
        if isinstance(error, KeyboardInterrupt):
            self.save_interrupted()
        if self.logger is not None:
            self.logger.fail(f"{type(error).__name__}: {error}")

    def save_interrupted(self) -> None:
        """Ctrl-C: the last reported mask at the mask path, and its resume point (`Report.write_checkpoint`)
        in the folder `resume_folder(mask path)`, which `erase train --resume` continues from."""
        if self.latest is None:
            return
        folder = resume_folder(self.mask_path)
        os.makedirs(folder, exist_ok=True)
        extra = {"status": f"interrupted after step {self.latest.step}", "steps_done": self.latest.step}
        self.latest.save_mask(self.mask_path, extra)
        self.latest.write_checkpoint(folder, metrics=self.latest.metrics, run_id=None, extra=extra)


def resume_folder(mask_path: str) -> str:
    """Where an interrupted `erase train` keeps its resume point: beside its mask, MASK.resume/."""
    return os.path.splitext(mask_path)[0] + ".resume"
