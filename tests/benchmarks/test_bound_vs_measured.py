"""benchmarks/bound_vs_measured.py: the planner's step bound against steps recorded on the GPU machine.

The recorded steps are fixed figures (BENCHMARKS.md), so this guards the planner's calibration: a change to the step
terms that moves the bound more than 10% from any of them shows here."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bound_vs_measured.py"


def test_the_bound_stays_within_ten_percent_of_the_recorded_steps():
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith(("| 3B", "| 8B"))]
    assert len(rows) == 6
    for row in rows:
        bound_error = int(re.findall(r"([+-]\d+)%", row)[-1])
        assert abs(bound_error) <= 10, row
