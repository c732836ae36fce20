"""Units updated on the compute device: their fp32 masters, fp32 gradient accumulator and optimizer state live there,
and their update runs there, on the training thread, refreshing the compute copy the parameters use.

Two kinds of unit are: the resident parts with ``tuning.resident_optimizer="device"`` (``resident.py`` owns their
compute copy), and the first ``tuning.device_layers`` decoder layers, which then do not slide: their compute copy and
gradient buffer stay on the device (:meth:`DeviceUnit.layer`) until a larger batch needs their room
(:func:`let_layers_slide`), so the host neither transfers nor updates them. Those are the first layers because the
next forward needs them first and their gradients arrive last: a host update of theirs is the step's critical path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lightning_slide.engine import state
from lightning_slide.engine.checks import Verdict, index_of, raise_if_nonfinite
from lightning_slide.engine.disk import place_optimizer_state
from lightning_slide.engine.host import MASTER_DTYPE, RESIDENT, HostUnit
from lightning_slide.engine.optimizer import UnitOptimizer
from lightning_slide.engine.streams import copy_cast

if TYPE_CHECKING:
    from lightning_slide.engine.engine import SlidingEngine


def check_device_layers(count: int, layers: int, shards, masters_on_disk: bool) -> int:
    """``count`` (``tuning.device_layers``) when the run can keep that many layers on the device, else a
    ``ValueError`` saying what to change."""
    if count >= layers:
        raise ValueError(
            f"tuning.device_layers={count}: at least one of the {layers} layers must slide; give fewer (or train "
            "without slideformer if the whole model fits on the device)"
        )
    if count and (shards.active or masters_on_disk):
        raise ValueError(
            "tuning.device_layers keeps layers' fp32 masters on one device: not with several devices or the masters "
            "on disk; set it to 0"
        )
    return count


def keep_layers(engine: SlidingEngine, count: int) -> None:
    """Keep layers ``0 .. count - 1`` on the device from now on (those not there yet), their optimizer state moved
    with them (a checkpoint may have restored it already); the window skips them after this."""
    check_device_layers(count, len(engine.layers), engine.shards, "masters" in engine.offload)
    engine.worker.wait_all()
    window, updates = engine.window, engine.updates
    for index in range(len(engine.device_layers), count):
        if index in window.slot_of:
            window.release(index)
        device = engine.device_layers[index] = DeviceUnit.layer(engine, index)
        window.pinned.add(index)
        host = updates.optimizers.get(index)
        if host is None:
            continue
        optimizer = updates.optimizers[index] = device.optimizer(*updates.source)
        _move_state(device.unit, host, optimizer, read=state.stored_state(engine, index, host))
    window.depth = min(window.depth, len(engine.layers) - len(window.pinned))


def let_layers_slide(engine: SlidingEngine, count: int) -> None:
    """Keep only layers ``0 .. count - 1`` on the device (a larger batch's activations need the room): each layer
    above goes back to sliding, its masters, optimizer state and any gradients summed so far this step with it."""
    engine.worker.wait_all()
    updates = engine.updates
    store = engine.state_store if "optimizer" in engine.offload else None
    for index in sorted(engine.device_layers, reverse=True):
        if index < count:
            break
        device = engine.device_layers.pop(index)
        unit, on_device = device.unit, updates.optimizers.get(index)
        device.apply_deferred()
        device.to_host()
        unit.refresh_weights()  # a compute copy on the host was not kept up to date meanwhile
        if on_device is not None:  # its optimizer state goes where the other layers' is: memory, or the disk tier
            names, dtype = on_device.state_names, on_device.state_dtype
            on_disk = bool(place_optimizer_state(store, {index: unit}, names, [index], dtype))
            host = updates.optimizers[index] = UnitOptimizer(unit, *updates.source, state_in_memory=not on_disk)
            arrays = host.empty_state() if on_disk else None
            _move_state(unit, on_device, host, write=arrays)
            if on_disk:
                store.put(index, arrays)
        if not unit.grad_empty:  # mid-accumulation: the sum so far goes to a host accumulator
            unit.grad = engine.loans.lend(index, bounded=False)
            unit.grad.copy_(device.grad)
        device.close()
        unit.park()
        engine.window.pinned.discard(index)
    engine.window.depth = min(len(engine.window.slots), len(engine.layers) - len(engine.window.pinned))


def _move_state(unit: HostUnit, source: UnitOptimizer, target: UnitOptimizer, read=None, write=None) -> None:
    """Copy each of ``unit``'s parameters' optimizer state from ``source`` to ``target``; ``read``/``write``: the
    flat state arrays of the disk tier where one of them keeps its state there."""
    for entry in unit.trainable:
        saved = source.state_of(entry.param, read)
        if saved is not None:
            target.load_state_of(entry.param, saved, write)


class DeviceUnit:
    """Unit ``key`` of ``engine`` updated on the device; ``weights``/``grads``: its compute-dtype buffers there."""

    def __init__(self, engine: SlidingEngine, key, unit: HostUnit, weights: torch.Tensor, grads: torch.Tensor):
        self.engine, self.key, self.unit = engine, key, unit
        self.weights, self.grads = weights, grads
        self.master: torch.Tensor | None = None  # fp32, once an optimizer is attached
        self.grad: torch.Tensor | None = None  # fp32 accumulator
        self.deferred: tuple | None = None  # an update waiting for the step's verdict

    @classmethod
    def layer(cls, engine: SlidingEngine, index: int) -> DeviceUnit:
        """Decoder layer ``index`` kept on the device: its compute copy uploaded once, its parameters pointed at it."""
        unit = engine.layers[index]
        if unit.frozen is not None:
            raise ValueError(
                f"tuning.device_layers: {unit.name} keeps frozen parameters in the compute dtype (LoRA under bf16), "
                "which a layer on the device does not; set device_layers to 0"
            )
        weights = torch.empty(unit.numel, dtype=engine.compute_dtype, device=engine.device)
        for offset, source in unit.upload_pieces():
            copy_cast(weights[offset : offset + source.numel()], source, engine.upload_staging)
        for entry in unit.entries:
            entry.param.data = entry.view(weights)
        grads = torch.zeros(unit.trainable_numel, dtype=engine.compute_dtype, device=engine.device)
        return cls(engine, index, unit, weights, grads)

    def optimizer(self, optimizer, group_of: dict[int, int]) -> UnitOptimizer:
        """The unit's optimizer, over fp32 masters copied to the device."""
        self.engine.worker.wait(self.key)
        self.master = self.unit.master.to(self.engine.device, copy=True)
        self.grad = torch.zeros(self.unit.trainable_numel, dtype=MASTER_DTYPE, device=self.engine.device)
        return UnitOptimizer(self.unit, optimizer, group_of, master=self.master, grad=self.grad)

    @property
    def updates(self) -> bool:
        return self.master is not None

    # ---------------------------------------------------------------- backward
    def attach_grads(self) -> None:
        """Give the trainable parameters zeroed gradient views of ``grads``, for autograd to fill (a layer's)."""
        self.grads.zero_()
        for entry in self.unit.trainable:
            entry.param.grad = entry.view(self.grads)

    def take_grads(self) -> None:
        """Add this backward's gradients (in ``grads``) into the fp32 accumulator, their NaN/Inf flag on its way."""
        engine, unit = self.engine, self.unit
        checks, streams, shards = engine.gradient_checks, engine.streams, engine.shards
        unit.grad_event = checks.fold_finite(index_of(self.key), self.grads, unit.grad_empty, streams, shards)
        shards.mean(self.grads)  # replicated: every rank updates all of it alike
        if unit.grad_empty:
            self.grad.copy_(self.grads)
        else:
            self.grad.add_(self.grads)
        unit.grad_empty = False

    # ---------------------------------------------------------------- update
    def norms(self):
        """Per-parameter gradient norms, on their way to the host: ``(host tensor, event)``."""
        grads = self.engine.updates.optimizers[self.key].bind().values()
        norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
        host = torch.empty(norms.shape, dtype=norms.dtype, pin_memory=self.engine.pin)
        host.copy_(norms, non_blocking=True)
        return host, self.engine.streams.record()

    def update(self, hyper, coefficient, clip_value, step: int) -> None:
        """Update the unit on the device (global step ``step``) and refresh its compute copy there."""
        engine, checks = self.engine, self.engine.gradient_checks
        if engine.nonfinite == "error":
            # Waits for the flag, i.e. for the unit's gradients on the device.
            raise_if_nonfinite(engine, self.key)
        if coefficient is not None:
            coefficient = coefficient.to(engine.device)
        optimizer = engine.updates.optimizers[self.key]
        if checks.track:
            # replicated on every rank: counted on the first
            norm = torch.zeros((), device=engine.device) if engine.shards.rank else optimizer.grad_norm()
            checks.expect(index_of(self.key), step)
            checks.put_norm(index_of(self.key), norm, engine.streams, step)
        optimizer.step(hyper, coefficient, clip_value)
        self.unit.grad_empty = True
        self.weights.copy_(self.master)

    def defer(self, hyper, verdict: Verdict, clip_value, step: int) -> None:
        """The update waits for the step's verdict: done before the next forward (``apply_deferred``)."""
        self.deferred = (hyper, verdict, clip_value, step)

    def apply_deferred(self) -> None:
        if self.deferred is None:
            return
        (hyper, verdict, clip_value, step), self.deferred = self.deferred, None
        self.engine.worker.wait("norm")
        verdict.raise_error()
        if verdict.skip:
            self.unit.grad_empty = True
            return
        self.update(hyper, verdict.coefficient, clip_value, step)

    # ---------------------------------------------------------------- state and lifetime
    def to_host(self) -> None:
        """Bring the device masters back to the host masters."""
        if self.updates:
            self.unit.master.copy_(self.master)

    def from_host(self) -> None:
        """Take the host masters (a loaded state dict) as the current weights."""
        if self.updates:
            self.master.copy_(self.unit.master)
            self.weights.copy_(self.master)
        elif self.key != RESIDENT:  # a layer's compute copy is its only device copy
            for offset, source in self.unit.upload_pieces():
                copy_cast(self.weights[offset : offset + source.numel()], source, self.engine.upload_staging)

    def show(self) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """Point the trainable parameters at their fp32 masters and ``.grad`` at their accumulated gradients (for
        user hooks between backward and step); returns the ``(parameter, gradient view)`` pairs shown."""
        shown = []
        for entry in self.unit.trainable:
            entry.param.data = entry.view(self.master)
            entry.param.grad = view = entry.view(self.grad)
            shown.append((entry.param, view))
        return shown

    def point_at_weights(self) -> None:
        """Point the parameters at the compute copy (after ``show``)."""
        for entry in self.unit.entries:
            entry.param.data = entry.view(self.weights)

    def close(self) -> None:
        """Let the compute buffers go (masters and state stay, for a checkpoint after the run)."""
        self.deferred = None
        self.weights = self.grads = None
