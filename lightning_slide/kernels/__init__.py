"""Triton kernels (forward and backward) for the hot non-GEMM ops of decoder LMs, and :func:`apply_kernels`, which
swaps them into Hugging Face models.

One module per op: :mod:`.rmsnorm`, :mod:`.rope`, :mod:`.swiglu`, :mod:`.fused_linear_cross_entropy`. On a machine
without CUDA they run under Triton's interpreter when ``TRITON_INTERPRET=1`` was set before triton was imported,
and otherwise fall back to plain torch.
"""

from .fused_linear_cross_entropy import fused_linear_cross_entropy
from .patch import KERNEL_NAMES, active_kernels, apply_kernels, running_kernels
from .rmsnorm import rms_norm
from .rope import apply_rope
from .swiglu import swiglu

__all__ = [
    "KERNEL_NAMES",
    "active_kernels",
    "apply_kernels",
    "running_kernels",
    "apply_rope",
    "fused_linear_cross_entropy",
    "rms_norm",
    "swiglu",
]
