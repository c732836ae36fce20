"""parked_grads: with every host gradient buffer lent, the backward parks a layer's gradients on the device and goes
on; they go down later, as host buffers come back. Training is unchanged."""

from __future__ import annotations

import functools
import time

import lightning as L
import pytest

import lightning_slide
from lightning_slide.engine.optimizer import UnitOptimizer
import torch

from tests.core.tiny import TinyLM, batches, initial_state, trainer

STEPS = 6


def train(strategy, callbacks=()):
    """Updates stream out of the backward: no clipping, no accumulation."""
    torch.manual_seed(123)
    module = TinyLM("llama_deep", initial_state("llama_deep"))
    trainer(strategy, max_steps=STEPS, accumulate_grad_batches=1, gradient_clip_val=None,
            callbacks=list(callbacks)).fit(module, batches(STEPS))
    return module


class _Parked(L.Callback):
    """The engine's figures at the end, and the weights a checkpoint would hold after the third step (with layers
    of that step still parked: reading the weights sends them down and updates them first)."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == 2:
            self.weights = {n: t.clone() for n, t in trainer.strategy.engine.state_dict().items()}

    def on_train_end(self, trainer, module):
        self.stats = trainer.strategy.engine.stats()


@pytest.fixture
def slow_host(monkeypatch):
    """A host update takes 20 ms, so a tiny model's backward outruns it and runs out of host gradient buffers."""
    step = UnitOptimizer.step

    @functools.wraps(step)
    def slow(self, *args, **kwargs):
        time.sleep(0.02)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(UnitOptimizer, "step", slow)


@pytest.mark.parametrize("window,parking", [(1, 6), (2, 6), (2, 2)])
def test_parked_gradients_train_the_same(slow_host, window, parking):
    """Bit for bit as without parking (which the parity tests hold equal to plain training). With 2 parking
    buffers for 24 layers the backward runs out of them and sends a parked layer down to park the next."""
    before = _Parked()
    waited = train(lightning_slide.SlideFormerStrategy(window=window, grad_buffers=1), [before])
    seen = _Parked()
    parked = train(lightning_slide.SlideFormerStrategy(window=window, grad_buffers=1, parked_grads=parking), [seen])
    assert seen.stats["parked_layers"] > 0  # the backward did park (the last step's go down when fit ends)
    assert waited.losses == parked.losses
    theirs = dict(waited.named_parameters())
    for name, param in parked.named_parameters():
        assert torch.equal(param, theirs[name]), name
    for name, tensor in seen.weights.items():
        assert torch.equal(tensor, before.weights[name]), name


def test_parked_grads_option_is_validated():
    with pytest.raises(ValueError, match="parked_grads"):
        lightning_slide.SlideFormerStrategy(parked_grads=-1)
