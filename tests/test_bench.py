"""`erase bench` produces its rows and ratios (the figures themselves live in the closing note)."""

import pytest

from erase import bench


@pytest.mark.slow
def test_bench_rows_on_tiny_model():
    report = bench.run("flux-tiny", [1, 2], repeats=1, progress=False)
    rows = report["rows"]
    assert [(r["steps"], r["checkpointing"]) for r in rows] == [(1, True), (1, False), (2, True), (2, False)]
    for r in rows:
        assert r["seconds"] > 0 and r["peak_mb"] >= 0
    assert set(report["ratios"]["time_checkpointed_over_plain"]) == {"1", "2"}
    assert "peak_checkpointed_2_over_1_steps" in report["ratios"]
