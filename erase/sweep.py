"""`erase sweep`: Ray Tune + Optuna over a search space, one study per concept, every trial in MLflow.

    driver (erase sweep)             one subprocess per concept           per trial
    ------------------------         ---------------------------          ------------------------------
    ray.init (local, or --address)   ray.init(address)                    Tune function trainable
    MLflow experiments               Tuner(OptunaSearch, ASHA)            -> TorchTrainer, 1 worker
    live progress, final tables      (or Tuner.restore on --resume)       -> the MCE recipe (erase.train)

- One Optuna study per concept (OptunaSearch cannot grid over concepts). Studies run in
  parallel subprocesses attached to the same Ray cluster, each sharing out the trial slots
  (Tune's registry is not safe to drive from threads; a process per study also makes Ctrl-C
  save every study's state).
- The objective is a documented scalarisation, reported with both parts:
      score = max(0, 1 - erasure_rate / base_rate) * preservation
  1 = the concept never shows and every other concept is as it was; 0 = nothing erased or
  everything broken. ASHA stops trials early on `score`, reported every `report_every` steps.
- A trial is a Tune function that builds a `TorchTrainer` (Train V2) with one worker, pinned
  to one GPU where the cluster has GPUs (the CPU otherwise); `--workers-per-trial N` makes it
  data-parallel (the mask gradients are averaged across workers). Reports reach Tune through
  `TuneReportCallback`; each report carries a checkpoint (mask file + optimizer state), and a
  failed worker restarts from it (`FailureConfig(max_failures=2)`), not from scratch.
- Prompts are Ray Data datasets {prompt, seed}: the erase and neutral sets are split among a
  trial's workers and streamed in batches; evaluation prompts are never split. They are
  materialised once on the driver: Ray Data tasks need free CPUs, which running trials hold.
- Every trial is an MLflow run (erase.tracking), logged by Train rank 0 only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib

from erase import config as run_config
from erase.config import TrainConfig
from erase.errors import EraseError

GPUS_PER_WORKER = 1  # one Train worker per GPU; raycluster.yaml's GPU pods match (tests/test_raycluster.py)
SCORE_FORMULA = "max(0, 1 - erasure_rate / base_rate) * preservation"


class SweepError(EraseError):
    """The sweep cannot start as asked; the message says what to change."""


@dataclasses.dataclass
class SweepSpec:
    """Everything one concept's study needs, as plain values (it crosses into a subprocess as JSON)."""

    sweep_id: str
    concept: str
    model: str = "toy"
    model_path: str | None = None
    space: str = "toy_fast"
    trials: int = 4
    max_concurrent: int = 1
    storage: str = "erase-sweeps"
    tracking_uri: str | None = None
    workers_per_trial: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    dtype: str = "fp32"
    guidance: float | None = None
    report_every: int = 25
    grace_steps: int = 50
    prompts: str | None = None
    neutral_prompts: str | None = None
    eval_prompts: str | None = None
    prompt_column: str = "prompt"
    detector: dict | None = None
    seed: int = 0
    fail_once_at_step: int | None = None  # resilience tests: the first worker of each trial dies once here

    @property
    def study_dir(self) -> str:
        return _join(self.storage, self.sweep_id, _slug(self.concept))

    @property
    def study_name(self) -> str:
        return f"{self.sweep_id}-{_slug(self.concept)}"


def _slug(text: str) -> str:
    from erase.tracking import slug

    return slug(text)


def _join(*parts: str) -> str:
    first, rest = parts[0], parts[1:]
    if "://" in first:
        return "/".join([first.rstrip("/"), *rest])
    return os.path.join(os.path.abspath(first), *rest)


def score(erasure_rate: float, base_rate: float, preservation: float) -> float:
    """The scalar objective (see the module doc)."""
    if base_rate <= 0:
        return 0.0
    return max(0.0, 1.0 - erasure_rate / base_rate) * preservation


# ---------------------------------------------------------------- the train worker


def _rows_from_shard(shard) -> list[dict]:
    rows = []
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy"):
        keys = list(batch)
        for i in range(len(batch[keys[0]])):
            rows.append({k: (batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i]) for k in keys})
    return rows


def worker_loop(config: dict) -> None:
    """One trial's erasure on one Train worker: the recipe, with reports, checkpoints and MLflow."""
    import ray.train
    import torch

    from erase.data import endless_batches
    from erase.detectors import build_detector
    from erase.evaluate import DetectStage, EvalSettings, GenerateStage, evaluate, grid_rows, save_image_grid
    from erase.masks import Masks, save_mask_file
    from erase.pipelines import load_generator
    from erase.train import TrainingStopped, train

    started = time.time()  # the trial's own compute: model load, training, evaluation (not Ray's scheduling)
    spec = SweepSpec(**config["spec"])
    cfg = TrainConfig(**config["train"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(max(1, int(spec.cpus_per_worker)))
    device = "cuda" if spec.use_gpu else "cpu"
    gen = load_generator(spec.model, spec.model_path, dtype=spec.dtype, device=device, guidance=spec.guidance)
    sites = gen.mask_sites()

    resume, run_id, earlier_seconds = None, None, 0.0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = torch.load(os.path.join(folder, "state.pt"), weights_only=True)
            with open(os.path.join(folder, "run.json")) as f:
                saved = json.load(f)
            run_id = saved.get("mlflow_run_id")
            earlier_seconds = saved.get("metrics", {}).get("compute_seconds", 0.0)

    logger = None
    if rank == 0:
        from erase.masks import fingerprint
        from erase.tracking import RunLogger

        logger = RunLogger(config["tracking_uri"], spec.model, spec.concept, run_name=config["trial_name"],
                           params={**{k: config["train"][k] for k in ("target", "substitutions") if config["train"][k]},
                                   **config["searched"], **config["fixed"]}, run_id=run_id,
                           tags={"erase.sweep": spec.sweep_id, "erase.trial": config["trial_id"],
                                 "erase.fingerprint": fingerprint(sites), "erase.space": spec.space,
                                 "erase.prompts_sha": config["prompt_hashes"]["erase"],
                                 "erase.neutral_sha": config["prompt_hashes"]["neutral"],
                                 "erase.eval_sha": config["prompt_hashes"]["eval"]})
        run_id = logger.run_id

    eval_rows = _rows_from_shard(ray.train.get_dataset_shard("eval"))
    detector = DetectStage(detector=build_detector(spec.detector, device=device))
    settings = EvalSettings(model=spec.model, concept=spec.concept, attack=None, steps=cfg.sampling_steps)
    fail_marker = os.path.join(config["marker_dir"], f"failed-{config['trial_id']}")

    def figures_of(masks: Masks) -> tuple[dict, list[dict]]:
        stage = GenerateStage(gen=gen, masks=(masks.sites, masks.binary(threshold=cfg.threshold)), steps=cfg.sampling_steps)
        stage.base_cache = base_cache
        return evaluate(settings, eval_rows, stages=(stage, detector))

    base_cache: dict = {}

    def report(row: dict, masks: Masks, resume_point: dict, final: bool = False) -> dict:
        found, results = figures_of(masks)
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        metrics.update(erasure_rate=found["erasure_rate"]["value"], base_rate=found["base_rate"]["value"],
                       preservation=found["preservation"]["value"], neutral_fidelity=found["neutral_fidelity"]["value"])
        if "rephrase_erasure_rate" in found:
            metrics["rephrase_erasure_rate"] = found["rephrase_erasure_rate"]["value"]
        metrics["score"] = score(metrics["erasure_rate"], metrics["base_rate"] or 0.0, metrics["preservation"] or 0.0)
        metrics = {k: v for k, v in metrics.items() if v is not None}
        metrics["step"] = int(row["step"])
        metrics["compute_seconds"] = earlier_seconds + time.time() - started
        with tempfile.TemporaryDirectory() as folder:
            mask_path = os.path.join(folder, "mask.safetensors")
            if rank == 0:
                save_mask_file(mask_path, masks, model_id=spec.model, model_sites=sites, concept=spec.concept,
                               threshold=cfg.threshold, extra={"sweep": spec.sweep_id, "trial": config["trial_id"],
                                                               "step": metrics["step"], **{k: metrics[k] for k in
                                                               ("erasure_rate", "preservation", "score")}})
                torch.save(resume_point, os.path.join(folder, "state.pt"))
                with open(os.path.join(folder, "run.json"), "w") as f:
                    json.dump({"mlflow_run_id": run_id, "metrics": metrics}, f)
                logger.metrics(metrics, step=metrics["step"])
                if final:
                    grid = os.path.join(folder, "grid.png")
                    save_image_grid(grid_rows(results, spec.concept), grid)
                    logger.finish(mask_path, {"figures": _plain(found), "metrics": metrics,
                                              "config": dataclasses.asdict(cfg)}, grid_png=grid)
            ckpt = ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
            ray.train.report({**metrics, "final": int(final)}, checkpoint=ckpt)
        return metrics

    latest: dict = {}

    def on_log(row, state) -> None:
        latest["point"] = state.resume_point()
        if state.step < cfg.steps:  # the last step is reported once, after training
            report(row, state.masks, latest["point"])
        if spec.fail_once_at_step is not None and state.step >= spec.fail_once_at_step and rank == 0 \
                and not os.path.exists(fail_marker):
            os.makedirs(os.path.dirname(fail_marker), exist_ok=True)
            open(fail_marker, "w").close()
            raise RuntimeError(f"injected worker failure after step {state.step} (resilience test)")

    erase_batches = endless_batches(ray.train.get_dataset_shard("erase"), cfg.batch_size)
    neutral_batches = endless_batches(ray.train.get_dataset_shard("neutral"), cfg.batch_size)
    try:
        result = train(gen, cfg, erase_batches, neutral_batches, progress=False, on_log=on_log, resume=resume)
        status = "finished"
    except TrainingStopped as stopped:  # NaN: keep the last good mask, report it, end the trial
        result, status = stopped.result, str(stopped)
    except Exception as err:
        if logger is not None:
            logger.client.set_tag(logger.run_id, "erase.last_error", f"{type(err).__name__}: {err}"[:4000])
        raise  # Train restarts the worker from the last checkpoint (FailureConfig)
    last = result.history[-1] if result.history else {"step": result.steps_done}
    if rank == 0 and status != "finished":
        logger.client.set_tag(logger.run_id, "erase.status", status)
    report({**last, "step": result.steps_done}, result.masks, latest.get("point") or resume, final=True)


def _plain(value):
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------- the Tune trial


def trial(config: dict, *, spec: dict, fixed: dict, datasets: dict, prompt_hashes: dict) -> None:
    """Tune function trainable: one TorchTrainer run of the recipe with the sampled hyperparameters."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    sweep = SweepSpec(**spec)
    train_cfg = run_config.resolve(sweep.model, sweep.concept, fixed=fixed, fixed_from=f"space {sweep.space}",
                                   sampled=config, flags={"log_every": sweep.report_every})
    ctx = tune.get_context()
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"spec": spec, "train": dataclasses.asdict(train_cfg), "searched": config, "fixed": fixed,
                           "trial_id": ctx.get_trial_id(), "trial_name": ctx.get_trial_name(),
                           "tracking_uri": sweep.tracking_uri, "prompt_hashes": prompt_hashes,
                           "marker_dir": _join(sweep.study_dir, "markers") if "://" not in sweep.storage else tempfile.gettempdir()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=sweep.workers_per_trial, use_gpu=sweep.use_gpu,
            resources_per_worker={"GPU": GPUS_PER_WORKER, "CPU": sweep.cpus_per_worker} if sweep.use_gpu else {"CPU": sweep.cpus_per_worker}),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["erase", "neutral"]),
        run_config=ray.train.RunConfig(
            # the trial's name as the run's: a resumed sweep finds the run's checkpoints again
            name=ctx.get_trial_name(), storage_path=_join(sweep.study_dir, "train"),
            failure_config=ray.train.FailureConfig(max_failures=2),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


# ---------------------------------------------------------------- one study (runs in its own process)


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
        best = self.best
        running = len(self.started - set(self.ended))
        ended = list(self.ended.values())
        info = {"concept": self.concept, "total": self.total, "running": running, "done": ended.count("done"),
                "errored": ended.count("errored"), "best": best, "time": time.time()}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, self.path)


def _prompt_sets(spec: SweepSpec, fixed: dict):
    """(erase prompts, neutral prompts, eval rows) as Ray Datasets, materialised; and their hashes."""
    import ray.data

    from erase.data import read_prompt_dataset, with_seeds
    from erase.evaluate import evaluation_rows
    from erase.prompts import prompt_sets, read_prompts
    from erase.tracking import prompts_hash
    from erase.train import first_seeds

    settings = run_config.resolve(spec.model, spec.concept, fixed=fixed, fixed_from=f"space {spec.space}")
    erase_first, neutral_first = first_seeds(settings)  # the seed and noises cannot be searched: plan()
    noises = settings.noises_per_prompt
    erase_list, neutral_list = prompt_sets(spec.model, spec.concept)
    if spec.prompts:
        erase_ds = read_prompt_dataset(spec.prompts, spec.prompt_column)
    else:
        erase_ds = ray.data.from_items([{"prompt": p} for p in erase_list])
    if spec.neutral_prompts:
        neutral_ds = read_prompt_dataset(spec.neutral_prompts, spec.prompt_column)
    else:
        neutral_ds = ray.data.from_items([{"prompt": p} for p in neutral_list])
    erase_ds = with_seeds(erase_ds, erase_first, noises).materialize()
    neutral_ds = with_seeds(neutral_ds, neutral_first, noises).materialize()
    source = spec.eval_prompts or spec.prompts
    concept_list = read_prompts(source, "evaluation prompt", spec.prompt_column) if source else None
    rows = evaluation_rows(spec.model, spec.concept, seeds_per_prompt=1, prompts=concept_list)
    eval_ds = ray.data.from_items(rows).materialize()
    hashes = {name: prompts_hash(sorted(str(r["prompt"]) for r in ds.take_all()))
              for name, ds in (("erase", erase_ds), ("neutral", neutral_ds), ("eval", eval_ds))}
    if erase_ds.count() == 0:
        from erase.prompts import PromptError

        raise PromptError(f"no prompts for the concept {spec.concept!r}")
    return {"erase": erase_ds, "neutral": neutral_ds, "eval": eval_ds}, hashes


def tpe_sampler(spec: SweepSpec):
    """Optuna's TPE sampler for one concept's study.

    TPE draws its first `n_startup_trials` configurations at random, 10 by default: a sweep of 10
    trials or fewer would be a random search throughout. A third of the trials (2 to 10) are
    random here, the rest follow TPE. Each concept gets its own seed: with one shared seed every
    study drew the same configurations."""
    import optuna

    seed = spec.seed + zlib.crc32(spec.concept.encode()) % 100_000
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, spec.trials // 3)))


def run_study(spec: SweepSpec) -> dict:
    """One concept's Tuner: a new study, or the saved one when it can be restored. Returns its summary."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from erase.spaces import load_space

    space = load_space(spec.space, run_config.FILE_KEYS)
    datasets, hashes = _prompt_sets(spec, space.fixed)
    trainable = tune.with_resources(
        tune.with_parameters(trial, spec=dataclasses.asdict(spec), fixed=space.fixed, datasets=datasets,
                             prompt_hashes=hashes),
        {"cpu": 0.01})  # the trial function only waits on its trainer; the Train worker holds the real resources
    name = f"trial-{_slug(spec.concept)}"
    tune.register_trainable(name, trainable)
    tune_dir = _join(spec.study_dir, "tune")
    path = f"{tune_dir}/study"
    local = "://" not in spec.storage
    if local:
        os.makedirs(spec.study_dir, exist_ok=True)
    progress = ProgressFile(os.path.join(spec.study_dir if local else tempfile.gettempdir(), "progress.json"),
                            spec.concept, spec.trials)
    max_steps = int(space.fixed.get("steps") or space.search.get("steps", {}).get("high") or 400)
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=name, resume_errored=True)
    else:
        storage = optuna.storages.RDBStorage(f"sqlite:///{os.path.join(spec.study_dir, 'optuna.db')}") if local else None
        searcher = OptunaSearch(space=space.optuna_distributions(), metric="score", mode="max", storage=storage,
                                study_name=spec.study_name, sampler=tpe_sampler(spec))
        tuner = tune.Tuner(
            name,
            tune_config=tune.TuneConfig(
                search_alg=searcher, metric="score", mode="max", num_samples=spec.trials,
                max_concurrent_trials=spec.max_concurrent,
                scheduler=ASHAScheduler(time_attr="step", max_t=max_steps, grace_period=min(spec.grace_steps, max_steps),
                                        reduction_factor=2)),
            run_config=tune.RunConfig(name="study", storage_path=tune_dir, verbose=0,
                                      callbacks=[progress.callback]),
        )
    results = tuner.fit()
    trials = []
    for r in results:
        m = r.metrics or {}
        trials.append({"trial": r.path.rstrip("/").rsplit("/", 1)[-1], "config": r.config,
                       "status": "error" if r.error else ("finished" if m.get("final") else "stopped"),
                       **{k: m.get(k) for k in ("score", "erasure_rate", "preservation", "base_rate", "sparsity",
                                                "step", "compute_seconds", "checkpoint_path")},
                       "ended_at": m.get("timestamp")})
    summary = {"concept": spec.concept, "sweep_id": spec.sweep_id, "space": spec.space, "trials": trials,
               "objective": SCORE_FORMULA, "study_dir": spec.study_dir,
               "optuna_storage": f"sqlite:///{os.path.join(spec.study_dir, 'optuna.db')}" if local else None,
               "optuna_study": spec.study_name}
    finished = [t for t in trials if t["score"] is not None and t["status"] == "finished"]
    if finished:
        best = max(finished, key=lambda t: t["score"])
        summary["best"] = best
        if local and best.get("checkpoint_path"):
            target = os.path.join(spec.study_dir, "best.safetensors")
            shutil.copyfile(os.path.join(best["checkpoint_path"], "mask.safetensors"), target)
            summary["best"]["mask_file"] = target
            with open(os.path.join(best["checkpoint_path"], "run.json")) as f:
                summary["best"]["mlflow_run_id"] = json.load(f).get("mlflow_run_id")
    return summary


# ---------------------------------------------------------------- the driver


def new_sweep_id(model: str) -> str:
    return f"{_slug(model)}-{time.strftime('%Y%m%d-%H%M%S')}"


def plan(model: str, concepts: list[str], space: str, trials: int, storage: str, *, resume: str | None = None,
         **options) -> list[SweepSpec]:
    """Check the request and make one SweepSpec per concept (a resumed sweep keeps its saved specs)."""
    from erase.spaces import load_space

    if resume:
        folder = _join(storage, resume)
        if "://" in storage or not os.path.isdir(folder):
            raise SweepError(f"no sweep {resume!r} under {storage!r} to resume; sweeps there: "
                             f"{', '.join(sorted(os.listdir(storage))) if os.path.isdir(storage) else 'none'}")
        specs = []
        for name in sorted(os.listdir(folder)):
            spec_file = os.path.join(folder, name, "spec.json")
            if os.path.isfile(spec_file):
                with open(spec_file) as f:
                    specs.append(SweepSpec(**json.load(f)))
        if not specs:
            raise SweepError(f"sweep {resume!r} has no study specs in {folder}")
        return specs
    if trials < 1:
        raise SweepError(f"--trials must be at least 1, got {trials}")
    if not concepts:
        raise SweepError("no concepts: pass --concepts A,B (the toy world's default is striped)")
    loaded = load_space(space, run_config.FILE_KEYS)
    for key in run_config.NOT_SEARCHABLE:
        if key in loaded.search:
            raise SweepError(f"{loaded.path}: {key!r} sets the prompt streams' noise seeds and cannot be searched; "
                             "move it to `fixed`")
    if "recipe" in loaded.search:
        raise SweepError(f"{loaded.path}: 'recipe' names the settings every trial starts from and cannot be "
                         "searched; move it to `fixed` (or search the settings themselves)")
    from erase.pipelines import model as model_entry
    from erase.prompts import read_prompts

    for concept in concepts:
        model_entry(model).prompt_sets(concept)  # a clear error for a concept the model does not have
        run_config.resolve(model, concept, fixed=loaded.fixed, fixed_from=f"{loaded.path}: fixed")  # bad values now

    for key, what in (("prompts", "concept prompt"), ("neutral_prompts", "neutral prompt"), ("eval_prompts", "evaluation prompt")):
        if options.get(key):  # a missing, unreadable or empty file fails here, before Ray starts
            read_prompts(options[key], what, options.get("prompt_column", "prompt"))
    sweep_id = new_sweep_id(model)
    return [SweepSpec(sweep_id=sweep_id, concept=c, model=model, space=space, trials=trials, storage=storage, **options)
            for c in concepts]


def _start_ray(address: str | None):
    """Connect to --address, or start a Ray head inside this process for the sweep's lifetime."""
    import logging

    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    else:
        # a small machine: more logical CPUs than cores, so that Ray Data and the trial drivers find
        # room next to the Train workers; a small object store (prompt sets are tiny)
        cores = os.cpu_count() or 2
        # The head's processes are our children, in the terminal's process group: they inherit an
        # ignored SIGINT, so that a Ctrl-C reaches the studies (which save their state) and this
        # driver (which then shuts the head down), and never kills the head under them first.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            # address="local": always a new head, never a stray cluster some earlier run left behind
            ray.init(address="local", num_cpus=max(4, 2 * cores), object_store_memory=256 * 2**20,
                     log_to_driver=False, logging_level=logging.ERROR)
        finally:
            signal.signal(signal.SIGINT, previous)
    return ray


def _slots(resources: dict, workers_per_trial: int, cpus_per_worker: float, local: bool) -> tuple[bool, int]:
    """(use GPUs?, concurrent trials in all): one trial per GPU, else one per CPU core (of this machine
    when Ray runs locally with more logical CPUs than cores)."""
    gpus = int(resources.get("GPU", 0))
    if gpus > 0:
        return True, max(1, gpus // workers_per_trial)
    cpus = (os.cpu_count() or 1) if local else int(resources.get("CPU", 1))
    return False, max(1, int(cpus // (cpus_per_worker * workers_per_trial)))


def run_sweep(specs: list[SweepSpec], *, address: str | None = None, on_progress=None, poll: float = 2.0) -> list[dict]:
    """Run every concept's study as a subprocess on one Ray cluster; returns their summaries.

    The trial slots (GPUs, or CPU cores locally) are shared out: with at least as many slots as
    studies all studies run at once; with more studies than slots, `slots` studies run at a time
    with one trial each, and the next starts when one ends. On Ctrl-C every running study saves
    its state; `erase sweep --resume ID` continues without losing finished trials.
    """
    from erase.tracking import connect, ensure_experiment

    if "://" in specs[0].storage:
        raise SweepError("the driver keeps study specs and logs in a local --storage folder; on a cluster use a "
                         "shared filesystem path such as /mnt/erase/sweeps (see the README)")
    uri = connect(specs[0].tracking_uri)
    for spec in specs:
        spec.tracking_uri = uri
        ensure_experiment(spec.model, spec.concept)  # once, here: SQLite schema creation is not multi-process safe
    started = time.time()
    ray = _start_ray(address)
    try:
        use_gpu, slots = _slots(ray.cluster_resources(), specs[0].workers_per_trial, specs[0].cpus_per_worker,
                                local=address is None)
        at_once = min(len(specs), slots)
        for spec in specs:  # every spec on disk first: a resumed sweep finds the studies that had not started too
            spec.use_gpu = use_gpu
            spec.max_concurrent = max(1, slots // len(specs))
            os.makedirs(spec.study_dir, exist_ok=True)
            with open(os.path.join(spec.study_dir, "spec.json"), "w") as f:
                json.dump(dataclasses.asdict(spec), f, indent=2)
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
        waiting, running, ended = list(specs), [], []
        interrupted = False
        try:
            while waiting or running:
                while waiting and len(running) < at_once:
                    running.append(_start_study(waiting.pop(0), env))
                for child in [c for c in running if c[2].poll() is not None]:
                    running.remove(child)
                    ended.append(child)
                if on_progress is not None:
                    on_progress(_read_progress(specs))
                time.sleep(poll)
        except KeyboardInterrupt:
            interrupted = True
            for _, _, proc in running:  # a Ctrl-C at a terminal reaches them already; a signal to us alone does not
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
            for _, _, proc in running:
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
            ended.extend(running)
        if on_progress is not None:
            on_progress(_read_progress(specs))
        for _, log, _ in ended:
            log.close()
        if interrupted:
            raise KeyboardInterrupt(f"sweep {specs[0].sweep_id} interrupted; every study saved its state. Continue "
                                    f"with: erase sweep --resume {specs[0].sweep_id} --storage {specs[0].storage}")
        summaries = []
        for spec, log, proc in sorted(ended, key=lambda c: specs.index(c[0])):
            summary_file = os.path.join(spec.study_dir, "summary.json")
            if proc.returncode != 0 or not os.path.isfile(summary_file):
                raise SweepError(f"the study for {spec.concept!r} failed (exit {proc.returncode}); its log: "
                                 f"{os.path.join(spec.study_dir, 'study.log')}:\n{_tail(log.name)}")
            with open(summary_file) as f:
                summaries.append(json.load(f))
        costs = orchestration(summaries, time.time() - started, at_once * max(1, specs[0].max_concurrent))
        for summary in summaries:
            summary["sweep_cost"] = costs
        return summaries
    finally:
        ray.shutdown()


def orchestration(summaries: list[dict], wall_seconds: float, slots: int) -> dict:
    """The sweep's wall time against its trials' own compute (model load, training, evaluation).

    `overhead` = wall time / (trial compute / concurrent slots): 1.0 would be a sweep that cost
    nothing beyond its trials; the rest is Ray's start-up and scheduling, worker start-up,
    checkpointing and the idle tail of the last trials. (A resumed sweep counts this session's
    wall time only.)
    """
    compute = sum(t.get("compute_seconds") or 0.0 for s in summaries for t in s["trials"])
    return {"wall_seconds": round(wall_seconds, 1), "trial_compute_seconds": round(compute, 1), "slots": slots,
            "overhead": round(wall_seconds / (compute / slots), 2) if compute > 0 else None}


def _start_study(spec: SweepSpec, env: dict):
    """Start a study's process (its spec.json is written); returns (spec, log file, process)."""
    spec_file = os.path.join(spec.study_dir, "spec.json")
    for stale in ("summary.json", "progress.json"):
        if os.path.exists(os.path.join(spec.study_dir, stale)):
            os.remove(os.path.join(spec.study_dir, stale))
    log = open(os.path.join(spec.study_dir, "study.log"), "a")
    return spec, log, subprocess.Popen([sys.executable, "-m", "erase.sweep", spec_file], stdout=log,
                                       stderr=subprocess.STDOUT, env=env)


def _read_progress(specs: list[SweepSpec]) -> list[dict]:
    out = []
    for spec in specs:
        path = os.path.join(spec.study_dir, "progress.json")
        try:
            with open(path) as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            out.append({"concept": spec.concept, "total": spec.trials, "running": 0, "done": 0, "errored": 0,
                        "best": None})
    return out


def _tail(path: str, lines: int = 25) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _study_main(argv: list[str]) -> None:
    """Entry of a study subprocess: `python -m erase.sweep SPEC_JSON_FILE` (started by `run_sweep`)."""
    import logging

    import ray

    with open(argv[0]) as f:
        spec = SweepSpec(**json.load(f))
    logging.getLogger("ray").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from erase.tracking import connect

    connect(spec.tracking_uri)
    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, logging_level=logging.ERROR)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    summary = run_study(spec)
    out = os.path.join(spec.study_dir, "summary.json")
    with open(out, "w") as f:
        json.dump(summary, f, indent=2, default=str)


if __name__ == "__main__":
    _study_main(sys.argv[1:])
