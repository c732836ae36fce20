"""The engine's state as the outside world reads and writes it: state dicts of the fp32 masters (read from the disk
tier's files when they live there), the optimizer state of one parameter at a time, host memory by kind, and the
gathering of every rank's shards of the masters; and the gradients user hooks see between a backward and its
step."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_slide.engine.disk import MASTER, OneUnitCache
from lightning_slide.engine.host import MASTER_DTYPE
from lightning_slide.engine.optimizer import UnitOptimizer

if TYPE_CHECKING:
    from lightning_slide.engine.engine import SlidingEngine


class _MastersFromDisk(Mapping):
    """A state dict whose decoder-layer parameters are read from the master files when accessed (``read(layer)``
    gives a layer's flat masters); every other entry is as ``root.state_dict()`` gave it."""

    def __init__(self, state: dict, on_disk: dict[str, tuple[int, Any]], read) -> None:
        self._state, self._on_disk, self._read = state, on_disk, read

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._on_disk:
            key, entry = self._on_disk[name]
            return entry.view(self._read(key))
        return self._state[name]

    def __iter__(self):
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


def gather_masters(engine: SlidingEngine) -> None:
    """Complete every rank's copy of the fp32 masters from the owners' shards, unit by unit through the
    device (one unit's padded fp32 buffer at a time). Masters shared by the ranks of this host are complete
    once every rank is here (its updates done)."""
    if engine._masters_shared:
        engine.shards.host_barrier()
    for unit in engine.units().values():
        if (unit.start, unit.stop) == (0, unit.numel) or unit.master is None or unit.shared:
            continue  # replicated, or shared
        span = engine.shards.span(unit.numel)
        buffer = torch.empty(span.padded, dtype=MASTER_DTYPE, device=engine.device)
        buffer[span.lo : span.lo + unit.stop - unit.start].copy_(unit.master[unit.start : unit.stop])
        engine.shards.gather(buffer, unit.numel)
        unit.master.copy_(buffer[: unit.numel])
        del buffer


def disk_caches(engine: SlidingEngine) -> tuple[OneUnitCache, OneUnitCache]:
    """The disk tier's arrays (optimizer state, masters) of the last unit read outside an update: a checkpoint goes
    parameter by parameter, and reads or writes each unit's files once."""
    moments = OneUnitCache(
        load=lambda key: engine.state_store.load(key, engine.updates.optimizers[key].state_names),
        store=lambda key, values: engine.state_store.put(key, values),
    )
    masters = OneUnitCache(
        load=lambda key: engine.state_store.load(key, (MASTER,))[MASTER],
        store=functools.partial(store_master, engine),
    )
    return moments, masters


def state_dict(engine: SlidingEngine) -> Mapping[str, torch.Tensor]:
    """The root's state dict with every parameter given by its fp32 master (host memory); frozen layer
    parameters kept in the compute dtype (``HostUnit.frozen``) by that copy (bf16 under ``bf16-true``).

    With the masters on disk it is a mapping that reads a layer's masters from its file when one of its
    tensors is accessed, keeping only the last layer read: a checkpoint written unit by unit holds one layer's
    masters at a time."""
    engine._sync_masters()
    state = engine.root.state_dict()
    on_disk: dict[str, tuple[int, Any]] = {}
    masters = {}
    for key, unit in engine.units().items():
        for e in unit.entries:
            masters[id(e.param)] = (key, e) if unit.master is None else unit.home(e)
    for name, param in engine.root.named_parameters(remove_duplicate=False):
        if name in state and id(param) in masters:
            if isinstance(masters[id(param)], tuple):
                on_disk[name] = masters[id(param)]
            else:
                state[name] = masters[id(param)]
    if not on_disk:
        return state
    return _MastersFromDisk(state, on_disk, functools.partial(stored_master, engine))


def stored_master(engine: SlidingEngine, key: int) -> torch.Tensor:
    """Layer ``key``'s flat fp32 masters read from its file (cached: the last layer read; changes made through
    it reach the file, and the compute copy, before that layer is next updated or uploaded)."""
    return engine._master_cache.get(key)


def store_master(engine: SlidingEngine, key: int, flat: torch.Tensor) -> None:
    engine.state_store.put(key, {MASTER: flat})
    engine.layers[key].refresh_weights(flat)


def load_state_dict(engine: SlidingEngine, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy ``state`` (names as in ``root.state_dict()``) into the fp32 masters and the root's buffers.

    Every compute copy is dropped and reloaded from the masters before it is used again.
    """
    engine._sync_masters()
    units = {id(e.param): (key, u, e) for key, u in engine.units().items() for e in u.entries}
    expected = set(engine.root.state_dict())
    if strict and set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise KeyError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # Parameters come in module order, a layer's together: a layer on disk is read and written once.
    for name, param in engine.root.named_parameters(remove_duplicate=False):
        if name in state:
            key, unit, entry = units[id(param)]
            if unit.master is None:
                entry.view(stored_master(engine, key)).copy_(state[name])
                engine._master_cache.mark_changed()
            elif not unit.shared or engine.shards.rank == 0:  # shared by this host's ranks: one writes
                unit.home(entry).copy_(state[name])  # frozen ones kept in the compute dtype: rounded
    engine._master_cache.flush()
    if engine._masters_shared:
        engine.shards.host_barrier()  # rank 0 has written the shared masters
    for name, buffer in engine.root.named_buffers():
        if name in state:
            buffer.copy_(state[name])
    for unit in engine.layers:
        if unit.master is not None:
            unit.refresh_weights()
    engine.window.clear()
    engine.resident_parts.from_host()
    for device in engine.device_layers.values():
        device.from_host()
    if not engine.resident_parts.updates_on_device:
        engine.prepare_forward()


def host_bytes(engine: SlidingEngine) -> dict[str, int]:
    """Bytes of host memory the engine holds in tensors now, by kind (what ``README`` calls host bytes per
    parameter; page-locked or not). ``"disk tier in flight"`` is the disk tier's read buffers (in use or pooled,
    at most ``grad_buffers + 1`` units' arrays; ``state_store.peak_bytes`` is their high-water mark)."""
    units = list(engine.units().values())
    pool = engine.loans.pool
    moments = sum(
        t.nbytes
        for o in engine.updates.optimizers.values()
        if o.state is not None and o.inner is not None
        for t in o.state.values()
        if t.device.type == "cpu"
    )
    caches = engine._state_cache.nbytes + engine._master_cache.nbytes
    return {
        # masters shared by this host's ranks: this rank's share of the one copy
        "fp32 masters": sum(
            u.master.nbytes // (engine.shards.world if u.shared else 1) for u in units if u.master is not None
        ),
        "compute copies": sum(u.weights.nbytes for u in units if u.weights is not None),
        # frozen parameters kept in the compute dtype (no fp32 master); with a compute copy they are part of it
        "frozen weights": sum(u.frozen.nbytes for u in units if u.frozen is not None and u.weights is None),
        "optimizer state": moments,
        "gradients": pool.allocated * pool.numel * 4
        + engine.downloads.nbytes
        + (engine.resident.grad.nbytes if engine.resident.grad is not None else 0)
        + (engine.resident_parts.chunk_buffer.nbytes if engine.resident_parts.chunk_buffer is not None else 0),
        "disk tier in flight": engine.state_store.allocated_bytes if engine.state_store is not None else 0,
        "disk tier caches": caches,
    }


def stored_state(engine: SlidingEngine, key, optimizer: UnitOptimizer) -> dict[str, torch.Tensor] | None:
    """A unit's optimizer state arrays read from the disk tier (``None`` when they are in memory).

    The last unit read stays cached, so that a checkpoint reading or writing a unit parameter by parameter
    touches its files once; changes made through it reach the disk before that unit's next update."""
    if optimizer.state is not None or optimizer.inner is None or engine.state_store is None:
        return None
    return engine._state_cache.get(key)  # read for inspection: no place in flight is held


def optimizer_state(engine: SlidingEngine, param: nn.Parameter) -> dict | None:
    """The optimizer state of ``param`` (host tensors; ``None`` when nobody optimizes it).

    With several ranks sharing its unit each holds a piece of it: this is then a collective (every rank must
    ask for the same parameters in the same order) that returns the whole state on every rank."""
    engine._sync_masters()
    key = engine.unit_key.get(id(param))
    if key is None or id(param) not in engine.updates.optimized:
        return None
    optimizer = engine.updates.optimizers[key]
    local = optimizer.state_of(param, stored_state(engine, key, optimizer))
    unit = engine.units()[key]
    if (unit.start, unit.stop) == (0, unit.numel):  # one rank, or replicated: whole here
        return {k: v.cpu() if torch.is_tensor(v) else v for k, v in local.items()}
    # Every rank adds its piece into zeros: the whole state on every rank.
    entry = next(e for e in unit.entries if e.param is param)
    piece = optimizer.piece_of(param)
    whole: dict[str, Any] = {"step": torch.zeros((), dtype=torch.float32)}
    for name in optimizer.state_names:
        flat = torch.zeros(entry.numel, dtype=optimizer.state_dtype)  # bf16 moments stay bf16: the sum adds zeros
        if piece is not None:
            flat[piece.start - entry.offset : piece.stop - entry.offset] = local[name].reshape(-1)
        engine.shards.host_sum(flat)
        whole[name] = flat.view(entry.shape)
    if local is not None:
        whole["step"].copy_(local["step"])
    engine.shards.host_max(whole["step"])
    return whole


def load_optimizer_state(engine: SlidingEngine, param: nn.Parameter, state: dict) -> None:
    """Load ``param``'s whole optimizer state (torch's layout); with several ranks each keeps its piece."""
    engine._sync_masters()
    key = engine.unit_key.get(id(param))
    if key is None or id(param) not in engine.updates.optimized:
        raise KeyError("parameter is not optimized by the host optimizer")
    optimizer = engine.updates.optimizers[key]
    if optimizer.piece_of(param) is None:
        return  # another rank's shard holds all of it
    stored = stored_state(engine, key, optimizer)
    optimizer.load_state_of(param, state, stored)
    if stored is not None:
        engine._state_cache.mark_changed()


def show_grads(engine: SlidingEngine) -> None:
    """Show this optimizer step's gradients so far as plain training does after a backward: every trainable
    parameter points at its fp32 master and its ``.grad`` at its fp32 gradient (host; the device for resident
    parts updated there), for user hooks between backward and step. In-place changes, new tensors and
    ``None`` given to ``.grad`` are what the step then uses (``hide_grads``). Needs a backward begun with
    ``observed=True``; one rank only (with several, each rank holds a shard of each gradient)."""
    if engine.shards.active:
        return
    hide_grads(engine)
    engine.downloads.wait_added()  # later micro-batches are added in by the update thread
    engine.window.clear()  # the layers' parameters are home: their masters
    on_device = {device.key: device for device in engine.on_device()}
    for key, unit in engine.units().items():
        if not unit.trainable or unit.grad_empty:
            continue
        if key in on_device:
            engine._shown += on_device[key].show()
            continue
        engine.worker.await_device(unit.grad_event)
        unit.park()
        for entry in unit.trainable:
            entry.param.grad = view = entry.view(unit.grad)
            engine._shown.append((entry.param, view))
    engine.resident_parts.parked()  # the next forward points the parameters at compute copies again


def hide_grads(engine: SlidingEngine) -> None:
    """Take back the gradients ``show_grads`` gave, keeping what user code did to them."""
    if not engine._shown:
        return
    for param, view in engine._shown:
        if param.grad is None:
            view.zero_()
        elif param.grad is not view:
            view.copy_(param.grad)
        param.grad = None
    engine._shown = []
    engine.gradient_checks.forget_norms()  # the norms taken on the device may be stale: the host's
