"""`erase plan`: the measured bytes per token, the predicted peak against a measured one, the choice of setting."""

import json
import os
import subprocess
import sys

import pytest
import torch

from erase import bench, plan
from erase.cli import main
from erase.config import resolve
from erase.errors import EraseError

# Predicted activations of one optimisation step against the peak RSS `erase.bench` measures, relative.
TOLERANCE = 0.25


def bench_cfg(**flags):
    return resolve("flux-bench", "plan", flags={"batch_size": 4, **flags})


# ---------------------------------------------------------------- fast


def test_help_lists_the_budget_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--gpu-memory" in out and "--utilisation" in out and "--micro-batch" in out


@pytest.mark.parametrize("argv, words", [
    (["--model", "toy"], "plan supports FLUX.1 models"),
    (["--model", "no-such-model"], "unknown model"),
    (["--model", "flux-bench", "--gpu-memory", "0"], "--gpu-memory"),
    (["--model", "flux-bench", "--utilisation", "0"], "--utilisation"),
    (["--model", "flux-bench", "--utilisation", "1.5"], "--utilisation"),
    (["--model", "flux-bench", "--recipe", "no-such-recipe"], "no recipe"),
])
def test_bad_input_is_one_line_before_anything_is_measured(monkeypatch, capsys, argv, words):
    def measured(*args, **kwargs):
        raise AssertionError("measured before the input was checked")

    monkeypatch.setattr(plan, "block_memory", measured)
    assert main(["plan", *argv]) == 2
    assert words in capsys.readouterr().err


def test_plan_function_checks_its_input_too():
    cfg = bench_cfg()
    for kwargs in ({"gpu_memory_gb": -1}, {"utilisation": 0.0}, {"dtype": "fp8"}):
        with pytest.raises(EraseError):
            plan.plan("flux-bench", cfg, **kwargs)


def test_block_bytes_grow_linearly_with_the_tokens():
    # attention that saved the tokens x tokens scores would bend this line
    config = plan.transformer_facts("flux-bench")["config"]
    sizes = ((64, 16), (128, 32), (256, 64))
    for kind in ("dual", "single"):
        rows = plan.measure_block(kind, config, torch.float32, "cpu", ("ffn", "norm"), sizes)
        tokens = [image + text for image, text in sizes]
        for key in ("saved", "backward"):
            slope = (rows[1][key] - rows[0][key]) / (tokens[1] - tokens[0])
            predicted = rows[1][key] + slope * (tokens[2] - tokens[1])
            assert slope > 0
            assert abs(rows[2][key] - predicted) < 0.01 * rows[2][key], (kind, key, rows)


def test_masked_blocks_save_more_than_unmasked_ones():
    # the taps multiply activations by values that require grad: the products' inputs are saved
    config = plan.transformer_facts("flux-bench")["config"]
    masked, = plan.measure_block("dual", config, torch.float32, "cpu", ("ffn", "norm"), ((256, 64),))
    plain, = plan.measure_block("dual", config, torch.float32, "cpu", (), ((256, 64),))
    assert masked["saved"] > plain["saved"] > 0


def test_the_text_length_setting_sets_the_text_tokens():
    cfg = bench_cfg()
    assert plan.token_counts("flux-bench", cfg) == (256, 64)  # 64 px / VAE factor 2 / 2x2 packing: 16², max_text
    cfg.text_length = 32  # the field the run config is getting; read with getattr until then
    assert plan.token_counts("flux-bench", cfg) == (256, 32)


def test_huge_memory_runs_the_whole_batch_without_block_checkpointing():
    assert plan.choose_setting(bench_cfg(), 10_000, model="flux-bench") == {"micro_batch": None,
                                                                            "block_checkpointing": False}


def test_tight_memory_takes_the_smallest_setting():
    report = plan.plan("flux-bench", bench_cfg())
    peaks = sorted(row["peak_gb"] for row in report["candidates"])
    assert peaks[0] < peaks[1], "no single smallest setting: the test would not tell settings apart"
    tight = plan.choose_setting(bench_cfg(), peaks[0] + 1e-6, model="flux-bench")
    assert tight == {"micro_batch": 1, "block_checkpointing": True}
    too_small = plan.plan("flux-bench", bench_cfg(), gpu_memory_gb=peaks[0] / 2)
    assert not too_small["fits"] and too_small["setting"] == tight
    assert "GPU with more memory" in plan.advice(too_small)


def test_the_choice_is_the_cheapest_setting_that_fits():
    report = plan.plan("flux-bench", bench_cfg(), gpu_memory_gb=10_000)
    rows = {(r["micro_batch"], r["block_checkpointing"]): r for r in report["candidates"]}
    assert set(rows) == {(m, b) for m in (4, 2, 1) for b in (False, True)}
    assert rows[4, True]["flops_per_run"] > rows[4, False]["flops_per_run"]  # a recomputed forward per step
    assert rows[4, False]["peak_gb"] > rows[1, False]["peak_gb"] > rows[1, True]["peak_gb"]
    assert report["peak_gb"] == rows[4, False]["peak_gb"] and report["fits"]


def test_run_flops_follow_the_run():
    cfg = bench_cfg(steps=10, sampling_steps=4)
    base = plan.run_flops("flux-bench", cfg, False)["training"]
    assert plan.run_flops("flux-bench", bench_cfg(steps=20, sampling_steps=4), False)["training"] == pytest.approx(2 * base)
    assert plan.run_flops("flux-bench", bench_cfg(steps=10, sampling_steps=4, grad_accum=3),
                          False)["training"] == pytest.approx(3 * base)
    forward, backward = plan.sample_step_flops("flux-bench", 256, 64)
    params = plan.transformer_facts("flux-bench")["params"]
    assert forward >= 2 * params * 256 * 0.5  # every weight meets every image token (the text ones most weights)
    assert 0.5 * forward < backward < 3 * forward


def test_adaptive_target_runs_the_whole_batch():
    cfg = resolve("flux-bench", "a cat", flags={"batch_size": 4, "target": "adaptive", "vocabulary": "dog,bird"})
    assert {m for m, _ in plan.candidate_settings(cfg)} == {4}


# ---------------------------------------------------------------- FLUX.1-schnell at full width


@pytest.mark.slow
def test_paper_recipe_plan_as_json(capsys):
    assert main(["plan", "--model", "flux.1-schnell", "--recipe", "paper", "--gpu-memory", "80", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert isinstance(report["fits"], bool) and isinstance(report["peak_gb"], float)
    assert isinstance(report["gpu_minutes"], float) and report["gpu_minutes"] > 0
    assert set(report["setting"]) == {"micro_batch", "block_checkpointing"}
    assert isinstance(report["setting"]["block_checkpointing"], bool)
    assert report["setting"]["micro_batch"] is None or isinstance(report["setting"]["micro_batch"], int)
    per_token = report["activation_bytes_per_token"]
    assert isinstance(per_token["dual"], int) and isinstance(per_token["single"], int)
    assert per_token["dual"] > per_token["single"] > 3072 * 2  # each block saves several widths per token
    assert report["tokens"] == {"image": 4096, "text": 256, "total": 4352}
    assert report["dtype"] == "bf16" and report["recipe"] == "paper"
    assert 20 < report["weights_gb"]["transformer"] < 25  # 11.9B parameters in bf16
    assert report["fits"] == (report["peak_gb"] <= 80)
    fitting = [r for r in report["candidates"] if r["peak_gb"] <= 80]
    assert report["flops_per_run"] == min(r["flops_per_run"] for r in fitting)


# ---------------------------------------------------------------- predicted against measured

# The prediction, and `erase.bench.measure_row`'s measurement, each in a fresh process with the
# benchmark's allocator setting (bench.ROW_ENV), so that the resident set follows the live bytes.
ROW = """
import json, logging, sys
logging.disable(logging.WARNING)
from erase import bench, config, plan
spec = json.loads(sys.argv[1])
if spec["predict"]:
    cfg = config.resolve(spec["model"], "x", flags={"block_checkpointing": spec["block_checkpointing"],
                                                    "sampling_steps": spec["steps"], "batch_size": 1})
    dtype = plan.run_dtype(spec["model"])
    memory = plan.block_memory(spec["model"], dtype)
    print(json.dumps(plan.activation_bytes(spec["model"], cfg, memory, dtype, 1, spec["block_checkpointing"])))
else:
    print(json.dumps(bench.measure_row(spec["model"], spec["steps"], True, repeats=1,
                                       block_checkpointing=spec["block_checkpointing"])))
"""
ROW_ENV = {**bench.ROW_ENV, "OMP_NUM_THREADS": "2"}


def row(model: str, steps: int, block_checkpointing: bool, predict: bool) -> dict:
    spec = {"model": model, "steps": steps, "block_checkpointing": block_checkpointing, "predict": predict}
    proc = subprocess.run([sys.executable, "-c", ROW, json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, **ROW_ENV}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def relative_errors(model: str, steps: int) -> dict:
    errors = {}
    for blocks in (False, True):
        predicted = row(model, steps, blocks, predict=True)["total"] / 2**20
        measured = row(model, steps, blocks, predict=False)["peak_mb"]  # MiB above the post-first-step baseline
        assert measured > 0, "nothing measured: the comparison would be vacuous"
        errors[blocks] = (predicted - measured) / measured
        print(f"{model} block checkpointing {blocks}: predicted {predicted:.1f} MiB, measured {measured:.1f} MiB, "
              f"error {errors[blocks]:+.1%}")
    return errors


@pytest.mark.slow
def test_predicted_activations_match_the_measured_peak_of_flux_bench():
    errors = relative_errors("flux-bench", steps=2)
    assert all(abs(e) < TOLERANCE for e in errors.values()), errors


@pytest.mark.slow
def test_predicted_activations_match_the_measured_peak_at_full_width():
    # flux-wide: one dual and one single block at width 3072 in bf16, 1024 + 64 tokens: ~1.3 GB of weights
    errors = relative_errors("flux-wide", steps=2)
    assert all(abs(e) < TOLERANCE for e in errors.values()), errors
