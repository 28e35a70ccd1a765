import logging
import os
import re
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


def _postgres_bindir() -> str:
    """The folder with PostgreSQL's server programs: Debian keeps them in /usr/lib/postgresql/<ver>/bin,
    off PATH; elsewhere (or with symlinks in /usr/local/bin) `initdb` is on PATH."""
    import glob
    import shutil

    wanted = ("initdb", "pg_ctl", "postgres")
    found = shutil.which("initdb")
    candidates = [os.path.dirname(os.path.realpath(found))] if found else []
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(versions, key=lambda d: [int(p) for p in re.findall(r"\d+", d)], reverse=True)
    for folder in candidates:
        if all(os.access(os.path.join(folder, name), os.X_OK) for name in wanted):
            return folder
    pytest.fail("PostgreSQL's server programs (initdb, pg_ctl, postgres) were not found on PATH nor in "
                "/usr/lib/postgresql/*/bin: the MLflow tests run their server on PostgreSQL; install it with "
                "`apt-get install postgresql` (.ci/run does)", pytrace=False)


def _postgres_account():
    """(uid, gid) to run PostgreSQL as: the current user, or, as root (which PostgreSQL refuses),
    the `postgres` system user that Debian's package creates (`nobody` where there is none)."""
    import pwd

    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    pytest.fail("the tests run as root, which PostgreSQL refuses, and there is no `postgres` or `nobody` user "
                "to run it as; `apt-get install postgresql` creates `postgres`", pytrace=False)


@pytest.fixture(scope="session")
def postgres_uri():
    """A throwaway PostgreSQL server on a free loopback port; yields `postgresql://USER:PW@127.0.0.1:PORT/DB`.

    Its data folder and socket live in a fresh folder under the system temp dir (not pytest's, whose
    root-only parents another user cannot enter, and whose depth could pass the 107-byte socket path
    limit); removed at the end.
    """
    import secrets
    import shutil
    import tempfile

    try:
        import psycopg2
    except ImportError:
        pytest.fail("psycopg2 is missing (MLflow needs it for PostgreSQL): pip install -e '.[test]'", pytrace=False)
    bindir = _postgres_bindir()
    account = _postgres_account()
    base = tempfile.mkdtemp(prefix="erase-pg-")
    user, password, database, port = "erase", secrets.token_hex(12), "mlflow", _free_port()
    data = os.path.join(base, "data")
    with open(os.path.join(base, "pwfile"), "w") as f:
        f.write(password + "\n")
    if account is not None:
        os.chown(base, *account)
        os.chown(os.path.join(base, "pwfile"), *account)

    def pg(program, *args, timeout=120, check=True):
        # as root: drop to the account (its own group, no supplementary groups) in the child only
        as_user = {} if account is None else {"user": account[0], "group": account[1], "extra_groups": []}
        done = subprocess.run([os.path.join(bindir, program), *args], cwd=base, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "LC_ALL": "C"}, **as_user)
        if done.returncode != 0 and check:
            server_log = os.path.join(base, "server.log")
            tail = open(server_log).read()[-3000:] if os.path.exists(server_log) else ""
            pytest.fail(f"{program} {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}{tail}",
                        pytrace=False)

    try:
        pg("initdb", "-D", data, "-U", user, f"--pwfile={base}/pwfile", "--auth-local=trust",
           "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-locale", "--no-sync")
        with open(os.path.join(data, "postgresql.conf"), "a") as f:
            # loopback only, socket in our folder (not /var/run/postgresql); durability settings off:
            # nothing here outlives the session, and no test crashes the database
            f.write(f"\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{base}'\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n")
        pg("pg_ctl", "start", "-D", data, "-l", os.path.join(base, "server.log"), "-w", "-t", "60")
        admin = psycopg2.connect(host="127.0.0.1", port=port, user=user, password=password, dbname="postgres")
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {database}")
        admin.close()
        yield f"postgresql://{user}:{password}@127.0.0.1:{port}/{database}"
    finally:
        if os.path.exists(os.path.join(data, "postmaster.pid")):  # running, or half started
            pg("pg_ctl", "stop", "-D", data, "-m", "fast", "-w", "-t", "60", check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, postgres_uri):
    """A real `mlflow server` process on loopback: runs and the registry in the PostgreSQL above,
    artifacts proxied to a temp folder."""
    # The driver named: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg (3), 2.0 as psycopg2
    backend = postgres_uri.replace("postgresql://", "postgresql+psycopg2://", 1)
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "mlflow"), "server",
                             "--backend-store-uri", backend,
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
    yield {"uri": uri, "artifacts": folder / "artifacts", "backend_store_uri": backend}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def log_mask_run(uri, model, concept, folder, *, erasure_rate, preservation, seed=0, sweep="sweep-a", test=None):
    """A finished MLflow run as a sweep trial leaves it, with a random ffn mask of `model`: metrics,
    tags and the mask artifact. Returns (run id, mask file)."""
    from erase.masks import Masks, save_mask_file
    from erase.pipelines import mask_sites
    from erase.tracking import RunLogger, connect, ensure_experiment

    sites = mask_sites(model)
    g = torch.Generator().manual_seed(seed)
    masks = Masks([s for s in sites if s.group == "ffn"],
                  {s.name: torch.randn(s.size, generator=g) + 1 for s in sites if s.group == "ffn"})
    path = str(folder / f"{concept}-{seed}.safetensors")
    save_mask_file(path, masks, model_id=model, model_sites=sites, concept=concept)
    connect(uri)
    ensure_experiment(model, concept)
    logger = RunLogger(uri, model, concept, run_name=f"trial-{seed}", params={"beta": 0.01, "seed": seed},
                       tags={"erase.sweep": sweep, "erase.trial": f"t{seed}", "erase.fingerprint": "x"})
    for step in (10, 20):
        logger.metrics({"loss": 1.0 / step}, step=step)
    score = (1 - erasure_rate) * preservation
    logger.metrics({"erasure_rate": erasure_rate, "preservation": preservation, "score": score, "base_rate": 1.0,
                    **{f"test_{k}": v for k, v in (test or {}).items()}}, step=20)
    logger.finish(path, {"erasure_rate": erasure_rate})
    return logger.run_id, path
