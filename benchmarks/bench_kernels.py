"""Kernel benchmark (GPU): each op's forward + backward in bf16 at Llama-3.1-8B shapes, against torch eager and
Liger-Kernel (when importable), as a markdown table: median time (triton.testing.do_bench), peak extra memory, and
the gradients' error relative to an fp32 computation on the same inputs.

    python benchmarks/bench_kernels.py [--tokens 32768] [--tune]

``--tune`` first times a few launch configurations of our kernels (printed) and keeps the fastest for the table.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import math
import pathlib
import sys
import traceback
import types

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

# Only the kernels are needed: register a bare `lightning_slide` package so that its __init__ (Lightning, the
# strategy) is not imported and the script runs from a plain checkout with torch and triton alone.
if "lightning_slide" not in sys.modules:
    _pkg = types.ModuleType("lightning_slide")
    _pkg.__path__ = [str(pathlib.Path(__file__).resolve().parents[1] / "lightning_slide")]
    sys.modules["lightning_slide"] = _pkg

from lightning_slide.kernels import apply_rope, fused_linear_cross_entropy, rms_norm, swiglu  # noqa: E402

# The modules (their TUNING tables); the package's names for two of them are the functions.
flce_mod = importlib.import_module("lightning_slide.kernels.fused_linear_cross_entropy")
rmsnorm_mod = importlib.import_module("lightning_slide.kernels.rmsnorm")
swiglu_mod = importlib.import_module("lightning_slide.kernels.swiglu")

try:
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.rope import LigerRopeFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    HAVE_LIGER = True
except ImportError:
    HAVE_LIGER = False

H, I, V, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 128256, 32, 8, 128  # Llama-3.1-8B  # noqa: E741
DT = torch.bfloat16
DEVICE = "cuda"
GiB = 2**30


# ------------------------------------------------------------------------------------------ torch eager (HF code)
def eager_rmsnorm(x, w, eps=1e-5):
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dtype)


def eager_rope(q, k, cos, sin):
    def rot(x):
        return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def eager_lce(h, w, y):
    return F.cross_entropy((h @ w.t()).float(), y, ignore_index=-100)


# ------------------------------------------------------------------------------------------ problems
class Problem:
    """Inputs of one op, a step (forward + backward) per implementation, and the fp32 reference gradients."""

    def __init__(self, name, make, impls, reference):
        self.name, self.make, self.impls, self.reference = name, make, impls, reference


def rmsnorm_problem(n):
    def make():
        x = torch.randn(n, H, device=DEVICE, dtype=DT, requires_grad=True)
        w = (1 + 0.1 * torch.randn(H, device=DEVICE)).to(DT).requires_grad_()
        return [x, w], torch.randn(n, H, device=DEVICE, dtype=DT)

    impls = {
        "torch eager": lambda x, w: eager_rmsnorm(x, w),
        "ours": lambda x, w: rms_norm(x, w, 1e-5),
    }
    if HAVE_LIGER:
        # in_place=False: Liger's default writes dx over the incoming gradient, which this script reuses
        impls["Liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-5, 0.0, "llama", False)
    return Problem("RMSNorm (H=4096)", make, impls, lambda x, w: eager_rmsnorm(x, w))


def swiglu_problem(n):
    def make():
        g = torch.randn(n, I, device=DEVICE, dtype=DT, requires_grad=True)
        u = torch.randn(n, I, device=DEVICE, dtype=DT, requires_grad=True)
        return [g, u], torch.randn(n, I, device=DEVICE, dtype=DT)

    impls = {"torch eager": lambda g, u: F.silu(g) * u, "ours": lambda g, u: swiglu(g, u)}
    if HAVE_LIGER:
        impls["Liger"] = lambda g, u: LigerSiLUMulFunction.apply(g, u)
    return Problem("SiLU·mul (I=14336)", make, impls, lambda g, u: F.silu(g) * u)


def rope_problem(n):
    B, T = max(1, n // 8192), min(n, 8192)

    def make():
        # HF layout: projections [B, T, heads, D] viewed as [B, heads, T, D]
        q = torch.randn(B, T, HEADS, HEAD_DIM, device=DEVICE, dtype=DT).transpose(1, 2).requires_grad_()
        k = torch.randn(B, T, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DT).transpose(1, 2).requires_grad_()
        inv = 1.0 / (500000 ** (torch.arange(0, HEAD_DIM, 2, device=DEVICE).float() / HEAD_DIM))
        f = torch.arange(T, device=DEVICE).float()[:, None] * inv
        emb = torch.cat((f, f), -1)[None].expand(B, T, HEAD_DIM)
        return [q, k, emb.cos().to(DT), emb.sin().to(DT)], [torch.randn_like(q), torch.randn_like(k)]

    impls = {"torch eager": eager_rope, "ours": apply_rope}
    if HAVE_LIGER:
        impls["Liger"] = lambda q, k, c, s: LigerRopeFunction.apply(q, k, c, s)
    return Problem("RoPE (q 32×128, k 8×128)", make, impls, eager_rope)


def lce_problem(n):
    def make():
        h = torch.randn(n, H, device=DEVICE, dtype=DT, requires_grad=True)
        w = (torch.randn(V, H, device=DEVICE) / math.sqrt(H)).to(DT).requires_grad_()
        y = torch.randint(0, V, (n,), device=DEVICE)
        y[::7] = -100  # some masked tokens
        return [h, w, y], None

    impls = {"torch eager": eager_lce, "ours": fused_linear_cross_entropy}
    if HAVE_LIGER:
        impls["Liger"] = lambda h, w, y: LigerFusedLinearCrossEntropyFunction.apply(h, w, y)[0]
    return Problem("linear + cross-entropy (V=128256)", make, impls, eager_lce)


# ------------------------------------------------------------------------------------------ measuring
def _step(fn, inputs, grad_out):
    def run():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        grads = grad_out if isinstance(grad_out, list) else [grad_out] * len(outs)
        torch.autograd.backward(list(outs), grads)

    return run


def _leaves(inputs):
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def measure(fn, inputs, grad_out, rep_ms):
    """(median ms, peak GiB allocated above the inputs) of one forward + backward."""
    leaves = _leaves(inputs)
    run = _step(fn, inputs, grad_out)
    for t in leaves:
        t.grad = None
    run()  # compile / warm caches
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / GiB
    ms = do_bench(run, warmup=max(25, rep_ms // 4), rep=rep_ms, grad_to_none=leaves, return_mode="median")
    return ms, peak


def grads_of(fn, inputs, grad_out, fp32=False):
    """Gradients of fn's inputs after one backward; with fp32, of an fp32 copy of the inputs (the reference)."""
    if fp32:
        inputs = [t.detach().float().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in inputs]
        if grad_out is not None:
            grad_out = [g.float() for g in grad_out] if isinstance(grad_out, list) else grad_out.float()
    leaves = _leaves(inputs)
    for t in leaves:
        t.grad = None
    _step(fn, inputs, grad_out)()
    out = [t.grad.float().clone() for t in leaves]
    for t in leaves:
        t.grad = None
    return out


def rel_err(grads, ref):
    return max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, ref))


# ------------------------------------------------------------------------------------------ tuning
def tune(problem, space, table, rep_ms):
    """Time `ours` over the configurations in `space` (dicts merged into `table`); keep the fastest."""
    inputs, grad_out = problem.make()
    fn = problem.impls["ours"]
    keys = list(space)
    best = None
    for values in itertools.product(*space.values()):
        config = dict(zip(keys, values))
        table.update(config)
        try:
            ms, _ = measure(fn, inputs, grad_out, rep_ms)
        except Exception as e:  # a configuration the compiler rejects (e.g. too many registers) is skipped
            print(f"  {config}: failed ({type(e).__name__})")
            continue
        print(f"  {config}: {ms:.3f} ms")
        if best is None or ms < best[0]:
            best = (ms, config)
    table.update(best[1])
    print(f"  -> {problem.name}: {best[1]}")
    del inputs, grad_out
    torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--tune", action="store_true")
    args = parser.parse_args()
    n = args.tokens
    props = torch.cuda.get_device_properties(0)
    print(
        f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}, "
        f"Liger {'present' if HAVE_LIGER else 'absent'}; {n} tokens, bf16\n"
    )

    problems = [rmsnorm_problem(n), swiglu_problem(n), rope_problem(n), lce_problem(n)]
    if args.tune:
        print("tuning (ours, median ms of forward + backward):")
        tune(problems[0], {"num_warps": [4, 8, 16], "bwd_programs_per_sm": [1, 2, 4, 8]}, rmsnorm_mod.TUNING, 100)
        tune(problems[1], {"block": [1024, 2048, 4096], "num_warps": [4, 8]}, swiglu_mod.TUNING, 100)
        tune(problems[3], {"chunk_elements": [2**28, 2**29, 2**30], "block_v": [4096, 8192]}, flce_mod.TUNING, 1500)
        print(f"\nchosen: rmsnorm {rmsnorm_mod.TUNING}, swiglu {swiglu_mod.TUNING}, flce {flce_mod.TUNING}\n")

    rows = []
    for p in problems:
        inputs, grad_out = p.make()
        ref = grads_of(p.reference, inputs, grad_out, fp32=True)
        rep = 1500 if "cross" in p.name else 200
        results = {}
        for impl, fn in p.impls.items():
            try:
                ms, peak = measure(fn, inputs, grad_out, rep)
                err = rel_err(grads_of(fn, inputs, grad_out), ref)
                results[impl] = (ms, peak, err)
            except Exception:
                traceback.print_exc()
                results[impl] = None
            torch.cuda.empty_cache()
        if "cross" in p.name:  # flag the path the fp32 weight-gradient accumulation took
            print(f"fp32-output GEMM for dW accumulation: {flce_mod._fp32_out_mm_works}")
        rows.append((p.name, results))
        del inputs, grad_out, ref
        torch.cuda.empty_cache()

    print("| op | impl | fwd+bwd ms | peak extra GiB | grad rel. err vs fp32 | speed-up vs eager | vs Liger |")
    print("|---|---|---|---|---|---|---|")
    for name, results in rows:
        eager, liger = results.get("torch eager"), results.get("Liger")
        for impl, r in results.items():
            if r is None:
                print(f"| {name} | {impl} | failed | | | | |")
                continue
            ms, peak, err = r
            vs_eager = f"{eager[0] / ms:.2f}×" if eager else ""
            vs_liger = f"{liger[0] / ms:.2f}×" if liger else ""
            print(f"| {name} | {impl} | {ms:.3f} | {peak:.2f} | {err:.1e} | {vs_eager} | {vs_liger} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
