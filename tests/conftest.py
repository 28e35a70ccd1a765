import logging
import os
import subprocess
import sys
import time

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
logging.getLogger("transformers").setLevel(logging.ERROR)
logging.getLogger("diffusers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny():
    """The tiny random FLUX.1-architecture generator (fp32, CPU). Tests must not modify its weights."""
    from erase.pipelines import load_generator

    return load_generator("flux-tiny")


@pytest.fixture
def velocity_turns_nan(monkeypatch):
    """`turn(generator_class, after)`: that class's velocity returns NaN from its `after`-th call on."""

    def turn(generator_class, after: int):
        calls = {"n": 0}
        velocity = generator_class.velocity

        def flaky(self, x, sigma, cond):
            calls["n"] += 1
            out = velocity(self, x, sigma, cond)
            return out * float("nan") if calls["n"] > after else out

        monkeypatch.setattr(generator_class, "velocity", flaky)

    return turn


@pytest.fixture
def random_logits():
    """Random mask logits around 0 so that masks are neither all-on nor saturated."""

    def make(sites, seed=0, scale=2.0):
        g = torch.Generator().manual_seed(seed)
        return {s.name: torch.randn(s.size, generator=g) * scale for s in sites}

    return make


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process on loopback (SQLite backend in a temp folder, proxied artifacts)."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "mlflow"), "server",
                             "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                             "--artifacts-destination", str(folder / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    import urllib.request

    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            log.close()
            pytest.fail("mlflow server did not start:\n" + (folder / "server.log").read_text()[-3000:])
        time.sleep(0.5)
    yield {"uri": uri, "artifacts": folder / "artifacts"}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
