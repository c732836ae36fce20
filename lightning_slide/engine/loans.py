"""The host's layer gradient buffers, lent to layers between the download of their gradients and their update.

While updates stream out of a backward at most ``bound`` layers hold one (``grad_buffers``): the backward waits for
the host rather than hold more, so host memory for gradients stays a few layers' worth whatever the model's depth.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import torch

from lightning_slide.engine.host import MASTER_DTYPE, GradientPool, HostUnit

if TYPE_CHECKING:
    from lightning_slide.engine.update_worker import UpdateWorker

POLL_SECONDS = 1e-3  # how often a wait for room looks again (the caller may have other work between looks)


class GradientLoans:
    """Buffers of ``numel`` fp32 elements (page-locked with ``pin``) lent to the layers ``layers``; a layer gives its
    buffer back when its update (``worker`` task under its index) is done."""

    def __init__(self, layers: list[HostUnit], numel: int, bound: int, worker: UpdateWorker, pin: bool) -> None:
        self.layers, self.bound, self.worker = layers, bound, worker
        self.pool = GradientPool(numel, pin=pin)
        self.lent: collections.deque = collections.deque()  # layers holding a buffer, oldest first
        self._whole: dict[int, torch.Tensor] = {}  # the pool's whole fp32 buffer of each lent view, by its address

    def lend(self, index: int, bounded: bool, dtype: torch.dtype = MASTER_DTYPE) -> torch.Tensor:
        """A buffer for layer ``index``: the front of one of the pool's, viewed as ``dtype`` (a narrower one takes
        less of it); ``bounded`` (updates stream): first wait until few enough are lent."""
        if bounded:
            self.wait_for_room()
        else:
            self.has_room()  # forgets the layers that gave theirs back
        self.lent.append(index)
        buffer = self.pool.take()
        lent = buffer.view(dtype)[: self.layers[index].grad_numel]
        self._whole[lent.data_ptr()] = buffer
        return lent

    def give_back(self, unit: HostUnit) -> None:
        """Return a layer's buffer (the resident parts own theirs)."""
        if unit in self.layers and unit.grad is not None:
            buffer, unit.grad = unit.grad, None
            self.pool.give(self._whole.pop(buffer.data_ptr()))

    def wait_for_room(self) -> None:
        """Block until a layer could borrow a buffer within the bound: until one of the layers holding one
        (whichever first) has given it back."""
        while not self.has_room():
            oldest = self.lent[0]
            if not self.worker.wait(oldest, timeout=POLL_SECONDS) or self._returned(oldest):
                continue
            # done but still holding it: a step waiting for the backward has not queued its update yet
            self.lent.popleft()
            return

    def has_room(self) -> bool:
        """Whether a layer could borrow a buffer now, within the bound, without waiting."""
        for index in [index for index in self.lent if self._returned(index)]:
            self.lent.remove(index)
            self.worker.wait(index)  # done: returns at once (re-raises its failure)
        return len(self.lent) < self.bound

    def _returned(self, index: int) -> bool:
        """Whether layer ``index`` gave its buffer back: its update is done (in a step that waits for its backward,
        a layer holds its buffer before its update is queued)."""
        return self.worker.done(index) and self.layers[index].grad is None

    def close(self) -> None:
        for unit in self.layers:
            unit.grad = None  # buffers lent by the pool
        self.lent.clear()
        self._whole.clear()
        self.pool = GradientPool(0, pin=False)
