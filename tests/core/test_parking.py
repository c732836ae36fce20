"""parked_grads: with every host gradient buffer lent, the backward parks a layer's gradients on the device and goes
on; they go down later, as host buffers come back. Training is unchanged."""

from __future__ import annotations

import functools
import time

import lightning as L
import pytest
import torch

import lightning_slide
from lightning_slide.engine.optimizer import UnitOptimizer
from tests.core.tiny import ACCELERATOR, TinyLM, batches, growing_batches, initial_state, trainer

STEPS = 6


def train(strategy, callbacks=(), **options):
    """Updates stream out of the backward: no clipping (unless by value), no accumulation."""
    torch.manual_seed(123)
    module = TinyLM("llama_deep", initial_state("llama_deep"))
    options = {"gradient_clip_val": None, **options}
    trainer(strategy, max_steps=STEPS, accumulate_grad_batches=1, callbacks=list(callbacks), **options).fit(
        module, batches(STEPS)
    )
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
    waited = train(lightning_slide.SlideFormerStrategy(window=window, tuning=dict(grad_buffers=1)), [before])
    seen = _Parked()
    tuning = dict(grad_buffers=1, parked_grads=parking)
    parked = train(lightning_slide.SlideFormerStrategy(window=window, tuning=tuning), [seen])
    assert seen.stats["parked_layers"] > 0  # the backward did park (the last step's go down when fit ends)
    assert waited.losses == parked.losses
    theirs = dict(waited.named_parameters())
    for name, param in parked.named_parameters():
        assert torch.equal(param, theirs[name]), name
    for name, tensor in seen.weights.items():
        assert torch.equal(tensor, before.weights[name]), name


def test_parked_gradients_clipped_by_value_train_the_same(slow_host):
    """Clipping by value streams too: a parked layer's update, queued when it goes down, clamps its gradients."""
    clip = dict(gradient_clip_val=0.002, gradient_clip_algorithm="value")
    waited = train(lightning_slide.SlideFormerStrategy(window=2, tuning=dict(grad_buffers=1)), **clip)
    seen = _Parked()
    parking = dict(grad_buffers=1, parked_grads=6)
    parked = train(lightning_slide.SlideFormerStrategy(window=2, tuning=parking), [seen], **clip)
    unclipped = train(lightning_slide.SlideFormerStrategy(window=2, tuning=parking))
    assert seen.stats["parked_layers"] > 0
    assert waited.losses == parked.losses != unclipped.losses
    theirs = dict(waited.named_parameters())
    for name, param in parked.named_parameters():
        assert torch.equal(param, theirs[name]), name


def test_parked_grads_option_is_validated():
    with pytest.raises(ValueError, match="parked_grads"):
        lightning_slide.SlideFormerStrategy(tuning=dict(parked_grads=-1))


class _Pool(L.Callback):
    """The most host gradient buffers the engine ever allocated, and the layers the plan let park at each step."""

    def __init__(self):
        self.planned = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.planned.append(trainer.strategy.plan.settings.parked_grads)

    def on_train_end(self, trainer, module):
        self.allocated = trainer.strategy.engine.loans.pool.allocated
        self.parked = trainer.strategy.engine.stats()["parked_layers"]
        parking = trainer.strategy.engine.parking
        self.buffers = len(parking.free) + len(parking.parked)  # parking buffers still held


def _held_step_run(parked, nonfinite="error", limit=None, data=None, clip=0.05, grad_buffers=2):
    """llama_deep trained with updates that wait for the end of backward: clipping by norm, or nonfinite="skip"."""
    torch.manual_seed(123)
    module = TinyLM("llama_deep", initial_state("llama_deep"))
    pool = _Pool()
    tuning = dict(grad_buffers=grad_buffers, parked_grads=parked, device_layers=0)  # parking alone (layers kept first)
    strategy = lightning_slide.SlideFormerStrategy(window=2, tuning=tuning, nonfinite=nonfinite, gpu_memory_limit=limit)
    trainer(
        strategy,
        max_steps=STEPS,
        accumulate_grad_batches=1,
        callbacks=[pool],
        gradient_clip_val=clip if nonfinite == "error" else None,
    ).fit(module, data or batches(STEPS))
    return module, pool, strategy


@pytest.mark.parametrize("nonfinite", ["error", "skip"])
def test_a_step_that_waits_for_the_backward_parks_its_gradients_and_trains_the_same(nonfinite):
    """With clipping by norm (or nonfinite="skip") the updates wait for the end of backward, so every layer's
    gradients are held until then: parked layers hold theirs on the device instead of in host buffers, and go down
    after the step, first layer first. Bit for bit as without parking."""
    held, held_pool, _ = _held_step_run(0, nonfinite)
    parked, parked_pool, _ = _held_step_run(6, nonfinite)
    assert parked_pool.parked == 6 * STEPS and held_pool.parked == 0
    assert held_pool.allocated == 24 and parked_pool.allocated == 24 - 6  # host buffers for the others only
    assert held.losses == parked.losses
    theirs = dict(held.named_parameters())
    for name, param in parked.named_parameters():
        assert torch.equal(param, theirs[name]), name


def test_auto_parks_as_many_as_the_first_batch_plan_allows():
    """parked_grads="auto": the engine starts with none and, at the first batch, takes the most the plan fits."""
    roomy, roomy_pool, roomy_strategy = _held_step_run("auto", limit="1GiB")
    assert roomy_strategy.plan.settings.parked_grads == 24 and roomy_pool.parked == 24 * STEPS  # every layer
    held, _, _ = _held_step_run(0, limit="1GiB")
    assert held.losses == roomy.losses
    # A limit that leaves room for a few: as many as the plan fits. Not on a GPU, whose caching allocator reserves
    # blocks of 2-20 MiB: this model's plan is a few hundred KiB, so no such limit can be met there.
    if ACCELERATOR != "cpu":
        return
    plan = roomy_strategy.plan
    fixed = sum(v for k, v in plan.gpu.items() if k != "parked layer gradients")
    layer = plan.gpu["parked layer gradients"] // 24
    _, tight_pool, tight_strategy = _held_step_run("auto", limit=str(int((fixed + 3.5 * layer) / 0.9)))
    assert tight_strategy.plan.settings.parked_grads == 3 and tight_pool.parked == 3 * STEPS


def _tight_limit(run) -> str:
    """A GPU limit at which the plan of the 64-token batches leaves room for 3 parked layers (none too many)."""
    plan = run.plan
    fixed = sum(v for k, v in plan.gpu.items() if k != "parked layer gradients")
    layer = plan.gpu["parked layer gradients"] // plan.settings.parked_grads
    return str(int((fixed + 3.5 * layer) / 0.9))


@pytest.mark.skipif(ACCELERATOR != "cpu", reason="a GPU's caching allocator reserves more than this tiny plan")
def test_auto_parks_fewer_when_a_larger_batch_comes_and_trains_the_same():
    """Padding each batch to its longest makes later batches longer than the first: "auto" plans each larger
    batch and lets buffers go so that its activations fit. Training is unchanged."""
    _, _, roomy = _held_step_run("auto", limit="1GiB", data=growing_batches(STEPS))
    assert roomy.plan.settings.parked_grads == 24 and roomy.plan.settings.seq == 64
    limit = _tight_limit(roomy)
    held, _, _ = _held_step_run(0, limit=limit, data=growing_batches(STEPS))
    parked, pool, _ = _held_step_run("auto", limit=limit, data=growing_batches(STEPS))
    short = pool.planned[0]
    assert short > 3 and pool.planned == [short] * 3 + [3] * 3  # each step parks as many as it may
    assert pool.parked == 3 * short + 3 * 3
    assert held.losses == parked.losses
    theirs = dict(held.named_parameters())
    for name, param in parked.named_parameters():
        assert torch.equal(param, theirs[name]), name


@pytest.mark.skipif(ACCELERATOR != "cpu", reason="a GPU's caching allocator reserves more than this tiny plan")
def test_parked_layers_beyond_a_smaller_parking_go_down_and_train_the_same(slow_host):
    """While updates stream, layers still parked when a larger batch shrinks the parking keep their buffers until
    they go down, and those buffers are then let go. Bit for bit as without parking."""
    _, _, roomy = _held_step_run("auto", limit="1GiB", data=growing_batches(STEPS), clip=None, grad_buffers=1)
    limit = _tight_limit(roomy)
    waited, _, _ = _held_step_run(0, limit=limit, data=growing_batches(STEPS), clip=None, grad_buffers=1)
    parked, pool, _ = _held_step_run("auto", limit=limit, data=growing_batches(STEPS), clip=None, grad_buffers=1)
    assert pool.parked > 0 and pool.planned[0] > 3 and pool.planned[-1] == 3 and pool.buffers <= 3
    assert waited.losses == parked.losses
    theirs = dict(waited.named_parameters())
    for name, param in parked.named_parameters():
        assert torch.equal(param, theirs[name]), name


class _ReadsGradients(L.Callback):
    """A hook between backward and step that reads every gradient, as gradient-norm loggers do."""

    def __init__(self):
        self.seen = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.seen.append(sum(p.grad is not None for p in module.parameters()))

    def on_train_end(self, trainer, module):
        self.capacity = trainer.strategy.engine.parking.capacity


def test_auto_parks_nothing_when_hooks_observe_the_step():
    """Hooks that read a step's gradients see them all on the host: "auto" then keeps no parking buffer."""
    reads = _ReadsGradients()
    strategy = lightning_slide.SlideFormerStrategy(window=2, gpu_memory_limit="1GiB")
    module = train(strategy, [reads], gradient_clip_val=0.5)
    trainable = sum(p.requires_grad for p in module.parameters())
    assert reads.seen == [trainable] * STEPS and reads.capacity == 0
    assert strategy.plan.settings.parked_grads == 0
