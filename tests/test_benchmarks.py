"""The benchmark command runs end to end (tiny sizes) and reports every benchmark."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_benchmark_run_reports_every_benchmark(tmp_path):
    out = tmp_path / "results.md"
    done = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--threads", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if re.match(r"\| \d+ ", line)]
    assert {int(r[0].strip("| ").split()[0]) for r in rows} == set(range(1, 16))
    for row in rows:  # every figure is a measured number, or says it was skipped (and why)
        value = row[2].replace(",", "")
        assert value == "skipped" and row[4].strip(" |") or float(value) > 0, row
    assert "mode: --quick" in out.read_text()
