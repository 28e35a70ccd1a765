"""`erase sweep`: Ray Tune + Optuna over a search space, one study per concept, every trial in MLflow.

A module per process role:

    driver.py   `erase sweep`: plan the studies, start Ray, one study process per concept, live
                progress, the summaries (plan, run_sweep)
    study.py    a process per concept: the prompt datasets, Tuner(OptunaSearch, ASHA), summary.json
    trial.py    per trial: a Tune function that runs a TorchTrainer, and the Train workers' loop,
                which runs erase.trial.run_trial with a reporter that calls ray.train.report
    spec.py     what crosses the process boundaries, each once: a StudySpec (driver -> study ->
                Tune trial) and a TrialPlan (Tune trial -> Train workers)

The objective is erase.trial.score, reported with both its parts; ASHA stops trials on it.
"""

from erase.sweep.driver import orchestration, plan, run_sweep
from erase.sweep.spec import StudySpec, SweepError, TrialPlan

__all__ = ["StudySpec", "SweepError", "TrialPlan", "orchestration", "plan", "run_sweep"]
