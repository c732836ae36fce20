"""Page-locked host memory of exactly the size asked for.

torch's pinned allocator (``pin_memory=True``) rounds every block up to a power of two and caches freed blocks: a
layer-sized buffer can cost up to twice its size (measured at the 8B shape in BENCHMARKS.md) — gigabytes of host
memory over a model. Large buffers are instead mapped anonymously and page-locked in place with
``cudaHostRegister``; they are unregistered and unmapped when the last tensor viewing them is freed (a parameter
may still view its master after training). They follow torch's ``THP_MEM_ALLOC_ENABLE=1``: transparent huge pages.
"""

from __future__ import annotations

import mmap
import os
import weakref

import torch

# Smaller buffers go through torch's allocator: the rounding costs little there and its cache is fast.
EXACT_FROM_BYTES = 1 << 20


def host_empty(numel: int, dtype: torch.dtype, *, pin: bool) -> torch.Tensor:
    """An uninitialised flat host tensor of ``numel`` elements, page-locked when ``pin`` (only on a CUDA machine)."""
    size = numel * torch.empty((), dtype=dtype).element_size()
    if not pin or size < EXACT_FROM_BYTES:
        return torch.empty(numel, dtype=dtype, pin_memory=pin)
    return mapped_tensor(anonymous_buffer(size), dtype, pin=True)


def anonymous_buffer(size: int) -> mmap.mmap:
    """``size`` bytes of anonymous memory, advised onto transparent huge pages when torch's own host allocations are
    (``THP_MEM_ALLOC_ENABLE=1``): one setting for all of a run's large host buffers."""
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" and hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


def mapped_tensor(buffer: mmap.mmap, dtype: torch.dtype, *, pin: bool) -> torch.Tensor:
    """A flat tensor over the whole of ``buffer`` (which it keeps alive), page-locked in place when ``pin``."""
    tensor = torch.frombuffer(buffer, dtype=dtype)  # keeps `buffer` alive as long as any view of it
    if not pin or not len(buffer):
        return tensor
    address, size = tensor.data_ptr(), len(buffer)
    cudart = torch.cuda.cudart()
    try:
        torch.cuda.check_error(cudart.cudaHostRegister(address, size, 0))
    except Exception as error:
        raise RuntimeError(
            f"could not page-lock {size / 2**30:.2f} GiB of host memory ({error}); the host may be out of "
            "lockable memory: lower the model size or window, or use the disk tier (offload_dir)"
        ) from error
    weakref.finalize(buffer, cudart.cudaHostUnregister, address)  # runs before the mapping is released
    return tensor
