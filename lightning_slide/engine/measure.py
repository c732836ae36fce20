"""Measured rates of this machine for the planner: host AdamW, gradient sums and matmul FLOP/s, with a GPU the copy
bandwidths and its matmul FLOP/s, and with a directory the disk's read and write bandwidths, alone and at once. Each
takes a fraction of a second, the disk's ten times as long: its rate swings with its queue and the page cache."""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

DISK_TIMING = 10  # the disk's rates are timed this many times longer than the others


def _rate(work, amount: float, seconds: float, sync=lambda: None) -> float:
    """``amount`` per second of ``work()``, repeated for about ``seconds`` after one warm-up call."""
    work()
    sync()
    runs, start = 0, time.perf_counter()
    while True:
        work()
        runs += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return amount * runs / elapsed


def host_adamw_rate(seconds: float = 0.2, numel: int = 2**22, moments: torch.dtype = torch.float32) -> float:
    """Parameters per second of the host AdamW: torch's fused kernel with fp32 moments (the host loop the engine runs
    for AdamW moves the same bytes; 28 bytes per parameter at this rate are also what the planner takes the host
    memory to move), ``lightning_slide.optim.AdamW``'s loop with bf16 ones."""
    from lightning_slide.optim import AdamW

    param = torch.zeros(numel, dtype=torch.float32)
    param.grad = torch.ones(numel, dtype=torch.float32)
    optimizer = AdamW([param], lr=1e-3, state_dtype=moments, fused=True if moments == torch.float32 else None)
    return _rate(optimizer.step, numel, seconds)


def host_add_rate(seconds: float = 0.2, numel: int = 2**22) -> float:
    """Parameters per second of an fp32 gradient sum on the host (accumulation: ``acc += micro-batch``)."""
    total, part = torch.zeros(numel, dtype=torch.float32), torch.ones(numel, dtype=torch.float32)
    return _rate(lambda: total.add_(part), numel, seconds)


def measure_rates(
    directory: str | None = None, seconds: float = 0.2, moments: torch.dtype = torch.float32
) -> dict[str, float]:
    """The rate fields of :class:`~lightning_slide.engine.machine.Machine` this machine can measure (the host AdamW
    with bf16 moments too when ``moments`` is bf16: its kernel is built first)."""
    rates = {"host_adamw_params_per_s": host_adamw_rate(seconds), "host_add_params_per_s": host_add_rate(seconds)}
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    rates["cpu_flops"] = _rate(lambda: a @ b, 2 * n**3, seconds)
    if moments != torch.float32:
        rates["host_adamw_bf16_params_per_s"] = host_adamw_rate(seconds, moments=moments)
    if torch.cuda.is_available():
        sync = torch.cuda.synchronize
        numel = 2**26  # 256 MiB of fp32
        host = torch.empty(numel, dtype=torch.float32, pin_memory=True)
        device = torch.empty(numel, dtype=torch.float32, device="cuda")
        rates["h2d_bytes_per_s"] = _rate(lambda: device.copy_(host, non_blocking=True), 4 * numel, seconds, sync)
        rates["d2h_bytes_per_s"] = _rate(lambda: host.copy_(device, non_blocking=True), 4 * numel, seconds, sync)
        del host, device
        n = 8192
        a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
        rates["gpu_flops"] = _rate(lambda: a @ b, 2 * n**3, seconds, sync)
    if directory is not None:
        rates.update(disk_rates(directory, DISK_TIMING * seconds))
    return rates


def disk_rates(directory: str, seconds: float = 2.0) -> dict[str, float]:
    """Bytes per second under ``directory``: writing (with fsync), reading back past the page cache, and both at once
    (another file written while one is read: what the disk tier does through a step). Two 256 MiB files, removed."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    data = torch.zeros(2**26, dtype=torch.float32).numpy()
    landing = bytearray(data.nbytes)
    names = []
    for _ in range(2):
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".bench", delete=False) as f:
            names.append(f.name)

    def write(name: str) -> None:
        with open(name, "wb") as out:
            data.tofile(out)
            out.flush()
            os.fsync(out.fileno())

    def read(name: str) -> None:  # from the disk: the file's pages (clean after the fsync) leave the page cache first
        with open(name, "rb") as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            f.readinto(landing)

    try:
        rates = {"disk_write_bytes_per_s": _rate(lambda: write(names[0]), data.nbytes, seconds)}
        rates["disk_read_bytes_per_s"] = _rate(lambda: read(names[0]), data.nbytes, seconds)
        with ThreadPoolExecutor(1, thread_name_prefix="slide-measure") as writer:
            writing = writer.submit(lambda: _rate(lambda: write(names[1]), data.nbytes, seconds))
            reading = _rate(lambda: read(names[0]), data.nbytes, seconds)
            rates["disk_mixed_bytes_per_s"] = reading + writing.result()
        return rates
    finally:
        for name in names:
            os.unlink(name)
