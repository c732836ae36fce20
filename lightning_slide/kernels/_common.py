"""Helpers shared by the Triton kernels: where they can run, and block / warp sizing."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _probe():
    pass


# `triton.jit` decides at decoration time whether kernels are compiled or interpreted (TRITON_INTERPRET=1), so
# ask a decorated function rather than re-reading the environment, which may have changed since.
INTERPRETED = type(_probe).__name__ == "InterpretedFunction"


def triton_ok(*tensors: torch.Tensor) -> bool:
    """True when the kernels can run on these tensors: on a CUDA device, or anywhere under the interpreter."""
    return all(t.is_cuda or INTERPRETED for t in tensors)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def program_count(device: torch.device) -> int:
    """Streaming multiprocessors on `device` (4 under the interpreter): the size of persistent grids."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@triton.jit
def tanh(x):
    # Written through the sigmoid so that it needs no libdevice (the interpreter and every Triton version have it).
    # tanh(+-20) is +-1 in fp32; clamping there keeps exp() finite (numpy warns on overflow under the interpreter).
    x = tl.minimum(tl.maximum(x, -20.0), 20.0)
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0
