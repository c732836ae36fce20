"""The disk tier: each unit's optimizer state in files, read ahead of its update and written behind it.

A unit's Adam moments are two flat fp32 arrays laid out like its trainable parameters; on disk they are one file
per unit and moment, in the machine's byte order. A reader thread loads the state of the units whose updates are
queued, at most ``in_flight`` units ahead, so that reading overlaps the update before it; a writer thread writes
each state back after its update and only then frees its place, so host memory holds at most ``in_flight`` units'
state whatever the model size.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from lightning_slide.engine.plan import human


def check_disk_space(directory: str | Path, needed: int, free: int | None = None) -> None:
    """Raise a clear error when ``directory``'s file system has fewer than ``needed`` bytes free."""
    free = shutil.disk_usage(directory).free if free is None else free
    if needed > free:
        raise ValueError(
            f"the disk tier needs {human(needed)} under {str(directory)!r} but only {human(free)} is free; "
            "free some space, choose another offload_dir, or keep the optimizer state in host memory (offload_dir=None)"
        )


class StateStore:
    """Flat fp32 state arrays of every unit, in files under ``directory``.

    Args:
        directory: where the files live (created if missing); one file per unit and state name.
        names: the state arrays of a unit, e.g. ``("exp_avg", "exp_avg_sq")``.
        numel: elements of each array of each unit, by unit key.
        in_flight: most units whose state may be in host memory at once (>= 1).
    """

    def __init__(self, directory: str | Path, names: tuple[str, ...], numel: dict[Hashable, int], in_flight: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.names = names
        self.numel = numel
        self._slots = threading.Semaphore(max(1, in_flight))
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slide-disk-read")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slide-disk-write")
        self._writes: dict[Hashable, Future] = {}
        self._on_disk: set[Hashable] = set()
        self._closed = threading.Event()

    def path(self, key: Hashable, name: str) -> Path:
        return self.directory / f"{'resident' if key == 'resident' else f'layer{key:05d}'}.{name}.bin"

    def read(self, key: Hashable) -> Future:
        """Start loading ``key``'s state; the future gives ``{name: flat fp32 tensor}`` (zeros before any write).
        After ``close`` (e.g. a checkpoint saved after training) it reads at once, on the calling thread."""
        if self._closed.is_set():
            done: Future = Future()
            done.set_result(self._load(key))
            return done
        return self._reader.submit(self._read, key)

    def _read(self, key: Hashable) -> dict[str, torch.Tensor]:
        while not self._slots.acquire(timeout=0.1):  # bounded memory: wait for a write to free a place
            if self._closed.is_set():
                raise RuntimeError("the disk tier was closed")
        try:
            return self._load(key)
        except BaseException:
            self._slots.release()
            raise

    def _load(self, key: Hashable) -> dict[str, torch.Tensor]:
        pending = self._writes.get(key)
        if pending is not None:
            pending.result()  # the previous update's state must be on disk before it is read again
        if key not in self._on_disk:
            return {name: torch.zeros(self.numel[key], dtype=torch.float32) for name in self.names}
        return {name: torch.from_numpy(np.fromfile(self.path(key, name), dtype=np.float32)) for name in self.names}

    def write(self, key: Hashable, state: dict[str, torch.Tensor]) -> None:
        """Write ``key``'s state back, then free its place (call once for every read)."""
        self._writes[key] = self._writer.submit(self._write, key, state)

    def put(self, key: Hashable, state: dict[str, torch.Tensor]) -> None:
        """Write ``key``'s state now, outside the read/write pairing (e.g. when a checkpoint is loaded)."""
        pending = self._writes.get(key)
        if pending is not None:
            pending.result()
        for name, tensor in state.items():
            tensor.numpy().tofile(self.path(key, name))
        self._on_disk.add(key)

    def release(self, key: Hashable) -> None:
        """Free the place of a read whose state is not written back (its update did not run)."""
        self._slots.release()

    def _write(self, key: Hashable, state: dict[str, torch.Tensor]) -> None:
        try:
            for name, tensor in state.items():
                tensor.numpy().tofile(self.path(key, name))
            self._on_disk.add(key)
        finally:
            self._slots.release()

    def flush(self) -> None:
        """Wait until every write has reached the files (re-raises a failed write)."""
        for future in list(self._writes.values()):
            future.result()

    def close(self) -> None:
        self._closed.set()
        self._reader.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True)
