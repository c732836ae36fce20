"""Host-side state of one unit (a decoder layer, or the resident parts): fp32 masters and gradient accumulators.

Each unit keeps its parameters in one flat fp32 buffer, trainable parameters first, so that a whole unit moves
to or from the compute device as one contiguous copy and its gradients form one contiguous buffer. The module's
``nn.Parameter`` objects stay the same Python objects throughout; only their ``.data`` is pointed either at their
master view (at rest) or at a compute-device slot (while the unit is in the window).

A unit may also keep a *compute copy*: its weights in the compute dtype (bf16), page-locked, laid out like the
masters. Uploads then copy it as it is (2 bytes per parameter over PCIe instead of 4, no cast on the device) and
the host optimizer refreshes it after each update of the masters (``refresh_weights``).

Frozen parameters (``requires_grad=False``: a LoRA run's base weights) need no fp32 master: nothing updates them.
With ``frozen_dtype`` (the compute dtype, below fp32) a unit keeps them only in that dtype (``frozen``, 2 bytes per
parameter in bf16, page-locked on a GPU machine), uploaded as they are, and ``master`` holds the trainable part
only. At rest the frozen parameters point at their views of ``frozen``. This equals Lightning's ``bf16-true``,
which casts the whole module (frozen weights too) to bf16.

With the masters on disk (``master_path``), the unit holds no fp32 masters in memory: they live in one file, the
compute copy is the upload source, and the parameters at rest point at views of the file mapped into memory
(``torch.from_file``, shared): fp32 values that the OS reads only if someone touches them (a user reading the
module after training, ``save_pretrained``) and that the disk tier's in-place writes keep current. Training never
reads through the map: the optimizer reads and writes the file explicitly (see ``disk.StateStore``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lightning_slide.engine.disk import MASTER, write_array
from lightning_slide.engine.pinned import host_empty
from lightning_slide.engine.shared_masters import shared_masters
from lightning_slide.engine.sizes import frozen_in_compute_dtype

MASTER_DTYPE = torch.float32
RESIDENT = "resident"  # the key of the unit holding the resident parts (embeddings, final norm, head)


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
        weights_dtype: keep a compute copy of the weights in this dtype (``weights``), the source of uploads;
            ``None``: uploads read the fp32 masters.
        master_path: keep the fp32 masters only in this file (written now); requires ``weights_dtype``.
        span: ``(start, stop)``, the part of the flat vector this process owns when data-parallel ranks share the
            unit (``shard.Shards``): its gradients, updates and uploads; the rest of the masters is refreshed from
            the other ranks only on demand. Default ``None``: everything.
        master: a flat fp32 buffer of the unit's size to keep the masters in, shared with the other ranks of this
            host (``shared_masters.py``): this process writes only its ``span`` of it, the other ranks theirs.
            Default ``None``: a buffer of its own.
        frozen_dtype: keep the frozen parameters only in this dtype (``frozen``; the compute dtype) and the fp32
            masters of the trainable ones only. One process with masters of its own in memory only (``span``
            the whole unit, no ``master`` or ``master_path``). Default ``None``: every parameter has an fp32 master.

    Construction moves each parameter's values into the flat master buffer and points the parameter at its view,
    so host memory holds one copy (plus at most one parameter in flight).
    """

    def __init__(
        self,
        name: str,
        params: list[tuple[str, nn.Parameter]],
        *,
        pin: bool = False,
        own_grad: bool = True,
        weights_dtype: torch.dtype | None = None,
        master_path: Path | None = None,
        span: tuple[int, int] | None = None,
        master: torch.Tensor | None = None,
        frozen_dtype: torch.dtype | None = None,
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
        self.start, self.stop = (0, self.numel) if span is None else span
        # The owned trainable elements: what the gradient accumulator and the optimizer state cover.
        self.grad_start, self.grad_stop = min(self.start, self.trainable_numel), min(self.stop, self.trainable_numel)
        self.grad_numel = self.grad_stop - self.grad_start

        on_disk = master_path is not None and self.numel > 0
        if on_disk and weights_dtype is None:
            raise ValueError("masters on disk need a compute copy (weights_dtype) to upload from")
        if master is not None and (on_disk or master.numel() != self.numel):
            raise ValueError(f"{name}: a shared master buffer must hold the unit's {self.numel} elements, in memory")
        whole = (self.start, self.stop) == (0, self.numel)
        if frozen_dtype is not None and (not whole or master is not None or master_path is not None):
            raise ValueError(f"{name}: frozen parameters in the compute dtype need one process and masters in memory")
        self.shared = master is not None
        # Masters only for what is trained, when the frozen parameters have a home of their own.
        split = frozen_dtype is not None and self.trainable_numel < self.numel
        master_numel = self.trainable_numel if split else self.numel
        # fp32 masters in memory (None when they live in a file), and what the parameters point at when at rest.
        self.master: torch.Tensor | None = (
            master if self.shared else host_empty(master_numel, MASTER_DTYPE, pin=pin and not on_disk)
        )
        self.weights: torch.Tensor | None = None  # the compute copy, when kept
        if weights_dtype is not None:
            self.weights = host_empty(self.numel, weights_dtype, pin=pin)
        # The frozen parameters in the compute dtype: the compute copy's frozen part when there is one (the same
        # values: nothing refreshes it), else a buffer of their own.
        self.frozen: torch.Tensor | None = None
        if split:
            self.frozen = (
                self.weights[self.trainable_numel :]
                if self.weights is not None
                else host_empty(self.numel - self.trainable_numel, frozen_dtype, pin=pin)
            )
        for e in self.entries:
            home = self.home(e)
            if self.shared:  # this rank's part only: the other ranks write theirs at the same time
                low, high = max(e.offset, self.start), min(e.offset + e.numel, self.stop)
                if low < high:
                    self.master[low:high].copy_(e.param.detach().reshape(-1)[low - e.offset : high - e.offset])
            else:
                home.copy_(e.param.detach())  # frozen ones round to the compute dtype here, as Lightning's cast does
            e.param.data = home
        self.refresh_weights()
        self.rest = self.master
        self.master_path = master_path if on_disk else None
        if on_disk:
            write_array(master_path, self.master)
            self.rest = torch.from_file(str(master_path), shared=True, size=self.numel, dtype=MASTER_DTYPE)
            self.master = None
            self.park()
        self.grad = host_empty(self.grad_numel, MASTER_DTYPE, pin=pin).zero_() if own_grad else None
        # True when `grad` holds nothing yet for the current optimizer step: the next download overwrites it.
        self.grad_empty = True
        # Device event after which `grad` holds the last download (None on the CPU, or when nothing is in flight).
        self.grad_event = None

    def home(self, e: Entry) -> torch.Tensor:
        """Where entry ``e`` lives at rest: its view of the frozen buffer (a frozen parameter, when the unit keeps
        them apart), else of the fp32 masters (in memory, or the mapped master file)."""
        if self.frozen is not None and e.offset >= self.trainable_numel:
            start = e.offset - self.trainable_numel
            return self.frozen[start : start + e.numel].view(e.shape)
        return e.view(self.master if self.master is not None else self.rest)

    @property
    def upload_source(self) -> torch.Tensor:
        """The one flat buffer laid out like the unit that an upload may copy whole: the compute copy when there is
        one, else the fp32 masters (with frozen parameters kept apart, see ``upload_pieces``)."""
        return self.master if self.weights is None else self.weights

    def upload_pieces(self) -> list[tuple[int, torch.Tensor]]:
        """``(offset in the unit's layout, flat host tensor)`` pairs that an upload copies: one buffer, or the
        trainable masters and the frozen parameters when they are kept apart without a compute copy."""
        if self.frozen is None or self.weights is not None:
            return [(0, self.upload_source)]
        return [(0, self.master), (self.trainable_numel, self.frozen)]

    def refresh_weights(self, master: torch.Tensor | None = None) -> None:
        """Bring the compute copy up to date with ``master`` (default: the unit's masters); no-op without one.
        The cast rounds as the device's cast would (round to nearest even), so uploads carry the same values.
        Frozen parameters kept apart are not touched: their part of the compute copy is their only home."""
        if self.weights is not None:
            source = self.master if master is None else master
            stop = self.stop if self.frozen is None else self.trainable_numel
            self.weights[self.start : stop].copy_(source[self.start : stop])

    @property
    def master_bytes_in_memory(self) -> int:
        return 0 if self.master is None else self.master.nbytes

    def park(self) -> None:
        """Point every parameter back at its home on the host (``home``)."""
        for e in self.entries:
            e.param.data = self.home(e)
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
        return host_empty(self.numel, MASTER_DTYPE, pin=self.pin)

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buffer)


def build_units(
    parts,
    *,
    shards,
    pin: bool,
    compute_dtype: torch.dtype,
    compute_copy: bool,
    state_store=None,
    resident_on_device: bool,
) -> tuple[list[HostUnit], HostUnit, bool]:
    """Every unit of a model split into ``parts`` (``blocks.ModelParts``): ``(layers, resident, masters_shared)``.

    With several ranks each unit's span is this rank's shard (the resident parts are replicated when updated on the
    device) and the ranks of one host keep one copy of the sharded masters in shared memory where it fits
    (``shared_masters.py``). ``state_store``: keep the layers' masters in its files (the disk tier). Frozen layer
    parameters (a LoRA run's base weights) are kept in the compute dtype only where that is simple
    (``sizes.frozen_in_compute_dtype``), and so are the resident parts when none of them is trained.
    """
    on_disk = state_store is not None
    sizes = [sum(p.numel() for _, p in parts.block_parameters(i)) for i in range(len(parts.blocks))]
    sizes.append(0 if resident_on_device else sum(p.numel() for _, p in parts.resident))  # replicated: its own
    shared = None if on_disk else shared_masters(shards, sum(sizes), pin=pin)
    masters = [None] * len(sizes) if shared is None else list(shared.split(sizes))
    frozen_apart = frozen_in_compute_dtype(compute_dtype, shards.world, on_disk)

    def span(params):
        owned = shards.span(sum(p.numel() for _, p in params))
        return owned.start, owned.stop

    layers = [
        HostUnit(
            f"layer {i}",
            parts.block_parameters(i),
            pin=pin,
            own_grad=False,
            weights_dtype=compute_dtype if compute_copy else None,
            master_path=state_store.path(i, MASTER) if on_disk else None,
            span=span(parts.block_parameters(i)),
            master=masters[i],
            frozen_dtype=compute_dtype if frozen_apart else None,
        )
        for i in range(len(parts.blocks))
    ]
    if on_disk:
        for i in range(len(layers)):
            state_store.mark_written(i, MASTER)
    resident_frozen = frozen_apart and not any(p.requires_grad for _, p in parts.resident)
    resident = HostUnit(
        RESIDENT,
        parts.resident,
        pin=pin,
        own_grad=False,
        span=None if resident_on_device else span(parts.resident),
        master=masters[-1] if sizes[-1] else None,
        frozen_dtype=compute_dtype if resident_frozen else None,
    )
    if shared is not None:
        shards.host_barrier()  # every rank's part of the shared masters is written
    return layers, resident, shared is not None
