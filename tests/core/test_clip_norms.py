"""Clipping by norm: a unit's gradient norm is taken on the device as its gradients of a step's only micro-batch
leave it, so the host's norm task reads one number per unit instead of a pass over every gradient. With
accumulation the host takes the norm of the summed gradients. Either way training matches plain Lightning."""

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
    if accumulate == 1:  # every unit's norm came down from the device
        assert norm_tasks == [0] * STEPS
    else:  # the host took the norms of the summed gradients (only the norm task's own reads counted)
        assert all(n > 0 for n in norm_tasks)
    theirs = dict(plain.named_parameters())
    for name, param in ours.named_parameters():
        assert relative_error(param.detach(), theirs[name].detach()) <= 1e-5, name
