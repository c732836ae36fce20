"""A NaN or Inf loss or gradient stops training with a clear error, or skips that step, by option."""

from __future__ import annotations

import threading

import lightning as L
import pytest
import torch

import lightning_slide
from tests.core.tiny import TinyLM, batches, initial_state, trainer


class PoisonedLM(TinyLM):
    """Micro-batches ``poisoned`` give a NaN loss (``where="loss"``) or a finite loss with Inf gradients."""

    def __init__(self, poisoned, where="loss"):
        super().__init__("llama", initial_state("llama"))
        self.poisoned, self.where = set(poisoned), where

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx in self.poisoned:
            if self.where == "loss":
                return loss * float("nan")
            weight = self.model.model.layers[1].mlp.down_proj.weight
            return loss + _inf_grad(weight)
        return loss


def _inf_grad(weight):
    """Zero in forward; an all-Inf gradient for ``weight`` in backward."""

    class Inf(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            ctx.shape = w.shape
            return w.new_zeros(())

        @staticmethod
        def backward(ctx, grad):
            return torch.full(ctx.shape, float("inf"))

    return Inf.apply(weight)


def test_nan_loss_stops_with_a_clear_error():
    module = PoisonedLM({3})
    with pytest.raises(FloatingPointError, match=r"loss is nan at global step 1 .*nonfinite='skip'"):
        trainer("slideformer").fit(module, batches(8))
    assert not [t for t in threading.enumerate() if t.name.startswith("slide-")]


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_step_is_skipped_and_counted(where):
    module = PoisonedLM({2}, where=where)  # micro-batch 2 opens the second optimizer step (accumulation 2)
    seen = {}

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            engine = trainer.strategy.engine
            seen.setdefault("skipped", []).append(engine.skipped_steps)
            if batch_idx in (1, 3):  # after the first step, and after the skipped one: the masters
                seen[batch_idx] = {n: t.clone() for n, t in engine.state_dict().items()}

    strategy = lightning_slide.SlideFormerStrategy(window=1, nonfinite="skip")
    trainer(strategy, max_steps=4, callbacks=[Watch()]).fit(module, batches(8))
    assert module.trainer.strategy is strategy
    assert seen["skipped"][-1] == 1
    for name, before in seen[1].items():  # the skipped step changed nothing
        assert torch.equal(before, seen[3][name]), name
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_inf_gradient_stops_with_a_clear_error():
    module = PoisonedLM({1}, where="grad")
    with pytest.raises(FloatingPointError, match="gradient norm is inf"):
        trainer("slideformer").fit(module, batches(8))
