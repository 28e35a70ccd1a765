"""The sweep's driver (`erase sweep`): plan the studies, start Ray, run one study process per concept.

- One Optuna study per concept (OptunaSearch cannot grid over concepts), each in its own process
  (erase/sweep/study.py) attached to the same Ray cluster: Tune's registry is not safe to drive
  from threads, and a process per study makes a Ctrl-C save every study's state.
- Trials ask for what the request says, not for what is up at start: each Train worker asks
  for `--gpus-per-trial` / workers GPUs (the model's default: one for the FLUX.1 checkpoints,
  none for the toy world), so that on a cluster that scales from zero the pending trials are the
  autoscaler's demand. The number of trials at once (`--max-concurrent`) defaults to the most
  GPUs the autoscaler may bring up, else to the GPUs up now; CPU trials to the CPU cores.
- Those slots are shared out: with at least as many slots as studies every study runs at once;
  with more studies than slots, that many run at a time with one trial each, and the next
  starts when one ends.
- Trial drivers are pinned to the head when it advertises erase.sweep.trial.DRIVER_RESOURCE
  (raycluster.yaml's head does; a local Ray started here does too): Ray Train places each
  trial's controller beside its driver, so a lost GPU node costs only its worker.
- The driver creates every MLflow experiment before a trial starts (SQLite schema creation from
  many processes at once races), shows each study's progress from its progress.json, and ends
  with the studies' summaries and the sweep's orchestration cost.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

from erase import config as run_config
from erase.sweep.spec import StudySpec, SweepError, join, slug, state_folder
from erase.sweep.trial import DRIVER_RESOURCE, DRIVER_SLOTS


RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a `ray job submit` entrypoint


def new_sweep_id(model: str) -> str:
    return f"{slug(model)}-{time.strftime('%Y%m%d-%H%M%S')}"


def plan(model: str, concepts: list[str], space: str, trials: int, storage: str, *, resume: str | None = None,
         **options) -> list[StudySpec]:
    """Check the request and make one StudySpec per concept (a resumed sweep keeps its saved specs).

    Everything that can be checked without Ray is checked here: the concepts, the space and its
    fixed settings, the prompt files, paths that a Ray job would lose."""
    state_dir = state_folder(storage, options.get("state_dir"))
    if resume:
        specs = _saved_specs(state_dir or storage, resume)
        _check_paths_outlive_a_ray_job(specs[0].storage, specs[0].state_dir, specs[0].tracking_uri)
        return specs
    _check_paths_outlive_a_ray_job(storage, state_dir, options.get("tracking_uri"))
    # absolute from here: a trial driver runs in Tune's trial folder, not where `erase sweep` ran
    storage, options["state_dir"] = absolute(storage), absolute(state_dir)
    if trials < 1:
        raise SweepError(f"--trials must be at least 1, got {trials}")
    options["gpus_per_worker"] = _gpus_per_worker(model, options.pop("gpus_per_trial", None),
                                                  options.get("workers_per_trial", 1))
    if not concepts:
        raise SweepError("no concepts: pass --concepts A,B (the toy world's default is striped)")
    _check_space(model, concepts, space)
    from erase.pipelines import model as model_entry
    from erase.prompts import read_prompts

    options["detector"] = options.get("detector") or model_entry(model).detector
    if options["detector"] is None:
        raise SweepError(f"{model} has no detector of its own to score trials with: pass one "
                         "(erase sweep --detector nudenet, or clip with --detector-config)")

    for key, what in (("prompts", "concept prompt"), ("neutral_prompts", "neutral prompt"),
                      ("eval_prompts", "evaluation prompt")):
        if options.get(key):  # a missing, unreadable or empty file fails here, before Ray starts
            read_prompts(options[key], what, options.get("prompt_column", "prompt"))
    sweep_id = new_sweep_id(model)
    return [StudySpec(sweep_id=sweep_id, concept=c, model=model, space=space, trials=trials, storage=storage, **options)
            for c in concepts]


def absolute(path: str | None) -> str | None:
    """A folder made absolute against this process's working directory; a URI or None as it is."""
    return path if path is None or "://" in path else os.path.abspath(path)


def _gpus_per_worker(model: str, gpus_per_trial: float | None, workers_per_trial: int) -> float:
    """Each Train worker's share of --gpus-per-trial; the model's own default when it is not given."""
    from erase.pipelines import model as model_entry

    if workers_per_trial < 1:
        raise SweepError(f"--workers-per-trial must be at least 1, got {workers_per_trial}")
    if gpus_per_trial is None:
        return float(model_entry(model).gpus_per_worker)
    if gpus_per_trial < 0:
        raise SweepError(f"--gpus-per-trial must be 0 (CPU trials) or more, got {gpus_per_trial}")
    share = gpus_per_trial / workers_per_trial
    if share > 1 and share != int(share):
        raise SweepError(f"--gpus-per-trial {gpus_per_trial:g} over {workers_per_trial} workers gives each "
                         f"{share:g} GPUs: Ray places a worker on whole GPUs above one; pass a multiple of "
                         f"--workers-per-trial")
    return share


def _check_paths_outlive_a_ray_job(storage: str, state_dir: str | None, tracking_uri: str | None) -> None:
    """Under `ray job submit` the working directory is Ray's runtime cache, which Ray deletes: relative
    paths would put the sweep's state and runs there."""
    if RAY_JOB_ENV not in os.environ:
        return
    lost = []
    if "://" not in storage and not os.path.isabs(storage):
        lost.append(f"--storage {storage!r}")
    if state_dir and not os.path.isabs(state_dir):
        lost.append(f"--state-dir {state_dir!r}")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        lost.append("the default MLflow store ./mlflow.db")
    elif uri.startswith("sqlite:///") and not os.path.isabs(uri[len("sqlite:///"):]):
        lost.append(f"--tracking-uri {uri!r}")
    if lost:
        raise SweepError(f"erase sweep runs as a Ray job, whose working directory ({os.getcwd()}) Ray deletes: "
                         f"{', '.join(lost)} would be lost with it. Pass paths every node sees, e.g. --storage "
                         "/mnt/erase/sweeps (or an s3:// URI with an absolute --state-dir), and --tracking-uri "
                         "http://mlflow.erase.svc.cluster.local:5000 (or sqlite:////an/absolute/mlflow.db)")


def _saved_specs(storage: str, sweep_id: str) -> list[StudySpec]:
    folder = join(storage, sweep_id)
    if not os.path.isdir(folder):
        raise SweepError(f"no sweep {sweep_id!r} under {storage!r} to resume; sweeps there: "
                         f"{', '.join(sorted(os.listdir(storage))) if os.path.isdir(storage) else 'none'}")
    specs = []
    for name in sorted(os.listdir(folder)):
        spec_file = os.path.join(folder, name, "spec.json")
        if os.path.isfile(spec_file):
            specs.append(StudySpec.read(spec_file))
    if not specs:
        raise SweepError(f"sweep {sweep_id!r} has no study specs in {folder}")
    return specs


def _check_space(model: str, concepts: list[str], space: str) -> None:
    """The space loads, searches nothing a study fixes, and its fixed values are settings of the right types."""
    from erase.pipelines import model as model_entry
    from erase.spaces import load_space

    loaded = load_space(space, run_config.FILE_KEYS)
    for key in run_config.NOT_SEARCHABLE:
        if key in loaded.search:
            raise SweepError(f"{loaded.path}: {key!r} sets the prompt streams' noise seeds and cannot be searched; "
                             "move it to `fixed`")
    if "recipe" in loaded.search:
        raise SweepError(f"{loaded.path}: 'recipe' names the settings every trial starts from and cannot be "
                         "searched; move it to `fixed` (or search the settings themselves)")
    # each fixed value is checked now; the settings as a whole are validated per trial, with its draw
    run_config.check_settings(model, loaded.fixed, f"{loaded.path}: fixed")
    for concept in concepts:
        model_entry(model).prompt_sets(concept)  # a clear error for a concept the model does not have


def run_sweep(specs: list[StudySpec], *, address: str | None = None, max_concurrent: int | None = None,
              on_progress=None, poll: float = 2.0) -> list[dict]:
    """Run every concept's study as a subprocess on one Ray cluster; returns their summaries.

    `max_concurrent` trials run at once over all studies (default: see the module's docstring).
    On Ctrl-C every running study saves its state; `erase sweep --resume ID` continues without
    losing finished trials.
    """
    from erase.tracking import connect, ensure_experiment

    if max_concurrent is not None and max_concurrent < 1:
        raise SweepError(f"--max-concurrent must be at least 1, got {max_concurrent}")
    uri = connect(specs[0].tracking_uri)
    for spec in specs:
        spec.tracking_uri = uri
        ensure_experiment(spec.model, spec.concept)  # once, here: SQLite schema creation is not multi-process safe
    started = time.time()
    ray = _start_ray(address)
    try:
        slots = max_concurrent or _slots(specs[0], ray.cluster_resources(), _autoscaler_maximum(),
                                         local=address is None)
        slots = min(slots, sum(spec.trials for spec in specs))  # an unbounded autoscaler: no more than the trials
        at_once = min(len(specs), slots)
        pin = ray.cluster_resources().get(DRIVER_RESOURCE, 0) > 0
        if not pin:
            print(f"erase sweep: no node of this cluster advertises the {DRIVER_RESOURCE!r} resource, so trial "
                  "drivers may land on GPU nodes, and losing one loses its trials' drivers too; start the head with "
                  f"`ray start --head --resources '{{\"{DRIVER_RESOURCE}\": {DRIVER_SLOTS}}}'` (raycluster.yaml "
                  "does)", file=sys.stderr)
        _write_specs(specs, max(1, slots // len(specs)), pin)
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
        ended = _run_studies(specs, env, at_once, on_progress, poll)
        summaries = [_summary_of(spec, log, proc) for spec, log, proc in sorted(ended, key=lambda c: specs.index(c[0]))]
        costs = orchestration(summaries, time.time() - started, at_once * max(1, specs[0].max_concurrent))
        for summary in summaries:
            summary["sweep_cost"] = costs
        return summaries
    finally:
        ray.shutdown()


def _write_specs(specs: list[StudySpec], max_concurrent: int, pin_drivers: bool) -> None:
    """Every spec on disk before any study starts: a resumed sweep finds the studies that had not started too."""
    for spec in specs:
        spec.max_concurrent, spec.pin_drivers = max_concurrent, pin_drivers
        os.makedirs(spec.study_dir, exist_ok=True)
        with open(os.path.join(spec.study_dir, "spec.json"), "w") as f:
            json.dump(dataclasses.asdict(spec), f, indent=2)


def _run_studies(specs: list[StudySpec], env: dict, at_once: int, on_progress, poll: float) -> list[tuple]:
    """Start the studies, `at_once` at a time, until all have ended; (spec, log, process) of each.

    On Ctrl-C: every running study gets SIGINT (a terminal's reaches them already; one sent to this
    process alone does not) and saves its state, then KeyboardInterrupt names the resume command."""
    waiting, running, ended = list(specs), [], []
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
        for _, _, proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for _, _, proc in running:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise KeyboardInterrupt(f"sweep {specs[0].sweep_id} interrupted; every study saved its state. Continue "
                                f"with: {resume_command(specs[0])}") from None
    finally:
        for _, _, proc in running:  # an error here must not leave studies running on the cluster
            if proc.poll() is None:
                proc.kill()
        if on_progress is not None:
            on_progress(_read_progress(specs))
        for _, log, _ in ended + running:
            log.close()
    return ended


def resume_command(spec: StudySpec) -> str:
    state = f" --state-dir {spec.state_dir}" if spec.state_dir else ""
    return f"erase sweep --resume {spec.sweep_id} --storage {spec.storage}{state}"


def _summary_of(spec: StudySpec, log, proc) -> dict:
    summary_file = os.path.join(spec.study_dir, "summary.json")
    if proc.returncode != 0 or not os.path.isfile(summary_file):
        raise SweepError(f"the study for {spec.concept!r} failed (exit {proc.returncode}); its log: "
                         f"{os.path.join(spec.study_dir, 'study.log')}:\n{_tail(log.name)}")
    with open(summary_file) as f:
        return json.load(f)


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
                     resources={DRIVER_RESOURCE: DRIVER_SLOTS}, log_to_driver=False, logging_level=logging.ERROR)
        finally:
            signal.signal(signal.SIGINT, previous)
    return ray


def _slots(spec: StudySpec, resources: dict, maximum: dict | None, local: bool) -> int:
    """Trials that may run at once, in all: for GPU trials, as many as the most GPUs the cluster may
    have (`maximum`, the autoscaler's configured limit, else what is up now) hold; for CPU trials,
    one per `cpus_per_worker` of CPU cores (this machine's when Ray runs locally, whose head
    advertises more logical CPUs than it has cores)."""
    if spec.gpus_per_worker > 0:
        per_trial = spec.gpus_per_worker * spec.workers_per_trial
        most = (maximum or {}).get(spec.accelerator) or resources.get(spec.accelerator, 0)
        if most < per_trial:
            raise SweepError(f"each trial asks for {per_trial:g} {spec.accelerator}, but the cluster has "
                             f"{resources.get(spec.accelerator, 0):g} now and the autoscaler's limit is "
                             f"{(maximum or {}).get(spec.accelerator, 'unknown')}: "
                             "pass --max-concurrent N (trials at once; they wait for the autoscaler), or "
                             "--gpus-per-trial 0 to run on CPUs")
        return max(1, math.floor(most / per_trial + 1e-9))  # 1 / 0.1 is 9.99...: count whole trials
    cpus = (os.cpu_count() or 1) if local else int(resources.get("CPU", 1))
    return max(1, int(cpus // (spec.cpus_per_worker * spec.workers_per_trial)))


def _autoscaler_maximum() -> dict | None:
    """The most of each resource the autoscaler may bring up ({"GPU": 8.0, ...}), or None without an
    autoscaler. Ray keeps it in the cluster config the autoscaler publishes; Ray Train reads the same."""
    try:
        from ray._private.state import state
    except ImportError:  # a private module: a Ray that moved it leaves the fallbacks
        return None
    read = getattr(state, "get_max_resources_from_cluster_config", None)
    return read() if read is not None else None


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


def _start_study(spec: StudySpec, env: dict):
    """Start a study's process on its spec.json; returns (spec, log file, process)."""
    spec_file = os.path.join(spec.study_dir, "spec.json")
    for stale in ("summary.json", "progress.json"):
        if os.path.exists(os.path.join(spec.study_dir, stale)):
            os.remove(os.path.join(spec.study_dir, stale))
    log = open(os.path.join(spec.study_dir, "study.log"), "a")
    return spec, log, subprocess.Popen([sys.executable, "-m", "erase.sweep.study", spec_file], stdout=log,
                                       stderr=subprocess.STDOUT, env=env)


def _read_progress(specs: list[StudySpec]) -> list[dict]:
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
