"""The machine a slideformer run plans for: its memory sizes and rates (:class:`Machine`), and the step time those
rates bound (:func:`step_times`).

Units: bytes for memory, seconds for time, bytes/s and params/s for rates.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_slide.engine.disk import reusable_bytes
from lightning_slide.engine.sizes import ModelShape, Settings, disk_bytes, host_updated_trainable


def host_available() -> int:
    """Host memory available to a new allocation now (``MemAvailable`` of ``/proc/meminfo``; elsewhere the
    physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


ADAMW_BYTES = 28  # fp32 AdamW moves 28 bytes per parameter (reads the master, gradient and moments, writes 3)
ADD_SPEEDUP = ADAMW_BYTES / 12  # a gradient sum moves 12 bytes per parameter: both memory-bound


@dataclass
class Machine:
    """Memory sizes and rates of the machine. Memory ``None``: unknown, not checked.

    The rate defaults describe a PCIe 4.0 ×16 workstation GPU with a many-core host; give measured figures (or
    ``measure()`` them) for a real plan.
    """

    gpu_memory: int | None = None  # bytes the process may use on the GPU (gpu_memory_limit or the card's memory)
    host_memory: int | None = None  # bytes of host memory available (MemAvailable)
    disk_free: int | None = None  # bytes free under offload_dir
    h2d_bytes_per_s: float = 20e9
    d2h_bytes_per_s: float = 20e9
    disk_read_bytes_per_s: float = 2e9
    disk_write_bytes_per_s: float = 1e9
    # Read and written bytes per second with both at once, as the disk tier runs them; None: not measured (each alone)
    disk_mixed_bytes_per_s: float | None = None
    host_adamw_params_per_s: float = 1e9
    # With bf16 moments (lightning_slide.optim.AdamW); None: taken as the fp32 rate
    host_adamw_bf16_params_per_s: float | None = None
    # fp32 gradient sums (accumulation: acc += micro-batch); None: ADD_SPEEDUP x the fp32 AdamW rate
    host_add_params_per_s: float | None = None
    # What the host's memory moves while the update and the GPU's copies share it; None: what the fp32 AdamW kernel,
    # memory-bound, draws alone (ADAMW_BYTES x its rate)
    host_memory_bytes_per_s: float | None = None
    gpu_flops: float = 150e12  # sustained bf16 matmul FLOP/s
    cpu_flops: float = 1e12  # the host's sustained fp32 matmul FLOP/s (a plan for a run on the CPU)

    @classmethod
    def detect(
        cls,
        *,
        gpu_memory_limit: int | None = None,
        offload_dir: str | None = None,
        tier: tuple[int, Iterable[str]] = (0, ()),
        **rates,
    ) -> Machine:
        """Memory sizes of this machine: ``gpu_memory_limit`` or the current GPU's memory (``None`` without a GPU),
        ``MemAvailable``, free space under ``offload_dir`` (or its nearest existing parent) with what the files of a
        disk tier of ``tier`` (decoder layers, what is on disk) already hold there. ``rates``: any rate field."""
        gpu = gpu_memory_limit
        if gpu is None and torch.cuda.is_available():
            gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        disk = None
        if offload_dir is not None:
            path = Path(offload_dir).absolute()
            while not path.exists():
                path = path.parent
            disk = shutil.disk_usage(path).free + reusable_bytes(offload_dir, *tier)
        return cls(gpu_memory=gpu, host_memory=host_available(), disk_free=disk, **rates)

    def adamw_rate(self, moments: torch.dtype) -> float:
        """Host AdamW parameters per second with moments in ``moments``. A bf16 update moves 20 bytes per parameter
        where fp32 moves 28, but converts the moments both ways: unless measured, it is taken as fast as fp32 (no
        slower on the hosts measured: BENCHMARKS.md, "Host optimizer")."""
        if moments == torch.float32:
            return self.host_adamw_params_per_s
        return self.host_adamw_bf16_params_per_s or self.host_adamw_params_per_s

    @property
    def memory_rate(self) -> float:
        """Host memory bytes per second: measured, or the fp32 AdamW kernel's draw alone."""
        return self.host_memory_bytes_per_s or ADAMW_BYTES * self.host_adamw_params_per_s

    @property
    def add_rate(self) -> float:
        """Host gradient sums per second: measured, or as memory-bound as fp32 AdamW (12 bytes per parameter against
        its 28)."""
        return self.host_add_params_per_s or ADD_SPEEDUP * self.host_adamw_params_per_s

    def measure(
        self, offload_dir: str | None = None, seconds: float = 0.2, moments: torch.dtype = torch.float32
    ) -> Machine:
        """Measure the rates this machine can: host AdamW and the host's matmul FLOP/s always; H2D, D2H and matmul
        FLOP/s with a GPU; disk read and write under ``offload_dir``, alone and at once (256 MiB files, removed; timed
        ten times as long). Returns a copy with the measured figures."""
        from lightning_slide.engine.measure import measure_rates  # only when asked: it allocates and times

        return dataclasses.replace(self, **measure_rates(offload_dir, seconds, moments))


# ------------------------------------------------------------------------------------------------ step time
def step_times(shape: ModelShape, s: Settings, m: Machine) -> dict[str, float]:
    """Seconds per optimizer step of each resource, alone: the step takes at least the largest.

    GPU compute (CPU compute for a run on the CPU): 8·N·tokens FLOPs per micro-batch (forward 2, backward 4,
    recompute 2; N = the layers' and the head's parameters). H2D: every layer's weights twice per micro-batch
    (forward and recompute; the fp32 masters, 4 B/param, or with ``host_weights="compute"`` the compute copy, 2
    B/param in bf16; frozen parameters kept in the compute dtype, 2 B/param), the resident parts once per step when
    updated on the host, offloaded layer inputs coming back. D2H: gradients per micro-batch, fp32 (4 B/param, cast
    on the device) or, for AdamW's own host kernel with one micro-batch per step, as computed (2 B/param), offloaded
    layer inputs going out. Host AdamW: every host-updated parameter once per step, and with accumulation each later
    micro-batch's gradients added into the host accumulators (the same thread). Host memory: the bytes of those
    updates and sums and of every copy to and from the GPU (each crosses the host's memory once), which share its
    bus (its calibration against measured steps: BENCHMARKS.md, "Plans"). With clipping by norm the updates start
    only once the last backward has ended: that backward and the larger of the two host terms follow each other.
    Disk: the Adam moments read and written once per step.
    With several ranks on one host (``s.ranks``): each GPU moves its shard of the weights and gradients over its
    own link (the all-gathers and reduce-scatters between GPUs are not counted), while the host's AdamW and its disk
    serve every rank. Where the disk was measured reading and writing at once, a term for both through it.
    """
    a = s.accumulate
    tokens = (s.batch or 0) * (s.seq or 0)
    sliding = s.sliding(shape)  # the layers kept on the device move nothing
    layer_params = sliding * shape.layer_params
    head = shape.vocab * shape.hidden if shape.has_dims else shape.resident_params
    resident_host = 0 if s.resident_on_device else 1
    resident_up = 4 * shape.resident_params if shape.resident_trainable else 0  # frozen: uploaded once, not per step
    offloaded = shape.layers * tokens * (shape.hidden or 0) * s.element if s.offload_activations else 0
    upload = s.element if s.compute_copy else 4  # bytes per layer parameter per upload
    # Layer gradients go down in the compute dtype where AdamW's own host kernel reads them so (one micro-batch per
    # step and one rank: the plan assumes AdamW), else in fp32.
    narrow = a == 1 and s.ranks == 1
    layer_down = (s.element if narrow else 4) * sliding * shape.layer_trainable
    resident_down = resident_host * 4 * shape.resident_trainable
    # One upload of every layer; frozen parameters kept in the compute dtype go up as they are.
    frozen = shape.layers_frozen if s.frozen_apart else 0
    layer_upload = upload * (layer_params - frozen) + s.element * frozen
    h2d = a * (2 * layer_upload / s.ranks + offloaded) + resident_host * resident_up / s.ranks  # bytes, per rank
    d2h = a * ((layer_down + resident_down) / s.ranks + offloaded)
    flops, compute = (m.gpu_flops, "GPU compute") if s.device == "cuda" else (m.cpu_flops, "CPU compute")
    compute = f"{compute} (8·N·tokens)"
    times = {
        compute: a * 8 * (shape.layers * shape.layer_params + head) * tokens / flops,
        "H2D weights (forward + recompute)": h2d / m.h2d_bytes_per_s,
        "D2H gradients": d2h / m.d2h_bytes_per_s,
    }
    updated = host_updated_trainable(shape, s)
    adamw = updated / m.adamw_rate(s.moments_dtype)
    if a > 1:
        times["host AdamW + gradient sums"] = adamw + (a - 1) * updated / m.add_rate
    else:
        times["host AdamW"] = adamw
    # The update reads and writes the masters and moments and reads the gradients (the layers' as they came down); it
    # writes the layers' compute copy if kept.
    layers = sliding * shape.layer_trainable
    update = updated * (8 + 4 * s.moment_element + 4) - (4 - s.element) * layers * narrow
    update += s.element * layers * s.compute_copy
    traffic = update + updated * (a - 1) * 12 + s.ranks * (h2d + d2h)
    memory = times["host memory (update + copies)"] = traffic / m.memory_rate
    if s.clipping and updated and tokens:  # the updates wait for the global norm: the host idles through the backward
        backward = 6 * (shape.layers * shape.layer_params + head) * tokens / flops  # recompute 2, backward 4
        times["last backward, then host AdamW (clipping by norm)"] = backward + max(adamw, memory)
    files = sum(disk_bytes(shape, s).values()) * s.ranks  # every rank's, each read and written once per step
    if files:
        what = " + ".join(
            n for n in ("Adam moments", "masters") if any(n.split()[-1] in k for k in disk_bytes(shape, s))
        )
        times[f"disk read ({what})"] = files / m.disk_read_bytes_per_s
        times[f"disk write ({what})"] = files / m.disk_write_bytes_per_s
        if m.disk_mixed_bytes_per_s:  # one device serves both: the reads and writes of a step share it
            times[f"disk read + write at once ({what})"] = 2 * files / m.disk_mixed_bytes_per_s
    if not tokens:
        del times[compute]
    return times
