"""A trial without Ray: reports at the recipe's log steps, one final report, checkpoints that resume, failures reported."""

import dataclasses

import pytest
import torch

from erase.config import TrainConfig
from erase.evaluate import Evaluator, rows_from_sets
from erase.trial import LocalReporter, read_checkpoint, run_trial

CAT, NEUTRAL = ["a photo of a cat", "a cat on a sofa"], ["a bowl of fruit", "a red car"]


class Recorder:
    def __init__(self):
        self.reports, self.failures = [], []

    def report(self, report):
        self.reports.append(report)

    def fail(self, error):
        self.failures.append(error)


def test_a_trial_reports_every_log_step_once_and_the_end_once(tiny):
    cfg = TrainConfig(concept="cat", steps=6, batch_size=1, log_every=2, sampling_steps=2)
    rows = rows_from_sets({"concept": {"circle": ["a circle"], "square": ["a square"]}}, seeds_per_prompt=2)
    evaluator = Evaluator(tiny, {"name": "toy"}, rows, concept="circle")  # flux-tiny draws 16x16, as the toy world
    recorder = Recorder()
    result = run_trial(tiny, cfg, CAT, NEUTRAL, recorder, evaluator=evaluator, tester=evaluator)
    assert [(r.step, r.final) for r in recorder.reports] == [(2, False), (4, False), (6, True)]
    final = recorder.reports[-1]
    # the tester measures once, at the end, with the held-out erasure's interval and n (2 seeds of "a circle")
    assert not any(k.startswith("test_") for r in recorder.reports[:-1] for k in r.metrics)
    test = {k: v for k, v in final.metrics.items() if k.startswith("test_")}
    assert test["test_erasure_n"] == 2 and test["test_score"] == final.metrics["score"]
    assert test["test_erasure_rate_low"] <= test["test_erasure_rate"] <= test["test_erasure_rate_high"]
    assert final.status == "finished" and final.result is result and final.results and not recorder.reports[0].results
    for report in recorder.reports:
        assert {"loss", "sparsity", "erasure_rate", "base_rate", "score", "step"} <= set(report.metrics)
        assert 0.0 <= report.metrics["score"] <= 1.0 and report.metrics["step"] == report.step
    assert recorder.reports[0].resume_point["step"] == 2 and final.resume_point["step"] == 6
    assert not recorder.failures


def test_a_checkpoint_resumes_the_trial_where_it_was(tiny, tmp_path):
    cfg = TrainConfig(concept="cat", steps=4, batch_size=1, log_every=2, sampling_steps=2)
    recorder = Recorder()
    run_trial(tiny, dataclasses.replace(cfg, steps=2), CAT, NEUTRAL, recorder)
    first = recorder.reports[-1]
    first.write_checkpoint(str(tmp_path), metrics=first.metrics, run_id="run-1", extra={"step": first.step})
    resume, saved = read_checkpoint(str(tmp_path))
    assert saved == {"mlflow_run_id": "run-1", "metrics": first.metrics}
    assert all(torch.equal(resume["logits"][k], v) for k, v in first.masks.snapshot().items())
    resumed = Recorder()
    result = run_trial(tiny, cfg, CAT, NEUTRAL, resumed, resume=resume)
    assert [r.step for r in resumed.reports] == [4] and result.steps_done == 4
    assert [row["step"] for row in result.history] == [2, 4]  # the first run's row, then the resumed one's
    whole = run_trial(tiny, cfg, CAT, NEUTRAL, Recorder())  # no interruption: the same masks, bit for bit
    assert all(torch.equal(whole.masks.snapshot()[k], v) for k, v in result.masks.snapshot().items())


def test_a_failing_trial_tells_its_reporter_and_raises(tiny, monkeypatch):
    def broken(self, x, sigma, cond):
        raise RuntimeError("the GPU fell off")

    monkeypatch.setattr(type(tiny), "velocity", broken)
    recorder = Recorder()
    with pytest.raises(RuntimeError, match="fell off"):
        run_trial(tiny, TrainConfig(concept="cat", steps=2, batch_size=1), CAT, NEUTRAL, recorder)
    assert [str(e) for e in recorder.failures] == ["the GPU fell off"] and not recorder.reports


def test_a_non_finite_loss_ends_the_trial_with_its_last_good_masks(tiny, tmp_path, velocity_turns_nan):
    velocity_turns_nan(type(tiny), after=30)
    mask, metrics = tmp_path / "m.safetensors", tmp_path / "m.json"
    reporter = LocalReporter(str(mask), str(metrics), model="flux-tiny")
    result = run_trial(tiny, TrainConfig(concept="cat", steps=20, batch_size=1, log_every=1, sampling_steps=2),
                       CAT, NEUTRAL, reporter)
    assert result.status.startswith("stopped: non-finite loss") and 0 < result.steps_done < 20
    assert mask.exists() and reporter.metrics["status"] == result.status and result.masks.is_finite()


def test_on_a_gpu_the_planner_sets_the_memory_setting_unless_a_layer_chose_it(monkeypatch):
    import types

    import erase.plan
    from erase.config import resolve
    from erase.trial import planned_memory

    asked = []

    def fake_plan(model, cfg, memory_gb, device):
        asked.append((model, memory_gb, device))
        return {"setting": {"micro_batch": 1, "block_checkpointing": True}, "peak_gb": 70.0, "fits": True}

    monkeypatch.setattr(erase.plan, "plan", fake_plan)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=80 * 2**30))
    free = resolve("flux.1-schnell", "nudity", flags={"recipe": "paper"})
    planned = planned_memory(free, "flux.1-schnell", "cuda:0")
    assert (planned.micro_batch, planned.block_checkpointing) == (1, True) and asked == [("flux.1-schnell", 80.0, "cuda:0")]
    told = resolve("flux.1-schnell", "nudity", flags={"recipe": "paper", "micro_batch": 2})
    assert planned_memory(told, "flux.1-schnell", "cuda:0") == told  # the user's choice stands
    assert planned_memory(free, "flux.1-schnell", "cpu") == free  # a CPU run is not planned
    assert planned_memory(resolve("toy", "circle"), "toy", "cuda:0").micro_batch is None  # nor a model it does not know
    assert len(asked) == 1


def test_a_planner_failure_reaches_the_reporter_so_no_run_is_left_running(tiny, monkeypatch):
    import erase.trial

    class Recording:
        def __init__(self):
            self.failed = []

        def report(self, report):
            raise AssertionError("nothing trained, nothing to report")

        def fail(self, error):
            self.failed.append(error)

    def broken_planner(cfg, model, device):
        raise RuntimeError("no CUDA context")

    monkeypatch.setattr(erase.trial, "planned_memory", broken_planner)
    reporter = Recording()
    with pytest.raises(RuntimeError, match="no CUDA context"):
        run_trial(tiny, TrainConfig(concept="cat", steps=1, batch_size=1), ["a cat"], ["a bowl"], reporter)
    assert [str(e) for e in reporter.failed] == ["no CUDA context"]
