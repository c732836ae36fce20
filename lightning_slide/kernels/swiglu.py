"""Gated MLP activation ``act(gate) * up`` in one pass, with ``act`` SiLU (Llama, Qwen, Mistral) or the tanh
approximation of GeLU (Gemma's ``gelu_pytorch_tanh``). Computed in fp32, stored in the inputs' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import tanh, triton_ok

ACTIVATIONS = ("silu", "gelu_tanh")
# Launch parameters (tuned on an H200; the sweep is in BENCHMARKS.md): elements and warps per program.
TUNING = {"block": 1024, "num_warps": 4}
# Globals read inside @triton.jit must be constexpr.
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_C = tl.constexpr(0.044715)


@triton.jit
def _act_and_grad(g, GELU: tl.constexpr):
    """act(g) and act'(g) in fp32."""
    if GELU:
        inner = _SQRT_2_OVER_PI * (g + _GELU_C * g * g * g)
        t = tanh(inner)
        act = 0.5 * g * (1.0 + t)
        dact = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * g * g)
    else:
        s = tl.sigmoid(g)
        act = g * s
        dact = s * (1.0 + g * (1.0 - s))
    return act, dact


@triton.jit
def _glu_fwd(g_ptr, u_ptr, y_ptr, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, _ = _act_and_grad(g, GELU)  # the unused derivative is dead code to the compiler
    tl.store(y_ptr + offs, (act * u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, dact = _act_and_grad(g, GELU)
    tl.store(dg_ptr + offs, (dy * u * dact).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dy * act).to(du_ptr.dtype.element_ty), mask=mask)


def _launch(kernel, n: int, *args, gelu: bool):
    if n:
        block = TUNING["block"]
        kernel[(triton.cdiv(n, block),)](*args, n, GELU=gelu, BLOCK=block, num_warps=TUNING["num_warps"])


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        _launch(_glu_fwd, gate.numel(), gate, up, y, gelu=gelu)
        ctx.save_for_backward(gate, up)
        ctx.gelu = gelu
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        _launch(_glu_bwd, gate.numel(), dy, gate, up, dg, du, gelu=ctx.gelu)
        return dg, du, None


def glu_reference(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Plain-torch ``act(gate) * up`` in fp32, rounded once to the inputs' dtype."""
    g = gate.float()
    act = torch.nn.functional.silu(g) if activation == "silu" else torch.nn.functional.gelu(g, approximate="tanh")
    return (act * up.float()).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Fused gated activation ``act(gate) * up``.

    Args:
        gate: output of the gate projection ``[..., I]``.
        up: output of the up projection, same shape and dtype as ``gate``.
        activation: ``"silu"`` (default; SwiGLU) or ``"gelu_tanh"`` (GeGLU with the tanh GeLU, as in Gemma).

    Returns:
        ``[..., I]`` in ``gate.dtype``; gradients flow to both inputs. Tensors that Triton cannot reach take the
        torch reference path.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must match: {tuple(gate.shape)} {gate.dtype} vs {tuple(up.shape)} {up.dtype}")
    if not triton_ok(gate, up):
        return glu_reference(gate, up, activation)
    return _GLU.apply(gate, up, activation == "gelu_tanh")
