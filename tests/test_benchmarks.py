"""The benchmark runs, on tiny sizes; its figures are measured by `python -m benchmarks.run`, never asserted here."""

import re
import subprocess
import sys

import pytest
from conftest import REPO

from benchmarks.run import cases


pytestmark = pytest.mark.slow  # a quick local run: python -m pytest -m 'not slow'


def test_benchmark_runs_every_case_on_tiny_sizes(tmp_path):
    output = tmp_path / "RESULTS.md"
    command = [sys.executable, "-m", "benchmarks.run", "--tiny", "-o", str(output)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [line for line in output.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    measured = {row.split(" | ")[0].removeprefix("| ") for row in rows}
    assert measured == {case.name for case in cases(tiny=True)} | {"CLI"}
    for row in rows:
        assert re.search(r"\*\*\d+\.\d+( s)?\*\*", row), row
