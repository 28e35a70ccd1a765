"""A reporter for the sweep's resilience test: it wraps a trial's Ray reporter and kills its worker once.

Imported by Ray Train workers through StudySpec.reporter ("faulty_reporter:FailOnce"), with this
folder on PYTHONPATH. The first worker of each trial raises right after its report at step
ERASE_TEST_FAIL_AT_STEP and leaves a marker in ERASE_TEST_MARKERS, so that the worker Ray Train
restarts from that report's checkpoint runs on to the end.
"""

import os


class FailOnce:
    def __init__(self, reporter, plan):
        self.reporter = reporter
        self.at_step = int(os.environ["ERASE_TEST_FAIL_AT_STEP"])
        self.marker = os.path.join(os.environ["ERASE_TEST_MARKERS"], f"failed-{plan.trial_id}")

    def report(self, report):
        self.reporter.report(report)
        if report.step >= self.at_step and self.reporter.rank == 0 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise RuntimeError(f"injected worker failure after step {report.step} (resilience test)")

    def fail(self, error):
        self.reporter.fail(error)
