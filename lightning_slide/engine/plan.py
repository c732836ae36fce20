"""The planner: GPU memory, host memory, disk and step time of a slideformer run, known before anything is allocated.

One memory model serves three callers: the engine (its fixed device buffers against ``gpu_memory_limit``), the
strategy (the whole plan at setup, the activations at the first batch) and ``slide-plan`` (a table, before a run).
This module puts a plan together (:func:`make_plan`), checks it against the machine (:meth:`Plan.check`,
:func:`check_device`), searches what fits (:func:`largest_batch` ...) and prints it (:meth:`Plan.table`). Its parts
live apart and are re-exported here, the planner's one public face:

- :mod:`lightning_slide.engine.sizes`: the memory model (bytes by item on the GPU, host and disk) with its inputs,
  :class:`ModelShape` and :class:`Settings`, and the units of memory sizes (:func:`parse_bytes`, :func:`human`);
- :mod:`lightning_slide.engine.machine`: the :class:`Machine` (memory sizes and rates, detected or measured) and
  the step time its rates bound (:func:`step_times`).

Units: bytes for memory, seconds for time, bytes/s and params/s for rates.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from lightning_slide.engine.machine import Machine, host_available, step_times
from lightning_slide.engine.sizes import (
    FUSED_CE,
    FUSED_CE_CHUNK_ELEMENTS,
    GRADS_AHEAD,
    RUNTIME_HOST_BYTES,
    STAGING_NUMEL,
    ModelShape,
    Settings,
    device_bytes,
    disk_bytes,
    frozen_in_compute_dtype,
    grads_in_flight,
    host_bytes,
    human,
    layer_backward_extra_bytes_per_token,
    layer_saved_bytes_per_token,
    loss_head_bytes,
    parse_bytes,
)

__all__ = [
    "FUSED_CE",
    "FUSED_CE_CHUNK_ELEMENTS",
    "GRADS_AHEAD",
    "RUNTIME_HOST_BYTES",
    "STAGING_NUMEL",
    "SUGGEST_MARGIN",
    "Choice",
    "Machine",
    "ModelShape",
    "Plan",
    "PlanError",
    "Settings",
    "check_device",
    "device_bytes",
    "disk_bytes",
    "fitting_options",
    "frozen_in_compute_dtype",
    "grads_in_flight",
    "host_available",
    "host_bytes",
    "human",
    "largest_batch",
    "largest_device_layers",
    "largest_parking",
    "largest_window",
    "layer_backward_extra_bytes_per_token",
    "layer_saved_bytes_per_token",
    "loss_head_bytes",
    "make_plan",
    "parse_bytes",
    "step_times",
    "with_most_that_fit",
]

# Suggestions leave this share of the GPU for the allocator's fragmentation and whatever the model adds.
SUGGEST_MARGIN = 0.9
# The share of host memory and disk the options suggested leave free (page cache, the data, what else runs).
SPARE = 0.05
# The directory a suggestion names when the run has none (the plan cannot know where a large disk is).
SOME_DIRECTORY = "DIR"


def _seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


# ------------------------------------------------------------------------------------------------ the plan
class PlanError(ValueError):
    """A plan that cannot fit the machine; the message gives the numbers and what to change."""


@dataclass
class Plan:
    """Predicted memory (bytes, by item) and step time (seconds per optimizer step, by resource) of one run."""

    shape: ModelShape
    settings: Settings
    machine: Machine
    gpu: dict[str, int]
    host: dict[str, int]
    disk: dict[str, int]
    time: dict[str, float]
    suggested_batch: int | None = None  # largest batch (at this window) that fits; None: not searched / none fits
    suggested_window: int | None = None  # largest window (at this batch) that fits
    suggested_parked_grads: int | None = None  # most parked layer gradients (at this batch and window) that fit
    suggested_device_layers: int | None = None  # most layers kept on the device (at this batch and window) that fit
    fitting: Choice | None = None  # when the run does not fit: the fastest options that do (fitting_options)
    notes: list[str] = field(default_factory=list)
    searched: bool = False  # the suggestions were searched for
    # Host bytes while the strategy takes the model, where whoever plans knows them (the app: its model as loaded,
    # whole, before the strategy splits it); None: not planned. The options above do not change it.
    host_at_setup: int | None = None

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def disk_total(self) -> int:
        return sum(self.disk.values())

    @property
    def step_seconds(self) -> float:
        return max(self.time.values()) if self.time else 0.0

    @property
    def binding(self) -> str | None:
        """The resource that bounds the step time."""
        return max(self.time, key=self.time.get) if self.time else None

    @property
    def tokens_per_second(self) -> float | None:
        s = self.settings
        if not s.batch or not s.seq or not self.step_seconds:
            return None
        return s.accumulate * s.batch * s.seq / self.step_seconds

    def problems(self) -> list[str]:
        """Each memory tier that does not fit, as one line with the numbers."""
        m, out = self.machine, []
        gpu_limit = m.gpu_memory if self.settings.device == "cuda" or m.gpu_memory is not None else None
        for name, total, limit in (
            ("GPU", self.gpu_total, gpu_limit),
            ("host", self.host_total, m.host_memory),
            ("disk", self.disk_total, m.disk_free),
        ):
            if limit is not None and total > limit:
                out.append(f"{name}: needs {human(total)}, more than the {human(limit)} available")
        if self.host_at_setup is not None and m.host_memory is not None and self.host_at_setup > m.host_memory:
            out.append(
                f"loading: the model as loaded needs {human(self.host_at_setup)} of host memory, more than the "
                f"{human(m.host_memory)} available"
            )
        return out

    def advice(self) -> list[str]:
        """What to change, for the tiers that do not fit."""
        s, tips = self.settings, []
        problems = " ".join(p.split(":")[0] for p in self.problems())  # the tiers that do not fit
        if "GPU" in problems:
            if s.batch is not None:
                tips.append(
                    f"lower the batch size (now {s.batch}"
                    + (f"; at most {self.suggested_batch} fits)" if self.suggested_batch else ")")
                )
            tips.append(f"lower the window (now {s.window})")
            if s.resident_on_device:
                tips.append("set tuning.resident_optimizer='host'")
            if not s.offload_activations and s.batch is not None:
                tips.append("set offload_activations=True")
            if FUSED_CE not in s.kernels and any(k.startswith("loss head") for k in self.gpu):
                tips.append("use kernels='all' (the fused cross-entropy never builds the logits)")
            tips.append("raise gpu_memory_limit or use a larger GPU")
        if "host" in problems:
            if s.offload_dir is None:
                tips.append("set offload_dir (the Adam moments go to disk: 8 bytes/parameter less)")
            elif "masters" not in s.on_disk:
                tips.append("set offload='both' (the layers' fp32 masters go to disk too: down to 2 bytes/parameter)")
            if s.offload_activations:
                tips.append("set offload_activations=False or lower the batch size")
            tips.append("free host memory or use a machine with more")
        if "disk" in problems:
            tips.append("free disk space, choose another offload_dir, or set offload_dir=None")
        if "loading" in problems:
            tips.append(
                "the model is loaded whole before the strategy splits it, whatever the options: "
                "use a machine with more host memory"
            )
        return tips

    def check(self) -> None:
        """Raise :class:`PlanError` with the numbers and what to change when a tier does not fit."""
        problems = self.problems()
        if problems:
            raise PlanError(
                "slideformer cannot fit this run: "
                + "; ".join(problems)
                + ".\n"
                + self.table()
                + "\nTo fit: "
                + "; ".join(self.advice())
                + "."
            )

    def table(self) -> str:
        """The plan as a readable table: every item with bytes and human units, the totals against the machine,
        the step-time terms and the one that binds, and the suggestions."""
        s = self.settings
        rows = [f"{'item':<58} {'bytes':>16}"]

        def block(title: str, items: dict[str, int], limit: int | None) -> None:
            rows.append(f"-- {title}")
            rows.extend(f"  {k:<56} {v:>16,}  {human(v):>10}" for k, v in items.items())
            total = sum(items.values())
            against = f"  (of {human(limit)}: {'fits' if total <= limit else 'DOES NOT FIT'})" if limit else ""
            rows.append(f"  {'total':<56} {total:>16,}  {human(total):>10}{against}")

        device = "GPU (peak)" if s.device == "cuda" else "compute device: the CPU (peak; also in host memory below)"
        block(device, self.gpu, self.machine.gpu_memory)
        block("host (peak)", self.host, self.machine.host_memory)
        if self.host_at_setup is not None:
            limit = self.machine.host_memory
            fits = "fits" if limit is None or self.host_at_setup <= limit else "DOES NOT FIT"
            against = f"  (of {human(limit)}: {fits})" if limit else ""
            label = "at setup: the model as loaded, whole, and the runtime"
            rows.append(f"  {label:<56} {self.host_at_setup:>16,}  {human(self.host_at_setup):>10}{against}")
        if self.disk:
            block("disk (offload_dir)", self.disk, self.machine.disk_free)
        rows.append("-- step time lower bound (per optimizer step; each term alone)")
        rows.extend(
            f"  {k:<56} {_seconds(v):>16}" + ("  <- binds" if k == self.binding else "") for k, v in self.time.items()
        )
        if self.tokens_per_second:
            rows.append(
                f"  {'step bound':<56} {_seconds(self.step_seconds):>16}  "
                f"({self.tokens_per_second:,.0f} tokens/s at most)"
            )
        if self.searched:
            rows.append(f"-- suggestions (GPU peak at most {SUGGEST_MARGIN:.0%} of the GPU, host within its memory)")
            if s.seq is not None and self.machine.gpu_memory is not None:
                rows.append(f"  largest batch at window {s.window}, seq {s.seq}: {self.suggested_batch or 'none fits'}")
            rows.append(f"  largest window at batch {s.batch}: {self.suggested_window or 'none fits'}")
            if self.suggested_device_layers:
                more = make_plan(
                    self.shape,
                    dataclasses.replace(s, device_layers=self.suggested_device_layers),
                    self.machine,
                    suggest=False,
                )
                rows.append(
                    f"  most layers kept on the GPU (tuning.device_layers) at batch {s.batch}, window {s.window}: "
                    f"{self.suggested_device_layers} (step bound then {_seconds(more.step_seconds)})"
                )
            if self.suggested_parked_grads:
                rows.append(
                    f"  most layer gradients parked on the GPU (parked_grads) at batch {s.batch}, window "
                    f"{s.window}: {self.suggested_parked_grads}"
                )
            if not s.compute_copy and s.compute_dtype != torch.float32:  # fewer bytes through the host's memory
                with_copy = dataclasses.replace(s, host_weights="compute")
                copy = make_plan(self.shape, with_copy, self.machine, suggest=False)
                if copy.step_seconds < self.step_seconds and not copy.problems():
                    rows.append(
                        f"  a bf16 copy of the layers on the host (tuning.host_weights='compute'): step bound then "
                        f"{_seconds(copy.step_seconds)}, host {human(copy.host_total)}"
                    )
        if self.fitting is not None and self.problems():
            rows.extend(self.fitting.rows())
            if any(p.startswith("loading") for p in self.problems()):
                rows.append("  but none of them changes what loading the model needs (above): it still does not fit")
        elif self.searched and self.problems():
            rows.append(
                "-- options that fit: none found (moments and masters on disk, bf16 moments, clipping by value, "
                "smaller micro-batches and windows all tried)"
            )
        rows.extend(f"note: {n}" for n in self.notes)
        return "\n".join(rows)

    def to_dict(self) -> dict:
        """Everything as plain Python (JSON-ready)."""
        return {
            "shape": dataclasses.asdict(self.shape),
            "settings": {
                **dataclasses.asdict(self.settings),
                "compute_dtype": str(self.settings.compute_dtype),
                "moments_dtype": str(self.settings.moments_dtype),
            },
            "machine": dataclasses.asdict(self.machine),
            "gpu": self.gpu,
            "host": self.host,
            "disk": self.disk,
            "time": self.time,
            "gpu_total": self.gpu_total,
            "host_total": self.host_total,
            "disk_total": self.disk_total,
            "step_seconds": self.step_seconds,
            "binding": self.binding,
            "tokens_per_second": self.tokens_per_second,
            "suggested_batch": self.suggested_batch,
            "suggested_window": self.suggested_window,
            "suggested_parked_grads": self.suggested_parked_grads,
            "suggested_device_layers": self.suggested_device_layers,
            "fitting_options": None if self.fitting is None else self.fitting.to_dict(),
            "problems": self.problems(),
            "notes": self.notes,
            "host_at_setup": self.host_at_setup,
        }


def _fits(shape: ModelShape, s: Settings, m: Machine, margin: float) -> bool:
    gpu_ok = m.gpu_memory is None or sum(device_bytes(shape, s).values()) <= margin * m.gpu_memory
    host_ok = m.host_memory is None or sum(host_bytes(shape, s).values()) <= m.host_memory
    return gpu_ok and host_ok


def largest_batch(
    shape: ModelShape, s: Settings, m: Machine, margin: float = SUGGEST_MARGIN, most: int = 2**16
) -> int | None:
    """The largest batch size (at ``s.seq`` and ``s.window``) whose GPU peak is at most ``margin`` of the GPU and
    whose host peak fits; ``None`` when not even 1 fits (or ``s.seq`` is unknown)."""
    if m.gpu_memory is None or s.seq is None or not shape.has_dims:
        return None
    if not _fits(shape, dataclasses.replace(s, batch=1), m, margin):
        return None
    low, high = 1, most  # memory grows with the batch: bisect
    while low < high:
        mid = (low + high + 1) // 2
        if _fits(shape, dataclasses.replace(s, batch=mid), m, margin):
            low = mid
        else:
            high = mid - 1
    return low


def largest_window(shape: ModelShape, s: Settings, m: Machine, margin: float = SUGGEST_MARGIN) -> int | None:
    """The largest window (at ``s.batch``) that fits as :func:`largest_batch` says; ``None`` when not even 1 does."""
    fitting = [w for w in range(1, shape.layers + 1) if _fits(shape, dataclasses.replace(s, window=w), m, margin)]
    return fitting[-1] if fitting else None


def largest_parking(shape: ModelShape, s: Settings, m: Machine, margin: float = SUGGEST_MARGIN) -> int | None:
    """The most layers' gradients that may park on the GPU (``parked_grads``, at ``s.batch`` and ``s.window``) with
    the run still fitting as :func:`largest_batch` says; ``None`` when parking does not apply (several micro-batches
    per step), the GPU or the activations are unknown, or the run does not fit even without parking."""
    if s.accumulate > 1 or m.gpu_memory is None or s.batch is None or s.seq is None or not shape.has_dims:
        return None
    sliding = s.sliding(shape)  # layers kept on the device send no gradients down: none of theirs parks
    fitting = [p for p in range(sliding + 1) if _fits(shape, dataclasses.replace(s, parked_grads=p), m, margin)]
    return fitting[-1] if fitting else None


def largest_device_layers(shape: ModelShape, s: Settings, m: Machine, margin: float = SUGGEST_MARGIN) -> int | None:
    """The most layers that may be kept and updated on the GPU (``tuning.device_layers``, at ``s.batch`` and
    ``s.window``) with the run still fitting as :func:`largest_batch` says; ``None`` when they do not apply (several
    ranks, masters on disk, frozen layer weights kept in the compute dtype), the GPU or the activations are unknown,
    or the run does not fit even without them."""
    unknown = m.gpu_memory is None or s.batch is None or s.seq is None or not shape.has_dims
    if unknown or s.ranks > 1 or "masters" in s.on_disk or (s.frozen_apart and shape.layers_frozen):
        return None
    fitting = [k for k in range(shape.layers) if _fits(shape, dataclasses.replace(s, device_layers=k), m, margin)]
    return fitting[-1] if fitting else None


def with_most_that_fit(plan: Plan, option: str, at_most: int | None = None) -> Plan:
    """``plan`` with ``option`` (``"parked_grads"`` or ``"device_layers"``) set to the most layers it leaves room
    for (and at most ``at_most``), as ``"auto"`` decides it: ``0`` when the GPU or the batch is unknown. Its
    suggestions are kept."""
    largest = {"parked_grads": largest_parking, "device_layers": largest_device_layers}[option]
    most = largest(plan.shape, plan.settings, plan.machine) or 0
    most = most if at_most is None else min(most, at_most)
    decided = make_plan(plan.shape, dataclasses.replace(plan.settings, **{option: most}), plan.machine, suggest=False)
    for name in ("suggested_batch", "suggested_window", "suggested_parked_grads", "suggested_device_layers"):
        setattr(decided, name, getattr(plan, name))
    decided.fitting, decided.searched, decided.notes = plan.fitting, plan.searched, list(plan.notes)
    return decided


def make_plan(shape: ModelShape, settings: Settings, machine: Machine | None = None, *, suggest: bool = True) -> Plan:
    """The plan of a run: memory by tier and item, step-time terms, and (``suggest``) the largest batch and window
    that fit ``machine`` (sizes ``None`` are not checked)."""
    machine = machine or Machine()
    plan = Plan(
        shape,
        settings,
        machine,
        device_bytes(shape, settings),
        host_bytes(shape, settings),
        disk_bytes(shape, settings),
        step_times(shape, settings, machine),
    )
    if not shape.has_dims:
        plan.notes.append("no model config with hidden_size etc. was found: activations are not planned")
    elif settings.batch is None or settings.seq is None:
        plan.notes.append("batch and sequence length unknown: activations are not planned")
    if suggest:
        plan.suggested_batch = largest_batch(shape, settings, machine)
        plan.suggested_window = largest_window(shape, settings, machine)
        plan.suggested_parked_grads = largest_parking(shape, settings, machine)
        plan.suggested_device_layers = largest_device_layers(shape, settings, machine)
        plan.searched = True
        if plan.problems():
            plan.fitting = fitting_options(shape, settings, machine)
    return plan


@dataclass(frozen=True)
class Choice:
    """Settings that fit a machine, and the options changed to get them (as ``slide-train`` overrides)."""

    plan: Plan
    changes: dict[str, str]  # override -> why, in the order to apply them
    exact: bool  # only where state lives changed: training is the same

    def overrides(self) -> str:
        return " ".join(self.changes)

    def rows(self) -> list[str]:
        p = self.plan
        how = "training unchanged" if self.exact else "these change training a little: see docs/tuning.md"
        rows = [f"-- options that fit (the fastest found; {how})"]
        rows.extend(f"  {override:<56} {why}" for override, why in self.changes.items())
        disk = f", disk {human(p.disk_total)}" if p.disk else ""
        speed = f", {p.tokens_per_second:,.0f} tokens/s at most" if p.tokens_per_second else ""
        rows.append(
            f"  then: GPU {human(p.gpu_total)}, host {human(p.host_total)}{disk}; step bound "
            f"{_seconds(p.step_seconds)}, {p.binding} binds{speed}"
        )
        return rows

    def to_dict(self) -> dict:
        return {
            "overrides": list(self.changes),
            "exact": self.exact,
            "gpu_total": self.plan.gpu_total,
            "host_total": self.plan.host_total,
            "disk_total": self.plan.disk_total,
            "step_seconds": self.plan.step_seconds,
        }


def fitting_options(shape: ModelShape, s: Settings, m: Machine, margin: float = SUGGEST_MARGIN) -> Choice | None:
    """The fastest options that fit ``m``: the GPU within ``margin``, host memory and disk (when its free space is
    known) each with :data:`SPARE` left free.

    Tried: the Adam moments and the layers' fp32 masters in memory or on disk (``offload``), a smaller micro-batch
    with more accumulation (the same batch per step) and a smaller window, which leave training as it is; only when
    none of those fits, bf16 Adam moments (``lightning_slide.optim.AdamW``), clipping by value instead of by norm
    (updates stream, so the host holds a few layers' gradients instead of all) and a smaller batch per step, which
    change it, the fewest first. ``None``: nothing fits."""
    directory = s.offload_dir or SOME_DIRECTORY
    spare = {"host_memory": 1 - SPARE, "disk_free": 1 - SPARE, "gpu_memory": margin}
    m = dataclasses.replace(
        m, **{k: None if getattr(m, k) is None else int(getattr(m, k) * share) for k, share in spare.items()}
    )
    # (micro-batch, accumulation): the same batch per step, then (changing training) a smaller one
    sizes = [b for b in range(s.batch, 0, -1) if s.batch % b == 0] if s.batch else [s.batch]
    batches = [(b, s.accumulate * (s.batch // b) if b else s.accumulate) for b in sizes]
    batches += [(b, s.accumulate) for b in sizes[1:]]
    found = []
    for offload in ((), ("optimizer",), ("masters",), ("masters", "optimizer")):
        for moments in dict.fromkeys((s.moments_dtype, torch.bfloat16)):
            for clipping in dict.fromkeys((s.clipping, False)):
                for (batch, accumulate), window in [(b, w) for b in batches for w in range(s.window, 0, -1)]:
                    settings = dataclasses.replace(
                        s,
                        offload_dir=directory if offload else None,
                        offload=offload,
                        moments_dtype=moments,
                        clipping=clipping,
                        host_weights="compute" if "masters" in offload else s.host_weights,
                        batch=batch,
                        window=window,
                        accumulate=accumulate,
                    )
                    plan = make_plan(shape, settings, m, suggest=False)
                    if not plan.problems():
                        smaller = (batch or 0) * accumulate < (s.batch or 0) * s.accumulate
                        changed = (moments != s.moments_dtype) + (clipping != s.clipping) + smaller
                        found.append((changed, plan.step_seconds, plan.disk_total, len(found), plan))
                        break  # the largest micro-batch that fits, at the largest window
    if not found:
        return None
    changed, *_, plan = min(found)
    return Choice(plan, _changes(s, plan.settings, plan), exact=not changed)


def _changes(given: Settings, chosen: Settings, plan: Plan) -> dict[str, str]:
    """The ``slide-train`` overrides from ``given`` to ``chosen``, each with why."""
    changes = {}
    if chosen.offload and not given.offload_dir:
        free = "" if plan.machine.disk_free is not None else f" with {human(plan.disk_total)} free"
        changes[f"strategy.offload_dir={chosen.offload_dir}"] = f"a directory on a fast local disk{free}"
    if tuple(sorted(chosen.on_disk)) != tuple(sorted(given.on_disk)):
        value = "both" if len(chosen.on_disk) == 2 else next(iter(chosen.on_disk), None)
        what = {"optimizer": "the Adam moments", "masters": "the layers' fp32 masters", "both": "moments and masters"}
        changes[f"strategy.offload={value}"] = f"{what.get(value, 'nothing')} on disk"
    if chosen.moments_dtype != given.moments_dtype:
        changes["model.moments=bf16"] = "bf16 Adam moments (lightning_slide.optim.AdamW): half their bytes"
    if chosen.clipping != given.clipping:
        changes["trainer.gradient_clip_algorithm=value"] = "clip by value: updates stream, few gradient buffers"
    if chosen.window != given.window:
        changes[f"strategy.window={chosen.window}"] = "fewer layers on the GPU at once"
    if chosen.batch != given.batch and chosen.accumulate != given.accumulate:
        changes[f"data.batch_size={chosen.batch}"] = "a smaller micro-batch (activations) ..."
        changes[f"trainer.accumulate_grad_batches={chosen.accumulate}"] = "... accumulated to the same batch per step"
    elif chosen.batch != given.batch:
        changes[f"data.batch_size={chosen.batch}"] = (
            "a smaller batch per step (activations; with accumulation the host holds every layer's gradients)"
        )
    return changes


def check_device(items: dict[str, int], limit: int, window: int) -> None:
    """Raise :class:`PlanError` when the device buffers ``items`` exceed ``limit`` bytes (the engine's own check of
    its fixed buffers, before it allocates them)."""
    total = sum(items.values())
    if total <= limit:
        return
    lines = "\n".join(f"  {name}: {human(size)}" for name, size in items.items())
    raise PlanError(
        f"slideformer needs {human(total)} of device memory before any activation, more than the "
        f"{human(limit)} allowed:\n{lines}\nLower the window (now {window}), set tuning.resident_optimizer='host', "
        "or raise gpu_memory_limit."
    )
