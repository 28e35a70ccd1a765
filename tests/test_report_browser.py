"""An evaluation report opens in a real browser (headless Chromium) and shows its image grids."""

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from erase.evaluate import html_report, rate

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=900,700"]


@pytest.mark.slow
def test_report_renders_its_grids_in_headless_chromium(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "headless Chromium is needed: apt-get install chromium (.ci/run installs it)"
    red = np.zeros((16, 16, 3), np.uint8)
    red[:, :] = (30, 30, 40)
    red[3:13, 3:13] = (230, 20, 20)
    green = red.copy()
    green[3:13, 3:13] = (20, 200, 40)
    report = {"concept": "circle", "erasure_rate": rate([False] * 19 + [True]), "detection": {"circle": 0.05},
              "base_detection": {"circle": 0.9}}
    page = tmp_path / "report.html"
    html_report(report, {"'circle': base vs masked": [("base", [red] * 4), ("masked", [green] * 4)]}, str(page))
    shot = tmp_path / "shot.png"
    proc = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    # the inline images were decoded and drawn: both tile colours are on the screen, in quantity
    red_pixels = ((pixels[:, 0] > 200) & (pixels[:, 1] < 60) & (pixels[:, 2] < 60)).sum()
    green_pixels = ((pixels[:, 1] > 170) & (pixels[:, 0] < 60) & (pixels[:, 2] < 80)).sum()
    assert red_pixels > 4 * 40 * 40 * 0.8 and green_pixels > 4 * 40 * 40 * 0.8, (red_pixels, green_pixels)
