"""Host-side state of one unit (a decoder layer, or the resident parts): fp32 masters and gradient accumulators.

Each unit keeps its parameters in one flat fp32 buffer, trainable parameters first, so that a whole unit moves
to or from the compute device as one contiguous copy and its gradients form one contiguous buffer. The module's
``nn.Parameter`` objects stay the same Python objects throughout; only their ``.data`` is pointed either at their
master view (at rest) or at a compute-device slot (while the unit is in the window).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

MASTER_DTYPE = torch.float32


@dataclass
class Entry:
    """One parameter's place in its unit: ``flat[offset : offset + numel].view(shape)``."""

    name: str
    param: nn.Parameter
    offset: int
    shape: torch.Size

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.offset : self.offset + self.numel].view(self.shape)


class HostUnit:
    """fp32 master weights and the fp32 gradient accumulator of one unit, in host memory.

    Args:
        name: label used in messages (``"layer 3"``, ``"resident"``).
        params: ``(qualified name, parameter)`` pairs, each parameter once.
        pin: allocate page-locked memory (only useful when the compute device is a GPU).
        own_grad: allocate the gradient accumulator now and keep it; ``False``: the engine lends one from a
            :class:`GradientPool` while the unit has gradients (layers), so idle layers cost no gradient memory.

    Construction moves each parameter's values into the flat master buffer and points the parameter at its view,
    so host memory holds one copy (plus at most one parameter in flight).
    """

    def __init__(
        self, name: str, params: list[tuple[str, nn.Parameter]], *, pin: bool = False, own_grad: bool = True
    ) -> None:
        self.name = name
        ordered = [np for np in params if np[1].requires_grad] + [np for np in params if not np[1].requires_grad]
        self.entries: list[Entry] = []
        offset = 0
        for pname, p in ordered:
            self.entries.append(Entry(pname, p, offset, p.shape))
            offset += p.numel()
        self.numel = offset
        self.trainable = [e for e in self.entries if e.param.requires_grad]
        self.trainable_numel = sum(e.numel for e in self.trainable)

        self.master = torch.empty(self.numel, dtype=MASTER_DTYPE, pin_memory=pin)
        for e in self.entries:
            view = e.view(self.master)
            view.copy_(e.param.detach())
            e.param.data = view
        self.grad = torch.zeros(self.trainable_numel, dtype=MASTER_DTYPE, pin_memory=pin) if own_grad else None
        # True when `grad` holds nothing yet for the current optimizer step: the next download overwrites it.
        self.grad_empty = True
        # Device event after which `grad` holds the last download (None on the CPU, or when nothing is in flight).
        self.grad_event = None

    def park(self) -> None:
        """Point every parameter back at its master (host, fp32)."""
        for e in self.entries:
            e.param.data = e.view(self.master)
            e.param.grad = None


class GradientPool:
    """Reusable flat fp32 gradient buffers (page-locked on a GPU machine) of ``numel`` elements, lent to layers
    between the download of their gradients and their update, then given back for the next layer. Thread-safe:
    buffers are taken on the training thread and given back by the update thread."""

    def __init__(self, numel: int, *, pin: bool) -> None:
        self.numel = numel
        self.pin = pin
        self.allocated = 0  # buffers created so far: the pool's high-water mark
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self) -> torch.Tensor:
        with self._lock:
            if self._free:
                return self._free.pop()
            self.allocated += 1
        return torch.empty(self.numel, dtype=MASTER_DTYPE, pin_memory=self.pin)

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buffer)
