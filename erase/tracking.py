"""MLflow tracking: every trial (and `erase train` with a tracking URI) is an MLflow run.

Layout (docs/design.md has the why):
- one experiment per base model and concept, `erase/<model>/<concept>`, so that a concept's
  whole history (every sweep) is one list, and promotion compares runs of one concept;
- each run: the trial's hyperparameters as params, loss / sparsity / erasure / preservation as
  metrics over steps, final figures, tags (concept, model id, architecture fingerprint, sweep
  id, trial id, project version, prompt-set hashes, mask sha256), and artifacts:
      mask/mask.safetensors   the mask file (λ per site + metadata)
      mask/mask.json          its metrics
      grid.png                base vs masked generations (where the model has a world to draw)

Embedded default: a local SQLite file plus a local artifact folder, nothing to start:
`sqlite:///<cwd>/mlflow.db` and `<cwd>/mlartifacts/`. On a cluster: `--tracking-uri
http://mlflow:5000` (an `mlflow server`, see the README). Only Train rank 0 logs.
"""

from __future__ import annotations

import json
import os
import re
import time

from erase.detectors import sha256_file
from erase.errors import EraseError
from erase.prompts import prompt_set_hash

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
MASK_DIR = "mask"
MASK_FILE = "mask.safetensors"


class TrackingError(EraseError):
    """The tracking server or store cannot be used; the message says what to check."""


def quiet_mlflow() -> None:
    """No telemetry, no run links on stdout, and fail in seconds (not minutes) when a server is down."""
    for key, value in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true"),
                       ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"), ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
                       ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30"),
                       ("MLFLOW_LOGGING_LEVEL", "WARNING")):  # not "Creating initial MLflow database tables"
        os.environ.setdefault(key, value)


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath(DEFAULT_DB)}"


def artifact_root_for(uri: str) -> str | None:
    """Where a local SQLite store keeps artifacts (next to the database); None: the server decides."""
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        return os.path.join(os.path.dirname(os.path.abspath(db)), DEFAULT_ARTIFACTS)
    return None


class NoStore(TrackingError):
    """A command that only reads found no local store: nothing was tracked there yet."""


def connect(uri: str | None = None, *, existing: bool = False) -> str:
    """Point MLflow at `uri` (default: the local SQLite store) and check that it answers; returns the URI.

    The URI is set process-wide: MLflow's `models:/` downloads use the global registry URI.
    `existing`: a command that reads (masks list, masks show, promote) must find a local SQLite
    store and not create one (NoStore).
    """
    quiet_mlflow()
    import mlflow

    uri = uri or default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    elif uri.startswith("sqlite:///"):
        # absolute: Ray workers and study processes run in other working directories
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
        folder = os.path.dirname(uri[len("sqlite:///"):])
        if not os.path.isdir(folder):
            raise TrackingError(f"tracking database folder {folder!r} does not exist; create it or pick another "
                                "--tracking-uri")
        if existing and not os.path.exists(uri[len("sqlite:///"):]):
            raise NoStore(f"no MLflow store at {uri[len('sqlite:///'):]}: nothing was tracked here yet. Run "
                          "`erase sweep` (or `erase train --tracking-uri ...`) first, or point --tracking-uri or "
                          "MLFLOW_TRACKING_URI at the store your runs are in")
    elif uri.startswith("file:") or "://" not in uri:
        raise TrackingError(f"tracking URI {uri!r}: MLflow 3 no longer keeps runs in a plain folder; use "
                            "sqlite:///PATH/mlflow.db (local) or http://HOST:PORT (an mlflow server)")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # Ray workers and subprocesses inherit it
    return uri


def connect_for(refs: list[str], uri: str | None = None) -> None:
    """Connect when a tracking URI is given or a mask reference is a registry or run URI (a plain
    file needs no MLflow, and a read of one creates no store)."""
    if uri or any(ref.startswith(("models:/", "runs:/")) for ref in refs):
        connect(uri, existing=True)


def _check_server(uri: str, timeout: float = 5.0) -> None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
            raise TrackingError(f"MLflow server {uri} answered /health with HTTP {response.status}")
    except (urllib.error.URLError, OSError) as err:
        raise TrackingError(f"MLflow server {uri} does not answer ({err}); check that `mlflow server` runs there "
                            "and the address is right, or drop --tracking-uri to use the local store") from None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "concept"


def experiment_name(model: str, concept: str) -> str:
    return f"erase/{model}/{slug(concept)}"


def ensure_experiment(model: str, concept: str) -> str:
    """The concept's experiment id, created if needed (once, by the driver: SQLite schema creation is not
    safe from many processes at once)."""
    import mlflow

    name = experiment_name(model, concept)
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    root = artifact_root_for(mlflow.get_tracking_uri())
    location = None
    if root is not None:
        location = "file://" + os.path.join(root, slug(model), slug(concept))
    try:
        return mlflow.create_experiment(name, artifact_location=location,
                                        tags={"erase.model": model, "erase.concept": concept})
    except Exception:  # created meanwhile by another driver
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class RunLogger:
    """One MLflow run, written from one process: params once, metrics as they come, the mask at the end."""

    def __init__(self, tracking_uri: str, model: str, concept: str, *, run_name: str, params: dict, tags: dict,
                 run_id: str | None = None):
        """`run_id`: continue that run (a worker restarted from its checkpoint). A trial (tags
        erase.sweep and erase.trial) that already has a run continues it too, checkpoint or not."""
        quiet_mlflow()
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        experiment_id = self.client.get_experiment_by_name(experiment_name(model, concept))
        if experiment_id is None:
            raise TrackingError(f"experiment {experiment_name(model, concept)!r} is missing: the driver creates it "
                                "before trials start (erase.tracking.ensure_experiment)")
        if run_id is None and tags.get("erase.trial") and tags.get("erase.sweep"):
            same = _trial_run(self.client, experiment_id.experiment_id, tags["erase.sweep"], tags["erase.trial"])
            run_id = same.info.run_id if same else None
        if run_id is not None:  # a retried worker continues its run
            self.run_id = run_id
            return
        from erase import __version__

        all_tags = {"erase.concept": concept, "erase.model": model, "erase.version": __version__, **tags}
        run = self.client.create_run(experiment_id.experiment_id, run_name=run_name,
                                     tags={k: str(v) for k, v in all_tags.items()})
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, params=[_param(k, v) for k, v in sorted(params.items())])

    def metrics(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()
                                                    if isinstance(v, (int, float)) and v is not None])

    def finish(self, mask_path: str, metrics: dict, grid_png: str | None = None, status: str = "FINISHED",
               extra_artifacts: dict[str, str] | None = None) -> str:
        """Log the mask (with its sha256 as a tag), its metrics and pictures; end the run. Returns the sha256."""
        import tempfile

        digest = sha256_file(mask_path)
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, MASK_DIR)
            os.makedirs(folder)
            with open(mask_path, "rb") as src, open(os.path.join(folder, MASK_FILE), "wb") as dst:
                dst.write(src.read())
            with open(os.path.join(folder, "mask.json"), "w") as f:
                json.dump(metrics, f, indent=2, default=str)
            self.client.log_artifacts(self.run_id, folder, MASK_DIR)
        if grid_png:
            self.client.log_artifact(self.run_id, grid_png)
        for path in (extra_artifacts or {}).values():
            self.client.log_artifact(self.run_id, path)
        self.client.set_tag(self.run_id, "erase.mask_sha256", digest)
        self.client.set_terminated(self.run_id, status)
        return digest

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def fail(self, reason: str) -> None:
        self.client.set_tag(self.run_id, "erase.failure", reason[:4000])
        self.client.set_terminated(self.run_id, "FAILED")


def _trial_run(client, experiment_id: str, sweep_id: str, trial_id: str):
    """The MLflow run of one sweep trial (tags erase.sweep and erase.trial), or None."""
    runs = client.search_runs([experiment_id], max_results=1, filter_string=(
        f"tags.`erase.sweep` = '{sweep_id}' and tags.`erase.trial` = '{trial_id}'"))
    return runs[0] if runs else None


def end_trial_run(tracking_uri: str, model: str, concept: str, sweep_id: str, trial_id: str, status: str,
                  reason: str) -> str | None:
    """End a sweep trial's run that its worker could not end (ASHA stopped it: KILLED; its driver
    died: FAILED), with `reason` as the tag erase.status. A run that already ended is left as it is.
    Returns the run's status afterwards, None when the trial has no run."""
    quiet_mlflow()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name(model, concept))
    run = _trial_run(client, experiment.experiment_id, sweep_id, trial_id) if experiment else None
    if run is None:
        return None
    if run.info.status == "RUNNING":
        client.set_tag(run.info.run_id, "erase.status", reason[:4000])
        client.set_terminated(run.info.run_id, status)
        return status
    return run.info.status


def _param(key: str, value):
    from mlflow.entities import Param

    text = json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)
    return Param(key, text[:6000])


def train_run(uri: str | None, model: str, cfg, erase_prompts: list, neutral_prompts: list, *, run_name: str,
              fingerprint: str) -> RunLogger:
    """The MLflow run of one `erase train`: its settings as params, the prompt sets' hashes as tags."""
    import dataclasses

    uri = connect(uri)
    ensure_experiment(model, cfg.concept)
    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "concept"}
    return RunLogger(uri, model, cfg.concept, run_name=run_name, params=params,
                     tags={"erase.fingerprint": fingerprint, "erase.sweep": "",
                           "erase.prompts_sha": prompt_set_hash(erase_prompts),
                           "erase.neutral_sha": prompt_set_hash(neutral_prompts)})


def log_evaluation(run_id: str, report: dict, pictures: list[str]) -> None:
    """Attach an evaluation report (eval/eval.json) and its pictures to the run that made the mask."""
    import tempfile

    from mlflow import MlflowClient

    client = MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "eval.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        client.log_artifact(run_id, path, "eval")
    for picture in pictures:
        client.log_artifact(run_id, picture, "eval")
