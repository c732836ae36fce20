"""Smoke test of benchmarks/convergence.py: a tiny model, a few steps, plain Lightning and slideformer."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "convergence.py"


@pytest.mark.timeout(300)
def test_convergence_smoke(tmp_path):
    out = tmp_path / "conv"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--runs", "plain,slideformer", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads((out / "convergence.json").read_text())
    assert set(report["runs"]) == {"plain", "slideformer"}
    steps = report["settings"]["steps"]
    for name, res in report["runs"].items():
        assert "error" not in res and "skipped" not in res, (name, res)
        assert res["steps"] == steps and len(res["losses"]) == steps, name
        assert res["micro_batches"] == steps * report["settings"]["accumulate"], name
        assert all(math.isfinite(x) for x in res["losses"]), name
        assert math.isfinite(res["final_loss"]) and math.isfinite(res["val_loss"]), name
    (comparison,) = [r for r in report["comparisons"] if r["run"] == "slideformer"]
    assert comparison["reference"] == "plain" and math.isfinite(comparison["rel_final"])
    assert "| slideformer | bf16-true |" in run.stdout  # the markdown table
