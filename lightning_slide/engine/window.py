"""The window: a fixed set of compute-device slots through which the decoder layers slide.

Each slot is one pre-allocated flat weight buffer (compute dtype) and one flat gradient buffer, sized for the
largest layer and reused for every layer that passes through. A layer is *loaded* while its parameters point into
a slot; at most ``depth`` layers are loaded at any moment. Loading copies the layer's fp32 masters into the slot on
the upload stream (cast on the device), or its compute copy as it is when the host keeps one, and its frozen
parameters as they are when the host keeps them in the compute dtype; evicting points the parameters back at their
host homes, which costs nothing.

Events keep the streams honest: an upload into a slot waits until compute is done with its previous occupant
(``free``); compute waits until the upload has landed (``ready``); zeroing a slot's gradients for a new occupant
waits until the previous occupant's gradients have left the device (``grads_free``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from lightning_slide.engine.host import HostUnit
from lightning_slide.engine.shard import Shards
from lightning_slide.engine.streams import Streams, copy_cast


@dataclass
class Slot:
    weights: torch.Tensor
    grads: torch.Tensor
    occupant: int | None = None
    ready: object = None  # upload of the occupant landed
    free: object = None  # compute finished with the previous occupant
    grads_free: object = None  # the previous occupant's gradients were copied out


class Window:
    """``depth`` compute-device slots shared by ``layers``.

    Args:
        layers: host state of every decoder layer, in execution order.
        depth: number of slots (layers on the compute device at once), 1 to ``len(layers)``.
        device: the compute device.
        dtype: the compute dtype of the slots.
        streams: the device's upload and download streams.
        upload_staging: device buffer (fp32) through which uploads are cast; ``None`` when no cast is needed.
        before_load: called with a layer index before its masters are read (waits for its pending update).
        may_load: says whether a layer can be prefetched now without blocking (its update is done).
        shards: the data-parallel ranks sharing each layer (``shard.Shards``); default ``None``: one process. With
            several, a load uploads the owned shard and all-gathers the rest on the upload stream, and slots are
            padded for the collectives.
        pinned: layers that never slide (kept on the device elsewhere, ``device_units.py``): never loaded here; while
            one of them computes, the next layers are only prefetched as far as their updates allow.
    """

    def __init__(
        self,
        layers: list[HostUnit],
        depth: int,
        device: torch.device,
        dtype: torch.dtype,
        streams: Streams,
        upload_staging: torch.Tensor | None,
        before_load: Callable[[int], None],
        may_load: Callable[[int], bool],
        shards: Shards | None = None,
        pinned: set[int] = frozenset(),
    ) -> None:
        if not 1 <= depth <= len(layers) - len(pinned):
            raise ValueError(
                f"window depth must be between 1 and {len(layers) - len(pinned)} (the layers that slide), got {depth}"
            )
        self.pinned = set(pinned)
        self.layers = layers
        self.depth = depth
        self.streams = streams
        self.upload_staging = upload_staging
        self.before_load = before_load
        self.may_load = may_load
        self.shards = shards if shards is not None and shards.active else None
        if self.shards is None:
            weight_numel = max(u.numel for u in layers)
            grad_numel = max(u.trainable_numel for u in layers)
        else:  # the gradients are reduce-scattered over the same shards as the weights
            weight_numel = grad_numel = max(self.shards.padded(u.numel) for u in layers)
        self.slots = [
            Slot(
                torch.empty(weight_numel, dtype=dtype, device=device),
                torch.empty(grad_numel, dtype=dtype, device=device),
            )
            for _ in range(depth)
        ]
        self.slot_of: dict[int, Slot] = {}

    @property
    def weights(self) -> list[torch.Tensor]:
        return [slot.weights for slot in self.slots]

    def ensure(self, wanted: Iterable[int], evict: Callable[[int], None]) -> None:
        """Load ``wanted[0]`` (blocking on its update if needed) and prefetch the rest of ``wanted`` whose updates
        are done, reusing slots of loaded layers that are not wanted; then make compute wait for ``wanted[0]``.

        ``evict(i)`` is called for each layer that gives up its slot, before the slot is reused.
        """
        wanted = [i for i in wanted if 0 <= i < len(self.layers)]
        computing_pinned = bool(wanted) and wanted[0] in self.pinned  # then every load here is a prefetch
        wanted = [i for i in wanted if i not in self.pinned][: self.depth]
        keep = set(wanted)
        for position, index in enumerate(wanted):
            if index in self.slot_of:
                continue
            if (position > 0 or computing_pinned) and not self.may_load(index):
                break  # prefetch stays in order: the next layer first
            self._load(index, self._free_slot(keep, evict))
        if wanted and not computing_pinned:
            self.streams.wait(self.slot_of[wanted[0]].ready)

    def _free_slot(self, keep: set[int], evict: Callable[[int], None]) -> Slot:
        for slot in self.slots:
            if slot.occupant is None:
                return slot
        for slot in self.slots:
            if slot.occupant not in keep:
                evict(slot.occupant)
                self.release(slot.occupant)
                return slot
        raise RuntimeError("no window slot can be freed")  # unreachable: len(keep) <= depth

    def _load(self, index: int, slot: Slot) -> None:
        self.before_load(index)
        unit = self.layers[index]
        with self.streams.on(self.streams.upload):
            self.streams.wait(slot.free)
            if self.shards is None:
                for offset, source in unit.upload_pieces():  # frozen parameters kept apart go up as they are
                    copy_cast(slot.weights[offset : offset + source.numel()], source, self.upload_staging)
            else:
                owned = slice(unit.start, unit.stop)
                copy_cast(slot.weights[owned], unit.upload_source[owned], self.upload_staging)
                self.shards.gather(slot.weights, unit.numel)
            slot.ready = self.streams.record()
        for e in unit.entries:
            e.param.data = e.view(slot.weights)
        slot.occupant = index
        self.slot_of[index] = slot

    def attach_grads(self, index: int) -> None:
        """Give the loaded layer's trainable parameters zeroed gradient views of its slot, for autograd to fill."""
        unit = self.layers[index]
        slot = self.slot_of[index]
        self.streams.wait(slot.grads_free)
        # With several ranks the padding past the trainable part is reduced too: zeros, whatever was there before.
        slot.grads[: self._grads_extent(unit)].zero_()
        for e in unit.trainable:
            e.param.grad = e.view(slot.grads)

    def grads_of(self, index: int) -> torch.Tensor:
        """The loaded layer's gradient buffer: its trainable elements, padded for the collectives with several
        ranks (zeros past them)."""
        return self.slot_of[index].grads[: self._grads_extent(self.layers[index])]

    def _grads_extent(self, unit: HostUnit) -> int:
        """Elements of a slot's gradient buffer a layer uses: its trainable ones, padded for the collectives."""
        return unit.trainable_numel if self.shards is None else self.shards.padded(unit.numel)

    def grads_copied(self, index: int, event) -> None:
        """Record that the gradients of loaded layer ``index`` leave the device when ``event`` happens."""
        self.slot_of[index].grads_free = event

    def release(self, index: int) -> None:
        """Point the layer back at its masters and free its slot once compute has finished with it."""
        slot = self.slot_of.pop(index)
        slot.free = self.streams.record()
        slot.occupant = None
        self.layers[index].park()

    def clear(self) -> None:
        for index in list(self.slot_of):
            self.release(index)
