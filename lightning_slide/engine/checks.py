"""A step's checks before its updates: whether each unit's gradients are finite, the clipping norm, and the verdict
the step's updates read.

Flags and norms are made on the device as each unit's gradients leave it and copied to the host behind them, so the
host reads one number per unit and never syncs the device for them. A step whose updates need every unit's gradients
(clipping by norm, ``nonfinite="skip"``) queues a task on the update thread ahead of its updates; the task fills in
a ``Verdict`` that those updates read.

Each unit's norm is kept per step (two rows: this step's and the last one's), taken on the device for a step's only
micro-batch, else in the host's pass that adds the last micro-batch in (``downloads.py``); what neither gave (a
unit whose optimizer steps part of its gradient) the host reads from the accumulator. With ``track`` on, every unit's
is taken, so the step's global norm is known without holding its updates back (``SlidingEngine.grad_norm``).
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
    """Per unit (``index_of``): whether its gradients of the current optimizer step are all finite, and their norms
    by step (``norms``: row ``step % 2``; ``known``: the units whose norm of that row's step is there or on its way;
    ``track``: take every unit's norm), made on the device where they can be and read on the host."""

    def __init__(self, layers: int, device: torch.device, pin: bool) -> None:
        self.finite = torch.ones(layers + 1, dtype=torch.bool, device=device)
        self.finite_host = torch.ones(layers + 1, dtype=torch.bool, pin_memory=pin)
        self.norms = torch.zeros(2, layers + 1, dtype=MASTER_DTYPE, pin_memory=pin)
        self.row_step = [-1, -1]
        self.known: list[set[int]] = [set(), set()]
        self.expected: list[set[int]] = [set(), set()]  # the units whose updates the step queued
        self.copies: list[list] = [[], []]  # events after which a row's norms copied from the device are there
        self.step = 0
        self.track = False

    def open_step(self, step: int) -> None:
        """A backward of global step ``step`` begins: its row starts empty unless it is already this step's."""
        self.step, row = step, step % 2
        if self.row_step[row] != step:
            self.row_step[row] = step
            self.known[row], self.expected[row], self.copies[row] = set(), set(), []

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

    def expect(self, index: int, step: int) -> None:
        """Step ``step`` queued unit ``index``'s update: its global norm counts the unit's (tracked norms only)."""
        if self.track:
            self.expected[step % 2].add(index)

    def put_norm(self, index: int, norm: torch.Tensor, streams, step: int | None = None) -> None:
        """Unit ``index``'s gradient norm of ``step`` (default: the current one) is ``norm``, a scalar on the host or,
        copied behind the current stream's work, on the device."""
        row = (self.step if step is None else step) % 2
        self.norms[row, index].copy_(norm, non_blocking=True)
        self.known[row].add(index)
        if self.track and norm.device.type != "cpu":  # (clipping reads it after the gradients' own event)
            self.copies[row].append(streams.record())

    def norm(self, index: int, step: int) -> torch.Tensor | None:
        """Unit ``index``'s norm of ``step`` if known (taken on the device, it may still be on its way: see
        ``await_device``)."""
        row = step % 2
        return self.norms[row, index] if self.row_step[row] == step and index in self.known[row] else None

    def forget_norm(self, index: int) -> None:
        """Unit ``index``'s gradients are (or may become) more than what its norm was taken of."""
        self.known[self.step % 2].discard(index)

    def forget_norms(self) -> None:
        self.known[self.step % 2].clear()

    def total(self, step: int) -> torch.Tensor | None:
        """The global norm of ``step``'s gradients from every unit's (its updates all run), or ``None`` when the step
        queued no update or is older than the last one."""
        row = step % 2
        if self.row_step[row] != step or not self.expected[row]:
            return None
        for event in self.copies[row]:
            event.synchronize()
        missing = self.expected[row] - self.known[row]
        if missing:
            raise RuntimeError(f"the gradient norms of units {sorted(missing)} of step {step} were not taken")
        return torch.linalg.vector_norm(self.norms[row, sorted(self.expected[row])])


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


def unit_norm(engine: SlidingEngine, key, step: int) -> torch.Tensor:
    """Unit ``key``'s gradient norm of ``step`` over the parameters its optimizer steps: taken on the device (as its
    gradients went down, where they are all it steps), else here, from its host accumulator (kept for the step's
    global norm)."""
    checks, optimizer = engine.gradient_checks, engine.updates.optimizers[key]
    known = checks.norm(index_of(key), step)
    if known is None:
        known = optimizer.grad_norm()
        checks.put_norm(index_of(key), known, engine.streams, step)
    return known


def clip_task(
    engine: SlidingEngine, max_norm: float, step: int, units: list[HostUnit], device_norms, verdict: Verdict
) -> None:
    """Worker task: the clipping coefficient of ``clip_grad_norm_`` over every optimized gradient of ``units`` and
    the per-parameter norms ``device_norms`` (a list of ``(host tensor, event)``) of gradients kept on the device."""
    shards = engine.shards
    norms = []
    for unit in units:
        engine.worker.await_device(unit.grad_event)
        key = engine.key_of(unit)
        norms.append(unit_norm(engine, key, step).clone())
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
