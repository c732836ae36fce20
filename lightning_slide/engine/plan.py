"""What the window costs on the compute device, known before anything is allocated.

The full planner (activations, host memory, disk, step time) is a later addition; this module already answers the
question that must be asked first: do the window's fixed buffers fit in the device memory the user allows?
"""

from __future__ import annotations

import re

import torch

from lightning_slide.engine.blocks import ModelParts

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: str | int | float) -> int:
    """``"24GiB"``, ``"24 GB"``, ``"1.5TiB"`` or a number of bytes -> bytes (``GB`` = 10^9, ``GiB`` = 2^30)."""
    if isinstance(value, bool):
        raise ValueError(f"not a memory size: {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"not a memory size: {value!r}; write e.g. '24GiB', '22.5GB' or a number of bytes")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"a memory size must be positive, got {value!r}")
    return size


def window_bytes(
    parts: ModelParts,
    depth: int,
    compute_dtype: torch.dtype,
    *,
    resident_on_device: bool,
    staging_numel: int,
    cast: bool,
) -> dict[str, int]:
    """Bytes of every buffer the engine allocates on the compute device, by name (activations not included)."""
    element = torch.empty((), dtype=compute_dtype).element_size()
    layer = max(sum(p.numel() for p in block.parameters()) for block in parts.blocks)
    layer_trainable = max(sum(p.numel() for p in block.parameters() if p.requires_grad) for block in parts.blocks)
    resident = sum(p.numel() for _, p in parts.resident)
    resident_trainable = sum(p.numel() for _, p in parts.resident if p.requires_grad)
    plan = {
        "window slots (weights + gradients)": depth * (layer + layer_trainable) * element,
        "resident weights + gradients": (resident + resident_trainable) * element,
    }
    if resident_on_device:
        plan["resident fp32 masters, gradients, Adam moments"] = 4 * resident + 12 * resident_trainable
    if cast:
        largest = max(layer, resident)
        plan["copy staging (fp32, upload + download)"] = 2 * 4 * min(largest, staging_numel)
    return plan


def human(size: float) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1 (``"22.50 GiB"``, ``"96.0 KiB"``)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} B"


def check_fits(plan: dict[str, int], limit: int, window: int) -> None:
    """Raise a clear error, with the numbers and what to change, when ``plan`` exceeds ``limit`` bytes."""
    total = sum(plan.values())
    if total <= limit:
        return
    lines = "\n".join(f"  {name}: {human(size)}" for name, size in plan.items())
    raise ValueError(
        f"slideformer needs {human(total)} of device memory before any activation, more than the "
        f"{human(limit)} allowed:\n{lines}\nLower the window (now {window}), set resident_optimizer='host', "
        "or raise gpu_memory_limit."
    )
