"""A NaN or Inf loss or gradient stops training with a clear error, or skips that step, by option."""

from __future__ import annotations

import threading

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Subset

import lightning_slide
from tests.core.test_parity import assert_same_training
from tests.core.tiny import TinyLM, batches, inf_grad, initial_state, trainer


class PoisonedLM(TinyLM):
    """Micro-batches ``poisoned`` give a NaN loss (``where="loss"``) or a finite loss with Inf gradients: of the
    output head (``where="head"``) or of a decoder layer's weight (``where="grad"``)."""

    def __init__(self, poisoned, where="loss", **options):
        super().__init__("llama", initial_state("llama"), **options)
        self.poisoned, self.where = set(poisoned), where
        self.poison_now = False
        if where == "grad":
            # Inside layer 1's forward, where its weights are in the window (on the compute device, in the compute
            # dtype). Used from the loss, the layer's parameter is parked on its fp32 host master: on a GPU (or
            # with bf16 compute) that swaps the parameter's device/dtype, so autograd gives it a second gradient
            # accumulator whose gradient arrives outside the layer's backward -- not the user pattern under test.
            self.model.model.layers[1].mlp.down_proj.register_forward_hook(self._poison_layer)

    def _poison_layer(self, module, args, output):
        # Also runs when the checkpointed layer is recomputed in backward: the flag holds through this backward.
        return output + inf_grad(module.weight) if self.poison_now else None

    def training_step(self, batch, batch_idx):
        self.poison_now = batch_idx in self.poisoned
        loss = super().training_step(batch, batch_idx)
        if self.poison_now and self.where == "loss":
            return loss * float("nan")
        if self.poison_now and self.where == "head":  # resident: on the compute device through the step
            return loss + inf_grad(self.model.lm_head.weight)
        return loss


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


# Without clipping, updates stream out of the backward: each unit's gradients are checked on their own.
@pytest.mark.parametrize("where, unit", [("grad", "layer 1"), ("head", "resident")])
@pytest.mark.parametrize("resident_optimizer", ["host", "device"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_inf_gradient_without_clipping_names_the_unit(where, unit, resident_optimizer, accumulate):
    # Micro-batch 2: the last of step 2 (accumulation 1), or the first of step 1 (accumulation 2: the finite last
    # micro-batch must not hide it).
    module = PoisonedLM({2}, where=where)
    strategy = lightning_slide.SlideFormerStrategy(window=1, tuning=dict(resident_optimizer=resident_optimizer))
    step = 2 // accumulate
    with pytest.raises(
        FloatingPointError, match=f"{unit} has NaN/Inf gradients at global step {step}.*nonfinite='skip'"
    ):
        trainer(strategy, gradient_clip_val=None, accumulate_grad_batches=accumulate).fit(module, batches(8))
    assert not [t for t in threading.enumerate() if t.name.startswith("slide-")]


@pytest.mark.parametrize("where", ["grad", "head"])
@pytest.mark.parametrize("resident_optimizer, accumulate, parked", [("host", 1, 0), ("device", 2, 0), ("host", 1, 1)])
def test_skipped_gradient_step_equals_dropping_its_batches(where, resident_optimizer, accumulate, parked):
    # parked: a layer's gradients wait on the device for the step's verdict (parked_grads), then go down or not.
    # A constant learning rate: the LR scheduler steps on a skipped step too (as in plain torch with a GradScaler).
    steps, poisoned = 6, 1 * accumulate  # the first micro-batch of the second step
    torch.manual_seed(123)
    ours = PoisonedLM({poisoned}, where=where, warmup=1)
    strategy = lightning_slide.SlideFormerStrategy(
        window=1, nonfinite="skip", tuning=dict(resident_optimizer=resident_optimizer, parked_grads=parked)
    )
    trainer(strategy, max_steps=steps, gradient_clip_val=None, accumulate_grad_batches=accumulate).fit(
        ours, batches(steps * accumulate)
    )
    assert strategy.engine is None and ours.trainer.global_step == steps
    dropped = set(range(poisoned, poisoned + accumulate))  # the micro-batches of the skipped step
    torch.manual_seed(123)
    plain = TinyLM("llama", initial_state("llama"), warmup=1)
    loader = batches(steps * accumulate)
    kept = [i for i in range(len(loader.dataset)) if i // loader.batch_size not in dropped]
    trainer("auto", max_steps=steps - 1, gradient_clip_val=None, accumulate_grad_batches=accumulate).fit(
        plain, DataLoader(Subset(loader.dataset, kept), batch_size=loader.batch_size)
    )
    ours.losses = [loss for i, loss in enumerate(ours.losses) if i not in dropped]
    assert_same_training(ours, plain)
