"""The resident parts (embeddings, final norm, output head): one compute copy on the device for a whole step (for
the whole run when none of them is trained, as in a LoRA run), their gradients there, and their update in one of
three ways.

- **On the device** (``resident_on_device``): fp32 masters, gradients and Adam state stay on the device, replicated
  over ranks. Their gradients arrive last in backward and their weights are needed first in the next forward, so
  this takes a host update out of the gap between two steps.
- **On the host, in chunks** (a streamed step): the gradients stay on the device and the update reads them chunk by
  chunk through two half-layer host buffers (one chunk goes down while the one before is updated), instead of a
  host accumulator as large as the parts (often larger than a layer).
- **On the host, whole** (accumulation, clipping by norm, ``nonfinite="skip"``): a host accumulator like a layer's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lightning_slide.engine.device_units import DeviceUnit
from lightning_slide.engine.host import MASTER_DTYPE, RESIDENT, HostUnit
from lightning_slide.engine.optimizer import UnitOptimizer
from lightning_slide.engine.pinned import host_empty
from lightning_slide.engine.streams import copy_cast

if TYPE_CHECKING:
    from lightning_slide.engine.engine import SlidingEngine


class ResidentParts:
    """The compute copy and the updates of ``engine``'s resident unit ``unit``."""

    # Elements of resident gradients per chunk (default: half a layer's gradient buffer); tests set it smaller.
    CHUNK: int | None = None

    def __init__(self, engine: SlidingEngine, unit: HostUnit, on_device: bool) -> None:
        self.engine = engine
        self.unit = unit
        self.on_device = on_device  # asked for; ``updates_on_device`` once an optimizer is attached
        sharded = engine.shards.active and not on_device
        self.weights = torch.empty(
            engine.shards.padded(unit.numel) if sharded else unit.numel,
            dtype=engine.compute_dtype,
            device=engine.device,
        )
        self.grads = torch.zeros(
            engine.shards.padded(unit.numel) if sharded else unit.trainable_numel,
            dtype=engine.compute_dtype,
            device=engine.device,
        )
        self.loaded = False  # the parameters point at a current compute copy
        self.current = False  # the compute copy holds the host's values (kept across steps when nothing trains it)
        # Updated on the device (``device_units.DeviceUnit``), once an optimizer is attached there.
        self.device = DeviceUnit(engine, RESIDENT, unit, self.weights, self.grads)
        self.in_chunks = False  # a streamed step's gradients are left on the device for the update to read
        self.chunks_ready = None  # the event after which they are (None on the CPU)
        self.chunk_buffer: torch.Tensor | None = None  # host fp32, two chunks of gradients
        self.chunk_staging: torch.Tensor | None = None  # device fp32, the update thread's own cast staging
        self.chunk_stream = torch.cuda.Stream(engine.device) if engine.device.type == "cuda" else None

    @property
    def updates_on_device(self) -> bool:
        return self.device.updates

    def chunk(self) -> int:
        return self.CHUNK or max(1, self.engine.loans.pool.numel // 2)

    def optimizer(self, optimizer, group_of: dict[int, int], state_in_memory: bool) -> UnitOptimizer:
        """The unit's optimizer: on the device (its masters copied there) or on the host, in chunks."""
        unit = self.unit
        if self.on_device and unit.trainable_numel > 0:
            return self.device.optimizer(optimizer, group_of)
        return UnitOptimizer(unit, optimizer, group_of, state_in_memory=state_in_memory, chunk=self.chunk())

    # ---------------------------------------------------------------- forward
    def load(self) -> None:
        """Point the parameters at a current compute copy (uploaded from the host masters when they changed)."""
        self.device.apply_deferred()
        if self.loaded:
            return
        engine, unit = self.engine, self.unit
        # Updated on the device, each update refreshes the copy there; with nothing trained it stays current.
        if not self.updates_on_device and not self.current:
            engine.parking.wait_for_update(RESIDENT)
            streams = engine.streams
            in_use = streams.record()  # whatever compute still reads the old copy
            with streams.on(streams.upload):
                streams.wait(in_use)
                if engine.shards.active:
                    owned = slice(unit.start, unit.stop)
                    copy_cast(self.weights[owned], unit.master[owned], engine.upload_staging)
                    engine.shards.gather(self.weights, unit.numel)
                else:  # frozen parameters kept apart go up as they are
                    for offset, source in unit.upload_pieces():
                        copy_cast(self.weights[offset : offset + source.numel()], source, engine.upload_staging)
                ready = streams.record()
            streams.wait(ready)
            self.current = not unit.trainable_numel
        for entry in unit.entries:
            entry.param.data = entry.view(self.weights)
        self.loaded = True

    # ---------------------------------------------------------------- backward
    def begin_backward(self) -> None:
        if self.unit.trainable_numel:
            self.engine.worker.wait(RESIDENT)  # a chunked update may still be reading last step's gradients
            self.grads.zero_()
            for entry in self.unit.trainable:
                entry.param.grad = entry.view(self.grads)

    def end_backward(self, streaming: list[dict] | None, clip_value: float | None) -> None:
        """Take the backward's gradients where this step updates them; queue a streamed step's update."""
        engine, unit = self.engine, self.unit
        if not unit.trainable_numel:
            return
        checks, streams, shards = engine.gradient_checks, engine.streams, engine.shards
        if self.updates_on_device:
            self.device.take_grads()
        elif streaming is not None and unit.grad_empty and RESIDENT in engine.updates.optimizers:
            # Left on the device for the update to read in chunks, through buffers made here, on the training
            # thread (page-locked for this thread's device).
            if self.chunk_buffer is None:
                self.chunk_buffer = host_empty(min(2 * self.chunk(), unit.grad_numel), MASTER_DTYPE, pin=engine.pin)
                if engine.upload_staging is not None:
                    self.chunk_staging = torch.empty_like(engine.upload_staging)
            unit.grad_event = checks.fold_finite(-1, self.grads[: unit.trainable_numel], True, streams, shards)
            produced = streams.record()
            with streams.on(streams.download):
                streams.wait(produced)
                shards.reduce_scatter(self.grads, unit.numel)
                if checks.track:  # the update reads them here, chunk by chunk: their norm is taken here too
                    checks.put_norm(-1, engine.updates.optimizers[RESIDENT].grad_norm(self.grads), streams)
                self.in_chunks, self.chunks_ready = True, streams.record()
        else:
            engine.downloads.send(unit, self.grads, RESIDENT)
        for entry in unit.trainable:
            entry.param.grad = None
        if streaming is not None and not self.updates_on_device:
            ready = self.chunks_ready if self.in_chunks else unit.grad_event
            engine.updates.submit(RESIDENT, streaming, clip_value=clip_value, ready=ready)

    def accumulator(self) -> torch.Tensor:
        """The host gradient accumulator (accumulation, clipping, ``nonfinite="skip"``), kept once allocated."""
        if self.unit.grad is None:
            self.unit.grad = host_empty(self.unit.grad_numel, MASTER_DTYPE, pin=self.engine.pin)
        return self.unit.grad

    # ---------------------------------------------------------------- update
    def step_in_chunks(self, optimizer: UnitOptimizer, hyper, clip_value, state) -> None:
        """Worker task part: update chunk by chunk from the gradients on the device (this rank's shard, averaged),
        each chunk cast to fp32 on the device and copied down on the update thread's own stream, through its own
        staging, into the half of ``chunk_buffer`` the previous chunk's update is not reading."""
        engine, unit, chunk = self.engine, self.unit, self.chunk()
        ready, self.in_chunks = self.chunks_ready, False
        spans = [(lo, min(lo + chunk, unit.grad_stop)) for lo in range(unit.grad_start, unit.grad_stop, chunk)]

        def fetch(number: int):
            lo, hi = spans[number]
            half = (number % 2) * chunk
            buffer = self.chunk_buffer[half : half + hi - lo]
            with engine.streams.on(self.chunk_stream):
                engine.streams.wait(ready)
                copy_cast(buffer, self.grads[lo:hi], self.chunk_staging)
                return buffer, engine.streams.record()

        coming = fetch(0)
        for number, (lo, hi) in enumerate(spans):
            buffer, copied = coming
            if number + 1 < len(spans):
                coming = fetch(number + 1)  # into the other half: the update that read it last has returned
            engine.worker.await_device(copied)
            optimizer.step(hyper, None, clip_value, state, only=(lo, hi, buffer))

    # ---------------------------------------------------------------- state and lifetime
    def from_host(self) -> None:
        """Take the host masters (a loaded state dict) as the current weights."""
        self.parked()
        self.device.from_host()

    def parked(self) -> None:
        """The parameters point at their host homes, where user code may change them: upload before the next use."""
        self.loaded = self.current = False

    def close(self) -> None:
        if self.chunk_stream is not None:
            self.chunk_stream.synchronize()
        self.device.close()
        self.weights = self.grads = None
        self.chunk_buffer = self.chunk_staging = None
        self.loaded = self.current = False
