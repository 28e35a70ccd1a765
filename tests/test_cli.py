"""The `erase` command end to end, in process: output, files, and errors for bad input."""

import json
import os
import pickle

import pytest
import torch

from erase.cli import main
from erase.masks import load_mask_file, read_mask_metadata
from erase.pipelines.toy_world import ROBUSTNESS_FAMILIES
from erase.prompts import prompt_set_hash


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_sites_json_for_real_flux(capsys):
    code, out, _ = run(capsys, "sites", "--model", "flux.1-schnell", "--json")
    assert code == 0
    groups = json.loads(out)["groups"]
    assert groups["ffn"] == {"masks": 38, "entries": 466_944}
    assert groups["norm"] == {"masks": 19, "entries": 350_208}
    assert groups["attn"] == {"masks": 57, "entries": 1_368}


def test_train_writes_mask_and_metrics(tmp_path, capsys, tiny):
    out = tmp_path / "cat.safetensors"
    prompts = tmp_path / "cat.txt"
    prompts.write_text("# concept prompts\na photo of a cat\n\na cat on a sofa\n")
    code, stdout, _ = run(capsys, "train", "--model", "flux-tiny", "--concept", "cat", "--prompts", str(prompts),
                          "--steps", "3", "--batch-size", "1", "--out", str(out), "--quiet")
    assert code == 0, stdout
    assert "removed" in stdout and str(out) in stdout
    metrics = json.loads((tmp_path / "cat.json").read_text())
    assert metrics["status"] == "finished" and metrics["steps_done"] == 3
    masks, meta = load_mask_file(str(out), tiny.mask_sites(), "flux-tiny")
    assert meta["concept"] == "cat" and meta["model_id"] == "flux-tiny"
    assert {s.group for s in masks.sites} == {"ffn", "norm"}
    code, stdout, _ = run(capsys, "masks", "inspect", str(out), "--json")
    assert code == 0 and json.loads(stdout)["sparsity"]["entries"] == sum(s.size for s in masks.sites)


def test_nan_loss_exits_nonzero_and_keeps_the_last_good_mask(tmp_path, capsys, velocity_turns_nan):
    from erase.pipelines.flux import FluxGenerator

    velocity_turns_nan(FluxGenerator, after=40)
    out = tmp_path / "m.safetensors"
    code, _, err = run(capsys, "train", "--model", "flux-tiny", "--concept", "cat", "--steps", "30",
                       "--batch-size", "1", "--out", str(out), "--quiet")
    assert code == 1
    assert "non-finite loss" in err and "last good mask" in err and str(out) in err
    meta = read_mask_metadata(str(out))
    assert json.loads(meta["extra"])["status"].startswith("stopped")
    assert json.loads((tmp_path / "m.json").read_text())["status"].startswith("stopped")


@pytest.mark.parametrize("argv, message", [
    (["sites", "--model", "flux.2-max"], "unknown model 'flux.2-max'; known models: toy, flux.1-schnell"),
    (["train", "--model", "flux-tiny", "--model-path", "/nowhere", "--concept", "cat", "--out", "m.safetensors"],
     "model path '/nowhere' is not a directory"),
    (["train", "--model", "flux-tiny", "--concept", "cat", "--sites", "ffn,mlp", "--out", "m.safetensors"],
     "site group 'mlp' does not exist"),
    (["train", "--model", "flux-tiny", "--concept", "cat", "--prompts", "/no/file.txt", "--out", "m.safetensors"],
     "concept prompt file '/no/file.txt' does not exist"),
    (["train", "--model", "flux-tiny", "--concept", "cat", "--target", "substitute", "--out", "m.safetensors"],
     "--substitute OLD=NEW"),
    (["train", "--model", "flux-tiny", "--concept", "cat", "--out", "/no/dir/m.safetensors"],
     "output folder '/no/dir' does not exist"),
    (["masks", "inspect", "/no/mask.safetensors"], "does not exist"),
    (["eval", "--concept", "circle", "--out", "/no/dir/report.json"], "output folder '/no/dir' does not exist"),
    (["masks", "apply", "/no/mask.safetensors", "--prompt", "a circle", "--out", "/no/dir/x.png"],
     "output folder '/no/dir' does not exist"),
    (["train", "--model", "flux-tiny", "--concept", "cat", "--metrics", "/no/dir/m.json"],
     "output folder '/no/dir' does not exist"),
    (["bench", "--targets", "cross", "--erasure-level", "0.05"], "--erasure-level is the rate --match-erasure matches"),
    (["bench", "--targets", "cross", "--match-erasure", "--erasure-level", "5"], "(5% is 0.05)"),
])
def test_bad_input_is_one_clear_line_and_exit_2(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("erase: error: ") and message in err
    assert "Traceback" not in err


def test_empty_prompt_file_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    code, _, err = run(capsys, "train", "--model", "flux-tiny", "--concept", "cat", "--neutral-prompts", str(empty),
                       "--out", str(tmp_path / "m.safetensors"))
    assert code == 2 and "has no prompts" in err


def _reference_files(folder, with_attn=True):
    from erase.pipelines import mask_sites

    sites = mask_sites("flux.1-schnell")
    g = torch.Generator().manual_seed(0)
    layers = {grp: [torch.randn(s.size, generator=g) for s in sites if s.group == grp] for grp in ("ffn", "norm", "attn")}
    torch.save(layers["ffn"], folder / "ff.pt")
    torch.save(layers["norm"], folder / "norm.pt")
    if with_attn:
        torch.save([torch.nn.Parameter(t) for t in layers["attn"]], folder / "attn.pt")
    return sites, layers


def test_import_reference_masks(tmp_path, capsys):
    sites, layers = _reference_files(tmp_path)
    out = tmp_path / "ref.safetensors"
    code, stdout, _ = run(capsys, "masks", "import-reference", str(tmp_path), "--model", "flux.1-schnell",
                          "--concept", "nudity", "--out", str(out))
    assert code == 0 and "114 masks" in stdout
    masks, meta = load_mask_file(str(out), sites, "flux.1-schnell")
    ffn = [s for s in sites if s.group == "ffn"]
    assert ffn[1].name == "ffn.transformer_blocks.0.ff_context"  # ff and ff_context alternate
    assert torch.equal(masks.logits[ffn[1].name], layers["ffn"][1])
    attn = [s for s in sites if s.group == "attn"]
    assert attn[19].name == "attn.single_transformer_blocks.0"
    assert torch.equal(masks.logits[attn[19].name], layers["attn"][19])
    assert meta["concept"] == "nudity"


class NotATensor:
    pass


def test_import_reference_refuses_anything_but_tensors(tmp_path, capsys):
    _reference_files(tmp_path, with_attn=False)
    with open(tmp_path / "attn.pt", "wb") as f:
        pickle.dump([NotATensor()], f)
    code, _, err = run(capsys, "masks", "import-reference", str(tmp_path), "--out", str(tmp_path / "x.safetensors"))
    assert code == 2 and "attn.pt" in err and "weights_only" in err
    torch.save([torch.zeros(3)] * 57, tmp_path / "attn.pt")
    code, _, err = run(capsys, "masks", "import-reference", str(tmp_path), "--out", str(tmp_path / "x.safetensors"))
    assert code == 2 and "has 3 entries, the site has 24" in err
    code, _, err = run(capsys, "masks", "import-reference", str(tmp_path / "nope"), "--out", str(tmp_path / "x.safetensors"))
    assert code == 2 and "is not a directory" in err


@pytest.mark.slow
def test_eval_on_the_toy_world_gives_every_figure_with_an_interval(tmp_path, capsys):
    mask = tmp_path / "circle.safetensors"
    code, _, err = run(capsys, "train", "--concept", "circle", "--steps", "30", "--out", str(mask), "--quiet")
    assert code == 0, err
    report_file = tmp_path / "circle.html"
    code, out, err = run(capsys, "eval", "--mask", str(mask), "--json", "--seeds-per-prompt", "1",
                         "--attack-prompts", "2", "--attack-steps", "3", "--report", str(report_file))
    assert code == 0, err
    report = json.loads(out)
    assert report["concept"] == "circle"  # read from the mask file
    for key in ("erasure_rate", "preservation", "neutral_fidelity", "rephrase_erasure_rate", "robust_erasure_rate",
                "attack_success_rate"):
        figure = report[key]
        assert {"value", "n", "low", "high"} <= set(figure), key
        assert figure["n"] > 0 and figure["low"] <= figure["value"] <= figure["high"], (key, figure)
        assert figure["split"]["name"] == "toy:test" and len(figure["split"]["hash"]) == 16, (key, figure)
    assert set(report["robustness"]) == set(ROBUSTNESS_FAMILIES)
    assert report["robust_erasure_rate"]["n"] == sum(f["masked"]["n"] for f in report["robustness"].values()) \
        + report["rephrase_erasure_rate"]["n"]
    assert report["attack_success_rate"]["n"] == 2
    assert report["detector"]["detector"] == "toy" and len(report["detector"]["weights_sha256"]) == 64
    assert report_file.read_text().count("data:image/png;base64,") >= 16


def test_eval_base_model_without_a_mask(tmp_path, capsys):
    code, out, err = run(capsys, "eval", "--concept", "circle", "--json", "--seeds-per-prompt", "1")
    assert code == 0, err
    report = json.loads(out)
    assert report["erasure_rate"]["value"] == report["base_rate"]["value"] == report["detection"]["circle"]
    assert report["preservation"]["value"] == 1.0 and "neutral_fidelity" not in report
    assert report["erasure_rate"]["split"]["name"] == "toy:test"
    # the user's prompt file replaces the concept's rows, and the figure says it came from that file
    own = tmp_path / "circles.txt"
    own.write_text("a circle\na red circle\na circle on a dark background\n")
    code, out, err = run(capsys, "eval", "--concept", "circle", "--json", "--seeds-per-prompt", "2",
                         "--eval-prompts", str(own))
    assert code == 0, err
    figure = json.loads(out)["erasure_rate"]
    assert figure["n"] == 6 and figure["split"] == {"name": f"file:{own}", "hash": prompt_set_hash(
        ["a circle", "a red circle", "a circle on a dark background"]), "prompts": 3}


def test_a_sweep_in_which_no_trial_finished_is_a_failure(capsys):
    from erase.cli.sweep import no_trial_finished as _no_trial_finished

    finished = {"concept": "circle", "study_dir": "/s/circle", "best": {"score": 0.5}}
    nothing = {"concept": "red", "study_dir": "/s/red", "best": None}
    assert _no_trial_finished([finished]) == 0
    assert _no_trial_finished([finished, nothing]) == 1
    err = capsys.readouterr().err
    assert "no trial of 'red' finished" in err and "/s/red/study.log" in err and "circle" not in err


def test_ray_output_goes_to_stderr_while_json_is_kept_for_stdout():
    # Ray's driver writes raylet warnings to file descriptor 1; a subprocess shows what reaches each stream
    import subprocess
    import sys

    code = ("import os\nfrom erase.cli.common import ray_output_off_stdout\n"
            "with ray_output_off_stdout() as out:\n    os.write(1, b'(raylet) WARNING\\n')\n"
            "    print('[1,', file=out)\n"
            "print('2]')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [1, 2] and "(raylet) WARNING" in done.stderr


def test_bench_targets_names_the_level_to_match_at_when_erasure_is_not_equal(monkeypatch, capsys):
    # the level-0.15 cross benchmark, replayed: adaptive never reached 0.15, so the run was not equal
    from erase import bench

    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "age_cross_level015.json")) as f:
        report = json.load(f)
    monkeypatch.setattr(bench, "compare_targets", lambda *args, **kwargs: report)
    code, out, _ = run(capsys, "bench", "--targets", "cross", "--match-erasure")
    assert code == 0
    assert "erasure rates NOT equal within 2 points (spread 0.050, level 0.150)" in out
    assert "the hardest erasure every strategy reached is 0.200: compare there with --erasure-level RATE" in out


def test_an_error_that_is_not_the_users_keeps_its_traceback(monkeypatch, capsys):
    # a ValueError from inside a library is a bug, not bad input: it must not become a one-line exit 2
    import erase.masks

    def broken(sites):
        raise ValueError("something inside numpy went wrong")

    monkeypatch.setattr(erase.masks, "fingerprint", broken)
    with pytest.raises(ValueError, match="inside numpy"):
        main(["sites", "--model", "flux-tiny"])
    assert "erase: error" not in capsys.readouterr().err


def test_a_prompt_file_that_is_not_utf8_names_the_file_and_the_fix(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("a caf\xe9 in the street\n".encode("latin-1"))
    code, _, err = run(capsys, "train", "--model", "flux-tiny", "--concept", "cat", "--prompts", str(bad),
                       "--out", str(tmp_path / "m.safetensors"))
    assert code == 2 and str(bad) in err and "UTF-8" in err and "Traceback" not in err
