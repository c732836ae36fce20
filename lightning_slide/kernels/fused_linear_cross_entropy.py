"""Linear head + cross-entropy without the ``[tokens, vocab]`` logits: tokens go through in chunks.

For each chunk of tokens: logits = h @ W^T (a torch GEMM into one reused buffer), then a Triton kernel computes each
row's log-sum-exp and loss and overwrites the logits with d(loss)/d(logits) in place, then two more GEMMs turn that
into the chunk's rows of dL/dh and its share of dL/dW (accumulated in fp32). All gradients are therefore done in the
forward pass; backward only scales them by the incoming gradient. Nothing reads a GPU value on the host: the number
of real tokens stays on the device, and the kernel reads the ``1 / count`` it needs through a pointer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2, tanh, triton_ok

REDUCTIONS = ("mean", "sum")
# Launch parameters (tuned on an H200; the sweep is in BENCHMARKS.md): logits elements held at once (2**29 is one
# [4096, 128k] chunk, 1 GiB in bf16; 2**30 was slightly faster at V=128k but holds 1 GiB more), the row kernel's
# vocabulary block and warps.
TUNING = {"chunk_elements": 2**29, "block_v": 4096, "num_warps": 8}


@triton.jit
def _capped(raw, softcap, SOFTCAP: tl.constexpr):
    """(soft-capped logit, tanh used for it) in fp32; the tanh is 0 and unused without capping."""
    if SOFTCAP:
        t = tanh(raw / softcap)
        return softcap * t, t
    return raw, raw * 0.0


@triton.jit
def _ce_rows(
    z_ptr,
    stride_z,
    y_ptr,
    loss_ptr,
    scale_ptr,
    V,
    ignore_index,
    softcap,
    SOFTCAP: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.cast(tl.program_id(0), tl.int64)
    z_row = z_ptr + row * stride_z
    label = tl.load(y_ptr + row).to(tl.int64)
    valid = label != ignore_index

    # Pass 1: running max and rescaled sum of exponentials -> log-sum-exp, reading the row once.
    m = -float("inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        raw = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
        z, _ = _capped(raw, softcap, SOFTCAP)
        z = tl.where(cols < V, z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)

    # Out-of-range labels are not checked (that would need a host sync); the mask only keeps the load in bounds.
    in_range = valid & (label >= 0) & (label < V)
    target, _ = _capped(tl.load(z_row + tl.where(in_range, label, 0)).to(tl.float32), softcap, SOFTCAP)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))

    if GRAD:
        # Pass 2: d loss_row / d logit = (softmax - onehot) [* (1 - tanh^2) under capping], times the reduction's
        # scale (1/count for "mean"), zero for ignored rows; written over the logits.
        scale = tl.where(valid, tl.load(scale_ptr), 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            raw = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            z, t = _capped(raw, softcap, SOFTCAP)
            p = tl.exp(z - lse)
            g = tl.where(cols == label, p - 1.0, p) * scale
            if SOFTCAP:
                g = g * (1.0 - t * t)
            tl.store(z_row + cols, g.to(z_ptr.dtype.element_ty), mask=cols < V)


_fp32_out_mm_works: bool | None = None  # whether addmm(..., out_dtype=float32, out=acc) is right here; probed once


def _fp32_out_mm_ok(device: torch.device) -> bool:
    """Whether cuBLAS can add a bf16 x bf16 product straight into an fp32 matrix (torch >= 2.8 on CUDA).

    Checked once per process on a 16 x 16 problem: the only host synchronisation in this module.
    """
    global _fp32_out_mm_works
    if _fp32_out_mm_works is None:
        try:
            a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
            acc = torch.ones(16, 16, dtype=torch.float32, device=device)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _fp32_out_mm_works = bool((acc == 17).all())
        except (RuntimeError, TypeError):
            _fp32_out_mm_works = False
    return _fp32_out_mm_works


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32 whatever the dtype of ``a``, ``b`` (bf16 GEMM, fp32 accumulation)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and _fp32_out_mm_ok(a.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # round the chunk's product once, accumulate in fp32
        acc.add_(torch.mm(a, b))


def _default_chunk(n_tokens: int, vocab: int) -> int:
    chunk = max(1, TUNING["chunk_elements"] // max(vocab, 1))
    if chunk >= 256:
        chunk -= chunk % 256  # whole GEMM tiles
    return max(1, min(n_tokens, chunk))


def _launch_rows(z, labels, loss_rows, scale, ignore_index, softcap, grad):
    V = z.shape[1]
    block = min(next_pow2(V), TUNING["block_v"])
    warps = TUNING["num_warps"] if block >= 2048 else 4
    _ce_rows[(z.shape[0],)](
        z,
        z.stride(0),
        labels,
        loss_rows,
        scale,
        V,
        ignore_index,
        float(softcap or 1.0),
        SOFTCAP=softcap is not None,
        GRAD=grad,
        BLOCK_V=block,
        num_warps=warps,
    )


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, softcap, chunk, need_dh, need_dw):
        H, V = hidden.shape[-1], weight.shape[0]
        h = hidden.reshape(-1, H).contiguous()
        y = labels.reshape(-1).contiguous()
        N = h.shape[0]
        if reduction == "mean":
            # 1 / (real tokens), on the device; clamping makes "all ignored" give loss 0 and zero gradients.
            scale = (y != ignore_index).sum().clamp_min(1).to(torch.float32).reciprocal().reshape(1)
        else:
            scale = torch.ones(1, dtype=torch.float32, device=h.device)
        loss_rows = torch.empty(N, dtype=torch.float32, device=h.device)
        grad = need_dh or need_dw
        dh = torch.empty_like(h) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_dw else None
        chunk = chunk or _default_chunk(N, V)
        buf = torch.empty((min(chunk, N), V), dtype=h.dtype, device=h.device)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            z = buf[: e - s]
            torch.mm(h[s:e], weight.t(), out=z)
            _launch_rows(z, y[s:e], loss_rows[s:e], scale, ignore_index, softcap, grad)
            if need_dh:
                torch.mm(z, weight, out=dh[s:e])
            if need_dw:
                _accumulate_fp32(dw, z.t(), h[s:e])
        ctx.save_for_backward(dh, dw)
        ctx.hidden_shape, ctx.weight_dtype = hidden.shape, weight.dtype
        return loss_rows.sum() * scale[0]

    @staticmethod
    def backward(ctx, g):
        dh, dw = ctx.saved_tensors
        g = g.to(torch.float32)
        grad_h = grad_w = None
        if dh is not None:
            grad_h = (dh * g).to(dh.dtype).view(ctx.hidden_shape)
        if dw is not None:
            grad_w = torch.empty(dw.shape, dtype=ctx.weight_dtype, device=dw.device)
            torch.mul(dw, g, out=grad_w)  # scale in fp32, round once, no fp32 temporary
        return grad_h, grad_w, None, None, None, None, None, None, None


def linear_cross_entropy_reference(hidden, weight, labels, ignore_index=-100, reduction="mean", softcap=None):
    """Plain-torch ``CE(hidden @ weight^T, labels)`` with the same conventions (materialises the logits)."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    logits = logits.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    y = labels.reshape(-1)
    loss = torch.nn.functional.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum")
    if reduction == "mean":
        loss = loss / (y != ignore_index).sum().clamp_min(1)
    return loss


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight^T`` against ``labels`` without materialising the logits.

    Args:
        hidden: final hidden states ``[..., H]`` (bf16, fp16 or fp32).
        weight: head weight ``[V, H]``, same dtype as ``hidden``. Under autocast both are cast to its dtype first,
            as the head's ``nn.Linear`` would be (fp32 masters under ``bf16-mixed``: bf16 GEMMs).
        labels: class indices with ``hidden``'s leading shape (already shifted for causal LMs); entries equal to
            ``ignore_index`` count neither in the loss nor in the mean.
        ignore_index: label to skip (default -100).
        reduction: ``"mean"`` (default) over real tokens, or ``"sum"``. With every label ignored the loss is 0 and
            the gradients are 0 (torch's mean would give NaN).
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` first (Gemma 2/3's final soft-capping).
        chunk_size: tokens per chunk (default: as many as keep one chunk's logits at 2**29 elements, 1 GiB in bf16).

    Returns:
        The fp32 scalar loss. Gradients for ``hidden`` and ``weight`` are computed during this call (only for those
        that require grad, and only when grad mode is on) and are merely scaled in backward. Extra memory: one
        chunk of logits, ``dL/dhidden`` and an fp32 ``[V, H]`` accumulator for ``dL/dweight``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # as the head's nn.Linear would: its GEMMs in autocast's dtype
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return fused_linear_cross_entropy(
                hidden.to(dtype), weight.to(dtype), labels, ignore_index, reduction, softcap, chunk_size
            )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden's leading shape {tuple(hidden.shape[:-1])}")
    if not triton_ok(hidden, weight):
        return linear_cross_entropy_reference(hidden, weight, labels, ignore_index, reduction, softcap)
    grad_on = torch.is_grad_enabled()
    need_dh, need_dw = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    return _FusedLinearCE.apply(
        hidden,
        weight,
        labels,
        int(ignore_index),
        reduction,
        None if softcap is None else float(softcap),
        chunk_size,
        need_dh,
        need_dw,
    )
