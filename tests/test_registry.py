"""MLflow tracking and the model registry against a real `mlflow server` on loopback (SQLite in a temp folder)."""

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import log_mask_run

from erase.cli import main
from erase.masks import load_mask_file
from erase.pipelines import mask_sites
from erase.tracking import MASK_DIR, RunLogger, connect, ensure_experiment

MODEL = "flux-tiny"


def _log_run(uri, concept, tmp_path, **kwargs):
    return log_mask_run(uri, MODEL, concept, tmp_path, **kwargs)


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_promote_list_show_apply_and_a_fresh_process_resolves_the_alias(mlflow_server, tmp_path, capsys):
    uri = mlflow_server["uri"]
    _log_run(uri, "cat", tmp_path, erasure_rate=0.2, preservation=0.95, seed=1)
    best_run, best_path = _log_run(uri, "cat", tmp_path, erasure_rate=0.0, preservation=0.97, seed=2)
    code, out, err = run_cli(capsys, "promote", "--concept", "cat", "--model", MODEL, "--tracking-uri", uri, "--json")
    assert code == 0, err
    done = json.loads(out)
    assert done["name"] == "erase-flux-tiny-cat" and done["run_id"] == best_run and done["alias"] == "production"

    code, out, _ = run_cli(capsys, "masks", "list", "--tracking-uri", uri, "--json")
    listed = {m["name"]: m for m in json.loads(out)}
    versions = listed["erase-flux-tiny-cat"]["versions"]
    assert versions[0]["aliases"] == ["production"] and float(versions[0]["erasure_rate"]) == 0.0

    code, out, _ = run_cli(capsys, "masks", "show", "erase-flux-tiny-cat@production", "--tracking-uri", uri, "--json")
    shown = json.loads(out)
    assert shown["tags"]["erase.run_id"] == best_run and shown["tags"]["erase.sweep"] == "sweep-a"
    assert shown["tags"]["erase.mask_sha256"]

    image = tmp_path / "cat.png"
    code, out, err = run_cli(capsys, "masks", "apply", "models:/erase-flux-tiny-cat@production", "--model", MODEL,
                             "--prompt", "a photo of a cat", "--out", str(image), "--tracking-uri", uri, "--compare")
    assert code == 0, err
    from PIL import Image

    assert Image.open(image).size[0] > 0

    # a fresh process, only the mlflow client: the alias resolves and the file is the logged one
    script = textwrap.dedent(f"""
        import hashlib, mlflow, sys
        mlflow.set_tracking_uri({uri!r})
        folder = mlflow.artifacts.download_artifacts(artifact_uri="models:/erase-flux-tiny-cat@production",
                                                     dst_path=sys.argv[1])
        print(hashlib.sha256(open(folder + "/mask.safetensors", "rb").read()).hexdigest())
    """)
    out_dir = tmp_path / "fresh"
    proc = subprocess.run([sys.executable, "-c", script, str(out_dir)], capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == shown["tags"]["erase.mask_sha256"]
    masks, meta = load_mask_file(str(out_dir / "mask.safetensors"), mask_sites(MODEL), MODEL)  # the fingerprint check
    assert meta["concept"] == "cat"


def test_gates_refuse_and_leave_no_version(mlflow_server, tmp_path, capsys):
    uri = mlflow_server["uri"]
    _log_run(uri, "dog", tmp_path, erasure_rate=0.4, preservation=0.99, seed=3)
    code, _, err = run_cli(capsys, "promote", "--concept", "dog", "--model", MODEL, "--tracking-uri", uri)
    assert code == 2 and "erasure_rate 0.4 > max_erasure_rate 0.05" in err
    from mlflow import MlflowClient

    assert not MlflowClient(uri).search_registered_models("name = 'erase-flux-tiny-dog'")
    code, out, err = run_cli(capsys, "promote", "--concept", "dog", "--model", MODEL, "--tracking-uri", uri,
                             "--force", "--json")
    assert code == 0, err
    done = json.loads(out)
    assert done["forced_past"] and MlflowClient(uri).get_model_version("erase-flux-tiny-dog", done["version"]).tags[
        "erase.forced"] == "True"


def test_gates_judge_the_held_out_test_figures_not_the_ones_the_sweep_selected_on(mlflow_server, tmp_path, capsys):
    uri = mlflow_server["uri"]
    # selected on validation at 0.0, but on the test split it lets the concept through in 30%
    _log_run(uri, "hare", tmp_path, erasure_rate=0.0, preservation=1.0, seed=14,
             test={"erasure_rate": 0.3, "preservation": 0.97})
    code, _, err = run_cli(capsys, "promote", "--concept", "hare", "--model", MODEL, "--tracking-uri", uri)
    assert code == 2 and "test_erasure_rate 0.3 > max_erasure_rate 0.05" in err
    _log_run(uri, "hare", tmp_path, erasure_rate=0.2, preservation=0.95, seed=15,
             test={"erasure_rate": 0.01, "preservation": 0.96, "score": 0.95})
    code, out, err = run_cli(capsys, "promote", "--concept", "hare", "--model", MODEL, "--tracking-uri", uri,
                             "--metric", "test_score", "--json")
    assert code == 0, err
    from mlflow import MlflowClient

    tags = MlflowClient(uri).get_model_version("erase-flux-tiny-hare", json.loads(out)["version"]).tags
    assert tags["erase.gated_on"] == "test split" and tags["metric.test_erasure_rate"] == "0.01"


def test_a_failed_alias_move_deletes_the_new_version(mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from erase import registry

    uri = mlflow_server["uri"]
    _log_run(uri, "fox", tmp_path, erasure_rate=0.0, preservation=1.0, seed=4)
    connect(uri)
    registry.promote(MODEL, "fox")
    before = MlflowClient(uri).search_model_versions("name = 'erase-flux-tiny-fox'")

    def broken(self, *a, **k):
        raise RuntimeError("network dropped")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", broken)
    with pytest.raises(RuntimeError, match="network dropped"):
        registry.promote(MODEL, "fox")
    after = MlflowClient(uri).search_model_versions("name = 'erase-flux-tiny-fox'")
    assert len(after) == len(before) == 1


def test_a_changed_artifact_is_refused(mlflow_server, tmp_path, capsys):
    uri = mlflow_server["uri"]
    run_id, _ = _log_run(uri, "owl", tmp_path, erasure_rate=0.0, preservation=1.0, seed=5)
    code, _, err = run_cli(capsys, "promote", "--concept", "owl", "--model", MODEL, "--tracking-uri", uri)
    assert code == 0, err
    stored = [p for p in mlflow_server["artifacts"].rglob("mask.safetensors") if run_id in str(p)]
    assert len(stored) == 1
    data = bytearray(stored[0].read_bytes())
    data[-1] ^= 0xFF  # flip one byte of the last tensor
    stored[0].write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "masks", "apply", "models:/erase-flux-tiny-owl@production", "--model", MODEL,
                           "--prompt", "an owl", "--out", str(tmp_path / "owl.png"), "--tracking-uri", uri)
    assert code == 2 and "does not match" in err and not (tmp_path / "owl.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["promote", "--concept", "unicorn", "--model", MODEL], "no runs for concept 'unicorn'"),
    (["masks", "show", "erase-flux-tiny-cat@staging"], "has no alias 'staging'"),
    (["masks", "show", "erase-flux-tiny-nothing"], "no registered mask 'erase-flux-tiny-nothing'"),
    (["promote", "--concept", "cat", "--model", MODEL, "--sweep", "sweep-zzz"], "no finished run"),
    (["promote", "--concept", "cat", "--model", MODEL, "--alias", "v3"], "is not allowed"),
])
def test_bad_registry_requests_are_clear_errors(mlflow_server, capsys, argv, message):
    code, _, err = run_cli(capsys, *argv, "--tracking-uri", mlflow_server["uri"])
    assert code == 2 and err.startswith("erase: error:") and message in err, err


def test_a_server_that_does_not_answer(capsys):
    started = time.time()
    code, _, err = run_cli(capsys, "masks", "list", "--tracking-uri", "http://127.0.0.1:1")
    assert code == 2 and "does not answer" in err and time.time() - started < 30


def test_a_relative_sqlite_uri_becomes_absolute(tmp_path, monkeypatch):
    # Ray workers run in another working directory: they must open the same database file
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "restored-after-the-test")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = connect("sqlite:///runs.db")
    assert uri == f"sqlite:///{tmp_path / 'runs.db'}" and os.environ["MLFLOW_TRACKING_URI"] == uri


def _log_many(uri, concept, index, queue):
    try:
        logger = RunLogger(uri, MODEL, concept, run_name=f"writer-{index}", params={"i": index}, tags={})
        for step in range(40):
            logger.metrics({"loss": index + step / 100}, step=step)
        logger.client.set_terminated(logger.run_id)
        queue.put(logger.run_id)
    except Exception as err:  # reported to the test, not swallowed
        queue.put(f"error: {err}")


def test_concurrent_writers_lose_nothing(mlflow_server):
    uri = mlflow_server["uri"]
    connect(uri)
    ensure_experiment(MODEL, "many")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_log_many, args=(uri, "many", i, queue)) for i in range(4)]
    for p in procs:
        p.start()
    run_ids = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert not [r for r in run_ids if r.startswith("error")], run_ids
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for run_id in run_ids:
        assert len(client.get_metric_history(run_id, "loss")) == 40


def test_train_logs_a_run_with_its_mask(mlflow_server, tmp_path, capsys):
    uri = mlflow_server["uri"]
    out = tmp_path / "cat.safetensors"
    code, stdout, err = run_cli(capsys, "train", "--model", MODEL, "--concept", "cat", "--steps", "4", "--batch-size", "1",
                                "--out", str(out), "--quiet", "--tracking-uri", uri, "--json")
    assert code == 0, err
    run_id = json.loads(stdout)["mlflow_run_id"]
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["erase.concept"] == "cat"
    assert run.data.params["beta"] == "0.01" and "erase.prompts_sha" in run.data.tags
    assert [a.path for a in client.list_artifacts(run_id, MASK_DIR)] == [f"{MASK_DIR}/mask.json", f"{MASK_DIR}/mask.safetensors"]
