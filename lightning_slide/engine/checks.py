"""A step's checks before its updates: whether each unit's gradients are finite, the clipping norm, and the verdict
the step's updates read.

Flags and norms are made on the device as each unit's gradients leave it and copied to the host behind them, so the
host reads one number per unit and never syncs the device for them. A step whose updates need every unit's gradients
(clipping by norm, ``nonfinite="skip"``) queues a task on the update thread ahead of its updates; the task fills in
a ``Verdict`` that those updates read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lightning_slide.engine.host import MASTER_DTYPE, RESIDENT, HostUnit

if TYPE_CHECKING:
    from lightning_slide.engine.engine import SlidingEngine


def index_of(key) -> int:
    """A unit's place in the flags: layers by index, the resident parts last."""
    return -1 if key == RESIDENT else key


class Verdict:
    """What a step's checks decided for its updates: scale the gradients by ``coefficient`` (clipping by norm), skip
    the step, or fail with ``error``."""

    def __init__(self) -> None:
        self.coefficient: torch.Tensor | None = None
        self.skip = False
        self.error: BaseException | None = None

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def decide(verdict: Verdict, task) -> None:
    """Worker task: run ``task``, which fills ``verdict``; should it fail, the updates fail with its error rather
    than run unclipped or unchecked."""
    try:
        task()
    except BaseException as error:
        verdict.error = error
        raise


class GradientChecks:
    """Per unit (``index_of``): whether its gradients of the current optimizer step are all finite, and their norm
    when the step clips by norm, made on the device and read on the host."""

    def __init__(self, layers: int, device: torch.device, pin: bool) -> None:
        self.finite = torch.ones(layers + 1, dtype=torch.bool, device=device)
        self.finite_host = torch.ones(layers + 1, dtype=torch.bool, pin_memory=pin)
        self.norms_host = torch.zeros(layers + 1, dtype=MASTER_DTYPE, pin_memory=pin)
        # unit i's norm of this step is in norms_host (its only micro-batch's, taken on the device)
        self.norm_down = [False] * (layers + 1)

    def fold_finite(self, index: int, device_grads: torch.Tensor, first: bool, streams, shards):
        """Fold whether one micro-batch's ``device_grads`` are all finite into unit ``index``'s flag (``first``: the
        step's first micro-batch) on the device, and copy it to the host on the download stream; returns the event
        after which the host copy is there."""
        low, high = torch.aminmax(device_grads)  # one pass, no gradient-sized temporary; NaN propagates
        finite = torch.isfinite(low) & torch.isfinite(high)
        if first:
            self.finite[index].copy_(finite)
        else:
            self.finite[index].logical_and_(finite)
        produced = streams.record()
        with streams.on(streams.download):
            streams.wait(produced)
            # Every rank must skip or stop alike: the flag becomes the AND over ranks.
            shards.all_true(self.finite.narrow(0, index % len(self.finite), 1))
            self.finite_host[index].copy_(self.finite[index], non_blocking=True)
            return streams.record()

    def take_norm(self, index: int, device_grads: torch.Tensor) -> None:
        """On the stream that copies ``device_grads`` down: send their norm down too (a step's only micro-batch)."""
        self.norm_down[index] = True
        self.norms_host[index].copy_(torch.linalg.vector_norm(device_grads, dtype=MASTER_DTYPE), non_blocking=True)

    def forget_norm(self, index: int) -> None:
        """Unit ``index``'s gradients are (or may become) more than what its norm was taken of."""
        self.norm_down[index] = False

    def forget_norms(self) -> None:
        self.norm_down = [False] * len(self.norm_down)


def raise_if_nonfinite(engine: SlidingEngine, key) -> None:
    """Raise ``FloatingPointError`` when unit ``key``'s gradients of this step hold a NaN/Inf (after waiting for its
    flag to reach the host)."""
    unit = engine.units()[key]
    engine.worker.await_device(unit.grad_event)
    if not engine.gradient_checks.finite_host[index_of(key)]:
        raise FloatingPointError(
            f"{unit.name} has NaN/Inf gradients at global step {engine.mode.step}. Lower the learning rate, check "
            "the data, or pass SlideFormerStrategy(nonfinite='skip') to skip such steps"
        )


def finite_task(engine: SlidingEngine, keys: list, verdict: Verdict) -> None:
    """Worker task (``nonfinite="skip"`` without clipping by norm): skip the step when a gradient of a unit in
    ``keys`` is NaN/Inf."""
    units = engine.units()
    for key in keys:
        engine.worker.await_device(units[key].grad_event)
    if not all(engine.gradient_checks.finite_host[index_of(key)] for key in keys):
        verdict.skip = True
        engine.skipped_steps += 1


def clip_task(engine: SlidingEngine, max_norm: float, units: list[HostUnit], device_norms, verdict: Verdict) -> None:
    """Worker task: the clipping coefficient of ``clip_grad_norm_`` over every optimized gradient of ``units`` and
    the per-parameter norms ``device_norms`` (a list of ``(host tensor, event)``) of gradients kept on the device."""
    checks, shards = engine.gradient_checks, engine.shards
    norms = []
    for unit in units:
        engine.worker.await_device(unit.grad_event)
        key = engine.key_of(unit)
        optimizer = engine.updates.optimizers[key]
        if checks.norm_down[index_of(key)] and optimizer.steps_whole_gradient:
            norms.append(checks.norms_host[index_of(key)].clone())  # taken on the device
        else:
            norms.extend(torch.linalg.vector_norm(g) for g in optimizer.bind().values())
    for host, event in device_norms if shards.rank == 0 else ():  # replicated on every rank: counted once
        engine.worker.await_device(event)
        norms.extend(host.unbind())
    if shards.active:  # the norm over every rank's shards (each rank takes part, even with none)
        squares = torch.stack(norms).square().sum() if norms else torch.zeros(())
        shards.host_sum(squares)
        norms = [squares.sqrt()]
    if not norms:
        return
    total = torch.linalg.vector_norm(torch.stack(norms))
    if torch.isfinite(total):
        verdict.coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    elif engine.nonfinite == "skip":
        verdict.skip = True
        engine.skipped_steps += 1
    else:
        verdict.error = FloatingPointError(
            f"the global gradient norm is {total.item()}: a NaN/Inf gradient. Lower the learning rate, check the "
            "data, or pass SlideFormerStrategy(nonfinite='skip') to skip such steps"
        )
