"""The window: a fixed set of compute-device slots through which the decoder layers slide.

Each slot is one pre-allocated flat weight buffer (compute dtype) and one flat gradient buffer, sized for the
largest layer and reused for every layer that passes through. A layer is *loaded* while its parameters point into
a slot; at most ``depth`` layers are loaded at any moment. Loading copies the layer's fp32 masters into the slot
(casting to the compute dtype); evicting points the parameters back at their masters, which costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from lightning_slide.engine.host import HostUnit


class Window:
    """``depth`` compute-device slots shared by ``layers``.

    Args:
        layers: host state of every decoder layer, in execution order.
        depth: number of slots (layers on the compute device at once), 1 to ``len(layers)``.
        device: the compute device.
        dtype: the compute dtype of the slots.
        before_load: called with a layer index before its masters are read (waits for a pending update).
    """

    def __init__(
        self,
        layers: list[HostUnit],
        depth: int,
        device: torch.device,
        dtype: torch.dtype,
        before_load: Callable[[int], None],
    ) -> None:
        if not 1 <= depth <= len(layers):
            raise ValueError(f"window depth must be between 1 and {len(layers)} (the number of layers), got {depth}")
        self.layers = layers
        self.depth = depth
        self.before_load = before_load
        weight_numel = max(u.numel for u in layers)
        grad_numel = max(u.trainable_numel for u in layers)
        self.weights = [torch.empty(weight_numel, dtype=dtype, device=device) for _ in range(depth)]
        self.grads = [torch.empty(grad_numel, dtype=dtype, device=device) for _ in range(depth)]
        self.occupant: list[int | None] = [None] * depth
        self.slot_of: dict[int, int] = {}

    def loaded(self) -> list[int]:
        return sorted(self.slot_of)

    def ensure(self, wanted: Iterable[int], evict: Callable[[int], None]) -> None:
        """Load every layer in ``wanted`` (in order), reusing slots of loaded layers that are not wanted.

        ``evict(i)`` is called for each layer that gives up its slot, before its slot is overwritten.
        """
        wanted = [i for i in wanted if 0 <= i < len(self.layers)][: self.depth]
        keep = set(wanted)
        for i in wanted:
            if i in self.slot_of:
                continue
            slot = self._free_slot(keep, evict)
            self._load(i, slot)

    def _free_slot(self, keep: set[int], evict: Callable[[int], None]) -> int:
        for slot, occupant in enumerate(self.occupant):
            if occupant is None:
                return slot
        for slot, occupant in enumerate(self.occupant):
            if occupant not in keep:
                evict(occupant)
                self.release(occupant)
                return slot
        raise RuntimeError("no window slot can be freed")  # unreachable: len(keep) <= depth

    def _load(self, index: int, slot: int) -> None:
        self.before_load(index)
        unit = self.layers[index]
        weights = self.weights[slot]
        weights[: unit.numel].copy_(unit.master)
        for e in unit.entries:
            e.param.data = e.view(weights)
        self.occupant[slot] = index
        self.slot_of[index] = slot

    def attach_grads(self, index: int) -> None:
        """Give the loaded layer's trainable parameters zeroed gradient views of its slot, for autograd to fill."""
        unit = self.layers[index]
        grads = self.grads[self.slot_of[index]]
        grads[: unit.trainable_numel].zero_()
        for e in unit.trainable:
            e.param.grad = e.view(grads)

    def grads_of(self, index: int) -> torch.Tensor:
        return self.grads[self.slot_of[index]][: self.layers[index].trainable_numel]

    def release(self, index: int) -> None:
        """Point the layer back at its masters and free its slot."""
        slot = self.slot_of.pop(index)
        self.occupant[slot] = None
        self.layers[index].park()

    def clear(self) -> None:
        for index in list(self.slot_of):
            self.release(index)
