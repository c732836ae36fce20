"""Gradients leaving the device: each unit's gradients of a micro-batch go down to its fp32 host accumulator.

The first micro-batch of a step lands directly in the accumulator (a buffer lent by ``loans``, or parked on the
device by ``parking`` when none is free); later ones land in a page-locked staging buffer that the update thread
adds in. The gradients' finiteness flag goes down ahead of them and, when the step clips by norm or norms are
tracked, their norm behind them (``checks``); with several micro-batches the last one's sum gives it instead. With
several ranks a reduce-scatter on the download stream first leaves this rank's shard averaged over ranks, and only
that shard crosses to the host.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch

from lightning_slide.engine.checks import index_of
from lightning_slide.engine.host import MASTER_DTYPE, HostUnit
from lightning_slide.engine.pinned import host_empty
from lightning_slide.engine.streams import copy_cast
from lightning_slide.optim import add_with_norm

if TYPE_CHECKING:
    from lightning_slide.engine.engine import SlidingEngine


class GradientDownloads:
    """The download path of ``engine``'s gradients and its staging buffers for later micro-batches."""

    def __init__(self, engine: SlidingEngine) -> None:
        self.engine = engine
        self.staging: dict[Any, torch.Tensor] = {}  # page-locked fp32, by the device buffer they come from

    def send(self, unit: HostUnit, device_grads: torch.Tensor, staging_key) -> object:
        """Copy ``device_grads`` (one micro-batch's) into ``unit``'s accumulator; returns the event after which the
        device buffer may be reused."""
        engine = self.engine
        streams, checks, mode = engine.streams, engine.gradient_checks, engine.mode
        key = engine.key_of(unit)
        index = index_of(key)
        # the step's norm of the unit, made where its last micro-batch's gradients meet its sum; only of a gradient
        # the optimizer steps whole (the norm is of what it steps)
        optimizer = engine.updates.optimizers.get(key)
        norm_wanted = (mode.clipping or checks.track) and mode.last_micro_batch
        norm_wanted = norm_wanted and optimizer is not None and optimizer.steps_whole_gradient
        checks.fold_finite(index, device_grads[: unit.trainable_numel], unit.grad_empty, streams, engine.shards)
        produced = streams.record()
        with streams.on(streams.download):
            streams.wait(produced)
            engine.shards.reduce_scatter(device_grads, unit.numel)
            device_grads = device_grads[unit.grad_start : unit.grad_stop]
            if unit.grad_empty:
                checks.forget_norm(index)
                if norm_wanted:
                    # made on this stream: the gradients' memory is reused only after the copy
                    checks.put_norm(index, torch.linalg.vector_norm(device_grads, dtype=MASTER_DTYPE), streams)
                if engine.parking.wants(unit, key):
                    # Rather than wait for the host, or take a buffer ahead of gradients parked earlier. With every
                    # parking buffer taken: wait for a host buffer, send a parked layer that has landed down into
                    # it, and park in the buffer that frees (the host never waits on gradients still computing).
                    if not engine.parking.free:
                        engine.loans.wait_for_room()
                        engine.parking.unpark_ready()
                    return engine.parking.park(index, device_grads)
                if unit.grad is None:
                    unit.grad = (
                        engine.resident_parts.accumulator()
                        if unit is engine.resident
                        else engine.loans.lend(index, mode.streaming is not None, engine.gradient_dtype(key))
                    )
                copy_cast(unit.grad, device_grads, engine.download_staging)
                unit.grad_empty = False
                unit.grad_event = streams.record()
                return unit.grad_event
            checks.forget_norm(index)  # a sum of micro-batches: its norm is taken on the host, by the last sum
            engine.worker.wait(("add", staging_key))  # the staging buffer's previous contents were added
            staging = self._staging(staging_key, device_grads.numel())
            copy_cast(staging, device_grads, engine.download_staging)
            copied = streams.record()
        norm_of = (index, mode.step) if norm_wanted else None
        engine.worker.submit(("add", staging_key), functools.partial(self._add, unit, staging, copied, norm_of))
        return copied

    def wait_added(self) -> None:
        """Wait until the update thread has added every later micro-batch in."""
        for key in list(self.staging):
            self.engine.worker.wait(("add", key))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.staging.values())

    def _staging(self, key, numel: int) -> torch.Tensor:
        buffer = self.staging.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self.staging[key] = host_empty(numel, MASTER_DTYPE, pin=self.engine.pin)
        return buffer[:numel]

    def _add(self, unit: HostUnit, staging: torch.Tensor, copied, norm_of: tuple[int, int] | None) -> None:
        """Worker task: add a later micro-batch's gradients in; ``norm_of=(index, step)``: the step's last, whose sum
        also gives unit ``index``'s norm of ``step`` (in the same pass with the C++ host loop)."""
        engine = self.engine
        engine.worker.await_device(copied)
        if norm_of is None:
            unit.grad.add_(staging)
        else:
            index, step = norm_of
            engine.gradient_checks.put_norm(index, add_with_norm(unit.grad, staging), engine.streams, step)
