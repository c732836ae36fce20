"""The plan of one Lightning run under the strategy, and the check that refuses a run that cannot fit.

``engine/plan.py`` does the arithmetic; this module gathers its inputs from a run — the strategy's options, the
Trainer's clipping and accumulation, the kernels on the model, the machine, what the process already holds — and
checks the plan before anything large is allocated: the fixed buffers, host memory and disk at setup, the
activations at the first training batch.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_slide.engine.plan import (
    Machine,
    ModelShape,
    Plan,
    Settings,
    device_bytes,
    largest_batch,
    make_plan,
    with_most_that_fit,
)
from lightning_slide.kernels import KERNEL_NAMES, active_kernels
from lightning_slide.precision import planned_clipping

if TYPE_CHECKING:
    from lightning_slide.engine.engine import SlidingEngine
    from lightning_slide.engine.options import SlideOptions
    from lightning_slide.strategy import SlideFormerStrategy


class RunPlan:
    """The planner's settings for a run (without the batch shape, unknown at setup) and its latest plan.

    Args:
        strategy: the run's strategy (its devices).
        trainer: the run's Trainer (gradient clipping, accumulation).
        module: the LightningModule (its kernels count as much as the ``kernels`` option's).
        options: the run's options, resolved (``strategy.run_options``).
        optimizer: the optimizer ``configure_optimizers`` returned (its moments' dtype), if any.
    """

    def __init__(
        self,
        strategy: SlideFormerStrategy,
        trainer: Trainer,
        module: LightningModule,
        options: SlideOptions,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.strategy = strategy
        self.options = options
        active = set(active_kernels(module))  # applied by the user (apply_kernels) or by an earlier run
        self.settings = Settings.of(
            options,
            compute_dtype=strategy.precision_plugin.compute_dtype,
            device=strategy.root_device.type,
            kernels=tuple(n for n in KERNEL_NAMES if n in options.kernels or n in active),
            clipping=planned_clipping(trainer, module)[0],
            accumulate=trainer.accumulate_grad_batches,
            ranks=strategy.num_processes * strategy.num_nodes,
            masters_shared_by=strategy.num_processes if strategy.num_nodes == 1 else 1,
            moments_dtype=getattr(optimizer, "state_dtype", torch.float32),
        )
        self.plan: Plan | None = None  # the latest, also when refused (the numbers stay inspectable)
        self.largest: tuple[int, int] | None = None  # the largest batch size and sequence length planned

    def check(
        self,
        module: LightningModule,
        engine: SlidingEngine | None = None,
        batch: int | None = None,
        seq: int | None = None,
    ) -> Plan:
        """Plan the run and refuse it (``PlanError``, with the numbers and what to change) when it cannot fit.

        Without ``batch`` x ``seq`` the fixed buffers (window slots, resident parts, staging), the host memory
        (masters, Adam moments, gradient buffers) and the disk tier are checked; with them the activations too.
        The GPU is checked against ``strategy.device_memory_limit()`` or the whole card (on the CPU only when a limit
        is given), the host against ``tuning.host_memory`` or the memory available now plus what this process already
        holds that the plan counts (shared by the host's ranks), the disk against the free space under ``offload_dir``.
        """
        settings = self.settings if batch is None else dataclasses.replace(self.settings, batch=batch, seq=seq)
        plan = self.plan = self.plan_of(module, engine, settings)
        if plan.problems():
            plan.suggested_batch = largest_batch(plan.shape, settings, plan.machine)
            plan.check()
        return plan

    def plan_of(self, module: LightningModule, engine: SlidingEngine | None, settings: Settings) -> Plan:
        """The plan of ``settings`` on this run's machine, as :meth:`check` counts it (not checked)."""
        strategy = self.strategy
        host_memory = self.options.tuning.host_memory
        shape = ModelShape.of(module, self.options.blocks)
        limit = strategy.device_memory_limit()
        tier = (shape.layers, self.options.on_disk)
        machine = Machine.detect(gpu_memory_limit=limit, offload_dir=self.options.offload_dir, tier=tier)
        if strategy.root_device.type != "cuda":
            machine.gpu_memory = limit
        if host_memory is not None:
            machine.host_memory = host_memory
        plan = make_plan(shape, settings, machine, suggest=False)
        if machine.host_memory is not None:
            if host_memory is None:  # MemAvailable leaves out what this process already holds
                machine.host_memory += _host_held(module, engine, plan) * strategy.num_processes
            machine.host_memory //= strategy.num_processes  # this host's ranks share it
        return plan

    def most_that_fit(self, option: str, at_most: int | None = None) -> int:
        """``parked_grads="auto"`` or ``device_layers="auto"`` (``option``): the most layers the latest plan (the
        first batch's) leaves room for, which the plan then counts; ``0`` when it does not know the batch or the GPU."""
        if self.plan is None:
            return 0
        self.plan = with_most_that_fit(self.plan, option, at_most)
        most = getattr(self.plan.settings, option)
        self.options = self.options.resolve(**{option: most})
        self.settings = dataclasses.replace(self.settings, **{option: most})
        return most

    def check_first_batch(self, module: LightningModule, engine: SlidingEngine, batch: Any) -> None:
        """Check the activations of the first training batch (later batches are not refused: a longer one that
        cannot fit runs into the allocator's own out-of-memory error)."""
        size = batch_shape(batch)
        if size is not None:
            self.largest = size
            self.check(module, engine, *size)

    def for_larger_batch(
        self, module: LightningModule, engine: SlidingEngine, batch: Any, options: tuple[str, ...]
    ) -> dict[str, int] | None:
        """The ``"auto"`` ``options`` (``device_layers``, ``parked_grads``) after the first batch: when ``batch`` is
        larger in either dimension than every batch before it, the layers it leaves room for beside its activations
        (no more layers on the device than now; those first, as at the first batch), which the plan then counts
        (planned, never refused); ``None`` when it is not larger."""
        size = batch_shape(batch)
        if size is None or self.largest is None or all(n <= m for n, m in zip(size, self.largest)):
            return None
        self.largest = tuple(max(n, m) for n, m in zip(size, self.largest))
        batch_size, seq = self.largest
        kept = self.settings.device_layers
        settings = dataclasses.replace(self.settings, batch=batch_size, seq=seq, parked_grads=0)
        if "device_layers" in options:  # planned from none, then at most as many as now
            settings = dataclasses.replace(settings, device_layers=0)
        self.plan = self.plan_of(module, engine, settings)
        decided = {}
        if "device_layers" in options:
            decided["device_layers"] = self.most_that_fit("device_layers", at_most=kept)
        if "parked_grads" in options:
            decided["parked_grads"] = self.most_that_fit("parked_grads")
        return decided


def _host_held(module: LightningModule, engine: SlidingEngine | None, plan: Plan) -> int:
    """Bytes of host memory this process holds now that ``plan`` counts (so they are not needed again)."""
    runtime = next(v for k, v in plan.host.items() if k.startswith("runtime"))
    if engine is None:  # before the engine: the runtime and the model's parameters (they become masters)
        params = {p.data_ptr(): p.numel() * p.element_size() for p in module.parameters() if p.device.type == "cpu"}
        return runtime + sum(params.values())
    # After the engine: everything but what depends on the batch or is allocated lazily during the step.
    pool = engine.loans.pool
    to_come = max(0, plan.host.get(_item(plan.host, "layer gradient buffers"), 0) - 4 * pool.allocated * pool.numel)
    to_come += plan.host.get(_item(plan.host, "offloaded layer inputs"), 0)
    to_come += plan.host.get(_item(plan.host, "accumulation staging"), 0)
    if plan.settings.device != "cuda":
        fixed = device_bytes(plan.shape, dataclasses.replace(plan.settings, batch=None, seq=None))
        to_come += sum(plan.gpu.values()) - sum(fixed.values())
    return plan.host_total - to_come


def _item(items: dict[str, int], prefix: str) -> str:
    """The key of ``items`` that starts with ``prefix`` (or ``prefix`` itself when none does)."""
    return next((k for k in items if k.startswith(prefix)), prefix)


def batch_shape(batch: Any) -> tuple[int, int] | None:
    """``(batch size, sequence length)`` of the first 2-D integer tensor in ``batch`` (``input_ids`` first when
    ``batch`` is a dict), or ``None`` if there is none."""
    if isinstance(batch, dict):
        values = [batch["input_ids"]] if "input_ids" in batch else list(batch.values())
    elif isinstance(batch, (list, tuple)):
        values = list(batch)
    else:
        values = [batch]
    for value in values:
        if torch.is_tensor(value):
            if value.ndim == 2 and not value.is_floating_point() and not value.is_complex():
                return int(value.shape[0]), int(value.shape[1])
        elif isinstance(value, (dict, list, tuple)):
            found = batch_shape(value)
            if found is not None:
                return found
    return None
