"""One sweep trial on Ray: a Tune function that runs a TorchTrainer, and the Train workers' loop.

    trial(sampled)     Tune calls it with Optuna's draw: resolve the trial's TrainConfig, run a
                       TorchTrainer with `workers_per_trial` workers, each asking for the spec's
                       GPUs (pending until the autoscaler brings them) and CPUs, and wait for it
    worker_loop(plan)  each Train worker: its generator and its shard of the prompts, then
                       erase.trial.run_trial with a RayReporter

Reports reach Tune through TuneReportCallback; each carries a checkpoint (the mask file, the
optimizer state, the MLflow run id), and a worker that dies restarts from the last one, up to
twice (Train's FailureConfig), in the same MLflow run. A trial whose driver dies (the node that
held it lost) is run again by Tune (the study's FailureConfig) and its TorchTrainer resumes from
the same checkpoints; a trial Train gave up on is not run again until `erase sweep --resume`. `--workers-per-trial N` makes a trial
data-parallel: the erase and neutral rows are split among the workers (the mask gradients are
averaged across them, erase/train.py); the evaluation rows are not split. Only rank 0 writes
checkpoints and logs to MLflow.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import tempfile
import time

from erase import config as run_config
from erase.sweep.spec import StudySpec, TrialPlan, join
from erase.trial import MASK_FILE, Report

# The custom resource the cluster's head advertises (deploy/raycluster.yaml's head rayStartParams): every
# trial driver asks for one unit, so drivers (and the Train controllers Ray places beside them) live
# on the head and a lost GPU node costs only its worker, which restarts from its checkpoint.
DRIVER_RESOURCE = "erase_driver"
DRIVER_SLOTS = 1000  # units the head advertises: at most this many trials at once
GAVE_UP_FILE = "gave-up.txt"  # in the trial's Train run folder once its workers' retries ran out


def trial(sampled: dict, *, study: dict, datasets: dict) -> None:
    """Tune function trainable: one TorchTrainer run of the recipe with the sampled settings."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = StudySpec(**study)
    cfg = run_config.resolve(spec.model, spec.concept, fixed=spec.fixed, fixed_from=f"space {spec.space}",
                             sampled=sampled,
                             # a worker computes with as many threads as it has CPUs: `erase train --threads N`
                             # repeats its mask bit for bit
                             flags={"log_every": spec.report_every, "threads": max(1, int(spec.cpus_per_worker))})
    context = tune.get_context()
    plan = TrialPlan(spec, cfg, sampled, context.get_trial_id(), context.get_trial_name())
    resources = {"CPU": spec.cpus_per_worker}
    if spec.gpus_per_worker > 0:
        resources[spec.accelerator] = spec.gpus_per_worker
    filesystem, train_dir = train_storage(spec)
    gave_up = f"{train_dir}/{plan.trial_name}/{GAVE_UP_FILE}"  # on the storage: every node's driver sees it
    if filesystem.get_file_info(gave_up).is_file:  # Tune runs a trial again when its driver died, not when Train gave up
        with filesystem.open_input_stream(gave_up) as f:
            raise TrainGaveUp(f.read().decode())
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True  # each worker's shard keeps the rows' order: erase train's batches, one worker
    trainer = TorchTrainer(
        worker_loop, train_loop_config=plan.to_dict(),
        scaling_config=ray.train.ScalingConfig(num_workers=spec.workers_per_trial, use_gpu=spec.device == "cuda",
                                               resources_per_worker=resources),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["erase", "neutral"], execution_options=ingest),
        run_config=ray.train.RunConfig(
            # the trial's name as the run's: a resumed sweep finds the run's checkpoints again
            name=plan.trial_name, storage_path=join(spec.results_dir, "train"),
            failure_config=ray.train.FailureConfig(max_failures=2),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2), callbacks=[TuneReportCallback()]),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as error:
        filesystem.create_dir(f"{train_dir}/{plan.trial_name}", recursive=True)
        with filesystem.open_output_stream(gave_up) as f:
            f.write(f"Ray Train gave up on this trial after its workers' retries: {error}".encode())
        raise


def train_storage(spec: StudySpec):
    """(pyarrow filesystem, path) of the study's Train runs: a shared folder or a URI storage."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(join(spec.results_dir, "train"))


class TrainGaveUp(RuntimeError):
    """A trial that Ray Train already gave up on: Tune's retry (meant for a lost driver) ends at once."""


def worker_loop(loop_config: dict) -> None:
    """One trial's erasure on one Train worker (erase.trial.run_trial), resumed from a checkpoint if any."""
    import ray.train

    from erase.data import read_shard
    from erase.evaluate import Evaluator
    from erase.pipelines import load_generator
    from erase.trial import read_checkpoint, run_trial

    started = time.time()  # the trial's own compute: model load, training, evaluation (not Ray's scheduling)
    plan = TrialPlan.from_dict(loop_config)
    spec, rank = plan.study, ray.train.get_context().get_world_rank()
    gen = load_generator(spec.model, spec.model_path, dtype=spec.dtype, device=spec.device,
                         guidance=spec.guidance)
    resume, saved = None, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume, saved = read_checkpoint(folder)
    logger = _run_logger(plan, gen, saved.get("mlflow_run_id")) if rank == 0 else None
    reporter = RayReporter(plan, rank, logger, started - saved.get("metrics", {}).get("compute_seconds", 0.0))
    if spec.reporter:
        module, _, name = spec.reporter.partition(":")
        reporter = getattr(importlib.import_module(module), name)(reporter, plan)
    evaluator = Evaluator(gen, spec.detector, read_shard(ray.train.get_dataset_shard("eval")), concept=spec.concept,
                          steps=plan.config.sampling_steps)
    test_shard = ray.train.get_dataset_shard("test")  # None for a model without splits
    tester = None if test_shard is None else Evaluator(gen, spec.detector, read_shard(test_shard), concept=spec.concept,
                                                       steps=plan.config.sampling_steps)
    run_trial(gen, plan.config, read_shard(ray.train.get_dataset_shard("erase")),
              read_shard(ray.train.get_dataset_shard("neutral")), reporter, evaluator=evaluator, tester=tester,
              resume=resume)


def _run_logger(plan: TrialPlan, gen, run_id: str | None):
    """The trial's MLflow run: continued when the worker restarted, or when the trial already has one."""
    from erase.masks import fingerprint
    from erase.tracking import RunLogger

    spec, cfg = plan.study, plan.config
    params = {**{k: getattr(cfg, k) for k in ("target", "substitutions") if getattr(cfg, k)}, **plan.searched,
              **spec.fixed}
    tags = {"erase.sweep": spec.sweep_id, "erase.trial": plan.trial_id, "erase.fingerprint": fingerprint(gen.mask_sites()),
            "erase.space": spec.space, "erase.prompts_sha": spec.prompt_hashes["erase"],
            "erase.neutral_sha": spec.prompt_hashes["neutral"], "erase.eval_sha": spec.prompt_hashes["eval"]}
    return RunLogger(spec.tracking_uri, spec.model, spec.concept, run_name=plan.trial_name, params=params, tags=tags,
                     run_id=run_id)


class RayReporter:
    """A report becomes a checkpoint (rank 0), MLflow metrics (rank 0) and ray.train.report (every rank:
    it is a barrier across a trial's workers); the final one also finishes the MLflow run with the mask
    and a base-vs-masked grid."""

    def __init__(self, plan: TrialPlan, rank: int, logger, clock_start: float):
        self.plan, self.rank, self.logger = plan, rank, logger
        self.clock_start = clock_start  # this trial's compute so far counts from here, earlier attempts included

    def report(self, report: Report) -> None:
        import ray.train

        metrics = {**report.metrics, "compute_seconds": time.time() - self.clock_start}
        with tempfile.TemporaryDirectory() as folder:
            if self.rank == 0:
                extra = {"sweep": self.plan.study.sweep_id, "trial": self.plan.trial_id, "step": report.step,
                         **{k: metrics[k] for k in ("erasure_rate", "preservation", "score")}}
                report.write_checkpoint(folder, metrics=metrics, run_id=self.logger.run_id, extra=extra)
                self.logger.metrics(metrics, step=report.step)
                if report.final:
                    self._finish_run(report, metrics, folder)
            checkpoint = ray.train.Checkpoint.from_directory(folder) if self.rank == 0 else None
            ray.train.report({**metrics, "final": int(report.final)}, checkpoint=checkpoint)

    def _finish_run(self, report: Report, metrics: dict, folder: str) -> None:
        """The MLflow run ends with the checkpoint's mask, its figures and a base-vs-masked grid."""
        from erase.evaluate import grid_rows, save_image_grid

        if report.status != "finished":
            self.logger.tag("erase.status", report.status)
        grid = os.path.join(folder, "grid.png")
        save_image_grid(grid_rows(report.results, self.plan.study.concept), grid)
        self.logger.finish(os.path.join(folder, MASK_FILE), {
            "figures": json.loads(json.dumps(report.figures, default=str)), "metrics": metrics,
            "config": dataclasses.asdict(self.plan.config)}, grid_png=grid)

    def fail(self, error: BaseException) -> None:
        """Train restarts the worker from its last checkpoint (FailureConfig); the run keeps the reason."""
        if self.logger is not None and isinstance(error, Exception):
            self.logger.tag("erase.last_error", f"{type(error).__name__}: {error}"[:4000])
