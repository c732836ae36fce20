"""The slideformer options: one frozen object, validated once, shared by the strategy, the engine and the planner.

``SlideOptions(...)`` checks every option where it is built (a ``ValueError`` names the option, what it got and what
it takes) and settles there whatever the options alone decide: the kernel names, what lives on disk,
``host_weights="auto"``, memory sizes in bytes. What needs the run is settled by :meth:`SlideOptions.resolve`:
``resident_optimizer="auto"`` (the device, the model and the GPU's memory, at setup) and ``parked_grads="auto"``
(the plans of the first training batch and of larger ones). Options that trade memory for speed without changing
training are grouped in :class:`Tuning`; the planner (or a rule) picks each by default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from lightning_slide.engine.disk import parse_offload
from lightning_slide.engine.sizes import parse_bytes

KERNEL_NAMES = ("rmsnorm", "rope", "swiglu", "fused_linear_cross_entropy")
START_METHODS = ("popen", "spawn", "fork", "forkserver")
# resident_optimizer="auto" puts the resident parts' optimizer on the GPU when its 16 bytes per resident parameter
# (fp32 master, gradient, two Adam moments) take at most this share of the GPU's memory.
RESIDENT_SHARE = 0.25


def parse_kernels(kernels: str | Iterable[str]) -> tuple[str, ...]:
    """``"all"``, ``"none"``, one kernel name or a list of them -> the names, in :data:`KERNEL_NAMES` order."""
    if isinstance(kernels, str):
        names = (kernels,)
    elif isinstance(kernels, Iterable) and not isinstance(kernels, Mapping):
        names = tuple(kernels)
    else:
        names = None
    if names is None:
        raise ValueError(f"kernels must be 'all', 'none' or a list of {list(KERNEL_NAMES)}, got {kernels!r}")
    unknown = [n for n in names if n not in (*KERNEL_NAMES, "all", "none")]
    if unknown:
        raise ValueError(f"kernels got unknown {unknown}; valid: 'all', 'none' or a list of {list(KERNEL_NAMES)}")
    return KERNEL_NAMES if "all" in names else tuple(n for n in KERNEL_NAMES if n in names)


def check_count(name: str, value: Any, *, minimum: int, optional: bool = False) -> int | None:
    """``value``, when it is an integer of at least ``minimum`` (or ``None`` when ``optional``); else a ``ValueError``
    naming option ``name``."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer of at least {minimum}")
        raise ValueError(f"{name} must be {kind}{' or None' if optional else ''}, got {value!r}")
    return value


def _choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be {', '.join(map(repr, choices[:-1]))} or {choices[-1]!r}, got {value!r}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _size(name: str, value: Any) -> int | None:
    """A memory size option in bytes (``"24GiB"``, ``"22.5GB"`` or a number of bytes), or ``None``."""
    if value is None:
        return None
    try:
        return parse_bytes(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name}: {error}") from None


def _directory(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, Path)) or not str(value):
        raise ValueError(f"offload_dir must be a directory path or None, got {value!r}")
    if Path(value).exists() and not Path(value).is_dir():
        raise ValueError(f"offload_dir {str(value)!r} is a file, not a directory; give a directory (made if missing)")
    return str(value)


@dataclass(frozen=True)
class Tuning:
    """How a run spends GPU memory, host memory and transfers for speed: training is the same whatever these say.
    Each is chosen by the planner or a rule by default. Give the ones to change as a mapping or a ``Tuning``."""

    resident_optimizer: str = "auto"
    """Where embeddings, final norm and head are updated: ``"device"`` (16 B/param of GPU memory), ``"host"``, or
    ``"auto"``: the GPU when that costs at most a quarter of its memory (decided by :meth:`SlideOptions.resolve`)."""
    host_weights: str = "auto"
    """What layer uploads read: ``"fp32"`` masters (cast on the GPU) or a bf16 host copy (``"compute"``); ``"auto"``:
    ``"compute"`` when the masters are on disk, else ``"fp32"`` (decided when the options are built)."""
    grad_buffers: int | None = None
    """fp32 layer gradient buffers the host may hold while updates stream out of a backward; ``None``: window + 2."""
    parked_grads: int | str = "auto"
    """Layers' gradients the GPU may hold when no host buffer is free; ``"auto"``: as many as the plan of the largest
    batch so far leaves room for (decided at the first, fewer at a larger one); ``0``: none."""
    host_memory: int | str | None = None
    """Host memory the plan may count on (``"240GiB"``; bytes once built); ``None``: what the OS reports available."""
    device_layers: int | str = "auto"
    """The first decoder layers kept and updated on the GPU (fp32 masters, gradients, Adam state there: ~20 B/param);
    the host neither transfers nor updates them; ``"auto"``: as many as the first batch's plan leaves room for."""

    def __post_init__(self) -> None:
        _choice("tuning.resident_optimizer", self.resident_optimizer, ("auto", "device", "host"))
        _choice("tuning.host_weights", self.host_weights, ("auto", "fp32", "compute"))
        check_count("tuning.grad_buffers", self.grad_buffers, minimum=1, optional=True)
        object.__setattr__(self, "host_memory", _size("tuning.host_memory", self.host_memory))
        for name in ("parked_grads", "device_layers"):
            value = getattr(self, name)
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"tuning.{name} must be a non-negative integer or 'auto', got {value!r}")

    @classmethod
    def of(cls, tuning: Tuning | Mapping[str, Any] | None) -> Tuning:
        """``tuning`` as the strategy takes it: ``None`` (every default), a ``Tuning``, or a mapping of its fields."""
        if tuning is None or isinstance(tuning, Tuning):
            return tuning or cls()
        if not isinstance(tuning, Mapping):
            raise ValueError(f"tuning must be a dict of {cls.names()} or None, got {tuning!r}")
        unknown = sorted(str(k) for k in tuning if k not in cls.names())
        if unknown:
            raise ValueError(f"tuning got unknown option(s) {unknown}; it takes {cls.names()}")
        return cls(**{str(k): v for k, v in tuning.items()})

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @property
    def device_layers_now(self) -> int:
        """Layers kept on the device until ``"auto"`` is decided at the first batch (none before)."""
        return 0 if self.device_layers == "auto" else self.device_layers

    @property
    def parked_now(self) -> int:
        """Layers' gradients that may park until ``"auto"`` is decided at the first batch (none before)."""
        return 0 if self.parked_grads == "auto" else self.parked_grads


@dataclass(frozen=True)
class SlideOptions:
    """Every option of a slideformer run, validated when built (see ``SlideFormerStrategy`` and the README's
    "Options" for what each does). Built again from its own fields (``dataclasses.replace``) it is unchanged."""

    window: int = 2
    """Decoder layers on the compute device at once; more than the number of layers means all."""
    blocks: str | None = None
    """Dotted path of the ``nn.ModuleList`` of decoder layers (``"model.model.layers"``); ``None``: found."""
    kernels: str | Iterable[str] = ()
    """Triton kernels swapped in at setup: ``"all"``, ``"none"`` or a list of names; once built, the names in
    :data:`KERNEL_NAMES` order."""
    offload_activations: bool = False
    """Keep each layer's input in page-locked host memory instead of on the GPU (long sequences)."""
    offload_dir: str | None = None
    """A directory for the disk tier (created if missing); ``None``: everything in host memory."""
    offload: str | Iterable[str] | None = None
    """What lives under ``offload_dir``: ``"optimizer"``, ``"masters"``, ``"both"`` or a list; ``None``:
    ``"optimizer"`` with an ``offload_dir``. Once built, the sorted names (``()``: nothing on disk)."""
    gpu_memory_limit: int | str | None = None
    """The most GPU memory the process may use (``"24GiB"``; bytes once built); ``None``: the whole GPU."""
    nonfinite: str = "error"
    """A NaN/Inf loss or gradient: ``"error"`` (stop, naming where) or ``"skip"`` (drop the optimizer step)."""
    monitor: bool = True
    """Add a ``SlideMonitor`` callback to the Trainer (unless it has one)."""
    tuning: Tuning | Mapping[str, Any] | None = None
    """Memory-for-speed choices the planner makes by default (:class:`Tuning`, or a mapping of its fields)."""
    start_method: str = "popen"
    """How Lightning starts the ranks with several devices: ``"popen"``, ``"spawn"``, ``"fork"``, ``"forkserver"``."""
    timeout: timedelta = timedelta(minutes=30)
    """How long a collective may wait for the other ranks before failing."""

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen: normalized once here
        set_("window", check_count("window", self.window, minimum=1))
        if self.blocks is not None and not isinstance(self.blocks, str):
            raise ValueError(f"blocks must be a dotted module path or None, got {self.blocks!r}")
        set_("kernels", parse_kernels(self.kernels))
        _flag("offload_activations", self.offload_activations)
        set_("offload_dir", _directory(self.offload_dir))
        set_("offload", tuple(sorted(parse_offload(self.offload, self.offload_dir))))
        set_("gpu_memory_limit", _size("gpu_memory_limit", self.gpu_memory_limit))
        _choice("nonfinite", self.nonfinite, ("error", "skip"))
        _flag("monitor", self.monitor)
        _choice("start_method", self.start_method, START_METHODS)
        if not isinstance(self.timeout, timedelta) or self.timeout <= timedelta(0):
            raise ValueError(f"timeout must be a positive datetime.timedelta, got {self.timeout!r}")
        tuning = Tuning.of(self.tuning)
        if tuning.host_weights == "fp32" and "masters" in self.offload:
            raise ValueError(
                "tuning.host_weights='fp32' uploads from fp32 masters in host memory, but offload puts "
                "the masters on disk; use host_weights='compute' or 'auto'"
            )
        if tuning.host_weights == "auto":
            tuning = dataclasses.replace(tuning, host_weights="compute" if "masters" in self.offload else "fp32")
        set_("tuning", tuning)

    @property
    def on_disk(self) -> frozenset[str]:
        """What lives in files under ``offload_dir``: ``"optimizer"`` (Adam moments) and/or ``"masters"``."""
        return frozenset(self.offload)

    def resolve(
        self,
        *,
        device: torch.device | str | None = None,
        resident_params: int = 0,
        gpu_memory: int | None = None,
        parked_grads: int | None = None,
        device_layers: int | None = None,
        observed: bool = False,
    ) -> SlideOptions:
        """These options with each ``"auto"`` decided that the run's facts given here decide: with the ``device``,
        ``resident_optimizer`` (``"device"`` on a GPU when ``resident_params`` x 16 bytes take at most a quarter of
        ``gpu_memory`` and no user hook ``observed`` the step's gradients, which then all show on the host, else
        ``"host"``); with the first batch's counts, ``parked_grads`` and ``device_layers``. Else unchanged."""
        tuning = self.tuning
        if tuning.resident_optimizer == "auto" and device is not None:
            on_device = (  # (hooks that observe a step see every gradient on the host: none on the device)
                not observed
                and torch.device(device).type == "cuda"
                and gpu_memory is not None
                and 16 * resident_params <= RESIDENT_SHARE * gpu_memory
            )
            tuning = dataclasses.replace(tuning, resident_optimizer="device" if on_device else "host")
        if tuning.parked_grads == "auto" and parked_grads is not None:
            tuning = dataclasses.replace(tuning, parked_grads=parked_grads)
        if tuning.device_layers == "auto" and device_layers is not None:
            tuning = dataclasses.replace(tuning, device_layers=device_layers)
        return dataclasses.replace(self, tuning=tuning)

    @property
    def resident_on_device(self) -> bool:
        """The resident parts are updated on the device (resolved options; ``"auto"`` reads as the host)."""
        return self.tuning.resident_optimizer == "device"
