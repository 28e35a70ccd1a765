"""The Ray Serve deployment (`erase serve`): it follows a registry alias without dropping requests,
and refuses a mask that fails its check (at start it does not start; later it keeps the last good one)."""

import json
import threading
import time
import urllib.request

import pytest
from conftest import _free_port, log_mask_run

from erase.cli import main
from erase.registry import RegistryError

ALIAS = "models:/erase-toy-striped@production"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def promote_better(uri, tmp_path, seed: int, erasure_rate: float) -> float:
    """Log a run better than the ones before and promote it; returns when the alias moved."""
    log_mask_run(uri, "toy", "striped", tmp_path, erasure_rate=erasure_rate, preservation=1.0, seed=seed)
    assert main(["promote", "--concept", "striped", "--tracking-uri", uri]) == 0
    return time.monotonic()


def tamper(tmp_path) -> None:
    """Flip a byte of the newest logged mask artifact."""
    stored = sorted((tmp_path / "mlartifacts").rglob("mask.safetensors"), key=lambda p: p.stat().st_mtime)
    data = bytearray(stored[-1].read_bytes())
    data[-1] ^= 0xFF
    stored[-1].write_bytes(bytes(data))


@pytest.mark.slow
def test_the_server_follows_the_alias_without_dropping_a_request_and_keeps_the_last_good_mask(store, tmp_path, capsys):
    import ray
    from ray import serve

    from erase.deployment import application

    promote_better(store, tmp_path, seed=1, erasure_rate=0.04)
    port = _free_port()
    ray.init(address="local", num_cpus=4, object_store_memory=100 * 2**20, include_dashboard=False,
             log_to_driver=False)
    answers, failures, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            request = urllib.request.Request(f"http://127.0.0.1:{port}/", method="POST",
                                             data=json.dumps({"prompt": "a striped red cross", "seed": 0}).encode())
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    answers.append((time.monotonic(), json.loads(response.read())))
            except Exception as err:  # any failed request counts
                failures.append(repr(err))

    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application("toy", [ALIAS], tracking_uri=store, poll_seconds=1.0), name="erase", route_prefix="/")
        sender = threading.Thread(target=client, daemon=True)
        sender.start()
        deadline = time.monotonic() + 120
        while not answers:
            assert time.monotonic() < deadline, f"no answer in 120 s: {failures[:3]}"
            time.sleep(0.2)
        promoted = promote_better(store, tmp_path, seed=2, erasure_rate=0.0)

        def first_with(version, since):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                found = [t for t, a in answers if t > since and a["versions"] == [f"models:/erase-toy-striped/{version}"]]
                if found:
                    return found[0]
                time.sleep(0.2)
            raise AssertionError(f"no answer with version {version}: {answers[-1][1]['versions']}")

        switched = first_with(2, promoted)
        # a third version whose artifact was changed after logging: refused, version 2 kept, and said so
        log_mask_run(store, "toy", "striped", tmp_path, erasure_rate=0.0, preservation=1.0, seed=3)
        tamper(tmp_path)
        assert main(["promote", "--concept", "striped", "--tracking-uri", store, "--force"]) == 0
        moved = time.monotonic()
        deadline = time.monotonic() + 60
        while not any(t > moved and a["warning"] for t, a in answers) and time.monotonic() < deadline:
            time.sleep(0.2)
        stop.set()
        sender.join(timeout=120)
    finally:
        serve.shutdown()
        ray.shutdown()
    late = [a for t, a in answers if t > moved]
    assert late and all(a["versions"] == ["models:/erase-toy-striped/2"] for a in late)
    assert any("does not match" in (a["warning"] or "") for a in late)
    assert not failures, failures[:3]
    before = [a for t, a in answers if t < promoted]
    assert before and all(a["versions"] == ["models:/erase-toy-striped/1"] for a in before)
    with capsys.disabled():
        print(f"\nerase serve: {len(answers)} requests answered, {len(failures)} failed; the first answer with "
              f"version 2 came {switched - promoted:.1f} s after the promotion (polling every 1 s)")


def test_a_mask_that_fails_its_check_stops_the_start(store, tmp_path):
    from erase.deployment import MaskedModel

    promote_better(store, tmp_path, seed=1, erasure_rate=0.0)
    tamper(tmp_path)
    with pytest.raises(RegistryError, match="does not match"):
        MaskedModel("toy", [ALIAS], tracking_uri=store)


def test_serve_refuses_what_it_cannot_follow_before_starting_ray(store, tmp_path, capsys):
    promote_better(store, tmp_path, seed=1, erasure_rate=0.0)
    assert main(["serve", "--mask", "toy-striped.safetensors"]) == 2
    assert "follows registry aliases" in capsys.readouterr().err
    assert main(["serve", "--mask", "models:/erase-toy-striped@staging"]) == 2
    assert "has no alias 'staging'" in capsys.readouterr().err
