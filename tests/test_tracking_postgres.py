"""The tests' `mlflow server` keeps its runs in PostgreSQL (conftest), as a cluster's does: writers in
several processes at once lose nothing, and the rows really are in PostgreSQL."""

import multiprocessing
import os
import time

# The writers import only mlflow (not erase, which brings torch): four spawned interpreters on
# two cores start in seconds. They log as erase.tracking.RunLogger does: a log_batch per step.
MODEL = "flux-tiny"
CONCEPT = "postgres-writers"
WRITERS = 4
RUNS_EACH = 2
STEPS = 30
KEYS = ("loss", "sparsity", "erasure_rate")


def _value(writer, run, key, step):
    return writer * 1000 + run * 100 + KEYS.index(key) * 10 + step / 1000


def _payload(writer, run):
    return f"writer {writer} run {run}\n".encode() * 50


def _write(uri, experiment_id, writer, start, queue, folder):
    """One writer: its runs step by step, interleaved, then a small artifact each and the end of the run."""
    try:
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        client = MlflowClient(uri)
        runs = [client.create_run(experiment_id, run_name=f"w{writer}-r{run}", tags={"test.writer": str(writer)})
                .info.run_id for run in range(RUNS_EACH)]
        for run, run_id in enumerate(runs):
            client.log_batch(run_id, params=[Param("writer", str(writer)), Param("run", str(run))])
        start.wait(timeout=120)  # every writer has its runs open: the logging below overlaps
        for step in range(STEPS):
            for run, run_id in enumerate(runs):
                now = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(key, _value(writer, run, key, step), now, step)
                                                  for key in KEYS])
        for run, run_id in enumerate(runs):
            path = os.path.join(folder, f"w{writer}-r{run}", "payload.bin")
            os.makedirs(os.path.dirname(path))
            with open(path, "wb") as f:
                f.write(_payload(writer, run))
            client.log_artifact(run_id, path, "out")
            client.set_terminated(run_id, "FINISHED")
            queue.put((writer, run, run_id))
    except Exception as err:  # reported to the test, not swallowed
        queue.put((writer, None, f"error: {type(err).__name__}: {err}"))


def test_concurrent_writers_through_the_server_lose_nothing_in_postgres(mlflow_server, postgres_uri, tmp_path):
    from erase.tracking import connect, ensure_experiment, experiment_name

    uri = mlflow_server["uri"]
    assert mlflow_server["backend_store_uri"].startswith("postgresql+psycopg2://")
    connect(uri)
    experiment_id = ensure_experiment(MODEL, CONCEPT)
    ctx = multiprocessing.get_context("spawn")
    queue, start = ctx.Queue(), ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=_write, args=(uri, experiment_id, w, start, queue, str(tmp_path)))
             for w in range(WRITERS)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in range(WRITERS * RUNS_EACH)]
    for p in procs:
        p.join(timeout=60)
    assert not [r for r in results if r[1] is None], results
    assert [p.exitcode for p in procs] == [0] * WRITERS
    ids = {(writer, run): run_id for writer, run, run_id in results}
    assert len(set(ids.values())) == WRITERS * RUNS_EACH

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.search_runs([experiment_id], max_results=1000)
    assert {r.info.run_id for r in found} == set(ids.values())
    for (writer, run), run_id in ids.items():
        got = client.get_run(run_id)
        assert got.info.status == "FINISHED" and got.data.params == {"writer": str(writer), "run": str(run)}
        assert got.data.tags["test.writer"] == str(writer)
        for key in KEYS:
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            assert history == [(s, _value(writer, run, key, s)) for s in range(STEPS)], (writer, run, key)
        local = client.download_artifacts(run_id, "out/payload.bin", str(tmp_path / f"got-{writer}-{run}"))
        with open(local, "rb") as f:
            assert f.read() == _payload(writer, run)

    # the same rows, read straight from the PostgreSQL database the server was started on
    import psycopg2

    with psycopg2.connect(postgres_uri) as db, db.cursor() as cur:
        cur.execute("SELECT version()")
        assert cur.fetchone()[0].startswith("PostgreSQL")
        cur.execute("SELECT e.name, r.run_uuid, r.status FROM runs r JOIN experiments e USING (experiment_id) "
                    "WHERE r.experiment_id = %s", (int(experiment_id),))
        rows = cur.fetchall()
        assert sorted(rows) == sorted((experiment_name(MODEL, CONCEPT), i, "FINISHED") for i in ids.values())
        cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = ANY(%s)", (list(ids.values()),))
        assert cur.fetchone()[0] == WRITERS * RUNS_EACH * len(KEYS) * STEPS
    db.close()
