"""Parked gradients (``parked_grads``): layers' gradients held on the compute device until a host buffer is free.

While updates stream out of a backward and every host gradient buffer is lent, the backward parks a layer's
gradients in a device buffer instead of waiting for the host; they go down on their own stream as host buffers come
back (the lowest layer whose gradients have landed first), at the latest when the next forward loads the layer. So
the host keeps updating through the next forward instead of idling in it. In a step whose updates wait for the end
of its backward (clipping by norm, ``nonfinite="skip"``; one micro-batch) the first layers to finish park, so the host
holds only the others' gradients, and they go down after the step, first layer first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.profiler import record_function

from lightning_slide.engine.host import HostUnit
from lightning_slide.engine.loans import POLL_SECONDS
from lightning_slide.engine.streams import copy_cast

if TYPE_CHECKING:
    from lightning_slide.engine.engine import SlidingEngine


class Parking:
    """The parking buffers of ``engine`` and the layers parked in them."""

    def __init__(self, engine: SlidingEngine) -> None:
        self.engine = engine
        # Free device buffers, each with the event after which it may be written again.
        self.free: list[tuple[torch.Tensor, object]] = []
        # Parked layers, in the order they were parked: index -> (buffer, event after the gradients landed there,
        # the arguments of its update: None until the step gives them, for a step that waits for the backward).
        self.parked: dict[int, tuple[torch.Tensor, object, tuple | None]] = {}
        self.stream = self.staging = None
        self.total = 0  # layers whose gradients were parked, since construction
        self.capacity = 0  # buffers kept, free or holding a parked layer (more may be held until they go down)

    def __contains__(self, index: int) -> bool:
        return index in self.parked

    def __bool__(self) -> bool:
        return bool(self.parked)

    def resize(self, count: int) -> None:
        """Keep ``count`` buffers from now on. More are allocated now; beyond it, free ones go now and those holding
        parked gradients once these have gone down (a longer batch's activations need their memory)."""
        engine = self.engine
        if count and self.stream is None and engine.device.type == "cuda":
            # Parked gradients go down on their own stream (and staging): the download stream runs as far behind
            # the training thread as the backward's flags and parks issued on it, which would hold back gradients
            # that are already complete.
            self.stream = torch.cuda.Stream(engine.device)
            if engine.download_staging is not None:
                self.staging = torch.empty_like(engine.download_staging)
        held = len(self.free) + len(self.parked)
        self.free += [
            (torch.empty(engine.loans.pool.numel, dtype=engine.compute_dtype, device=engine.device), None)
            for _ in range(count - held)
        ]
        self.capacity = count
        while self.free and len(self.free) + len(self.parked) > count:
            self._let_go(self.free.pop()[1])

    def _give_back(self, buffer: torch.Tensor, event) -> None:
        """``buffer`` is free once ``event`` has happened: kept for the next park, or let go beyond ``capacity``."""
        if len(self.free) + len(self.parked) < self.capacity:
            self.free.append((buffer, event))
        else:
            self._let_go(event)

    @staticmethod
    def _let_go(event) -> None:
        """Before a buffer's memory goes back to the allocator, which may hand it to the compute stream at once: the
        copies that read or wrote it on other streams (up to ``event``) must be done. Rare: a longer batch only."""
        if event is not None:
            event.synchronize()

    def wants(self, unit: HostUnit, key) -> bool:
        """Whether the first micro-batch's gradients of layer ``key``, about to go down, park instead. While updates
        stream: when no host buffer is free, or layers parked earlier wait (they go first). In a step whose updates
        wait for its backward: while a parking buffer is free."""
        engine, mode = self.engine, self.engine.mode
        if unit.grad is not None or unit is engine.resident:
            return False
        if mode.streaming is not None:
            return bool(self.free or self.parked) and bool(self.parked or not engine.loans.has_room())
        optimizer = engine.updates.optimizers.get(key)
        # clipping by norm reads a parked layer's norm taken on the device: it must cover all it optimizes
        return (
            mode.holding
            and bool(self.free)
            and optimizer is not None
            and (not mode.clipping or optimizer.steps_whole_gradient)
        )

    def park(self, index: int, device_grads: torch.Tensor) -> object:
        """On the download stream: copy layer ``index``'s gradients into a free buffer; returns the event after
        which ``device_grads`` may be overwritten. Its update waits for ``unpark``."""
        engine, mode = self.engine, self.engine.mode
        buffer, free = self.free.pop()
        engine.streams.wait(free)  # its previous contents went down
        buffer[: device_grads.numel()].copy_(device_grads)
        landed = engine.streams.record()
        update = None if mode.streaming is None else (mode.streaming, None, mode.clip_value, mode.step)
        self.parked[index] = (buffer, landed, update)
        engine.layers[index].grad_event = landed  # its flags (and norm) went down before it
        self.total += 1
        return landed

    def give_update(self, index: int, update: tuple) -> None:
        """The arguments of parked layer ``index``'s update, given by a step that waited for its backward."""
        buffer, landed, _ = self.parked[index]
        self.parked[index] = (buffer, landed, update)

    def drop_unqueued(self) -> None:
        """Forget the layers whose step gave no update (it was skipped): their buffers are free again."""
        for index in [i for i, (_, _, update) in self.parked.items() if update is None]:
            buffer, landed, _ = self.parked.pop(index)
            self._give_back(buffer, landed)

    def unpark(self, index: int) -> None:
        """Send layer ``index``'s parked gradients down into a host buffer (waiting for one) and queue its update."""
        engine = self.engine
        buffer, landed, update = self.parked.pop(index)
        unit = engine.layers[index]
        unit.grad = engine.loans.lend(index, bounded=True, dtype=engine.gradient_dtype(index))
        with engine.streams.on(self.stream):
            engine.streams.wait(landed)
            copy_cast(unit.grad, buffer[: unit.grad_numel], self.staging)
            unit.grad_empty = False
            unit.grad_event = engine.streams.record()
        self._give_back(buffer, unit.grad_event)
        engine.updates.submit(index, *update, ready=unit.grad_event)
        if engine.mode.streaming is None:  # after the backward: the next forward's order, this update among the first
            engine.updates.prefer_forward_order()
            engine.mode.open = bool(self.parked)  # the step's updates are all queued once none is parked

    def unpark_ready(self) -> None:
        """Send parked gradients down while host buffers are free (never waits), in the order ``next`` gives."""
        while self.ready() and self.engine.loans.has_room():
            self.unpark(self.next())

    def unpark_all(self) -> None:
        """Send every parked layer whose update may be queued down, first layer first (waiting for buffers)."""
        while self.ready():
            self.unpark(min(self.ready()))

    def ready(self) -> list[int]:
        """The parked layers whose update may be queued (a step waiting for its backward gives that at ``step``)."""
        return [index for index, (_, _, update) in self.parked.items() if update is not None]

    def next(self) -> int:
        """The parked layer to send down next: of the layers whose gradients have landed in their buffer, the lowest
        — the host can start on it at once, and the next forward needs it soonest, so the layers left for the end
        reach up to the last and the host still has updates to run while that forward ends. If none has landed:
        during the backward the oldest (the first to land), after it the first layer."""
        waiting = self.ready()
        landed = [index for index in waiting if self.parked[index][1] is None or self.parked[index][1].query()]
        if landed:
            return min(landed)
        return min(waiting) if self.engine.mode.streaming is None else waiting[0]

    def settled(self, index: int) -> bool:
        """Whether layer ``index``'s masters are current: no update queued or running, no gradients parked."""
        return index not in self.parked and self.engine.worker.done(index)

    def before_load(self, index: int) -> None:
        """Before the window loads layer ``index``: its parked gradients go down, and its update is waited for."""
        if index in self.ready():  # (not gradients parked for a step still to come: the masters are current)
            self.unpark(index)
        self.wait_for_update(index)

    def wait_for_update(self, key) -> None:
        """Wait for unit ``key``'s update, sending parked gradients down meanwhile as host buffers come back: the
        update thread would otherwise run out of gradients to update while the training thread waits."""
        worker = self.engine.worker
        with record_function(f"slide.wait update {key}"):
            while self.ready() and not worker.wait(key, timeout=POLL_SECONDS):
                self.unpark_ready()
            worker.wait(key)

    def close(self) -> None:
        """Let the buffers go once their copies are done."""
        if self.stream is not None:
            self.stream.synchronize()
        self.staging = None
        self.parked.clear()
        self.free.clear()
