"""`erase sweep`: planning errors (fast), and real sweeps on a local Ray with the toy world (slow)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from erase.errors import EraseError
from erase.prompts import PromptError
from erase.sweep import StudySpec, SweepError, plan, run_sweep
from erase.sweep.driver import _slots
from erase.trial import score

TINY_SPACE = """
description: a few steps per trial, for tests
fixed:
  steps: 4
  batch_size: 2
  sites: ffn,norm
search:
  beta: {distribution: loguniform, low: 1.0e-3, high: 0.1}
"""


def test_score_is_erasure_times_preservation():
    assert score(0.0, 1.0, 0.9) == pytest.approx(0.9)
    assert score(0.5, 1.0, 1.0) == pytest.approx(0.5)
    assert score(1.0, 0.8, 1.0) == 0.0  # more detections than the base model: nothing erased
    assert score(0.0, 0.0, 1.0) == 0.0  # the base model never showed it: nothing to erase


def test_the_summary_prints_the_held_out_erasure_with_its_interval_and_n(capsys):
    from erase.cli.sweep import print_summary

    best = {"trial": "t1", "config": {"beta": 0.25}, "status": "finished", "score": 0.95, "erasure_rate": 0.033,
            "preservation": 0.99, "step": 200, "test_score": 0.97, "test_erasure_rate": 0.031,
            "test_erasure_rate_low": 0.013, "test_erasure_rate_high": 0.071, "test_erasure_n": 160.0,
            "test_preservation": 1.0, "test_robust_erasure_rate": 0.26}
    print_summary({"concept": "striped", "objective": "o", "trials": [best], "best": best, "optuna_study": "s",
                   "optuna_storage": "sqlite:///x"})
    line = next(line for line in capsys.readouterr().out.splitlines() if "on the test split" in line)
    assert "erasure_rate 0.031 [0.013, 0.071] of 160 generations" in line and "robust_erasure_rate 0.26" in line


def test_plan_checks_the_request(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(TINY_SPACE)
    specs = plan("toy", ["circle", "red"], str(space), 3, str(tmp_path / "s"))
    assert [s.concept for s in specs] == ["circle", "red"] and len({s.sweep_id for s in specs}) == 1
    assert specs[0].study_dir.endswith(os.path.join(specs[0].sweep_id, "circle"))
    with pytest.raises(EraseError, match="no concept 'unicorn'"):
        plan("toy", ["unicorn"], str(space), 3, str(tmp_path / "s"))
    with pytest.raises(SweepError, match="--trials"):
        plan("toy", ["circle"], str(space), 0, str(tmp_path / "s"))
    seeded = tmp_path / "seeded.yaml"
    seeded.write_text(TINY_SPACE + "  seed: {distribution: int, low: 0, high: 3}\n")
    with pytest.raises(SweepError, match="'seed' .* cannot be searched"):
        plan("toy", ["circle"], str(seeded), 3, str(tmp_path / "s"))
    with pytest.raises(SweepError, match="no sweep 'nope'"):
        plan("toy", [], str(space), 3, str(tmp_path / "s"), resume="nope")
    # prompt files are read before any trial (or Ray) starts
    with pytest.raises(PromptError, match="neutral prompt file '/no/n.txt' does not exist"):
        plan("toy", ["circle"], str(space), 3, str(tmp_path / "s"), neutral_prompts="/no/n.txt")
    empty = tmp_path / "empty.csv"
    empty.write_text("text\n")
    with pytest.raises(PromptError, match="has no column 'prompt'; its columns are: text"):
        plan("toy", ["circle"], str(space), 3, str(tmp_path / "s"), prompts=str(empty))


def test_trials_ask_for_the_gpus_of_the_request_and_run_as_many_as_the_cluster_may_have():
    flux = plan("flux.1-schnell", ["nudity"], "flux_nudity", 2, "s", detector={"name": "toy"})[0]
    assert flux.gpus_per_worker == 1 and flux.device == "cuda"  # asked for though no GPU is up here
    assert plan("toy", ["striped"], "toy_fast", 2, "s")[0].gpus_per_worker == 0
    two = plan("toy", ["striped"], "toy_fast", 2, "s", gpus_per_trial=2, workers_per_trial=2)[0]
    assert two.gpus_per_worker == 1
    with pytest.raises(SweepError, match="multiple of --workers-per-trial"):
        plan("toy", ["striped"], "toy_fast", 2, "s", gpus_per_trial=3, workers_per_trial=2)
    with pytest.raises(SweepError, match="--gpus-per-trial must be 0"):
        plan("toy", ["striped"], "toy_fast", 2, "s", gpus_per_trial=-1)
    # the autoscaler's maximum wins over what is up at the start: 8 H100 pods may come, none is up
    assert _slots(flux, {"CPU": 8.0}, {"GPU": 8, "CPU": 136}, local=False) == 8
    assert _slots(two, {"CPU": 8.0}, {"GPU": 8}, local=False) == 4  # 2 GPUs per trial
    assert _slots(flux, {"GPU": 3.0, "CPU": 56.0}, None, local=False) == 3  # no autoscaler: what is up
    with pytest.raises(SweepError, match="pass --max-concurrent N"):
        _slots(flux, {"CPU": 8.0}, None, local=False)
    stand_in = dataclasses.replace(flux, accelerator="fake_gpu")
    assert stand_in.device == "cpu" and _slots(stand_in, {"fake_gpu": 2.0}, None, local=False) == 2
    toy = plan("toy", ["striped"], "toy_fast", 2, "s", cpus_per_worker=2)[0]
    assert _slots(toy, {"CPU": 16.0}, {"GPU": 8}, local=False) == 8  # CPU trials ignore GPUs
    # a local head advertises more logical CPUs than cores: slots follow the real cores
    one = plan("toy", ["striped"], "toy_fast", 2, "s")[0]
    assert _slots(one, {"CPU": 99.0}, None, local=True) == (os.cpu_count() or 1)


def test_an_older_spec_that_used_gpus_asks_for_one_per_worker(tmp_path):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"sweep_id": "s", "concept": "c", "use_gpu": True}))
    assert StudySpec.read(str(spec_file)).gpus_per_worker == 1.0


def _runs(uri, concept):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(f"erase/toy/{concept}")
    return client, client.search_runs([experiment.experiment_id])


@pytest.mark.slow
def test_a_sweep_tracks_every_trial_and_a_failed_worker_resumes_from_its_checkpoint(tmp_path, monkeypatch,
                                                                                   mlflow_server):
    # every trial logs to a real `mlflow server` (conftest) from its Ray Train worker
    monkeypatch.chdir(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text(TINY_SPACE)
    uri = mlflow_server["uri"]
    # the test reporter (tests/faulty_reporter.py) kills each trial's worker once, after its report at step 2
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("ERASE_TEST_FAIL_AT_STEP", "2")
    monkeypatch.setenv("ERASE_TEST_MARKERS", str(markers))
    specs = plan("toy", ["circle"], str(space), 2, str(tmp_path / "sweeps"), tracking_uri=uri,
                 report_every=2, grace_steps=4, reporter="faulty_reporter:FailOnce", detector={"name": "toy"})
    seen = []
    (summary,) = run_sweep(specs, on_progress=seen.append, poll=0.5)
    assert [t["status"] for t in summary["trials"]] == ["finished", "finished"], summary
    assert os.path.isfile(summary["best"]["mask_file"]) and summary["best"]["mlflow_run_id"]
    assert any(p[0]["running"] >= 1 for p in seen) and seen[-1][0]["done"] == 2
    assert len(os.listdir(markers)) == 2  # each trial's worker died once at step 2 ...
    client, runs = _runs(uri, "circle")
    runs = [r for r in runs if r.data.tags.get("erase.sweep") == specs[0].sweep_id]  # the server is shared
    assert len(runs) == 2  # ... and continued in the same MLflow run, from its checkpoint:
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["erase.sweep"] == specs[0].sweep_id
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert sorted(steps) == [2, 4], steps  # step 2 once: not redone from scratch
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "mask")]
        assert "mask/mask.safetensors" in artifacts
        assert {"erasure_rate", "preservation", "score", "sparsity"} <= set(run.data.metrics)
        assert run.data.params["target"] == "adaptive"  # the recipe's target for an object, logged though not in the space
    import optuna

    study = optuna.load_study(study_name=summary["optuna_study"], storage=summary["optuna_storage"])
    assert len(study.trials) == 2


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resume_finishes_without_redoing_trials(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(TINY_SPACE.replace("steps: 4", "steps: 40"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "erase.cli", "sweep", "--concepts", "circle", "--trials", "4", "--space", str(space),
            "--storage", str(tmp_path / "sweeps"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--report-every", "10", "--grace-steps", "40"]
    # Start the sweep with SIGINT at its default, as a terminal would: Python installs its Ctrl-C handler
    # only if SIGINT is not ignored at startup, and the child inherits whatever this test process has.
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    progress = None
    deadline = time.time() + 600
    # 4 trials on 2 slots: when the first finishes, about two trials' worth of work is left for
    # Ctrl-C to interrupt (with 3, one CI run exited 0: the sweep ended before the signal took effect)
    while time.time() < deadline:  # wait until the first trial has finished
        found = list((tmp_path / "sweeps").glob("*/circle/progress.json"))
        if found:
            try:
                progress = json.loads(found[0].read_text())
            except ValueError:
                progress = None
            if progress and progress["done"] >= 1:
                break
        time.sleep(1)
    assert progress and progress["done"] >= 1, "no trial finished in time"
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C at a terminal: the whole process group
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    sweep_id = found[0].parent.parent.name
    assert f"erase sweep --resume {sweep_id}" in err
    client, before = _runs(f"sqlite:///{tmp_path}/mlflow.db", "circle")
    finished_before = {r.info.run_id for r in before if r.info.status == "FINISHED"}
    assert finished_before
    resumed = subprocess.run([sys.executable, "-m", "erase.cli", "sweep", "--resume", sweep_id, "--storage",
                              str(tmp_path / "sweeps"), "--json"], cwd=tmp_path, capture_output=True, text=True,
                             env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.lstrip().startswith("["), resumed.stdout[:3000]
    (summary,) = json.loads(resumed.stdout)
    assert len(summary["trials"]) == 4 and all(t["status"] in ("finished", "stopped") for t in summary["trials"])
    client, after = _runs(f"sqlite:///{tmp_path}/mlflow.db", "circle")
    assert finished_before <= {r.info.run_id for r in after if r.info.status == "FINISHED"}
    assert len(after) == 4  # the interrupted trials went on in their own runs; nothing ran twice


def test_orchestration_overhead_compares_wall_time_with_trial_compute_per_slot():
    from erase.sweep import orchestration

    summaries = [{"trials": [{"compute_seconds": 100.0}, {"compute_seconds": 100.0}]},
                 {"trials": [{"compute_seconds": 200.0}, {"compute_seconds": None}]}]
    cost = orchestration(summaries, wall_seconds=300.0, slots=2)
    assert cost["trial_compute_seconds"] == 400.0 and cost["overhead"] == 1.5  # 300 s for 200 s of ideal wall time
    assert orchestration([{"trials": [{"compute_seconds": None}]}], 10.0, 1)["overhead"] is None



def test_small_sweeps_leave_tpes_random_start_after_a_third_of_their_trials():
    import optuna

    from erase.sweep import StudySpec
    from erase.sweep.study import tpe_sampler

    def sampler(concept, trials):
        return tpe_sampler(StudySpec(sweep_id="t", concept=concept, trials=trials))

    # Optuna's default, 10 random start-up trials, would make a sweep of 6 a random search throughout
    assert sampler("striped", 6)._n_startup_trials == 2
    assert sampler("striped", 60)._n_startup_trials == 10

    def first_draws(s):
        study = optuna.create_study(direction="maximize", sampler=s)
        study.optimize(lambda t: -(t.suggest_float("beta", 0.1, 10.0, log=True) - 1.0) ** 2, n_trials=3)
        return [t.params["beta"] for t in study.trials]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    assert first_draws(sampler("striped", 6)) == first_draws(sampler("striped", 6))  # seeded
    assert first_draws(sampler("striped", 6)) != first_draws(sampler("outlined", 6))  # a seed per concept


def test_plan_checks_each_fixed_value_but_leaves_the_settings_as_a_whole_to_each_trial(tmp_path):
    # attention alone is fixed and its learning rate searched: valid, though the fixed part alone has lr 0
    space = tmp_path / "attn.yaml"
    space.write_text("fixed: {sites: attn}\nsearch:\n  lr_attn: {distribution: loguniform, low: 0.1, high: 1.0}\n")
    (spec,) = plan("toy", ["circle"], str(space), 2, str(tmp_path / "s"))
    assert spec.detector == {"name": "toy"}  # the model's own detector when none is given
    space.write_text("fixed: {steps: many}\nsearch:\n  beta: {distribution: loguniform, low: 0.1, high: 1.0}\n")
    with pytest.raises(EraseError, match="fixed: 'steps' must be a whole number, got 'many'"):
        plan("toy", ["circle"], str(space), 2, str(tmp_path / "s"))
    with pytest.raises(SweepError, match="no detector of its own"):
        plan("flux-tiny", ["cat"], "default", 2, str(tmp_path / "s"))


def test_a_study_spec_written_by_an_older_version_still_resumes(tmp_path):
    from erase.sweep import StudySpec

    saved = tmp_path / "spec.json"
    saved.write_text(json.dumps({"sweep_id": "s", "concept": "circle", "fail_once_at_step": None}))
    assert StudySpec.read(str(saved)) == StudySpec(sweep_id="s", concept="circle")
    saved.write_text(json.dumps({"sweep_id": "s", "concept": "circle", "gpus_per_trial": 2}))
    with pytest.raises(SweepError, match="does not know \\(gpus_per_trial\\)"):
        StudySpec.read(str(saved))


@pytest.mark.slow
def test_trials_that_asha_stops_end_their_mlflow_runs_killed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text(TINY_SPACE.replace("steps: 4", "steps: 8"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    (tmp_path / "markers").mkdir()
    monkeypatch.setenv("ERASE_TEST_MARKERS", str(tmp_path / "markers"))
    specs = plan("toy", ["circle"], str(space), 4, str(tmp_path / "sweeps"), tracking_uri=uri, report_every=2,
                 grace_steps=2, reporter="scored_reporter:FallingScore", detector={"name": "toy"})
    (summary,) = run_sweep(specs, poll=0.5)
    stopped = {t["trial"] for t in summary["trials"] if t["status"] == "stopped"}
    assert len(stopped) >= 2, summary["trials"]  # trials 3 and 4 start after a better one passed the first rung
    _, runs = _runs(uri, "circle")
    assert len(runs) == 4 and not [r for r in runs if r.info.status == "RUNNING"]
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert len(killed) == len(stopped)
    assert all(r.data.tags["erase.status"].startswith("stopped by ASHA at step ") for r in killed)


def test_the_run_closer_ends_only_runs_their_workers_left_running(tmp_path):
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from erase.sweep.spec import StudySpec
    from erase.sweep.study import run_closer
    from erase.tracking import RunLogger, ensure_experiment, connect

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    connect(uri)
    ensure_experiment("toy", "circle")
    spec = StudySpec(model="toy", concept="circle", space="default", trials=3, storage=str(tmp_path), sweep_id="s1",
                     tracking_uri=uri)
    loggers = {t: RunLogger(uri, "toy", "circle", run_name=t, params={}, tags={"erase.sweep": "s1", "erase.trial": t})
               for t in ("t_00001", "t_00002", "t_00003")}
    closer = run_closer(spec)
    closer.on_trial_complete(0, [], SimpleNamespace(trial_id="t_00001", last_result={"step": 4, "final": 0}))
    error_file = tmp_path / "error.txt"
    error_file.write_text("Failure # 1\nTraceback (most recent call last):\n  ...\nRuntimeError: node lost\n")
    closer.on_trial_error(0, [], SimpleNamespace(trial_id="t_00002", error_file=str(error_file)))
    MlflowClient(uri).set_terminated(loggers["t_00003"].run_id, "FINISHED")  # its worker ended it
    closer.on_trial_complete(0, [], SimpleNamespace(trial_id="t_00003", last_result={"step": 8, "final": 1}))
    runs = {t: MlflowClient(uri).get_run(logger.run_id) for t, logger in loggers.items()}
    assert runs["t_00001"].info.status == "KILLED" and runs["t_00001"].data.tags["erase.status"] == "stopped by ASHA at step 4"
    assert runs["t_00002"].info.status == "FAILED"
    assert runs["t_00002"].data.tags["erase.status"] == "trial error: RuntimeError: node lost"
    assert runs["t_00003"].info.status == "FINISHED" and "erase.status" not in runs["t_00003"].data.tags


def test_a_uri_storage_keeps_checkpoints_there_and_the_sweeps_own_files_in_a_local_folder(tmp_path):
    spec = plan("toy", ["striped"], "toy_fast", 2, "s3://bucket/sweeps")[0]
    assert spec.results_dir == f"s3://bucket/sweeps/{spec.sweep_id}/striped"
    assert spec.study_dir == os.path.join(os.path.abspath("erase-sweeps"), spec.sweep_id, "striped")
    chosen = plan("toy", ["striped"], "toy_fast", 2, "gs://b/s", state_dir=str(tmp_path / "state"))[0]
    assert chosen.study_dir.startswith(str(tmp_path / "state")) and chosen.results_dir.startswith("gs://b/s/")
    folder = plan("toy", ["striped"], "toy_fast", 2, str(tmp_path / "shared"))[0]
    assert folder.state_dir is None and folder.study_dir == folder.results_dir  # a folder keeps both
    # a resumed sweep reads its specs from the local state folder, not from the URI
    with pytest.raises(SweepError, match=f"no sweep 'nope' under {str(tmp_path / 'state')!r}"):
        plan("toy", [], "toy_fast", 2, "s3://bucket/sweeps", resume="nope", state_dir=str(tmp_path / "state"))


def test_under_ray_job_submit_relative_paths_are_refused_with_the_flags_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SweepError, match=r"Ray job.*--storage 'erase-sweeps'.*default MLflow store.*--storage /mnt"):
        plan("toy", ["striped"], "toy_fast", 2, "erase-sweeps")
    with pytest.raises(SweepError, match=r"--state-dir 'erase-sweeps'"):  # a URI storage's default state folder
        plan("toy", ["striped"], "toy_fast", 2, "s3://b/s", tracking_uri="http://mlflow:5000")
    with pytest.raises(SweepError, match=r"--tracking-uri 'sqlite:///mlflow.db'"):
        plan("toy", ["striped"], "toy_fast", 2, str(tmp_path), tracking_uri="sqlite:///mlflow.db")
    saved = tmp_path / "state" / "s1" / "striped"
    saved.mkdir(parents=True)
    (saved / "spec.json").write_text(json.dumps({"sweep_id": "s1", "concept": "striped", "storage": "s3://b/s",
                                                 "state_dir": str(tmp_path / "state"),
                                                 "tracking_uri": "http://mlflow:5000"}))
    # a resume is judged by what the sweep saved, not by the flags' defaults
    assert plan("toy", [], "toy_fast", 2, "erase-sweeps", resume="s1", state_dir=str(tmp_path / "state"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.erase.svc.cluster.local:5000")  # as the pods have it
    assert plan("toy", ["striped"], "toy_fast", 2, str(tmp_path))[0].storage == str(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert plan("toy", ["striped"], "toy_fast", 2, "erase-sweeps", tracking_uri="sqlite:///mlflow.db")


def test_relative_folders_are_made_absolute_before_a_trial_driver_runs_in_tunes_trial_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = plan("toy", ["striped"], "toy_fast", 2, "rel")[0]
    assert spec.storage == str(tmp_path / "rel")
    monkeypatch.chdir("/")  # Tune's trial folder, say: the paths do not move
    assert spec.study_dir == str(tmp_path / "rel" / spec.sweep_id / "striped")


def test_resume_clears_the_markers_of_trials_train_gave_up_on_at_a_uri_storage(tmp_path):
    from erase.sweep.study import clear_gave_up_markers
    from erase.sweep.trial import GAVE_UP_FILE, train_storage

    spec = StudySpec(sweep_id="s", concept="c", storage=(tmp_path / "results").as_uri(), state_dir=str(tmp_path))
    filesystem, train_dir = train_storage(spec)
    assert train_dir == str(tmp_path / "results" / "s" / "c" / "train")
    for trial in ("t1", "t2"):
        filesystem.create_dir(f"{train_dir}/{trial}", recursive=True)
        with filesystem.open_output_stream(f"{train_dir}/{trial}/{GAVE_UP_FILE}") as f:
            f.write(b"gave up")
    (tmp_path / "results" / "s" / "c" / "train" / "t1" / "checkpoint.txt").write_text("kept")
    clear_gave_up_markers(spec)
    left = sorted(p.name for p in (tmp_path / "results").rglob("*") if p.is_file())
    assert left == ["checkpoint.txt"]


@pytest.mark.slow
def test_a_trial_gives_the_mask_erase_train_gives_bit_for_bit_in_any_sweep_and_beside_another_trial(tmp_path, capsys):
    # One configuration: a sweep of two trials at once (beside each other on the two cores), a second
    # sweep of one, and `erase train` with the same settings at the trial's one thread.
    from safetensors.torch import load_file

    from erase.cli import main
    from erase.masks import read_mask_metadata

    settings = {"steps": 6, "batch_size": 2, "sites": "ffn,norm", "lr_ffn": 0.3, "lr_norm": 0.3}
    space = tmp_path / "space.yaml"
    space.write_text("description: one configuration\nfixed:\n" + "".join(f"  {k}: {v}\n" for k, v in settings.items())
                     + "search:\n  beta: {distribution: categorical, choices: [1.5]}\n")
    masks = []
    for name, trials in (("first", 2), ("second", 1)):
        specs = plan("toy", ["striped"], str(space), trials, str(tmp_path / name), report_every=3, grace_steps=6,
                     tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
        (summary,) = run_sweep(specs, poll=0.5)
        assert [t["status"] for t in summary["trials"]] == ["finished"] * trials, summary
        masks += [os.path.join(t["checkpoint_path"], "mask.safetensors") for t in summary["trials"]]
    config = tmp_path / "config.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in {**settings, "beta": 1.5}.items()))
    threads = torch.get_num_threads()
    try:
        code = main(["train", "--concept", "striped", "--config", str(config), "--threads", "1", "--quiet",
                     "--out", str(tmp_path / "train.safetensors")])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, capsys.readouterr().err
    trained = load_file(str(tmp_path / "train.safetensors"))
    for path in masks:
        tensors = load_file(path)
        assert tensors.keys() == trained.keys() and all(torch.equal(tensors[k], trained[k]) for k in trained), path
    # the mask file says how to make it again
    record = json.loads(read_mask_metadata(masks[0])["extra"])["reproduce"]
    again = json.loads(read_mask_metadata(str(tmp_path / "train.safetensors"))["extra"])["reproduce"]
    assert record["threads"] == again["threads"] == 1 and record["seed"] == again["seed"] == 0
    assert record["prompts_sha"] == again["prompts_sha"] and record["erase_version"] and record["torch"]
    assert {k: record["config"][k] for k in settings} == {**settings, "sites": ["ffn", "norm"]}
