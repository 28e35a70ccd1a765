"""The README's first two commands are the main job and the test command; CI runs the latter verbatim."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    lines = ROOT.joinpath("README.md").read_text().splitlines()
    start = lines.index("```bash")
    return [line.split("#")[0].strip() for line in lines[start + 1:start + 3]]


def test_readme_starts_with_main_job_and_test_command():
    main_job, tests = _readme_commands()
    assert main_job.startswith("pip install torch==2.13.0") and "erase " in main_job
    assert tests.startswith("pip install torch==2.13.0") and "pytest" in tests


def test_ci_runs_exactly_the_readme_test_command():
    _, tests = _readme_commands()
    ci = ROOT.joinpath(".ci", "run").read_text().splitlines()
    assert tests in [line.strip() for line in ci if not line.lstrip().startswith("#")]


def test_no_figure_is_left_as_a_placeholder():
    import re

    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        # a bare capitalised token; names in backticks (`RECIPE_DEFAULTS`) are code, not placeholders
        left = re.findall(r"(?<![`\w])[A-Z]+_(?:FIGURES?|MINUTES|TRIALS|DEFAULTS)(?![`\w])", page.read_text())
        assert not left, f"{page.name} still has placeholders {left}: run the commands beside them and fill them in"
