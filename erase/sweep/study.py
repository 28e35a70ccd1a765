"""One concept's study, in its own process: `python -m erase.sweep.study SPEC_JSON` (started by the driver).

It attaches to the driver's Ray cluster, builds the study's prompt datasets once, and runs a
Tuner: OptunaSearch (TPE) proposes each trial's settings from the space, ASHA stops poor trials
early on `score` (erase/trial.py), and every trial is erase/sweep/trial.py's Tune function. A
study that was interrupted is restored from its Tune state instead (`erase sweep --resume`).
It keeps `progress.json` current for the driver and ends by writing `summary.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
import zlib

from erase import config as run_config
from erase.sweep.spec import StudySpec, join, slug
from erase.trial import MASK_FILE, RUN_FILE, SCORE_FORMULA

DRIVER_RETRIES = 2  # times a trial runs again after its driver died; its workers have their own (trial.py)


def main(argv: list[str]) -> None:
    import logging

    import ray

    spec = StudySpec.read(argv[0])
    logging.getLogger("ray").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from erase.tracking import connect

    connect(spec.tracking_uri)
    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, logging_level=logging.ERROR)
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    # a worker's shard keeps the rows in the order they were made, so one worker trains on the very
    # batches `erase train` draws from the same prompts (erase.train.cycle_batches)
    context.execution_options.preserve_order = True
    summary = run_study(spec)
    with open(os.path.join(spec.study_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)


def run_study(spec: StudySpec) -> dict:
    """The concept's Tuner, new or restored, run to the end; returns the study's summary."""
    from ray import tune

    from erase.spaces import load_space
    from erase.sweep.trial import DRIVER_RESOURCE, trial

    space = load_space(spec.space, run_config.FILE_KEYS)
    datasets, hashes = prompt_datasets(spec, space.fixed)
    spec = dataclasses.replace(spec, fixed=space.fixed, prompt_hashes=hashes)
    # the trial function only waits (the Train worker holds the resources), on the head when pinned
    driver = {"cpu": 0.01, **({DRIVER_RESOURCE: 1} if spec.pin_drivers else {})}
    trainable = tune.with_resources(tune.with_parameters(trial, study=dataclasses.asdict(spec), datasets=datasets),
                                    driver)
    name = f"trial-{slug(spec.concept)}"
    tune.register_trainable(name, trainable)
    path = f"{join(spec.results_dir, 'tune')}/study"
    os.makedirs(spec.study_dir, exist_ok=True)
    progress = ProgressFile(os.path.join(spec.study_dir, "progress.json"), spec.concept, spec.trials)
    if tune.Tuner.can_restore(path):  # a restored Tuner keeps the callbacks it was made with
        clear_gave_up_markers(spec)  # --resume gives errored trials their workers' retries again
        tuner = tune.Tuner.restore(path, trainable=name, resume_errored=True)
    else:
        tuner = _new_tuner(spec, space, name, progress)
    return summary(spec, tuner.fit())


def clear_gave_up_markers(spec: StudySpec) -> None:
    import pyarrow.fs

    from erase.sweep.trial import GAVE_UP_FILE, train_storage

    filesystem, train_dir = train_storage(spec)
    for entry in filesystem.get_file_info(pyarrow.fs.FileSelector(train_dir, recursive=True, allow_not_found=True)):
        if entry.is_file and entry.base_name == GAVE_UP_FILE:
            filesystem.delete_file(entry.path)


def _new_tuner(spec: StudySpec, space, trainable: str, progress: "ProgressFile"):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    max_steps = int(space.fixed.get("steps") or space.search.get("steps", {}).get("high") or 400)
    storage = optuna.storages.RDBStorage(optuna_storage(spec))
    searcher = OptunaSearch(space=space.optuna_distributions(), metric="score", mode="max", storage=storage,
                            study_name=spec.study_name, sampler=tpe_sampler(spec))
    scheduler = ASHAScheduler(time_attr="step", max_t=max_steps, grace_period=min(spec.grace_steps, max_steps),
                              reduction_factor=2)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, metric="score", mode="max", num_samples=spec.trials,
                                    max_concurrent_trials=spec.max_concurrent, scheduler=scheduler),
        run_config=tune.RunConfig(name="study", storage_path=join(spec.results_dir, "tune"), verbose=0,
                                  # a trial whose driver died (its node lost) runs again, and its
                                  # TorchTrainer resumes from the trial's last checkpoint
                                  failure_config=tune.FailureConfig(max_failures=DRIVER_RETRIES),
                                  callbacks=[progress.callback, run_closer(spec)]))


def tpe_sampler(spec: StudySpec):
    """Optuna's TPE sampler for one concept's study.

    TPE draws its first `n_startup_trials` configurations at random, 10 by default: a sweep of 10
    trials or fewer would be a random search throughout. A third of the trials (2 to 10) are
    random here, the rest follow TPE. Each concept gets its own seed: with one shared seed every
    study drew the same configurations."""
    import optuna

    seed = spec.seed + zlib.crc32(spec.concept.encode()) % 100_000
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, spec.trials // 3)))


def prompt_datasets(spec: StudySpec, fixed: dict):
    """The erase, neutral, evaluation and test rows as materialised Ray Datasets, and the prompt sets' hashes.

    Made here once for all trials, from the same prompt_rows `erase train` uses (the seed and the
    starting noises cannot be searched, so every trial shares them). The evaluation rows, which
    trials report, ASHA stops and the sweep selects on, are the model's validation split (or
    --eval-prompts); the test rows, measured once at the end of a trial for the promotion gates,
    are its test split. A model without splits has no test rows. Materialised on this side: Ray
    Data tasks need free CPUs, which running trials hold."""
    import ray.data

    from erase.evaluate import evaluation_rows
    from erase.pipelines import model as model_entry
    from erase.prompts import prompt_set_hash, prompt_sets, read_prompts
    from erase.train import first_seeds, prompt_rows

    cfg = run_config.resolve(spec.model, spec.concept, fixed=fixed, fixed_from=f"space {spec.space}")
    erase_prompts, neutral_prompts = prompt_sets(spec.model, spec.concept, prompts=spec.prompts,
                                                 neutral=spec.neutral_prompts, column=spec.prompt_column)
    erase_first, neutral_first = first_seeds(cfg)
    eval_prompts = read_prompts(spec.eval_prompts, "evaluation prompt", spec.prompt_column) if spec.eval_prompts else None
    rows = {"erase": prompt_rows(erase_prompts, erase_first, cfg.noises_per_prompt, cfg.shared_noise),
            "neutral": prompt_rows(neutral_prompts, neutral_first, cfg.noises_per_prompt, cfg.shared_noise),
            "eval": evaluation_rows(spec.model, spec.concept, seeds_per_prompt=2, split="validation",
                                    prompts=eval_prompts, files={"prompts": spec.eval_prompts})}
    if model_entry(spec.model).splits:
        rows["test"] = evaluation_rows(spec.model, spec.concept, seeds_per_prompt=2, split="test")
    hashes = {name: prompt_set_hash(part) for name, part in rows.items()}
    return {name: ray.data.from_items(part).materialize() for name, part in rows.items()}, hashes


# a finished trial's figures on the test split, measured once at its end (erase.trial.run_trial's tester)
TEST_FIGURES = ("test_score", "test_erasure_rate", "test_erasure_rate_low", "test_erasure_rate_high", "test_erasure_n",
                "test_preservation", "test_robust_erasure_rate")


def summary(spec: StudySpec, results) -> dict:
    """Every trial's last report and status, and the best finished trial with its mask and MLflow run."""
    trials = []
    for r in results:
        m = r.metrics or {}
        trials.append({"trial": r.path.rstrip("/").rsplit("/", 1)[-1], "config": r.config,
                       "status": "error" if r.error else ("finished" if m.get("final") else "stopped"),
                       **{k: m.get(k) for k in ("score", "erasure_rate", "preservation", "base_rate", "sparsity",
                                                "step", "compute_seconds", "checkpoint_path", *TEST_FIGURES)},
                       "ended_at": m.get("timestamp")})
    out = {"concept": spec.concept, "sweep_id": spec.sweep_id, "space": spec.space, "trials": trials,
           "objective": SCORE_FORMULA, "study_dir": spec.study_dir, "results_dir": spec.results_dir,
           "optuna_storage": optuna_storage(spec), "optuna_study": spec.study_name}
    finished = [t for t in trials if t["score"] is not None and t["status"] == "finished"]
    if finished:
        best = max(finished, key=lambda t: t["score"])
        out["best"] = best
        if best.get("checkpoint_path"):
            best["mask_file"], best["mlflow_run_id"] = _fetch_best(spec, best["checkpoint_path"])
    return out


def optuna_storage(spec: StudySpec) -> str:
    return f"sqlite:///{os.path.join(spec.study_dir, 'optuna.db')}"


def _fetch_best(spec: StudySpec, checkpoint_path: str) -> tuple[str, str | None]:
    """The best trial's mask, copied next to the study's files, and its MLflow run id.

    Tune names a checkpoint by its path inside the storage's filesystem: with a URI storage
    (s3://bucket/...) that path has lost the scheme, which comes back from the storage."""
    import pyarrow.fs

    scheme = spec.storage.split("://", 1)[0] if "://" in spec.storage else None
    filesystem, folder = pyarrow.fs.FileSystem.from_uri(f"{scheme}://{checkpoint_path}" if scheme
                                                        else os.path.abspath(checkpoint_path))
    target = os.path.join(spec.study_dir, "best.safetensors")
    with filesystem.open_input_stream(f"{folder}/{MASK_FILE}") as source, open(target, "wb") as out:
        shutil.copyfileobj(source, out)
    with filesystem.open_input_stream(f"{folder}/{RUN_FILE}") as source:
        return target, json.loads(source.read()).get("mlflow_run_id")


def run_closer(spec: StudySpec):
    """A Tune callback that ends the MLflow run of a trial whose worker could not: a trial ASHA stops is
    killed with its Train worker, mid-report (KILLED, "stopped by ASHA at step N"); a trial that
    errors may have lost the process that held its run (FAILED, with Tune's error)."""
    from ray import tune

    from erase.tracking import end_trial_run

    def end(trial, status: str, reason: str) -> None:
        end_trial_run(spec.tracking_uri, spec.model, spec.concept, spec.sweep_id, trial.trial_id, status, reason)

    class _RunCloser(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            if not result.get("final"):  # a finished trial's worker ended its run itself
                end(trial, "KILLED", f"stopped by ASHA at step {result.get('step')}")

        def on_trial_error(self, iteration, trials, trial, **info):
            end(trial, "FAILED", f"trial error: {last_error_line(trial)}")

    return _RunCloser()


def last_error_line(trial) -> str:
    """The last line of a Tune trial's error file (the exception itself), or "unknown" without one."""
    path = getattr(trial, "error_file", None)
    if not path or not os.path.isfile(path):
        return "unknown"
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else "unknown"


class ProgressFile:
    """A Tune callback that keeps `progress.json` of a study current, for the driver's live display."""

    def __init__(self, path: str, concept: str, trials: int):
        from ray import tune

        progress = self

        class _Callback(tune.Callback):
            def on_trial_start(self, iteration, trials, trial, **info):
                progress.started.add(trial.trial_id)
                progress.write(trials)

            def on_trial_result(self, iteration, trials, trial, result, **info):
                progress.write(trials)

            def on_trial_complete(self, iteration, trials, trial, **info):
                progress.ended[trial.trial_id] = "done"
                progress.write(trials)

            def on_trial_error(self, iteration, trials, trial, **info):
                progress.ended[trial.trial_id] = "errored"
                progress.write(trials)

        self.path, self.concept, self.total = path, concept, trials
        self.ended: dict[str, str] = {}  # Tune calls back before it updates a trial's status
        self.best: dict | None = None
        self.started: set[str] = set()
        self.callback = _Callback()

    def write(self, trials) -> None:
        for t in trials:  # the best report so far (Tune does not always pass ended trials)
            r = t.last_result or {}
            if r.get("score") is not None and (self.best is None or r["score"] > self.best["score"]):
                self.best = {"score": r["score"], "erasure_rate": r.get("erasure_rate"),
                             "preservation": r.get("preservation"), "trial": t.trial_id, "step": r.get("step")}
        running = len(self.started - set(self.ended))
        ended = list(self.ended.values())
        info = {"concept": self.concept, "total": self.total, "running": running, "done": ended.count("done"),
                "errored": ended.count("errored"), "best": self.best, "time": time.time()}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, self.path)


if __name__ == "__main__":
    main(sys.argv[1:])
