"""Clipping by norm: a unit's gradient norm is taken on the device as its gradients of a step's only micro-batch
leave it, or with accumulation by the host's sum of the last micro-batch (in the same pass), so the host's norm task
reads one number per unit instead of a pass over every gradient. Either way training matches plain Lightning."""

from __future__ import annotations

import functools

import pytest
import torch

import lightning_slide
from lightning_slide.engine import checks
from lightning_slide.engine.optimizer import UnitOptimizer
from tests.core.tiny import TinyLM, batches, initial_state, relative_error, trainer

STEPS = 4


def _train(strategy, accumulate):
    torch.manual_seed(123)
    module = TinyLM("llama", initial_state("llama"))
    trainer(strategy, max_steps=STEPS, accumulate_grad_batches=accumulate, gradient_clip_val=0.05).fit(
        module, batches(STEPS * accumulate)
    )  # small: the clipping bites
    return module


@pytest.fixture
def host_norm_passes(monkeypatch):
    """Counts the units whose gradients the norm task reads on the host."""
    read, inside = [], []
    norm_task, grad_norm = checks.clip_task, UnitOptimizer.grad_norm

    @functools.wraps(norm_task)
    def counting_task(engine, *args, **kwargs):
        read.append(0)
        inside.append(True)
        try:
            return norm_task(engine, *args, **kwargs)
        finally:
            inside.pop()

    @functools.wraps(grad_norm)
    def counting_grad_norm(self, *args, **kwargs):
        if inside:
            read[-1] += 1
        return grad_norm(self, *args, **kwargs)

    monkeypatch.setattr(checks, "clip_task", counting_task)
    monkeypatch.setattr(UnitOptimizer, "grad_norm", counting_grad_norm)
    return read


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_clipping_norm_matches_plain_training(host_norm_passes, accumulate):
    plain = _train("auto", accumulate)
    host_norm_passes.clear()
    ours = _train(lightning_slide.SlideFormerStrategy(window=2, tuning=dict(resident_optimizer="host")), accumulate)
    norm_tasks = list(host_norm_passes)
    assert len(norm_tasks) == STEPS
    assert norm_tasks == [0] * STEPS  # every unit's norm came down from the device or from its last sum
    theirs = dict(plain.named_parameters())
    for name, param in ours.named_parameters():
        assert relative_error(param.detach(), theirs[name].detach()) <= 1e-5, name


@pytest.mark.parametrize("host_loop", [True, False], ids=["C++ loop", "torch ops"])
def test_the_last_sum_gives_its_norm(monkeypatch, host_loop):
    """Accumulation's last sum and its norm in one pass: the sum exactly torch's, the norm within a rounding."""
    from lightning_slide import optim

    if not host_loop:

        def unbuilt():
            raise RuntimeError("no compiler here")

        monkeypatch.setattr(optim._kernel, "_host", unbuilt)
    generator = torch.Generator().manual_seed(0)
    total, part = (torch.randn(100_003, generator=generator) for _ in range(2))
    expected = total + part
    norm = optim.add_with_norm(total, part)
    assert torch.equal(total, expected)
    assert norm.dtype == torch.float32 and norm.item() == pytest.approx(expected.double().norm().item(), rel=1e-6)
