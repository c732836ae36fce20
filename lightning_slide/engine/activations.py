"""Layer-boundary activations offloaded to host memory in forward and brought back in backward.

With each layer checkpointed, the only activation a layer keeps through the forward is its input (B × T × H in
the compute dtype). For long sequences these inputs, one per layer, are what fills the GPU; this module moves them
to page-locked host memory as they are saved and back when the layer's recompute needs them. It works through
``torch.autograd.graph.saved_tensors_hooks`` around the checkpointed call: ``torch.utils.checkpoint`` saves the
layer's inputs as saved tensors, so the hooks see exactly those (the layer's inner saved tensors go through the
checkpoint's own, innermost hooks). Only tensors that require grad are moved: the hidden states; shared, small
inputs (rotary tables, masks) stay where they are.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from lightning_slide.engine.streams import Streams


class ActivationOffload:
    """Saved-tensor hooks that park layer inputs on the host.

    Args:
        device: the compute device.
        streams: its streams; the copy to the host runs on the download stream, so compute does not wait for it.
    """

    def __init__(self, device: torch.device, streams: Streams) -> None:
        self.device = device
        self.streams = streams
        self.offloaded_bytes = 0  # total moved to the host so far (for tests and metrics)

    def hooks(self) -> AbstractContextManager:
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
        return host, copied

    def _unpack(self, packed):
        if torch.is_tensor(packed):
            return packed
        host, copied = packed
        self.streams.wait(copied)
        return host.to(self.device, non_blocking=True)
