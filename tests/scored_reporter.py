"""A reporter for the ASHA test: each trial reports a score set by the order trials started in, falling.

Imported by Ray Train workers through StudySpec.reporter ("scored_reporter:FallingScore"), with
this folder on PYTHONPATH. The k-th trial to start (counted with marker files in
ERASE_TEST_MARKERS) reports 10 - k, so a trial that reaches ASHA's first rung after one that
started before it is below that rung's cutoff and is stopped there: ASHA's stops are certain,
not a matter of the toy world's scores.
"""

import os


class FallingScore:
    def __init__(self, reporter, plan):
        self.reporter = reporter
        self.score = 10.0 - start_order(os.environ["ERASE_TEST_MARKERS"], plan.trial_id)

    def report(self, report):
        report.metrics["score"] = self.score
        self.reporter.report(report)

    def fail(self, error):
        self.reporter.fail(error)


def start_order(folder: str, trial_id: str) -> int:
    """1 for the first trial to ask, 2 for the next...; the same number each time a trial asks again."""
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            if f.read() == trial_id:
                return int(name)
    k = 1
    while True:
        try:
            fd = os.open(os.path.join(folder, str(k)), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            k += 1
            continue
        with os.fdopen(fd, "w") as f:
            f.write(trial_id)
        return k
