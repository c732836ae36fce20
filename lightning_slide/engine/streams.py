"""CUDA streams and events for the window, and their no-op counterparts on the CPU.

Three streams order the work: *compute* (the current stream, where autograd runs), *upload* (host -> device
weights) and *download* (device -> host gradients). They synchronise only through events, never through the host
on the hot path. On the CPU every copy is synchronous, events are ``None`` and waiting is a no-op, so the same
bookkeeping runs in tests.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

Event = "torch.cuda.Event | None"


class Streams:
    """Upload and download streams of ``device`` (CUDA) or nothing at all (CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.upload = torch.cuda.Stream(device) if self.cuda else None
        self.download = torch.cuda.Stream(device) if self.cuda else None

    def on(self, stream) -> AbstractContextManager:
        """Make ``stream`` current (``None``: the compute stream)."""
        return torch.cuda.stream(stream) if self.cuda and stream is not None else nullcontext()

    def record(self, stream=None):
        """An event marking everything issued so far on ``stream`` (default: the current stream)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream())
        return event

    def wait(self, event, stream=None) -> None:
        """Make ``stream`` (default: the current stream) wait for ``event`` on the device, not on the host."""
        if event is not None:
            (stream if stream is not None else torch.cuda.current_stream()).wait_event(event)


def copy_cast(dst: torch.Tensor, src: torch.Tensor, staging: torch.Tensor | None) -> None:
    """``dst.copy_(src)`` across devices and dtypes, asynchronously on the current stream.

    A DMA copy cannot change dtype, so when dtypes differ the data crosses in ``src``'s dtype through the device
    buffer ``staging`` (any size; the copy goes in chunks of it) and is cast there: the host never converts.
    Issued on one stream, consecutive chunks reuse ``staging`` safely.
    """
    if dst.dtype == src.dtype or staging is None:
        dst.copy_(src, non_blocking=True)
        return
    chunk = staging.numel()
    for start in range(0, src.numel(), chunk):
        end = min(start + chunk, src.numel())
        piece = staging[: end - start]
        if src.device.type == "cpu":  # upload: host src -> device staging (src dtype) -> device dst (cast)
            piece.copy_(src[start:end], non_blocking=True)
            dst[start:end].copy_(piece)
        else:  # download: device src -> device staging (cast to dst dtype) -> host dst
            piece.copy_(src[start:end])
            dst[start:end].copy_(piece, non_blocking=True)


def memory_fraction(device: torch.device) -> float:
    """The process's current cap on ``device`` as a fraction of its memory (1.0 where torch cannot say)."""
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return float(getter(device)) if getter is not None else 1.0


class MemoryCap:
    """Caps the process's use of a GPU at ``limit`` bytes until ``release`` (torch's cap is process-wide: the one
    that was set before comes back); nothing on the CPU or without a limit."""

    def __init__(self, device: torch.device, limit: int | None) -> None:
        self.device, self.before = device, None
        if self.check(device, limit):
            self.before = memory_fraction(device)
            torch.cuda.set_per_process_memory_fraction(
                limit / torch.cuda.get_device_properties(device).total_memory, device
            )

    @staticmethod
    def check(device: torch.device, limit: int | None) -> bool:
        """Whether ``limit`` caps ``device``; raises ``ValueError`` when it is above the device's memory."""
        if limit is None or device.type != "cuda":
            return False
        total = torch.cuda.get_device_properties(device).total_memory
        if limit > total:
            raise ValueError(
                f"gpu_memory_limit is {limit / 2**30:.2f} GiB but {device} has {total / 2**30:.2f} GiB; lower it "
                "or leave it unset"
            )
        return True

    def release(self) -> None:
        if self.before is not None:
            torch.cuda.set_per_process_memory_fraction(self.before, self.device)
            self.before = None
