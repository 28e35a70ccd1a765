"""What a new user meets first: --help and --version, Ctrl-C at any point, and nothing lost to it."""

import argparse
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from erase.cli import build_parser

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def parsers(parser: argparse.ArgumentParser, name: str = "erase"):
    """Every parser of the command, with its full name: erase, erase train, erase masks apply, ..."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from parsers(subparser, f"{name} {sub}")


def test_every_flag_of_every_subcommand_has_help_and_one_default():
    seen = 0
    for name, parser in parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.dest != "help" and not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"`{name}` {action.option_strings or action.dest} has no help"
                seen += 1
        assert "(default: None)" not in text, name
        assert not re.search(r"\(default: [^)]*\) \(default:", text), f"`{name}` shows a default twice"
        assert text.count("(") == text.count(")"), f"`{name}`: an unclosed parenthesis in its help"
    assert seen > 100  # the walk reached every subcommand's flags
    steps = {name: a.help for name, p in parsers(build_parser()) for a in p._actions if "--steps" in a.option_strings}
    assert steps and all(text.startswith("optimisation steps") for text in steps.values()), steps  # one meaning


def test_version_and_help_are_quick_and_import_no_torch():
    version = subprocess.run([sys.executable, "-m", "erase.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and re.fullmatch(r"erase \d+\.\d+\.\d+\n", version.stdout)
    probe = ("import resource, sys; from erase.cli import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit as e:\n    code = e.code\n"
             "cpu = resource.getrusage(resource.RUSAGE_SELF)\n"
             "print(code, 'torch' in sys.modules, cpu.ru_utime + cpu.ru_stime, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    code, torch_loaded, cpu_seconds = done.stderr.split()[-3:]
    assert "sweep" in done.stdout and "promote" in done.stdout  # every command listed with its line
    assert code == "0" and torch_loaded == "False"
    assert float(cpu_seconds) < 2.0


def interrupt(argv: list[str], log, *, when, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m erase.cli argv` (stderr into the file `log`), send Ctrl-C (SIGINT) once
    `when(process, stderr so far)` is true."""
    with open(log, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "erase.cli", *argv], stdout=subprocess.PIPE, stderr=err_file,
                                env=ENV, text=True)
        started = time.monotonic()
        while proc.poll() is None and not when(proc, log.read_text()):
            assert time.monotonic() - started < timeout, log.read_text()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, log.read_text())


def loading(library: str, then: float = 0.0):
    """A `when` for interrupt(): `then` seconds after the process mapped a file named `library`."""
    seen = []

    def when(proc, err):
        with open(f"/proc/{proc.pid}/maps") as maps:
            if not seen and library in maps.read():
                seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= then

    return when


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="watches the process's mapped files in /proc")
@pytest.mark.parametrize("then", [0.0, 1.5])
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path, then):
    # the command is importing torch (then=0), or torch and the libraries after it, when the signal comes
    done = interrupt(["train", "--concept", "striped", "--out", str(tmp_path / "m.safetensors")], tmp_path / "log",
                     when=loading("libtorch", then))
    lines = [line for line in done.stderr.splitlines() if line.strip() and "erase striped" not in line]
    assert done.returncode == 130, done.stderr[-3000:]
    assert lines[-1].startswith("erase: interrupted") and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.slow
def test_ctrl_c_mid_run_saves_the_mask_and_resume_ends_where_an_uninterrupted_run_does(tmp_path, capsys):
    common = ["train", "--model", "flux-tiny", "--concept", "cat", "--steps", "60", "--threads", "1"]
    mask = tmp_path / "cat.safetensors"

    def past_step_12(proc, err):
        return any(int(n) >= 12 for n in re.findall(r"\| *(\d+)/60 ", err))

    done = interrupt([*common, "--out", str(mask)], tmp_path / "log", when=past_step_12)
    assert done.returncode == 130, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    folder = tmp_path / "cat.resume"
    assert message.startswith("erase: interrupted: the mask after step ") and f"--resume {folder}" in message
    assert mask.exists() and folder.is_dir()
    from erase.cli import main

    assert main(["train", "--concept", "striped", "--out", str(tmp_path / "t.safetensors"), "--resume",
                 str(folder)]) == 2  # the toy model cannot resume a flux-tiny run: said before any work
    assert "was made on model 'flux-tiny', not 'toy'" in capsys.readouterr().err

    resumed = subprocess.run([sys.executable, "-m", "erase.cli", *common, "--out", str(mask), "--resume", str(folder),
                              "--quiet"], capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "finished after 60 steps" in resumed.stdout and not folder.exists()
    plain = tmp_path / "plain.safetensors"
    subprocess.run([sys.executable, "-m", "erase.cli", *common, "--out", str(plain), "--quiet"], check=True,
                   capture_output=True, env=ENV)
    a, b = load_file(str(mask)), load_file(str(plain))
    # in one process a resumed run is bit for bit the uninterrupted one (test_trial); across processes the
    # float sums come out in another order (6e-6 in the logits measured): the tolerance is 1e-4
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-4) for k in a)
    assert sum(int(((a[k] > 0) != (b[k] > 0)).sum()) for k in a) <= 1  # the removed neurons: the same, near enough

    other = subprocess.run([sys.executable, "-m", "erase.cli", *common[:-4], "--steps", "80", "--threads", "1",
                            "--out", str(tmp_path / "x.safetensors"), "--resume", str(tmp_path)],
                           capture_output=True, text=True, env=ENV)
    assert other.returncode == 2 and "is not a resume point" in other.stderr


def test_commands_that_read_the_registry_create_no_store(tmp_path, monkeypatch, capsys):
    from erase.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["masks", "list"]) == 0
    assert "no registered masks: no MLflow store at" in capsys.readouterr().out
    for argv in (["masks", "show", "erase-toy-striped@production"], ["promote", "--concept", "striped"],
                 ["masks", "apply", "models:/erase-toy-striped@production", "--prompt", "a red cross", "--out", "x.png"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "no MLflow store at" in err and "MLFLOW_TRACKING_URI" in err, (argv, err)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["a folder", "a read-only folder"])
def test_an_out_that_cannot_be_written_fails_before_any_work(tmp_path, capsys, where):
    from erase.cli import main

    if where == "a folder":
        out = tmp_path
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out = locked / "m.safetensors"
    started = time.process_time()
    assert main(["train", "--concept", "striped", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("erase: error: --out") and "erase striped" not in err  # no training began
    assert time.process_time() - started < 30  # a 200-step training takes minutes


def test_sweep_dry_run_checks_the_space_and_prompts_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from erase.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("checked, nothing run: 1 study (striped)") and "search beta: loguniform" in out
    (tmp_path / "bad.yaml").write_text("search:\n  beta: {distribution: loguniform, low: 0.1, high: 1}\n"
                                       "fixed:\n  stepz: 10\n")
    assert main(["sweep", "--dry-run", "--space", "bad.yaml"]) == 2
    assert "'stepz' is not an erasure setting" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["bad.yaml"]  # no Ray state, no MLflow store


def test_max_prompts_makes_an_evaluation_small_and_spreads_over_each_set():
    from erase.evaluate import evaluation_rows

    full = evaluation_rows("toy", "striped", 1)
    quick = evaluation_rows("toy", "striped", 1, max_prompts=2)
    assert len(quick) < 60 < len(full)
    for kind in {(r["kind"], r["concept"]) for r in full}:
        prompts = [r["prompt"] for r in full if (r["kind"], r["concept"]) == kind]
        picked = [r["prompt"] for r in quick if (r["kind"], r["concept"]) == kind]
        assert len(picked) == min(2, len(prompts)) and set(picked) <= set(prompts)
        if len(prompts) > 2:
            assert picked[0] == prompts[0] and picked[1] == prompts[len(prompts) // 2]  # spread, not the first two


def test_prompts_the_toy_model_cannot_read_are_warned_about(tmp_path, capsys):
    from erase.prompts import prompt_sets

    path = tmp_path / "p.txt"
    path.write_text("zorp blarg\na striped red cross\n")
    prompts, _ = prompt_sets("toy", "striped", prompts=str(path))
    err = capsys.readouterr().err
    assert prompts == ["zorp blarg", "a striped red cross"]
    assert err.startswith("erase: warning: toy has no token for 'blarg', 'zorp' in 1 of 2 prompts")
    assert "1 prompts (e.g. 'zorp blarg') have no word it knows" in err
    path.write_text("a striped red cross\n")
    prompt_sets("toy", "striped", prompts=str(path))
    assert capsys.readouterr().err == ""


def test_a_graph_out_dir_that_is_a_file_fails_before_any_erasure(tmp_path, capsys):
    from erase.cli import main

    taken = tmp_path / "graph"
    taken.write_text("")
    assert main(["graph", "--out-dir", str(taken)]) == 2
    assert capsys.readouterr().err.startswith(f"erase: error: --out-dir {str(taken)!r} is a file")


def test_a_run_interrupted_while_the_model_loads_is_not_left_running(tmp_path, monkeypatch, capsys):
    import mlflow

    import erase.pipelines
    from erase.cli import main

    def interrupted_load(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(erase.pipelines, "load_generator", interrupted_load)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["train", "--concept", "striped", "--out", str(tmp_path / "m.safetensors"), "--tracking-uri", uri]) == 130
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
