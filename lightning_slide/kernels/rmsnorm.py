"""RMSNorm: ``y = x / sqrt(mean(x**2) + eps) * (offset + weight)``, statistics and products in fp32.

``offset=0`` is the Llama / Qwen / Mistral norm, ``offset=1`` Gemma's ``1 + weight``. The output has the input's
dtype; the normalised value is rounded once, at the end (Hugging Face's Llama rounds it before the weight product,
so bf16 outputs can differ from it by one bf16 ulp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2, program_count, triton_ok

# Launch parameters, tuned on an H200 at H=4096 (BENCHMARKS.md): warps per row program (None: one per 1024
# elements of the row, i.e. 32 per thread, clamped to 1..16) and backward programs per multiprocessor.
TUNING = {"num_warps": None, "bwd_programs_per_sm": 2}


def _warps(block: int) -> int:
    return TUNING["num_warps"] or max(1, min(16, block // 1024))


@triton.jit
def _rmsnorm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, H, eps, offset, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    tl.store(rstd_ptr + row, rstd)
    tl.store(y_ptr + row * stride_y + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_part_ptr,
    stride_dy,
    stride_x,
    stride_dx,
    N,
    H,
    offset,
    BLOCK_H: tl.constexpr,
):
    # A persistent grid: each program walks rows pid, pid + P, ... and keeps its share of the weight gradient in
    # registers, so dw costs one [P, H] fp32 write instead of an [N, H] one.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    for row in range(pid, N, tl.num_programs(0)):
        r = tl.cast(row, tl.int64)
        x = tl.load(x_ptr + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r)
        xhat = x * rstd
        g = dy * w
        # d/dx of x * rstd(x): the projection of g onto xhat is removed, then scaled by rstd.
        dx = (g - xhat * (tl.sum(g * xhat, axis=0) / H)) * rstd
        tl.store(dx_ptr + r * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(dw_part_ptr + pid * H + cols, dw, mask=mask)


def _rows(t: torch.Tensor, H: int) -> torch.Tensor:
    t = t.reshape(-1, H)
    return t if t.stride(1) == 1 else t.contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        H = x.shape[-1]
        x2 = _rows(x, H)
        N = x2.shape[0]
        y = torch.empty((N, H), dtype=x.dtype, device=x.device)
        rstd = torch.empty(N, dtype=torch.float32, device=x.device)
        block = next_pow2(H)
        if N > 0:
            _rmsnorm_fwd[(N,)](
                x2, weight, y, rstd, x2.stride(0), y.stride(0), H, eps, offset, BLOCK_H=block, num_warps=_warps(block)
            )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset = offset
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        N, H = x2.shape
        dy2 = _rows(dy, H)
        dx = torch.empty_like(x2)
        programs = max(1, min(N, TUNING["bwd_programs_per_sm"] * program_count(x2.device)))
        dw_part = torch.empty((programs, H), dtype=torch.float32, device=x2.device)
        block = next_pow2(H)
        if N > 0:
            _rmsnorm_bwd[(programs,)](
                dy2,
                x2,
                weight,
                rstd,
                dx,
                dw_part,
                dy2.stride(0),
                x2.stride(0),
                dx.stride(0),
                N,
                H,
                ctx.offset,
                BLOCK_H=block,
                num_warps=_warps(block),
            )
        else:
            dw_part.zero_()
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(dy.shape), dw, None, None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """Plain-torch RMSNorm with the same numerics as the kernel (fp32 inside, one rounding at the end)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight.float())
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dimension, fused forward and backward.

    Args:
        x: input ``[..., H]``, any float dtype; the last dimension must be ``weight``'s.
        weight: scale ``[H]``.
        eps: added to the mean square before the reciprocal square root (default 1e-6).
        offset: added to ``weight`` before scaling: 0.0 (default) for Llama-style norms, 1.0 for Gemma's.

    Returns:
        ``[..., H]`` in ``x.dtype``. Gradients flow to ``x`` and ``weight`` (weight's in its own dtype, summed in
        fp32). Tensors that Triton cannot reach (CPU without ``TRITON_INTERPRET=1``) take the torch reference path.
    """
    if not triton_ok(x, weight):
        return rms_norm_reference(x, weight, eps, offset)
    return _RMSNorm.apply(x, weight, float(eps), float(offset))
