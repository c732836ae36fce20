"""Host AdamW rate (G params/s) of torch's fused CPU kernel, from the main thread and from a worker thread, and of
``lightning_slide.optim.AdamW`` with bf16 moments (its C++ host loop) from a worker thread, as the engine runs it.
Then clipping by norm on the worker: the gradients scaled in a pass of their own before the kernel, against the
scale folded into the kernel's pass (its ``grad_scale``, as the engine does), with fp32 and with bf16 moments.

usage: python benchmarks/bench_host_adamw.py [--numel 110e6] [--threads 4,8,16]
The host optimizer is the step's binding term for large models; this says what the machine gives.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from lightning_slide.optim import AdamW


def rate(numel: int, pin: bool, repeats: int = 5, moments: torch.dtype = torch.float32, clip: str = "") -> float:
    """``clip``: ``"pass"`` scales the gradients by a clip coefficient first, ``"folded"`` hands its inverse to the
    fused kernel as ``grad_scale``; ``""``: no clipping."""
    param = torch.zeros(numel, pin_memory=pin and torch.cuda.is_available())
    param.grad = torch.randn(numel)
    fused = True if moments == torch.float32 else None
    optimizer = AdamW([param], lr=1e-4, fused=fused, state_dtype=moments)  # fp32: torch.optim.AdamW itself
    optimizer.step()
    coefficient = torch.tensor(0.5)
    start = time.perf_counter()
    for _ in range(repeats):
        if clip == "pass":
            param.grad.mul_(coefficient)
        optimizer.grad_scale = 1 / coefficient if clip == "folded" else None
        optimizer.step()
    return numel * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=float, default=110e6)
    parser.add_argument("--threads", default="4,8,16")
    args = parser.parse_args()
    numel = int(args.numel)
    print(
        f"fused AdamW over {numel / 1e6:.0f}M fp32 params; torch {torch.__version__}, "
        f"default threads {torch.get_num_threads()}"
    )
    print("| threads | main thread | worker thread | worker, pinned | bf16 moments, worker, pinned | bf16 / fp32 |")
    print("|---|---|---|---|---|---|")
    clipped = {}
    with ThreadPoolExecutor(1) as pool:
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            main_rate = rate(numel, False)
            worker_rate = pool.submit(lambda t=threads: (torch.set_num_threads(t), rate(numel, False))[1]).result()
            pinned_rate = pool.submit(lambda t=threads: (torch.set_num_threads(t), rate(numel, True))[1]).result()
            bf16_rate = pool.submit(
                lambda t=threads: (torch.set_num_threads(t), rate(numel, True, moments=torch.bfloat16))[1]
            ).result()
            print(
                f"| {threads} | {main_rate:.2f} | {worker_rate:.2f} | {pinned_rate:.2f} | {bf16_rate:.2f} | "
                f"{bf16_rate / pinned_rate:.2f} |",
                flush=True,
            )
            clipped[threads] = [
                pool.submit(
                    lambda t=threads, c=c, m=m: (torch.set_num_threads(t), rate(numel, True, moments=m, clip=c))[1]
                ).result()
                for m in (torch.float32, torch.bfloat16)
                for c in ("pass", "folded")
            ]
    print("\nclipping by norm, worker, pinned: the gradients scaled in a pass of their own, or folded into the kernel")
    print("| threads | fp32: own pass | fp32: folded | folded / own | bf16 moments: own pass | folded | folded / own |")
    print("|---|---|---|---|---|---|---|")
    for threads, (own, folded, own16, folded16) in clipped.items():
        print(
            f"| {threads} | {own:.2f} | {folded:.2f} | {folded / own:.2f} | {own16:.2f} | {folded16:.2f} | "
            f"{folded16 / own16:.2f} |"
        )


if __name__ == "__main__":
    main()
