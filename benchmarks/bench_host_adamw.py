"""Host AdamW rate (G params/s) of torch's fused CPU kernel, from the main thread and from a worker thread, and of
``lightning_slide.optim.AdamW``'s C++ host loop (the engine's for AdamW: fp32 or bf16 moments) from a worker thread.
Then clipping by norm on the worker: the gradients scaled in a pass of their own before the kernel, against the
scale folded into the kernel's pass (its ``grad_scale``, as the engine does), with fp32 and with bf16 moments. Then
accumulation's last gradient sum with its norm: in two passes, or in the host loop's one.
On a GPU machine, last: the same kernels while page-locked copies to and from the GPU run back to back (a step's
weight uploads and gradient downloads load the host memory meanwhile), and bf16 gradients read by the host loop
(and the bf16 compute copy written by it), which say whether the host's memory bus, not its cores, binds the
update during a step.

usage: python benchmarks/bench_host_adamw.py [--numel 110e6] [--threads 4,8,16]
The host optimizer is the step's binding term for large models; this says what the machine gives.
"""

from __future__ import annotations

import argparse
import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from lightning_slide.optim import AdamW, add_with_norm


def rate(
    numel: int,
    pin: bool,
    repeats: int = 5,
    moments: torch.dtype = torch.float32,
    clip: str = "",
    grads: torch.dtype = torch.float32,
    copy: str = "",
    kernel: str = "",
) -> float:
    """``clip``: ``"pass"`` scales the gradients by a clip coefficient first, ``"folded"`` hands its inverse to the
    fused kernel as ``grad_scale``; ``"clamp"`` clamps them first (clipping by value), ``"clamped"`` has the
    host loop clamp them as it reads them; ``""``: no clipping. ``grads``: the gradients' dtype and
    ``copy``: the updated weights also written in bf16, as the engine's compute copy, by the kernel (``"kernel"``)
    or in a pass of their own (``"pass"``). ``kernel``: ``"torch"`` (fused; fp32 moments and gradients only) or
    ``"own"`` (lightning_slide's host loop); default: torch's for fp32 moments."""
    pinned = pin and torch.cuda.is_available()
    param = torch.zeros(numel, pin_memory=pinned)
    grad = torch.randn(numel).to(grads)
    weights = torch.empty(numel, dtype=torch.bfloat16, pin_memory=pinned)
    copies = {param: weights} if copy == "kernel" else {}
    kernel = kernel or ("torch" if moments == torch.float32 else "own")
    fused = True if moments == torch.float32 else None
    optimizer = AdamW([param], lr=1e-4, fused=fused, state_dtype=moments)  # its step, fp32: torch.optim.AdamW's
    if kernel == "torch":
        param.grad = grad
        update = optimizer.step
    else:  # as the engine hands gradients that ``.grad`` cannot hold
        update = functools.partial(optimizer.update, {param: grad}, copies)
    step = (lambda: (update(), weights.copy_(param))) if copy == "pass" else update
    step()
    coefficient = torch.tensor(0.5)
    start = time.perf_counter()
    for _ in range(repeats):
        if clip == "pass":
            grad.mul_(coefficient)
        if clip == "clamp":
            grad.clamp_(-0.5, 0.5)
        optimizer.grad_scale = 1 / coefficient if clip == "folded" else None
        optimizer.clip_value = 0.5 if clip == "clamped" else None
        step()
    return numel * repeats / (time.perf_counter() - start) / 1e9


class CopyLoad:
    """Copies between page-locked host buffers and the GPU, both ways at once and back to back, on a thread of their
    own while in the ``with`` block; ``gb_per_s`` after it: the host memory traffic they made."""

    def __init__(self, numel: int = 2**27) -> None:
        self.host = [torch.empty(numel, pin_memory=True) for _ in range(2)]
        self.device = [torch.empty(numel, device="cuda") for _ in range(2)]
        self.stop = threading.Event()
        self.gb_per_s = 0.0

    def _run(self) -> None:
        up, down = torch.cuda.Stream(), torch.cuda.Stream()
        copied, start = 0, time.perf_counter()
        while not self.stop.is_set():
            with torch.cuda.stream(up):
                self.device[0].copy_(self.host[0], non_blocking=True)
            with torch.cuda.stream(down):
                self.host[1].copy_(self.device[1], non_blocking=True)
            up.synchronize()
            down.synchronize()
            copied += self.host[0].nbytes + self.host[1].nbytes
        self.gb_per_s = copied / (time.perf_counter() - start) / 1e9

    def __enter__(self) -> CopyLoad:
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        time.sleep(0.2)  # copies under way before the kernel is timed
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def under_copies(pool: ThreadPoolExecutor, numel: int, threads: int) -> None:
    """The kernels alone and under ``CopyLoad``, each from the worker on page-locked parameters, as one table row."""
    fp32, bf16 = torch.float32, torch.bfloat16
    cases = [(fp32, fp32, c, "torch") for c in ("", "pass")]
    cases += [(fp32, g, c, "own") for g, c in ((fp32, ""), (bf16, ""), (bf16, "kernel"))]
    cases += [(bf16, g, c, "own") for g, c in ((fp32, ""), (bf16, ""), (bf16, "pass"), (bf16, "kernel"))]
    cells, traffic = [], []
    for moments, grads, copy, kernel in cases:

        def timed(m=moments, g=grads, c=copy, k=kernel):
            torch.set_num_threads(threads)
            return rate(numel, True, moments=m, grads=g, copy=c, kernel=k)

        cells.append(f"{pool.submit(timed).result():.2f}")
        if torch.cuda.is_available():
            with CopyLoad() as load:
                cells.append(f"{pool.submit(timed).result():.2f}")
            traffic.append(load.gb_per_s)
        else:
            cells.append("–")
    copies = f"{min(traffic):.0f}-{max(traffic):.0f}" if traffic else "–"
    print(f"| {threads} | " + " | ".join(cells) + f" | {copies} |", flush=True)


def sum_rate(numel: int, how: str, repeats: int = 5) -> float:
    """G params/s of adding a micro-batch's fp32 gradients (page-locked staging, as they come down) into the fp32
    accumulator: ``"add"`` alone, ``"two passes"`` with the sum's norm after it, ``"one pass"`` both at once."""
    pinned = torch.cuda.is_available()
    total, part = torch.zeros(numel), torch.randn(numel).pin_memory() if pinned else torch.randn(numel)
    work = {
        "add": lambda: total.add_(part),
        "two passes": lambda: (total.add_(part), torch.linalg.vector_norm(total)),
        "one pass": lambda: add_with_norm(total, part),
    }[how]
    work()
    start = time.perf_counter()
    for _ in range(repeats):
        work()
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
            ] + [
                pool.submit(
                    lambda t=threads, c=c: (
                        torch.set_num_threads(t),
                        rate(numel, True, moments=torch.bfloat16, clip=c),
                    )[1]
                ).result()
                for c in ("clamp", "clamped")
            ]
    print(
        "\nclipping, worker, pinned: the gradients scaled (by norm) or clamped (by value) in a pass of their own, or "
        "folded into the kernel"
    )
    print(
        "| threads | norm, fp32: own pass | folded | folded / own | norm, bf16 moments: own pass | folded "
        "| folded / own | value, bf16 moments: own pass | folded | folded / own |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for threads, (own, folded, own16, folded16, clamp16, clamped16) in clipped.items():
        print(
            f"| {threads} | {own:.2f} | {folded:.2f} | {folded / own:.2f} | {own16:.2f} | {folded16:.2f} | "
            f"{folded16 / own16:.2f} | {clamp16:.2f} | {clamped16:.2f} | {clamped16 / clamp16:.2f} |"
        )
    print(
        "\naccumulation's last sum with its norm (what clipping by norm and GradNormMonitor read), worker, pinned, "
        "G params/s: torch's add_ then vector_norm, against the C++ host loop's one pass (add_with_norm)"
    )
    print("| threads | add_ alone | add_ + vector_norm | one pass | one pass / two |")
    print("|---|---|---|---|---|")
    with ThreadPoolExecutor(1) as pool:
        for threads in map(int, args.threads.split(",")):
            add, two, one = (
                pool.submit(lambda t=threads, w=w: (torch.set_num_threads(t), sum_rate(numel, w))[1]).result()
                for w in ("add", "two passes", "one pass")
            )
            print(f"| {threads} | {add:.2f} | {two:.2f} | {one:.2f} | {one / two:.2f} |", flush=True)
    print(
        "\nthe update as a step runs it (worker, pinned; G params/s alone, then while page-locked copies to and from "
        "the GPU run: a GPU machine only)"
    )
    columns = ["fp32, torch's", "+ bf16 weights written after", "fp32, own loop", "+ bf16 grads"]
    columns += ["+ bf16 weights written by the loop"]
    columns += ["bf16 moments", "+ bf16 grads", "+ bf16 weights written after", "+ bf16 weights written by the loop"]
    print("| threads | " + " | ".join(f"{c} | under copies" for c in columns) + " | copies GB/s |")
    print("|---" * (2 * len(columns) + 2) + "|")
    with ThreadPoolExecutor(1) as pool:
        for threads in map(int, args.threads.split(",")):
            under_copies(pool, numel, threads)


if __name__ == "__main__":
    main()
