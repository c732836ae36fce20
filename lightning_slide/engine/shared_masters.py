"""One copy of the fp32 masters for the data-parallel ranks of one host, in shared memory.

Each rank updates only its shards of every unit (``shard.py``), so the ranks of one host can keep a single copy of
the masters: a file in shared memory (``/dev/shm``) that every rank maps, each writing only its own shards. The host
then holds 4 bytes per parameter of masters for all its ranks instead of 4 per rank, and after a barrier (every
rank's updates done) the masters are whole and current on every rank without a gather.

The file is unlinked as soon as every rank has mapped it: the memory lives as long as some mapping does, and nothing
is left in ``/dev/shm`` on any exit. Ranks on several hosts, or a ``/dev/shm`` without the room (a container's
default is often 64 MiB), keep a copy each, as before. The environment variable ``LIGHTNING_SLIDE_SHM_DIR`` names
another memory-backed directory to use instead of ``/dev/shm`` (read when the ranks start).
"""

from __future__ import annotations

import mmap
import os
import socket
import tempfile
import warnings
from pathlib import Path

import torch

from lightning_slide.engine.pinned import mapped_tensor
from lightning_slide.engine.shard import Shards


def shared_memory_dir() -> Path:
    """Where the shared masters' file goes: ``$LIGHTNING_SLIDE_SHM_DIR``, default ``/dev/shm``."""
    return Path(os.environ.get("LIGHTNING_SLIDE_SHM_DIR", "/dev/shm"))


def _create(numel: int) -> tuple[str, str]:
    """Make the file (rank 0): ``(path, "")``, or ``("", why not)``."""
    size = numel * 4
    directory = shared_memory_dir()
    if not directory.is_dir():
        return "", f"{directory} does not exist"
    stats = os.statvfs(directory)
    free = stats.f_bavail * stats.f_frsize
    if free < size:
        return "", (
            f"{directory} has {free / 2**30:.2f} GiB free, the masters need {size / 2**30:.2f} GiB "
            "(in a container: a larger --shm-size)"
        )
    descriptor, path = tempfile.mkstemp(prefix="lightning-slide-masters-", dir=directory)
    try:
        os.ftruncate(descriptor, size)
    finally:
        os.close(descriptor)
    return path, ""


def shared_masters(shards: Shards, numel: int, *, pin: bool) -> torch.Tensor | None:
    """A flat fp32 host tensor of ``numel`` elements that every rank of this host maps (a collective: every rank
    calls it at the same point), page-locked when ``pin``; ``None`` when there is one rank, the ranks span several
    hosts, or shared memory lacks the room (then each rank keeps its own copy; rank 0 says why)."""
    if not shards.active or not numel:
        return None
    if len(set(shards.host_objects(socket.gethostname()))) > 1:
        return None
    path, why_not = _create(numel) if shards.rank == 0 else ("", "")
    path, why_not = shards.host_objects((path, why_not))[0]
    if not path:
        _copy_each(shards, why_not)
        return None
    masters, failure = None, ""
    try:
        with open(path, "r+b") as file:
            buffer = mmap.mmap(file.fileno(), numel * 4, flags=mmap.MAP_SHARED)
        masters = mapped_tensor(buffer, torch.float32, pin=pin)
    except (OSError, RuntimeError) as error:  # e.g. the mapping could not be page-locked
        failure = f"rank {shards.rank}: {error}"
    try:  # every rank has mapped it, or failed: all decide alike
        failures = [f for f in shards.host_objects(failure) if f]
    finally:
        if shards.rank == 0:
            os.unlink(path)  # the mappings keep the memory; the name can go (also when a rank is gone)
    if failures:
        _copy_each(shards, f"the shared copy could not be mapped ({failures[0]})")
        return None
    return masters


def _copy_each(shards: Shards, why: str) -> None:
    if shards.rank == 0:
        warnings.warn(
            f"each rank keeps its own copy of the fp32 masters (4 bytes per parameter per rank): {why}", stacklevel=3
        )
