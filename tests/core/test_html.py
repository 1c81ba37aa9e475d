"""`bench report --format html`: one self-contained page per suite and an index, from the same
data as the markdown (the same cell texts), checked in a real headless browser when one is
installed (CI installs Debian's chromium): it loads without errors and sorts on a click."""

import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from bench.cli import main
from bench.report import render_report
from test_report import fill, record_rows

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def make_page(tmp_path):
    der = {"a": (0.10, 0.11, 0.12), "b": (0.50, 0.52, 0.54), "c": (0.30, 0.31, 0.33)}
    record_rows(tmp_path / "s.db", {(d, seed): v for d, values in der.items() for seed, v in enumerate(values)}, "der")
    out = tmp_path / "site" / "s.html"
    result = CliRunner().invoke(main, ["report", str(tmp_path / "s.db"), "--format", "html", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_the_page_shows_the_markdowns_numbers_and_needs_nothing_from_outside(tmp_path):
    page = make_page(tmp_path).read_text()
    markdown = render_report(tmp_path / "s.db")
    for line in markdown.splitlines():
        if line.startswith("| ") and "| 100 " in line:
            for cell in [c.strip().strip("*") for c in line.strip("|").split("|")][4:]:
                assert cell in page, cell  # every markdown cell, as the same text
    # no external scripts, styles or images (links to the methods' papers are fine)
    assert not re.search(r"src=['\"](https?:)?//", page) and "<link" not in page
    assert "<b>52.0 ± 5.0</b>" in page  # the markdown's bold, the same rule
    index = (tmp_path / "site" / "index.html").read_text()
    assert "href='s.html'" in index


def test_html_needs_an_html_output_file(tmp_path):
    fill(tmp_path / "s.db")
    result = CliRunner().invoke(main, ["report", str(tmp_path / "s.db"), "--format", "html"])
    assert result.exit_code == 2 and "--output FILE.html" in result.output


@pytest.mark.skipif(BROWSER is None, reason="no chromium installed (CI installs Debian's chromium)")
def test_the_page_loads_without_errors_and_sorts_on_a_click_in_a_real_browser(tmp_path):
    page = make_page(tmp_path)
    done = subprocess.run(
        [
            BROWSER,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=3000",
            "--dump-dom",
            f"file://{page}#selftest",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'data-selftest="passed"' in done.stdout, done.stdout[-2000:]
    assert "data-errors" not in done.stdout
    console_errors = [line for line in done.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()]
    assert not console_errors, console_errors
