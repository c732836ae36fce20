"""Rotary position embedding of q and k in one launch, in the Hugging Face "rotate_half" convention.

``out = x * cos + rotate_half(x) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]`` (halves of the head dim), as in
Llama, Qwen2/3, Mistral and Gemma. Written per half:

    forward:  o1 = x1 c1 - x2 s1      o2 = x2 c2 + x1 s2
    backward: g1 = d1 c1 + d2 s2      g2 = d2 c2 - d1 s1      (the transpose of the same 2x2 rotation)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2, triton_ok


@triton.jit
def _rope_heads(
    x_ptr,
    o_ptr,
    b,
    t,
    sxb,
    sxh,
    sxt,
    sob,
    soh,
    sot,
    n_heads,
    c1,
    c2,
    s1,
    s2,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (dims < HALF)
    x_row = x_ptr + b * sxb + t * sxt + heads * sxh + dims
    o_row = o_ptr + b * sob + t * sot + heads * soh + dims
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(o_row, o1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + HALF, o2.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    qo_ptr,
    ko_ptr,
    cos_ptr,
    sin_ptr,
    T,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    sqob,
    sqoh,
    sqot,
    skob,
    skoh,
    skot,
    scb,
    sct,
    HQ,
    HK,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    # One program per (batch, position): cos/sin are read once and applied to every q and k head there.
    pid = tl.program_id(0)
    b = tl.cast(pid // T, tl.int64)
    t = tl.cast(pid % T, tl.int64)
    dims = tl.arange(0, BLOCK_D)[None, :]
    dmask = dims < HALF
    cs = cos_ptr + b * scb + t * sct + dims
    ss = sin_ptr + b * scb + t * sct + dims
    c1 = tl.load(cs, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cs + HALF, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(ss, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(ss + HALF, mask=dmask, other=0.0).to(tl.float32)
    _rope_heads(
        q_ptr, qo_ptr, b, t, sqb, sqh, sqt, sqob, sqoh, sqot, HQ, c1, c2, s1, s2, HALF, BLOCK_HQ, BLOCK_D, BACKWARD
    )
    _rope_heads(
        k_ptr, ko_ptr, b, t, skb, skh, skt, skob, skoh, skot, HK, c1, c2, s1, s2, HALF, BLOCK_HK, BLOCK_D, BACKWARD
    )


def _launch(q, k, cos, sin, backward: bool):
    B, HQ, T, D = q.shape
    HK = k.shape[1]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    qo, ko = torch.empty_like(q), torch.empty_like(k)  # empty_like keeps the (often transposed) layout
    if q.numel() and k.numel():
        scb = 0 if cos.shape[0] == 1 else cos.stride(0)  # a batch of 1 broadcasts over B
        _rope_kernel[(B * T,)](
            q,
            k,
            qo,
            ko,
            cos,
            sin,
            T,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            qo.stride(0),
            qo.stride(1),
            qo.stride(2),
            ko.stride(0),
            ko.stride(1),
            ko.stride(2),
            scb,
            cos.stride(1),
            HQ,
            HK,
            HALF=D // 2,
            BLOCK_HQ=next_pow2(HQ),
            BLOCK_HK=next_pow2(HK),
            BLOCK_D=next_pow2(D // 2),
            BACKWARD=backward,
            num_warps=4,
        )
    return qo, ko


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors  # (autograd hands zeros, not None, for an output that missed the loss)
        gq, gk = _launch(dq, dk, cos, sin, backward=True)
        return gq, gk, None, None


def rope_reference(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Plain-torch rotary embedding, the Hugging Face formula."""

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _cos_sin_3d(cos: torch.Tensor, q: torch.Tensor):
    """cos/sin as [B or 1, T, D] with a unit last stride, or None when their shape is not one we handle."""
    if cos.dim() == 2:
        cos = cos.unsqueeze(0)
    B, _, T, D = q.shape
    if cos.dim() != 3 or cos.shape[1:] != (T, D) or cos.shape[0] not in (1, B):
        return None
    return cos if cos.stride(-1) == 1 else cos.contiguous()


def supports(q, k, cos, sin, unsqueeze_dim: int = 1) -> bool:
    """Whether :func:`apply_rope` runs the kernel for these arguments (else it takes the reference path)."""
    return (
        unsqueeze_dim == 1
        and q.dim() == 4
        and k.dim() == 4
        and q.shape[0] == k.shape[0]
        and q.shape[2:] == k.shape[2:]
        and q.shape[-1] % 2 == 0
        and q.dtype == k.dtype
        and cos.dtype == sin.dtype
        and cos.shape == sin.shape
        and not (cos.requires_grad or sin.requires_grad)
        and _cos_sin_3d(cos, q) is not None
        and triton_ok(q, k, cos, sin)
    )


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
    """Rotate q and k by the position angles in (cos, sin); a drop-in for HF's ``apply_rotary_pos_emb``.

    Args:
        q: queries ``[B, H, T, D]`` (any strides with a unit last stride run without a copy).
        k: keys ``[B, Hkv, T, D]``, same dtype as ``q``.
        cos, sin: ``[B, T, D]``, ``[1, T, D]`` or ``[T, D]``; treated as constants (no gradient).
        unsqueeze_dim: HF's argument; only 1 (heads before positions) takes the kernel.

    Returns:
        ``(q_embed, k_embed)`` in the inputs' dtype, computed in fp32. Arguments the kernel does not handle
        (see :func:`supports`) go through the torch reference.
    """
    if not supports(q, k, cos, sin, unsqueeze_dim):
        return rope_reference(q, k, cos, sin, unsqueeze_dim)
    return _RoPE.apply(q, k, _cos_sin_3d(cos, q), _cos_sin_3d(sin, q))
