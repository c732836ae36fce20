"""Host updates: one fused optimizer per unit, and the worker task that runs a unit's update.

``attach`` rebuilds the user's optimizer over the host masters (the resident parts' through ``ResidentParts``, which
may keep them on the device). ``submit`` queues a unit's update on the update thread; with the disk tier it first
starts reading the unit's moments (and masters) ahead, and the task writes them back after the update.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from torch.optim import Optimizer

from lightning_slide.engine.checks import Verdict, index_of, raise_if_nonfinite, unit_norm
from lightning_slide.engine.disk import MASTER, place_optimizer_state
from lightning_slide.engine.host import RESIDENT
from lightning_slide.engine.optimizer import UnitOptimizer, check_optimizer, state_dtype, state_names

if TYPE_CHECKING:
    from lightning_slide.engine.engine import SlidingEngine


class HostUpdates:
    """The per-unit optimizers of ``engine`` and the queueing of their updates."""

    def __init__(self, engine: SlidingEngine) -> None:
        self.engine = engine
        self.optimizers: dict[Any, UnitOptimizer] = {}
        self.optimized: set[int] = set()  # ids of the parameters some rank's optimizer steps
        self.source: tuple | None = None  # the user's optimizer and each parameter's group in it

    def __bool__(self) -> bool:
        return bool(self.optimizers)

    def attach(self, optimizer: Optimizer) -> None:
        """Rebuild ``optimizer`` over the host masters, one fused optimizer per unit."""
        engine, units = self.engine, self.engine.units()
        check_optimizer(optimizer)
        group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self.source = (optimizer, group_of)
        if any(pid not in engine.unit_key for pid in group_of):
            raise ValueError("the optimizer holds tensors that are not parameters of the LightningModule")
        # Optimized by some rank (each rank optimizes only its shards' pieces of them).
        self.optimized = set(group_of) & {id(e.param) for unit in units.values() for e in unit.trainable}
        on_device = set(engine.device_layers)
        if engine.resident_parts.on_device and engine.resident.trainable_numel > 0:
            on_device.add(RESIDENT)
        keys = [key for key, unit in units.items() if unit.grad_numel and key not in on_device]
        store = engine.state_store if "optimizer" in engine.offload else None
        on_disk = place_optimizer_state(store, units, state_names(optimizer), keys, state_dtype(optimizer))
        self.optimizers = {}
        for key, unit in units.items():
            if key == RESIDENT:
                self.optimizers[key] = engine.resident_parts.optimizer(optimizer, group_of, key not in on_disk)
            elif key in engine.device_layers:
                self.optimizers[key] = engine.device_layers[key].optimizer(optimizer, group_of)
            else:
                self.optimizers[key] = UnitOptimizer(unit, optimizer, group_of, state_in_memory=key not in on_disk)

    def submit(
        self, key, hyper: list[dict], verdict: Verdict | None = None, clip_value=None, step=None, ready=None
    ) -> None:
        """Queue unit ``key``'s update of global step ``step`` (default: the current one). ``ready``: the event its
        gradients wait for, given for a streamed step's updates, which the host may then run in the order their
        gradients arrive (``UpdateWorker.submit``)."""
        optimizer = self.optimizers.get(key)
        if optimizer is None:
            return
        engine = self.engine
        step = engine.mode.step if step is None else step
        engine.gradient_checks.expect(index_of(key), step)
        engine.mode.open = True
        engine.masters_current = not engine.shards.active
        verdict = Verdict() if verdict is None else verdict  # filled in by the checks' task queued before, if any
        if engine.state_store is not None:
            engine.worker.wait(key)  # its previous update has handed its files to the writer: read after that
        reading = self._read_state(key, optimizer)  # the disk tier starts reading ahead now
        if reading is not None:
            # The disk tier reads ahead in queue order, a bounded number of units: an update run out of that order
            # could wait for a read that waits for the updates passed over. Keep the order.
            ready = None
        engine.worker.submit(key, functools.partial(self.run, key, hyper, verdict, clip_value, step, reading), ready)

    def prefer_forward_order(self) -> None:
        """Run the queued updates (and the disk tier's reads) in the order the next forward needs them."""
        engine = self.engine
        engine.worker.prefer(list(engine.units()))
        if engine.state_store is not None:
            engine.state_store.prefer(list(engine.units()))

    def _read_state(self, key, optimizer: UnitOptimizer):
        """Start reading ``key``'s arrays on disk (moments, masters) for its update; ``None`` if none are."""
        engine = self.engine
        if optimizer.inner is None or engine.state_store is None or not engine.state_store.holds(key):
            return None
        engine.flush_disk_caches()  # a checkpoint's changes first; the update then reads the files
        return engine.state_store.read(key)

    def run(self, key, hyper, verdict: Verdict, clip_value, step: int, reading=None) -> None:
        """Worker task: unit ``key``'s update from its accumulated gradients, which it then marks consumed.
        ``reading``: the disk tier's read of the unit's optimizer state (written back after the update)."""
        engine, optimizer = self.engine, self.optimizers[key]
        unit = optimizer.unit
        state = None if reading is None else reading.result()
        try:
            verdict.raise_error()
            engine.worker.await_device(unit.grad_event)
            in_chunks = key == RESIDENT and engine.resident_parts.in_chunks  # (its norm was taken on the device)
            if engine.gradient_checks.track and not in_chunks:
                unit_norm(engine, key, step)
            if not verdict.skip:
                raise_if_nonfinite(engine, key)
                if in_chunks:
                    engine.resident_parts.step_in_chunks(optimizer, hyper, clip_value, state)
                    refreshed = False
                else:  # (AdamW's host loop may bring the compute copy up to date in its own pass)
                    refreshed = optimizer.step(hyper, verdict.coefficient, clip_value, state)
                if not refreshed:  # before the next upload of the unit, which waits for this task
                    unit.refresh_weights(None if state is None else state.get(MASTER))
        except BaseException:
            if state is not None:
                engine.state_store.release(key, state)
            raise
        if state is not None:
            engine.state_store.write(key, state)
        unit.grad_empty = True
        engine.loans.give_back(unit)
