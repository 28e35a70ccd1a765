"""`erase sweep` on a multi-node Ray on this machine (ray.cluster_utils.Cluster), as on a GPU cluster.

A custom resource, `fake_gpu`, stands in for GPUs: a node that has it joins, or dies, while the
sweep runs. Each test counts the figure the cluster section of the README quotes: trials lost
and MLflow runs left RUNNING after a node is killed mid-sweep (both must be 0).
"""

import os
import signal
import time

import pytest

from erase.sweep import plan, run_sweep
from erase.sweep.trial import DRIVER_RESOURCE, DRIVER_SLOTS

SPACE = """
description: a dozen steps per trial, so that a node can die mid-trial
fixed:
  steps: 12
  batch_size: 2
  sites: ffn,norm
search:
  beta: {distribution: loguniform, low: 1.0e-3, high: 0.1}
"""


@pytest.fixture
def cluster():
    """`cluster(head_resources)`: a head node started with those resources; every node ends with the test."""
    from ray.cluster_utils import Cluster

    made = []

    def start(head_resources: dict):
        made.append(Cluster(initialize_head=True, connect=False,
                            head_node_args={"num_cpus": 2, "resources": head_resources}))
        return made[-1]

    yield start
    for c in made:
        c.shutdown()


def kill_node(node) -> int:
    """SIGKILL a node's raylet by its PID, and the processes it started, as a lost machine takes them all
    (on one machine a worker whose raylet died lingers; a lost pod has none left). Returns the PID."""
    (raylet,) = node.all_processes["raylet"]
    doomed = descendants(raylet.process.pid) + [raylet.process.pid]
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return raylet.process.pid


def descendants(pid: int) -> list[int]:
    """Every process under `pid`, from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def gpu_node(cluster):
    return cluster.add_node(num_cpus=1, resources={"fake_gpu": 1})


def sweep(tmp_path, uri, address, on_progress):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    specs = plan("toy", ["circle"], str(space), 2, str(tmp_path / "sweeps"), tracking_uri=uri, report_every=2,
                 grace_steps=12, gpus_per_trial=1, accelerator="fake_gpu", detector={"name": "toy"})
    (summary,) = run_sweep(specs, address=address, max_concurrent=1, on_progress=on_progress, poll=1.0)
    return specs[0], summary


def lost_and_running(summary, uri, sweep_id):
    """(trials that did not finish, this sweep's MLflow runs still RUNNING)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("erase/toy/circle")
    runs = [r for r in client.search_runs([experiment.experiment_id])
            if r.data.tags.get("erase.sweep") == sweep_id]
    lost = sum(t["status"] != "finished" for t in summary["trials"])
    print(f"\nnode killed mid-sweep: {lost} trial(s) lost, "
          f"{sum(r.info.status == 'RUNNING' for r in runs)} MLflow run(s) left RUNNING of {len(runs)}")
    return lost, [r for r in runs if r.info.status == "RUNNING"], runs


@pytest.mark.slow
def test_trials_wait_for_a_gpu_node_that_joins_later_and_survive_losing_it(tmp_path, cluster, mlflow_server):
    """The head (drivers only) is up; no node has a GPU. The trials wait as demand; a GPU node joins
    and they run there; its raylet is killed mid-trial and a second GPU node takes over."""
    cluster = cluster({DRIVER_RESOURCE: DRIVER_SLOTS})  # the head advertises it, as raycluster.yaml's does
    events = {}
    nodes = {}

    def on_progress(progress):
        (study,) = progress
        if "first" not in nodes:
            if study["best"] is not None:
                events["report before a GPU"] = True
            if study["running"] and "driver up" not in events:
                events["driver up"] = time.time()
            if time.time() - events.get("driver up", time.time()) > 20:  # time enough to report, had it a GPU
                events["running while waiting"] = study["running"]
                nodes["first"] = gpu_node(cluster)
        elif "killed" not in events and study["best"] is not None:  # the first report: mid-trial
            events["killed"] = kill_node(nodes["first"])
            events["step at kill"] = study["best"]["step"]
            nodes["second"] = gpu_node(cluster)

    spec, summary = sweep(tmp_path, mlflow_server["uri"], cluster.address, on_progress)
    assert "report before a GPU" not in events  # nothing ran until a node had the trial's GPU
    assert events["running while waiting"] == 1  # the driver was up on the head, its worker pending
    assert "killed" in events and events["step at kill"] < 12
    lost, running, runs = lost_and_running(summary, mlflow_server["uri"], spec.sweep_id)
    assert (lost, running) == (0, [])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert summary["best"]["mask_file"]


@pytest.mark.slow
def test_a_trial_whose_driver_node_dies_runs_again_from_its_checkpoint(tmp_path, cluster, mlflow_server):
    """The drivers' resource is on a node of its own; killing it kills the trial's driver and Train
    controller. Tune runs the trial again (FailureConfig) on the replacement, from its checkpoint."""
    cluster = cluster({})
    drivers = {"node": cluster.add_node(num_cpus=1, resources={DRIVER_RESOURCE: DRIVER_SLOTS})}
    gpu_node(cluster)
    events = {}

    def on_progress(progress):
        (study,) = progress
        if "killed" not in events and study["best"] is not None:
            events["killed"] = kill_node(drivers["node"])
            events["step at kill"] = study["best"]["step"]
            drivers["replacement"] = cluster.add_node(num_cpus=1, resources={DRIVER_RESOURCE: DRIVER_SLOTS})

    spec, summary = sweep(tmp_path, mlflow_server["uri"], cluster.address, on_progress)
    assert "killed" in events and events["step at kill"] < 12
    lost, running, runs = lost_and_running(summary, mlflow_server["uri"], spec.sweep_id)
    assert (lost, running) == (0, [])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server["uri"])
    for run in runs:  # the interrupted trial went on in its own run, every report there
        steps = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
        assert steps == {2, 4, 6, 8, 10, 12}, steps


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A `ray start --head --block` as the README's cluster has it (the drivers' resource on the head), on
    free ports and its own temp folder; the whole process group is stopped at the end, by its PID."""
    import shutil
    import subprocess
    import sys
    import tempfile
    import urllib.request

    temp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit in 107 bytes
    port, dashboard, agent = free_port(), free_port(), free_port()
    # Ray 2.59 and later start a local head with token authentication: its own token, given to the
    # head and to every `ray job submit` here, leaves the user's ~/.ray alone
    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex()}
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={agent}", "--num-cpus=4",
         f"--resources={{\"{DRIVER_RESOURCE}\": {DRIVER_SLOTS}}}", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    request = urllib.request.Request(url + "/api/version", headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    deadline = time.time() + 120
    try:
        while True:  # the job API answers once the dashboard is up
            try:
                with urllib.request.urlopen(request, timeout=2):
                    break
            except OSError:
                if head.poll() is not None or time.time() > deadline:
                    pytest.fail(f"ray start --head did not come up (exit {head.poll()})")
                time.sleep(1)
        yield {"url": url, "env": env}
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # its process group: the head's processes, all started here
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_the_readmes_ray_job_submit_runs_a_sweep_with_checkpoints_at_a_uri(tmp_path, ray_head):
    """The README's `ray job submit ... -- erase sweep ... --address auto`, with the toy world, a
    --working-dir upload (Ray's runtime cache), checkpoints at a URI and the sweep's files in a folder."""
    import json
    import subprocess

    from mlflow import MlflowClient

    work = tmp_path / "work"
    work.mkdir()
    (work / "space.yaml").write_text(SPACE.replace("steps: 12", "steps: 4"))
    submit = ["ray", "job", "submit", "--address", ray_head["url"], "--working-dir", str(work), "--",
              "erase", "sweep", "--concepts", "circle", "--trials", "1", "--space", "space.yaml", "--address", "auto",
              "--report-every", "2", "--grace-steps", "4"]

    def run(args):
        for _ in range(30):  # the head's job agent starts a little after its dashboard
            done = subprocess.run(args, env=ray_head["env"], capture_output=True, text=True, timeout=900)
            if "No available agent to submit job" not in done.stderr:
                return done
            time.sleep(2)
        return done

    # relative defaults would land in the runtime cache: refused, naming the flags
    refused = run(submit)
    assert refused.returncode != 0 and "--storage /mnt/erase/sweeps" in refused.stdout + refused.stderr, (
        refused.stdout[-3000:] + refused.stderr[-3000:])
    where = ["--storage", (tmp_path / "results").as_uri(), "--state-dir", str(tmp_path / "state"),
             "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    done = run(submit + where)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (summary_file,) = (tmp_path / "state").glob("*/circle/summary.json")
    summary = json.loads(summary_file.read_text())
    assert [t["status"] for t in summary["trials"]] == ["finished"]
    assert os.path.isfile(summary["best"]["mask_file"]) and summary["best"]["mask_file"].startswith(str(tmp_path))
    assert summary["results_dir"].startswith("file://")
    assert list((tmp_path / "results").glob("*/circle/train/*/checkpoint_*/mask.safetensors"))
    assert not list((tmp_path / "state").glob("*/circle/train"))  # checkpoints only at the URI
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(summary["best"]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
