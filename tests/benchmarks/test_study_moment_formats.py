"""benchmarks/study_moment_formats.py: its 8-bit formats keep what an update needs, and the study runs end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "study_moment_formats.py"


@pytest.fixture
def study(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import study_moment_formats

    return study_moment_formats


def test_a_positive_second_moment_is_never_stored_as_zero(study):
    # a zero would leave eps alone in the update's denominator: the largest step an element can take
    v = torch.cat([torch.tensor([1.0]), torch.full((300,), 1e-12)])  # one block far larger than the rest of it
    for stochastic in (False, True):
        assert (study.int8_root(v, stochastic) > 0).all()


def test_each_format_keeps_the_moments_within_its_precision(study):
    # Elements of at least a quarter of their block's maximum, where a linear format is coarsest: half a step of
    # 1/127 (first moment) or of 1/255 of the root (second) over a quarter; bf16 and e4m3 within half a unit in the
    # last place of their 8 and 4 significant bits. A root stored with relative error e gives its square (1 + e)^2 - 1.
    torch.manual_seed(0)
    m = torch.randn(8 * study.BLOCK) * torch.logspace(-3, 0, 8 * study.BLOCK)
    v = m * m
    near_max = (m.abs().view(-1, study.BLOCK) >= m.abs().view(-1, study.BLOCK).amax(1, keepdim=True) / 4).view(-1)

    def squared(e):
        return (1 + e) ** 2 - 1

    for name, first_bound, second_bound in (
        ("bf16", 2**-8, 2**-8),
        ("int8", 0.5 / 127 * 4, squared(0.5 / 255 * 4)),
        ("fp8", 2**-4, squared(2**-4)),
    ):
        first, second = study.FORMATS[name]
        assert ((first(m) - m).abs() / m.abs())[near_max].max() <= first_bound, name
        assert ((second(v) - v).abs() / v)[near_max].max() <= second_bound, name


@pytest.mark.timeout(300)
def test_the_study_runs_and_writes_every_format(tmp_path):
    out = tmp_path / "formats.json"
    command = [sys.executable, str(SCRIPT), "--steps", "3", "--batch", "2", "--seq", "32", "--hidden", "32"]
    run = subprocess.run([*command, "--layers", "1", "--out", str(out)], capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    results = json.loads(out.read_text())
    assert set(results) == {f"{name} beta2=0.95" for name in ("fp32", "bf16", "int8", "int8-sr", "fp8")}
    assert all(len(r["losses"]) == 3 for r in results.values())
    assert "| int8 |" in run.stdout
