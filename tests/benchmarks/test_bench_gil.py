"""Smoke test of benchmarks/bench_gil.py: both measurements run and print (no timing is asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gil.py"


@pytest.mark.timeout(200)
def test_bench_gil_runs():
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--holds", "0,10", "--switch", "5", "--meta-seconds", "0.5"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| 0 µs") or line.startswith("| 10 µs")]
    assert len(rows) == 2
    assert "to get the GIL back" in run.stdout
