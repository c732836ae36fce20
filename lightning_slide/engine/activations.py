"""Layer-boundary activations offloaded to host memory in forward and brought back, one layer ahead, in backward.

With each layer checkpointed, the only activation a layer keeps through the forward is its input (B × T × H in
the compute dtype). For long sequences these inputs, one per layer, are what fills the GPU; this module moves them
to page-locked host memory as they are saved and back before the layer's recompute needs them. It works through
``torch.autograd.graph.saved_tensors_hooks`` around the checkpointed call: ``torch.utils.checkpoint`` saves the
layer's inputs as saved tensors, so the hooks see exactly those (the layer's inner saved tensors go through the
checkpoint's own, innermost hooks). Only tensors that require grad are moved: the hidden states; shared, small
inputs (rotary tables, masks) stay where they are.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from lightning_slide.engine.streams import Streams


@dataclass
class Parked:
    """One layer input in host memory, and its way back."""

    host: torch.Tensor
    copied: object  # event: the copy to the host has landed
    back: torch.Tensor | None = None  # on the device again, when prefetched
    ready: object = None  # event: `back` has landed


class ActivationOffload:
    """Saved-tensor hooks that park layer inputs on the host, and their prefetch in backward.

    Args:
        device: the compute device.
        streams: its streams; copies to the host run on the download stream, prefetches on the upload stream, so
            compute waits for neither until it needs the data.
    """

    def __init__(self, device: torch.device, streams: Streams) -> None:
        self.device = device
        self.streams = streams
        self.offloaded_bytes = 0  # total moved to the host so far
        self.prefetched = 0  # inputs that were already back on the device when the recompute asked for them
        self._layer: int | None = None
        self._parked: dict[int, list[Parked]] = {}

    def hooks(self, layer: int) -> AbstractContextManager:
        """The hooks for saving layer ``layer``'s inputs."""
        self._layer = layer
        self._parked[layer] = []
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        if not tensor.requires_grad or tensor.device != self.device:
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.streams.cuda)
        produced = self.streams.record()
        with self.streams.on(self.streams.download):
            self.streams.wait(produced)
            host.copy_(tensor, non_blocking=True)
            if self.streams.cuda:  # keep the device memory until the copy has read it
                tensor.record_stream(self.streams.download)
            copied = self.streams.record()
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        parked = Parked(host, copied)
        self._parked[self._layer].append(parked)
        return parked

    def prefetch(self, layer: int) -> None:
        """Start bringing layer ``layer``'s inputs back to the device (called while the layer above recomputes)."""
        for parked in self._parked.pop(layer, []):
            with self.streams.on(self.streams.upload):
                self.streams.wait(parked.copied)
                parked.back = parked.host.to(self.device, non_blocking=True)
                parked.ready = self.streams.record()

    def _unpack(self, packed):
        if not isinstance(packed, Parked):
            return packed
        if packed.back is not None:
            self.prefetched += 1
            self.streams.wait(packed.ready)
            back, packed.back = packed.back, None
            if self.streams.cuda:  # allocated on the upload stream, used on the compute stream
                back.record_stream(torch.cuda.current_stream())
            return back
        self.streams.wait(packed.copied)
        return packed.host.to(self.device, non_blocking=True)
