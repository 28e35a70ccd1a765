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


def first_screen(browser: str, page, tmp_path) -> tuple[dict, str]:
    """Where the verdict and the figures table end on a 900x700 screen, and the page's text, as
    headless Chromium lays the page out (a copy of it, with a script that writes them down)."""
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", """<script>
const bottom = el => Math.round(el.getBoundingClientRect().bottom);
document.body.dataset.verdict = bottom(document.querySelector('.verdict'));
document.body.dataset.figures = bottom(document.querySelector('table'));
document.body.dataset.text = document.body.innerText.slice(0, 4000);
</script></body>"""))
    proc = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--dump-dom",
                           probe.as_uri()], capture_output=True, text=True, timeout=120)
    import html as html_module
    import re

    found = {k: html_module.unescape(v) for k, v in re.findall(r'data-(verdict|figures|text)="([^"]*)"', proc.stdout)}
    assert found, proc.stderr[-2000:]
    return {k: int(found[k]) for k in ("verdict", "figures")}, found["text"]


@pytest.mark.slow
def test_the_reports_first_screen_shows_the_verdict_the_figures_and_how_it_was_trained(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "headless Chromium is needed: apt-get install chromium (.ci/run installs it)"
    split = {"name": "toy:test", "hash": "abc", "prompts": 20}
    report = {"concept": "striped", "model": "toy", "generations": 400, "steps": 4, "guidance": 1.0,
              "erasure_rate": {**rate([False] * 79 + [True]), "split": split},
              "preservation": {**rate([True] * 99 + [False]), "split": split},
              "detection": {"striped": 0.01}, "base_detection": {"striped": 0.98}}
    tile = np.full((16, 16, 3), 120, np.uint8)
    grid = [("'striped' prompts, base", [tile] * 2, ["a striped red cross", "a striped blue bar"])]
    page = tmp_path / "report.html"
    training = {"status": "finished", "steps done": 200, "beta": 0.21, "sites": ["ffn", "norm"]}
    html_report(report, {"'striped': base vs masked": grid}, str(page), training=training,
                verdict={"failed": [], "gates": {"max_erasure_rate": 0.05, "min_preservation": 0.9}})
    bottoms, text = first_screen(browser, page, tmp_path)
    assert bottoms["verdict"] < bottoms["figures"] <= 700, bottoms  # both on the first 900x700 screen
    assert "Passes the promotion gates (max_erasure_rate 0.05, min_preservation 0.9) on toy:test" in text
    assert "erasure_rate\t0.013 [0.002, 0.067] n=80\ttoy:test" in text
    assert "beta\t0.21" in text and '["ffn", "norm"]' in text and "{'" not in text  # JSON, no Python reprs
    assert "a striped red cross" in text  # the tiles carry their prompts
    assert not text.lstrip().startswith("{")  # no screen of raw JSON first

    shot = tmp_path / "first_screen.png"
    subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile3'}", f"--screenshot={shot}",
                    page.as_uri()], capture_output=True, timeout=120)
    assert Image.open(shot).size == (900, 700)
