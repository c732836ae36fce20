"""The sliding engine: one training step's data flow, in one place.

forward    layer i:  upload i (and prefetch the next layers whose updates are done) into window slots on the
                     upload stream -> compute waits for the upload -> compute i under non-reentrant
                     checkpointing, so only the layer's input is kept
backward   layer i:  autograd recomputes i: upload i (and prefetch the layers below) -> attach zeroed slot grads
                     -> autograd fills them -> when the last parameter's gradient lands, the download stream
                     copies them into the layer's fp32 host accumulator (cast on the device; a host thread adds
                     when accumulating) and the slot is free for the next layer
update               without clipping by norm, on the last micro-batch: each layer's host update is queued as soon
                     as its gradients are downloaded, overlapping the rest of the backward; when the backward ends, the
                     updates not yet started are reordered first layer first, the order the next forward needs,
                     and the host thread passes over an update whose gradients are still on their way for one
                     whose gradients are down (clipping by value clamps each layer's gradients in its update);
                     with clipping by norm: after backward, the global norm, then the updates in forward order
next forward         uploading layer i waits only for layer i's update

The resident parts (embeddings, final norm, output head) keep one compute copy on the device for the whole step.
On the CPU the same bookkeeping runs with synchronous copies (tests). This module never imports Lightning: the
strategy drives it through ``prepare_forward``, ``begin_backward``, ``end_backward``, ``step``, ``zero_grad``,
``state_dict`` and ``close``.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from lightning_slide.engine.activations import ActivationOffload
from lightning_slide.engine.blocks import find_parts
from lightning_slide.engine.disk import MASTER, OneUnitCache, StateStore, check_disk_space, existing_bytes
from lightning_slide.engine.host import MASTER_DTYPE, GradientPool, HostUnit
from lightning_slide.engine.optimizer import (
    UnitOptimizer,
    UpdateWorker,
    check_optimizer,
    hyperparameters,
    state_names,
)
from lightning_slide.engine.options import SlideOptions, check_count
from lightning_slide.engine.pinned import host_empty
from lightning_slide.engine.shard import Shards
from lightning_slide.engine.shared_masters import shared_masters
from lightning_slide.engine.plan import (
    STAGING_NUMEL, ModelShape, Settings, check_device, device_bytes, frozen_in_compute_dtype, grads_in_flight, human,
)
from lightning_slide.engine.streams import Streams, copy_cast
from lightning_slide.engine import state
from lightning_slide.engine.window import Window

RESIDENT = "resident"
_UNPARK_POLL_SECONDS = 1e-3  # while the training thread waits for an update, how often it sends parked gradients down


def memory_fraction(device: torch.device) -> float:
    """The process's current cap on ``device`` as a fraction of its memory (1.0 where torch cannot say)."""
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return float(getter(device)) if getter is not None else 1.0


def _check_unshared(parts) -> None:
    """Each decoder layer must own its parameters: a parameter in two units would have two masters."""
    seen: dict[int, str] = {}
    units = {RESIDENT: parts.resident, **{f"layer {i}": parts.block_parameters(i) for i in range(len(parts.blocks))}}
    for unit, params in units.items():
        for name, param in params:
            if seen.get(id(param), unit) != unit:
                raise ValueError(
                    f"parameter {name} is shared between {seen[id(param)]} and {unit}; slideformer needs each "
                    "decoder layer to own its parameters"
                )
            seen[id(param)] = unit
# Key-value caches written in forward would be written again by the recompute in backward.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
# Device staging through which copies that change dtype travel (elements of fp32; 128 MiB).
_STAGING_NUMEL = STAGING_NUMEL
# What decoder-layer uploads read: the fp32 masters (cast on the device) or a host copy in the compute dtype.
HOST_WEIGHTS = ("fp32", "compute")


class SlidingEngine:
    """Trains ``root`` with only ``window`` of its decoder layers on ``device`` at a time.

    Args:
        root: the module whose parameters are trained (e.g. a LightningModule wrapping a Hugging Face causal LM).
        options: the run's options (:class:`~lightning_slide.engine.options.SlideOptions`, validated there; the
            Lightning-only ones are ignored). ``tuning.resident_optimizer="auto"`` is decided here from ``device``
            and ``memory_limit`` unless the strategy already did; ``parked_grads="auto"`` starts with none.
        device: the compute device (a CUDA device, or the CPU for tests).
        compute_dtype: dtype of the weights used for compute (``torch.bfloat16`` or ``torch.float32``).
        memory_limit: bytes of device memory the process may use (a GPU is capped to it); the window's buffers
            are checked against it before anything is allocated. Default ``None``: no cap, no check.
        data_parallel: this process is one rank of the default ``torch.distributed`` process group, each rank
            training the same model on its own micro-batches (see ``shard.py``): each rank keeps the gradients,
            Adam moments and up-to-date masters of its shard of every unit, gradients are averaged over ranks as
            they leave the device, weights are all-gathered as they arrive. Every rank must make the same calls
            in the same order. The resident parts, when updated on the device, are replicated instead. Default
            ``False``.

    How the options act here: with ``offload_dir`` a ``StateStore`` reads each unit's files ahead of its update and
    writes them behind (at most ``grad_buffers + 1`` units' arrays in host memory); with the masters on disk the
    parameters at rest are memory-mapped views of the master files (``host.HostUnit``). ``nonfinite``: each unit's
    gradients are checked on the device as they are produced (one flag per unit, read before its update; no host
    sync); ``"skip"`` makes updates wait for the end of backward. ``host_weights="compute"``: uploads read a
    page-locked compute-dtype copy the host optimizer refreshes (with fp32 compute the masters are that copy).
    ``parked_grads``: with every host gradient buffer lent, the backward parks a layer's gradients on the device
    instead of waiting, and they go down as buffers come back (or, in a step that waits for its backward, after it).

    Construction moves every parameter into fp32 host masters (one copy; page-locked when the device is a GPU)
    and the resident parts onto the device. Frozen decoder-layer parameters (a LoRA run's base weights) get no fp32
    master when the compute dtype is below fp32, on one rank with the masters in memory: they are kept, and
    uploaded, in the compute dtype only (``HostUnit.frozen``; 2 bytes per parameter in bf16).
    """

    def __init__(
        self,
        root: nn.Module,
        options: SlideOptions = SlideOptions(),
        *,
        device: torch.device,
        compute_dtype: torch.dtype,
        memory_limit: int | None = None,
        data_parallel: bool = False,
    ) -> None:
        parts = find_parts(root, options.blocks)
        # Validated when built; what "auto" leaves to the device and model is decided here unless it already is.
        self.options = options = options.resolve(
            device=device, resident_params=sum(p.numel() for _, p in parts.resident), gpu_memory=memory_limit
        )
        self.offload = options.on_disk
        masters_on_disk = "masters" in self.offload
        window, offload_dir, offload_activations = options.window, options.offload_dir, options.offload_activations
        resident_on_device, host_weights = options.resident_on_device, options.tuning.host_weights
        grad_buffers, parked_grads, nonfinite = options.tuning.grad_buffers, options.tuning.parked_now, options.nonfinite
        self.root = root
        self.device = torch.device(device)
        # Data-parallel ranks (torch.distributed initialized by the strategy with several processes): each owns a
        # shard of every unit. Created first and on every rank alike (it may create a process group).
        self.shards = Shards(data_parallel)
        if self.shards.active and masters_on_disk:
            raise ValueError(
                "the fp32 masters on disk are not supported with several devices yet; use offload='optimizer' "
                "(the Adam moments, 8 of the 12 bytes per parameter) or one device"
            )
        if self.shards.active and offload_dir is not None:
            offload_dir = str(Path(offload_dir) / f"rank{self.shards.rank}")  # each rank its own files
        cast = self.device.type == "cuda" and compute_dtype != MASTER_DTYPE
        depth = min(window, len(parts.blocks))
        self.grad_buffers = grads_in_flight(depth, grad_buffers)
        # The planner's fixed device buffers (lightning_slide/engine/plan.py): what the lines below allocate.
        self.device_plan = device_bytes(
            ModelShape.of(root, parts.blocks_path),
            Settings.of(options, compute_dtype=compute_dtype, device=self.device.type, ranks=self.shards.world),
        )
        if memory_limit is not None:
            check_device(self.device_plan, memory_limit, window)
            if self.device.type == "cuda":
                total = torch.cuda.get_device_properties(self.device).total_memory
                if memory_limit > total:
                    raise ValueError(
                        f"gpu_memory_limit is {memory_limit / 2**30:.2f} GiB but {self.device} has "
                        f"{total / 2**30:.2f} GiB; lower it or leave it unset"
                    )
        _check_unshared(parts)
        self.compute_dtype = compute_dtype
        self.blocks_path = parts.blocks_path
        self.streams = Streams(self.device)
        self.pin = self.streams.cuda
        # With the masters on disk the compute copy is kept whatever the compute dtype (it is all the host has).
        compute_copy = host_weights == "compute" and (compute_dtype != MASTER_DTYPE or masters_on_disk)
        self.host_weights = host_weights
        self.offload_dir = offload_dir
        self.state_store: StateStore | None = None
        if offload_dir is not None:
            # Updates streamed out of a backward: at most grad_buffers layers (the gradient buffers lent) and the
            # resident parts are outstanding, and they are reordered when the backward ends: every read fits.
            self.state_store = StateStore(offload_dir, in_flight=self.grad_buffers + 1)
            if masters_on_disk:
                for i in range(len(parts.blocks)):
                    self.state_store.add(i, MASTER, sum(p.numel() for _, p in parts.block_parameters(i)))
            try:
                self._check_disk_space(parts, masters_on_disk)
            except BaseException:
                self.state_store.close()  # unlock offload_dir now, not when the failed engine is collected
                raise
        # The ranks of one host keep one copy of the sharded units' masters, in shared memory (shared_masters.py).
        sizes = [sum(p.numel() for _, p in parts.block_parameters(i)) for i in range(len(parts.blocks))]
        sizes.append(0 if resident_on_device else sum(p.numel() for _, p in parts.resident))  # replicated: its own
        shared = None if masters_on_disk else shared_masters(self.shards, sum(sizes), pin=self.pin)
        self._masters_shared = shared is not None
        masters = [None] * len(sizes) if shared is None else list(shared.split(sizes))
        # Frozen layer parameters (a LoRA run's base weights) need no fp32 master: kept in the compute dtype only
        # where that is simple (plan.frozen_in_compute_dtype); the resident parts keep theirs.
        frozen_apart = frozen_in_compute_dtype(compute_dtype, self.shards.world, masters_on_disk)
        self.layers = [
            HostUnit(
                f"layer {i}", parts.block_parameters(i), pin=self.pin, own_grad=False,
                weights_dtype=compute_dtype if compute_copy else None,
                master_path=self.state_store.path(i, MASTER) if masters_on_disk else None,
                span=self._span(parts.block_parameters(i)), master=masters[i],
                frozen_dtype=compute_dtype if frozen_apart else None,
            )
            for i in range(len(parts.blocks))
        ]
        if masters_on_disk:
            for i in range(len(self.layers)):
                self.state_store.mark_written(i, MASTER)
        # Updated on the device, the resident parts are replicated (every rank updates all of them alike).
        # Their host gradient accumulator is allocated when first needed (_resident_accumulator): updated on the
        # device they accumulate there, and a streamed step's host update reads them from the device in chunks.
        self.resident = HostUnit(
            RESIDENT, parts.resident, pin=self.pin, own_grad=False,
            span=None if resident_on_device else self._span(parts.resident),
            master=masters[-1] if sizes[-1] else None,
        )
        if shared is not None:
            self.shards.host_barrier()  # every rank's part of the shared masters is written
        # A streamed step's resident gradients left on the device for the update: (event after which they are ready,)
        self._resident_from_device: tuple[object] | None = None
        self._chunk_buffer: torch.Tensor | None = None  # host fp32, two chunks of resident gradients
        self._chunk_staging: torch.Tensor | None = None  # device fp32, the update thread's own cast staging
        self._chunk_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # Whether the masters outside this rank's shards hold the other ranks' latest updates (see _sync_masters).
        self._masters_current = True
        self._unit_key = {id(e.param): key for key, unit in self._units().items() for e in unit.entries}
        self._optimized: set[int] = set()  # parameters some rank's optimizer steps (attach_optimizer)

        largest = max(u.numel for u in [self.resident, *self.layers])
        staging = min(largest, _STAGING_NUMEL)
        self.upload_staging = torch.empty(staging, dtype=MASTER_DTYPE, device=self.device) if cast else None
        self.download_staging = torch.empty(staging, dtype=MASTER_DTYPE, device=self.device) if cast else None
        self._host_staging: dict[Any, torch.Tensor] = {}  # pinned fp32, for gradients added into an accumulator
        self.grad_pool = GradientPool(max(u.grad_numel for u in self.layers), pin=self.pin)
        self._lent: collections.deque = collections.deque()  # layers holding a pool buffer, oldest first
        # Device buffers for parked gradients, each with the event after which it may be written again, and the
        # parked layers: index -> (buffer, event after the gradients landed there, the step's hyperparameters).
        self._park_free: list[tuple[torch.Tensor, object]] = []
        # Parked layers, in the order they were parked: index -> (buffer, event after the gradients landed there,
        # the arguments of its update: None until the step gives them, for a step that waits for the backward).
        self._parked: dict[int, tuple[torch.Tensor, object, tuple | None]] = {}
        self._unpark_stream = self._unpark_staging = None
        self.parked_total = 0  # layers whose gradients were parked, since construction
        self.streamed_steps = 0  # optimizer steps whose updates streamed out of their backward, since construction
        self.add_parking(parked_grads)

        self.activations = ActivationOffload(self.device, self.streams) if offload_activations else None
        self.worker = UpdateWorker()
        self.window = Window(
            self.layers, depth, self.device, compute_dtype, self.streams,
            self.upload_staging, before_load=self._before_load,
            # Prefetching only what is already updated depends on timing; with several ranks every rank must issue
            # the same all-gathers in the same order, so each load waits for its update instead.
            may_load=self._updated if not self.shards.active else (lambda index: True),
            shards=self.shards,
        )
        shard_resident = self.shards.active and not resident_on_device
        self.resident_weights = torch.empty(
            self.shards.padded(self.resident.numel) if shard_resident else self.resident.numel,
            dtype=compute_dtype, device=self.device,
        )
        self.resident_grads = torch.zeros(
            self.shards.padded(self.resident.numel) if shard_resident else self.resident.trainable_numel,
            dtype=compute_dtype, device=self.device,
        )
        self._resident_loaded = False
        self.resident_on_device = resident_on_device
        self._resident_master: torch.Tensor | None = None  # fp32, on the device, when updated there
        self._resident_grad: torch.Tensor | None = None
        self._resident_deferred: tuple | None = None  # a device update waiting for the clipping coefficient
        self._optimizers: dict[Any, UnitOptimizer] = {}
        # The disk tier's arrays of the last unit read outside an update (a checkpoint goes parameter by parameter).
        self._state_cache = OneUnitCache(
            load=lambda key: self.state_store.load(key, self._optimizers[key].state_names),
            store=lambda key, state: self.state_store.put(key, state),
        )
        self._master_cache = OneUnitCache(
            load=lambda key: self.state_store.load(key, (MASTER,))[MASTER], store=functools.partial(state.store_master, self)
        )
        self._clip_norm: float | None = None
        self._clip_value: float | None = None
        self.nonfinite = nonfinite
        self.skipped_steps = 0  # optimizer steps skipped for a NaN/Inf loss or gradient
        self._skip_step = False
        # Whether each unit's gradients of the current optimizer step are all finite (layers, then the resident
        # parts): folded on the device as each micro-batch's gradients are produced, copied to the host behind them
        # on the download stream, read on the host before the unit's update.
        self._finite = torch.ones(len(self.layers) + 1, dtype=torch.bool, device=self.device)
        self._finite_host = torch.ones(len(self.layers) + 1, dtype=torch.bool, pin_memory=self.pin)
        # For clipping by norm: each unit's gradient norm, taken on the device as its gradients of a step's only
        # micro-batch leave it (this rank's shard) and copied down behind them, so that the host's norm task reads
        # one number per unit instead of every gradient; ``_norm_down[i]``: unit i's norm of this step is there.
        self._norms_host = torch.zeros(len(self.layers) + 1, dtype=MASTER_DTYPE, pin_memory=self.pin)
        self._norm_down = [False] * (len(self.layers) + 1)
        self._clipping = False  # the current backward's step clips gradients (begin_backward)
        self._holding = False  # the current backward's step waits for its end to update (begin_backward)
        self._step_index = 0  # the global step of the current backward, for messages

        self._closed = False
        self._step_open = False  # some updates of an optimizer step are queued, not all of them yet
        self._backward = False
        self._streaming: list[dict] | None = None  # hyperparameters while updates stream out of this backward
        self._stream_clip: float | None = None  # the value its updates clamp gradients to (clipping by value)
        self._streamed: tuple[float | None] | None = None  # the last backward streamed: (its clip value,)
        self._pending: dict[int, int] = {}  # layer -> parameter gradients still to land in this backward
        self._wrapped: list[nn.Module] = []
        self._model_checkpointing: list[nn.Module] = []  # modules whose own checkpointing the engine turned off
        self._shown: list[tuple[nn.Parameter, torch.Tensor]] = []  # gradients shown to user code (show_grads)
        self._hooks: list = []
        # The cap is process-wide in torch: set here, where a failing construction still restores it (_release).
        self._fraction_before: float | None = None
        if memory_limit is not None and self.device.type == "cuda":
            self._fraction_before = memory_fraction(self.device)
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(memory_limit / total, self.device)
        try:
            # Buffers and other non-parameter state (e.g. torchmetrics states) go to the device; parameters stay.
            root._apply(lambda t: t if isinstance(t, nn.Parameter) else t.to(self.device))
            self.prepare_forward()
        except BaseException:
            self.close(drain=False)
            raise
        self._wrapped = list(parts.blocks)
        # The model's own activation checkpointing (Hugging Face's gradient_checkpointing_enable) on the decoder
        # layers would recompute each layer a second time inside the engine's recompute: off while the engine runs.
        self._model_checkpointing = [m for block in parts.blocks for m in block.modules()
                                     if getattr(m, "gradient_checkpointing", False) is True]
        for module in self._model_checkpointing:
            module.gradient_checkpointing = False
        for index, block in enumerate(parts.blocks):
            block.forward = functools.partial(self._forward_layer, index, block.forward)
        self._hooks = [
            entry.param.register_post_accumulate_grad_hook(functools.partial(self._on_grad, index))
            for index, unit in enumerate(self.layers)
            for entry in unit.trainable
        ]
        # Any forward that touches a resident part (the embedding first) brings the resident copy up to date, also
        # when user code calls the model outside a step (a callback that generates, say).
        resident = {id(e.param) for e in self.resident.entries}
        self._hooks += [
            module.register_forward_pre_hook(lambda *_: self.prepare_forward())
            for module in root.modules()
            if any(id(p) in resident for p in module.parameters(recurse=False))
        ]

    @property
    def depth(self) -> int:
        return self.window.depth

    @property
    def model_checkpointing_off(self) -> int:
        """How many modules' own activation checkpointing the engine turned off while it runs."""
        return len(self._model_checkpointing)

    def _span(self, params) -> tuple[int, int]:
        """This rank's ``(start, stop)`` of a unit made of ``params``."""
        span = self.shards.span(sum(p.numel() for _, p in params))
        return span.start, span.stop

    def _check_disk_space(self, parts, masters_on_disk: bool) -> None:
        """Before anything is written: the masters' files, and the optimizer state at 8 bytes per trainable
        parameter (Adam's two moments; ``attach_optimizer`` checks again with the optimizer's exact needs)."""
        needed, what = 0, []
        if masters_on_disk:
            masters = 4 * sum(self.state_store.layout[i][MASTER] for i in range(len(parts.blocks)))
            needed += masters - existing_bytes(self.state_store.paths())
            what.append(f"fp32 masters {human(masters)}")
        if "optimizer" in self.offload:
            params = [*parts.resident, *(np for i in range(len(parts.blocks)) for np in parts.block_parameters(i))]
            trainable = sum(p.numel() for _, p in params if p.requires_grad)
            moments = 8 * trainable
            needed += moments
            what.append(f"optimizer state about {human(moments)}")
        check_disk_space(self.offload_dir, needed, what=" + ".join(what))

    def _units(self) -> dict[Any, HostUnit]:
        """Every unit by key, in the order the next forward needs them."""
        return {RESIDENT: self.resident, **dict(enumerate(self.layers))}

    # ---------------------------------------------------------------- optimizer
    def attach_optimizer(self, optimizer: Optimizer) -> None:
        """Rebuild ``optimizer`` over the host masters, one fused optimizer per unit."""
        check_optimizer(optimizer)
        group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        known = {id(e.param) for u in self._units().values() for e in u.entries}
        if any(pid not in known for pid in group_of):
            raise ValueError("the optimizer holds tensors that are not parameters of the LightningModule")
        units = self._units()
        # Optimized by some rank (each rank optimizes only its shards' pieces of them).
        self._optimized = set(group_of) & {id(e.param) for unit in units.values() for e in unit.trainable}
        on_device = self.resident_on_device and self.resident.trainable_numel > 0
        on_disk = [key for key, unit in units.items() if unit.grad_numel and not (key == RESIDENT and on_device)]
        if "optimizer" not in self.offload:
            on_disk = []
        if on_disk:
            names = state_names(optimizer)
            for key in on_disk:
                for name in names:
                    self.state_store.add(key, name, units[key].grad_numel)
            paths = [self.state_store.path(key, name) for key in on_disk for name in names]
            moments = 4 * len(names) * sum(units[key].grad_numel for key in on_disk)
            check_disk_space(self.offload_dir, moments - existing_bytes(paths), what=f"optimizer state {human(moments)}")
        self._optimizers = {}
        for key, unit in units.items():
            if key == RESIDENT and on_device:
                self.worker.wait(RESIDENT)
                self._resident_master = self.resident.master.to(self.device, copy=True)
                self._resident_grad = torch.zeros(unit.trainable_numel, dtype=MASTER_DTYPE, device=self.device)
                self._optimizers[key] = UnitOptimizer(
                    unit, optimizer, group_of, master=self._resident_master, grad=self._resident_grad
                )
            else:
                in_memory = key not in on_disk
                chunk = self._resident_chunk() if key == RESIDENT else None
                self._optimizers[key] = UnitOptimizer(
                    unit, optimizer, group_of, state_in_memory=in_memory, chunk=chunk
                )

    def _resident_updates_on_device(self) -> bool:
        return self._resident_master is not None

    def clip_grad_norm(self, max_norm: float) -> None:
        """Clip the global gradient norm to ``max_norm`` at the next step (exactly as ``clip_grad_norm_``)."""
        self._clip_norm = float(max_norm)

    def clip_grad_value(self, clip_value: float) -> None:
        """Clamp every gradient element to ``[-clip_value, clip_value]`` at the next step."""
        self._clip_value = float(clip_value)

    def zero_grad(self) -> None:
        """Start a new accumulation: the next micro-batch's gradients overwrite the host accumulators.

        A unit whose update is still queued is left alone: that update empties it when it has consumed it.
        """
        self.hide_grads()
        for key, unit in self._units().items():
            if self.worker.done(key):
                unit.grad_empty = True
                self._give_back(unit)
        for index in [i for i, (_, _, update) in self._parked.items() if update is None]:  # their step was skipped
            buffer, parked, _ = self._parked.pop(index)
            self._park_free.append((buffer, parked))

    def skip_step(self) -> None:
        """Skip the current optimizer step: its gradients are dropped when ``step`` comes (a NaN/Inf loss)."""
        self._skip_step = True

    def step(self, param_groups: list[dict]) -> None:
        """Queue the host update of every unit not already updated by this step's backward."""
        self.hide_grads()
        clip_norm, clip_value = self._clip_norm, self._clip_value
        self._clip_norm = self._clip_value = None
        # Slots hold copies of the weights being updated: drop them (the next forward reloads from the masters).
        self.window.clear()
        self._resident_loaded = False
        if self._skip_step:
            self._skip_step = False
            self.skipped_steps += 1
            self.zero_grad()
            return
        if self._streamed is not None:
            (streamed_clip,), self._streamed = self._streamed, None
            if clip_norm is not None or clip_value != streamed_clip:
                raise RuntimeError(
                    "gradients were clipped after the updates had started"
                    + ("" if streamed_clip is None else f" with clip value {streamed_clip}")
                    + ". slideformer clips exactly when it knows before backward how clipping will happen: set "
                    "Trainer(gradient_clip_val=..., gradient_clip_algorithm=...), and leave "
                    "configure_gradient_clipping to Lightning or clip in it the same way at every step."
                )
            return
        hyper = hyperparameters(param_groups)
        # Decided here, on the training thread: a unit takes part if gradients reached it since the last step.
        keys = [key for key, unit in self._units().items() if not unit.grad_empty or key in self._parked]
        coefficient: dict[str, torch.Tensor | None] = {}
        # Skipping a step needs every unit's flag before any update (the clipping norm sees NaN/Inf by itself).
        check = clip_norm is None and self.nonfinite == "skip"
        if check:
            self.worker.submit("norm", functools.partial(
                self._for_updates, coefficient, functools.partial(self._check_finite, list(keys), coefficient)
            ))
        on_device = self._resident_updates_on_device() and RESIDENT in keys
        if on_device:
            keys.remove(RESIDENT)
        if clip_norm is not None:
            units = [self._units()[key] for key in keys]
            device_norms = self._device_norms() if on_device else None
            self.worker.submit(
                "norm", functools.partial(self._for_updates, coefficient, functools.partial(
                    self._clip_coefficient, clip_norm, units, device_norms, coefficient
                ))
            )
        if on_device:
            if clip_norm is None and not check:
                self._update_resident_on_device(hyper, None, clip_value)
            else:  # needs the global norm: done before the next forward (prepare_forward)
                self._resident_deferred = (hyper, coefficient, clip_value)
        for key in keys:
            if key in self._parked:  # queued when it goes down (_unpark), first layer first as host buffers free
                buffer, parked, _ = self._parked[key]
                self._parked[key] = (buffer, parked, (hyper, coefficient, clip_value))
            else:
                self._submit_update(key, hyper, coefficient, clip_value)
        self._step_open = bool(self._parked)
        self._unpark_ready()

    def _device_norms(self):
        """Per-parameter gradient norms of the device-updated resident parts, on their way to the host."""
        norms = torch.stack([torch.linalg.vector_norm(g) for g in self._optimizers[RESIDENT].bind()])
        host = torch.empty(norms.shape, dtype=norms.dtype, pin_memory=self.pin)
        host.copy_(norms, non_blocking=True)
        return host, self.streams.record()

    def _update_resident_on_device(self, hyper, coefficient, clip_value) -> None:
        """Update the resident parts on the compute device and refresh their compute copy there."""
        if self.nonfinite == "error":
            # Waits for the flag, i.e. the end of backward on the device (the resident gradients come last); the
            # next forward waits about as long for layer 0's update anyway.
            self._raise_if_nonfinite(RESIDENT)
        if coefficient is not None:
            coefficient = coefficient.to(self.device)
        self._optimizers[RESIDENT].step(hyper, coefficient, clip_value)
        self.resident.grad_empty = True
        self.resident_weights.copy_(self._resident_master)

    def _submit_update(self, key, hyper: list[dict], coefficient: dict | None = None, clip_value=None,
                       ready=None) -> None:
        """Queue unit ``key``'s update. ``ready``: the event its gradients wait for, given for a streamed step's
        updates, which the host may then run in the order their gradients arrive (``UpdateWorker.submit``)."""
        optimizer = self._optimizers.get(key)
        if optimizer is not None:
            self._step_open = True
            self._masters_current = not self.shards.active
            # `coefficient` is filled in by the norm task queued before: pass the same dict, even while empty.
            coefficient = {} if coefficient is None else coefficient
            if self.state_store is not None:
                self.worker.wait(key)  # its previous update has handed its files to the writer: read after that
            state = self._read_state(key, optimizer)  # the disk tier starts reading ahead now
            if state is not None:
                # The disk tier reads ahead in queue order, a bounded number of units: an update run out of that
                # order could wait for a read that waits for the updates passed over. Keep the order.
                ready = None
            self.worker.submit(key, functools.partial(self._update, optimizer, hyper, coefficient, clip_value, state),
                               ready)

    def _read_state(self, key, optimizer: UnitOptimizer):
        """Start reading ``key``'s arrays on disk (moments, masters) for its update; ``None`` if none are."""
        if optimizer.inner is None or self.state_store is None or not self.state_store.holds(key):
            return None
        self._state_cache.flush()  # a checkpoint's changes first; the update then reads the files
        self._master_cache.flush()
        return self.state_store.read(key)

    def _clip_coefficient(self, max_norm: float, units: list[HostUnit], device_norms, out: dict) -> None:
        """Worker task: the clipping coefficient of ``clip_grad_norm_`` over every optimized gradient of ``units``
        and the per-parameter norms ``device_norms`` (``(host tensor, event)``) of gradients kept on the device."""
        norms = []
        for unit in units:
            self.worker.await_device(unit.grad_event)
            key = self._key_of(unit)
            optimizer = self._optimizers[key]
            index = -1 if key == RESIDENT else key
            if self._norm_down[index] and optimizer.steps_whole_gradient:
                norms.append(self._norms_host[index].clone())  # taken on the device
            else:
                norms.extend(torch.linalg.vector_norm(g) for g in optimizer.bind())
        if device_norms is not None and self.shards.rank == 0:  # replicated on every rank: counted once
            self.worker.await_device(device_norms[1])
            norms.extend(device_norms[0].unbind())
        if self.shards.active:  # the norm over every rank's shards (each rank takes part, even with none)
            squares = torch.stack(norms).square().sum() if norms else torch.zeros(())
            self.shards.host_sum(squares)
            norms = [squares.sqrt()]
        if norms:
            total = torch.linalg.vector_norm(torch.stack(norms))
            if not torch.isfinite(total):
                if self.nonfinite == "skip":
                    out["skip"] = True
                    self.skipped_steps += 1
                else:
                    out["error"] = FloatingPointError(
                        f"the global gradient norm is {total.item()}: a NaN/Inf gradient. Lower the learning rate, "
                        "check the data, or pass SlideFormerStrategy(nonfinite='skip') to skip such steps"
                    )
                return
            out["value"] = torch.clamp(max_norm / (total + 1e-6), max=1.0)

    @staticmethod
    def _for_updates(out: dict, task) -> None:
        """Worker task: run ``task``, which fills ``out`` for the updates queued after it; should it fail, they fail
        with its error rather than run unclipped or unchecked."""
        try:
            task()
        except BaseException as error:
            out["error"] = error
            raise

    def _check_finite(self, keys: list, out: dict) -> None:
        """Worker task (``nonfinite="skip"`` without norm clipping): the step is skipped (``out["skip"]``) when a
        gradient of a unit in ``keys`` is NaN/Inf."""
        units = self._units()
        for key in keys:
            self.worker.await_device(units[key].grad_event)
        if not all(self._finite_host[-1 if key == RESIDENT else key] for key in keys):
            out["skip"] = True
            self.skipped_steps += 1

    def _check_finite_on_device(self, key, device_grads: torch.Tensor, first: bool):
        """Fold whether one micro-batch's ``device_grads`` of unit ``key`` are all finite into the unit's flag for
        this optimizer step (``first``: the step's first micro-batch), on the device, and copy the flag to the host
        on the download stream, without a host sync; returns the event after which the host copy is there."""
        index = -1 if key == RESIDENT else key
        low, high = torch.aminmax(device_grads)  # one pass, no gradient-sized temporary; NaN propagates
        finite = torch.isfinite(low) & torch.isfinite(high)
        if first:
            self._finite[index].copy_(finite)
        else:
            self._finite[index].logical_and_(finite)
        produced = self.streams.record()
        with self.streams.on(self.streams.download):
            self.streams.wait(produced)
            # Every rank must skip or stop alike: the flag becomes the AND over ranks.
            self.shards.all_true(self._finite.narrow(0, index % len(self._finite), 1))
            self._finite_host[index].copy_(self._finite[index], non_blocking=True)
            return self.streams.record()

    def _raise_if_nonfinite(self, key) -> None:
        """Raise ``FloatingPointError`` when unit ``key``'s gradients of this step hold a NaN/Inf (after waiting for
        its flag to reach the host)."""
        unit = self._units()[key]
        self.worker.await_device(unit.grad_event)
        if not self._finite_host[-1 if key == RESIDENT else key]:
            raise FloatingPointError(
                f"{unit.name} has NaN/Inf gradients at global step {self._step_index}. Lower the learning rate, check "
                "the data, or pass SlideFormerStrategy(nonfinite='skip') to skip such steps"
            )

    def _key_of(self, unit: HostUnit):
        return RESIDENT if unit is self.resident else self.layers.index(unit)

    def _update(self, optimizer: UnitOptimizer, hyper, coefficient: dict, clip_value, reading=None) -> None:
        """Worker task: one unit's update from its accumulated gradients, which it then marks consumed.
        ``reading``: the disk tier's read of the unit's optimizer state (written back after the update)."""
        unit = optimizer.unit
        state = None if reading is None else reading.result()
        try:
            if "error" in coefficient:
                raise coefficient["error"]
            self.worker.await_device(unit.grad_event)
            if not coefficient.get("skip"):
                self._raise_if_nonfinite(self._key_of(unit))
                if unit is self.resident and self._resident_from_device is not None:
                    self._step_resident_in_chunks(optimizer, hyper, clip_value, state)
                else:
                    optimizer.step(hyper, coefficient.get("value"), clip_value, state)
                # before the next upload of the unit, which waits for this task
                unit.refresh_weights(None if state is None else state.get(MASTER))
        except BaseException:
            if state is not None:
                self.state_store.release(self._key_of(unit), state)
            raise
        if state is not None:
            self.state_store.write(self._key_of(unit), state)
        unit.grad_empty = True
        self._give_back(unit)

    # The resident parts (embeddings, head: often larger than a layer) of a streamed step are updated on the host
    # chunk by chunk, their gradients read from the device through two half-layer buffers (one chunk goes down while
    # the one before is updated) instead of a host accumulator as large as they are. Tests may set RESIDENT_CHUNK
    # (elements) to cut smaller chunks.
    RESIDENT_CHUNK: int | None = None

    def _resident_chunk(self) -> int:
        """Elements of resident gradients per chunk: half a layer's gradient buffer."""
        return self.RESIDENT_CHUNK or max(1, self.grad_pool.numel // 2)

    def _resident_accumulator(self) -> torch.Tensor:
        """The resident parts' host gradient accumulator (accumulation, clipping, ``nonfinite="skip"``), kept once
        allocated."""
        if self.resident.grad is None:
            self.resident.grad = host_empty(self.resident.grad_numel, MASTER_DTYPE, pin=self.pin)
        return self.resident.grad

    def _step_resident_in_chunks(self, optimizer: UnitOptimizer, hyper, clip_value, state) -> None:
        """Worker task part: update the resident parts chunk by chunk from their gradients on the device (this
        rank's shard, already averaged), each chunk cast to fp32 on the device and copied down on the update
        thread's own stream, through its own staging, into the half of ``_chunk_buffer`` the previous chunk's update
        is not reading."""
        unit, chunk = self.resident, self._resident_chunk()
        (ready,), self._resident_from_device = self._resident_from_device, None
        spans = [(lo, min(lo + chunk, unit.grad_stop)) for lo in range(unit.grad_start, unit.grad_stop, chunk)]

        def fetch(number: int):
            lo, hi = spans[number]
            half = (number % 2) * chunk
            buffer = self._chunk_buffer[half : half + hi - lo]
            with self.streams.on(self._chunk_stream):
                self.streams.wait(ready)
                copy_cast(buffer, self.resident_grads[lo:hi], self._chunk_staging)
                return buffer, self.streams.record()

        coming = fetch(0)
        for number, (lo, hi) in enumerate(spans):
            buffer, copied = coming
            if number + 1 < len(spans):
                coming = fetch(number + 1)  # into the other half: the update that read it last has returned
            self.worker.await_device(copied)
            optimizer.step(hyper, None, clip_value, state, only=(lo, hi, buffer))

    def _give_back(self, unit: HostUnit) -> None:
        """Return a layer's lent gradient buffer to the pool (the resident parts own theirs)."""
        if unit is not self.resident and unit.grad is not None:
            buffer, unit.grad = unit.grad, None
            self.grad_pool.give(buffer)

    def _lend(self, index: int, bounded: bool | None = None) -> torch.Tensor:
        """A gradient buffer for layer ``index``; while updates stream (or ``bounded``), first wait until few enough
        are lent."""
        bounded = self._streaming is not None if bounded is None else bounded
        if bounded:
            self._wait_for_room()
        else:
            self._pool_has_room()  # forgets the layers that gave theirs back
        self._lent.append(index)
        return self.grad_pool.take()[: self.layers[index].grad_numel]

    def _wait_for_room(self) -> None:
        """Block until a layer could borrow a gradient buffer within the streaming bound: until one of the layers
        holding one (whichever first) has given it back."""
        while not self._pool_has_room():
            oldest = self._lent[0]
            if not self.worker.wait(oldest, timeout=_UNPARK_POLL_SECONDS) or self._returned(oldest):
                continue
            # done but still holding it: a step waiting for the backward has not queued its update yet
            self._lent.popleft()
            return

    def _pool_has_room(self) -> bool:
        """Whether a layer could borrow a gradient buffer now, within the streaming bound, without waiting."""
        for index in [index for index in self._lent if self._returned(index)]:
            self._lent.remove(index)
            self.worker.wait(index)  # done: returns at once (re-raises its failure)
        return len(self._lent) < self.grad_buffers

    def _returned(self, index: int) -> bool:
        """Whether layer ``index`` has given its lent buffer back: its update is done (in a step that waits for the
        backward, a layer holds its buffer before its update is queued)."""
        return self.worker.done(index) and self.layers[index].grad is None

    # ---------------------------------------------------------------- parked gradients (parked_grads)
    def _updated(self, index: int) -> bool:
        """Whether layer ``index``'s masters are current: no update queued or running, no gradients parked."""
        return index not in self._parked and self.worker.done(index)

    def _before_load(self, index: int) -> None:
        if index in self._unparkable():  # (not gradients parked for a step still to come: the masters are current)
            self._unpark(index)
        self._wait_update(index)

    def _wait_update(self, key) -> None:
        """Wait for unit ``key``'s update, sending parked gradients down meanwhile as host buffers come back: the
        update thread would otherwise run out of gradients to update while this thread waits."""
        with record_function(f"slide.wait update {key}"):
            while self._unparkable() and not self.worker.wait(key, timeout=_UNPARK_POLL_SECONDS):
                self._unpark_ready()
            self.worker.wait(key)

    def add_parking(self, count: int) -> None:
        """Let ``count`` more layers' gradients park on the device (``parked_grads``; allocated now)."""
        check_count("parked_grads", count, minimum=0)
        if count and self._unpark_stream is None and self.device.type == "cuda":
            # Parked gradients go down on their own stream (and staging): the download stream runs as far behind
            # the training thread as the backward's flags and parks issued on it, which would hold back gradients
            # that are already complete.
            self._unpark_stream = torch.cuda.Stream(self.device)
            if self.download_staging is not None:
                self._unpark_staging = torch.empty_like(self.download_staging)
        self._park_free += [(torch.empty(self.grad_pool.numel, dtype=self.compute_dtype, device=self.device), None)
                            for _ in range(count)]

    def _parks(self, unit: HostUnit, key) -> bool:
        """Whether the first micro-batch's gradients of layer ``key``, about to go down, park on the device instead.
        While updates stream: when no host buffer is free, or layers parked earlier wait (they go first). In a
        step whose updates wait for the end of backward (clipping, ``nonfinite="skip"``): while a parking buffer
        is free — the host then holds only the other layers' gradients until the step."""
        if unit.grad is not None or unit is self.resident:
            return False
        if self._streaming is not None:
            return bool(self._park_free or self._parked) and bool(self._parked or not self._pool_has_room())
        optimizer = self._optimizers.get(key)
        # clipping by norm reads a parked layer's norm taken on the device: it must cover all it optimizes
        return (self._holding and bool(self._park_free) and optimizer is not None
                and (not self._clipping or optimizer.steps_whole_gradient))

    def _park(self, index: int, device_grads: torch.Tensor) -> object:
        """On the download stream: copy layer ``index``'s gradients into a free parking buffer; returns the event
        after which ``device_grads`` may be overwritten. Its update waits for ``_unpark``."""
        buffer, free = self._park_free.pop()
        self.streams.wait(free)  # its previous contents went down
        buffer[: device_grads.numel()].copy_(device_grads)
        parked = self.streams.record()
        streamed = None if self._streaming is None else (self._streaming, None, self._stream_clip)
        self._parked[index] = (buffer, parked, streamed)
        self.layers[index].grad_event = parked  # its flags (and norm) went down before it
        self.parked_total += 1
        return parked

    def _unpark(self, index: int) -> None:
        """Send layer ``index``'s parked gradients down into a host buffer (waiting for one) and queue its update."""
        buffer, parked, update = self._parked.pop(index)
        unit = self.layers[index]
        unit.grad = self._lend(index, bounded=True)
        with self.streams.on(self._unpark_stream):
            self.streams.wait(parked)
            copy_cast(unit.grad, buffer[: unit.grad_numel], self._unpark_staging)
            unit.grad_empty = False
            unit.grad_event = self.streams.record()
        self._park_free.append((buffer, unit.grad_event))
        self._submit_update(index, *update, ready=unit.grad_event)
        if self._streaming is None:  # after the backward: the next forward's order, this update among the first
            self._prefer_forward_order()
            self._step_open = bool(self._parked)  # the step's updates are all queued once none is parked

    def _unpark_ready(self) -> None:
        """Send parked gradients down while host buffers are free (never waits), in the order ``_next_unpark``
        gives."""
        while self._unparkable() and self._pool_has_room():
            self._unpark(self._next_unpark())

    def _unparkable(self) -> list[int]:
        """The parked layers whose update may be queued (a step waiting for the backward gives that at ``step``)."""
        return [index for index, (_, _, update) in self._parked.items() if update is not None]

    def _next_unpark(self) -> int:
        """The parked layer to send down next: of the layers whose gradients have landed in their parking buffer,
        the lowest — the host can start on it at once, and the next forward needs it soonest, so the layers left
        for the end reach up to the last and the host still has updates to run while that forward ends. If none
        has landed: during the backward the oldest (the first to land), after it the first layer."""
        waiting = self._unparkable()
        landed = [index for index in waiting if self._parked[index][1] is None or self._parked[index][1].query()]
        if landed:
            return min(landed)
        return min(waiting) if self._streaming is None else waiting[0]

    # ---------------------------------------------------------------- what user code between steps sees
    def show_grads(self) -> None:
        """Show this optimizer step's gradients so far as plain training does after a backward: every trainable
        parameter points at its fp32 master and its ``.grad`` at its fp32 gradient (host; the device for resident
        parts updated there), for user hooks between backward and step. In-place changes, new tensors and
        ``None`` given to ``.grad`` are what the step then uses (``hide_grads``). Needs a backward begun with
        ``observed=True``; one rank only (with several, each rank holds a shard of each gradient)."""
        if self.shards.active:
            return
        self.hide_grads()
        self.window.clear()
        for key in list(self._host_staging):  # later micro-batches are added in by the update thread
            self.worker.wait(("add", key))
        units = [u for u in self._units().values() if u.trainable and not u.grad_empty]
        for unit in units:
            if unit is self.resident and self._resident_updates_on_device():
                master, grad = self._resident_master, self._resident_grad
            else:
                self.worker.await_device(unit.grad_event)
                master, grad = unit.rest, unit.grad
            for entry in unit.trainable:
                view = entry.view(grad)
                entry.param.data = entry.view(master)
                entry.param.grad = view
                self._shown.append((entry.param, view))
            if unit is self.resident:
                self._resident_loaded = False  # the next forward points the parameters at the compute copy again

    def hide_grads(self) -> None:
        """Take back the gradients ``show_grads`` gave, keeping what user code did to them."""
        if not self._shown:
            return
        for param, view in self._shown:
            if param.grad is None:
                view.zero_()
            elif param.grad is not view:
                view.copy_(param.grad)
            param.grad = None
        self._shown = []
        self._norm_down = [False] * len(self._norm_down)  # the norms taken on the device may be stale: the host's

    def finish_updates(self) -> None:
        """Finish every queued update and point every parameter at its fp32 master: the module then holds the
        weights of the last optimizer step, as plain training's does between steps. Costs the overlap of those
        updates with the next forward. With several ranks a collective (every rank calls it)."""
        self.hide_grads()
        self._sync_masters()
        self.window.clear()
        self.resident.park()
        self._resident_loaded = False

    # ---------------------------------------------------------------- forward
    def prepare_forward(self) -> None:
        """Make the resident parts' compute copy current; call before every forward."""
        self.hide_grads()  # before the window moves a layer, which drops its parameters' .grad
        self._apply_deferred_resident_update()
        if self._resident_loaded:
            return
        if self._resident_updates_on_device():  # its compute copy is refreshed by each update, on the device
            for entry in self.resident.entries:
                entry.param.data = entry.view(self.resident_weights)
            self._resident_loaded = True
            return
        self._wait_update(RESIDENT)
        in_use = self.streams.record()  # whatever compute still reads the old copy
        with self.streams.on(self.streams.upload):
            self.streams.wait(in_use)
            owned = slice(self.resident.start, self.resident.stop)
            copy_cast(self.resident_weights[owned], self.resident.master[owned], self.upload_staging)
            self.shards.gather(self.resident_weights, self.resident.numel)
            ready = self.streams.record()
        self.streams.wait(ready)
        for entry in self.resident.entries:
            entry.param.data = entry.view(self.resident_weights)
        self._resident_loaded = True

    def _apply_deferred_resident_update(self) -> None:
        if self._resident_deferred is not None:
            hyper, coefficient, clip_value = self._resident_deferred
            self._resident_deferred = None
            self.worker.wait("norm")
            if "error" in coefficient:
                raise coefficient["error"]
            if coefficient.get("skip"):
                self.resident.grad_empty = True
                return
            self._update_resident_on_device(hyper, coefficient.get("value"), clip_value)

    def _forward_layer(self, index: int, forward, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self._run_layer(index, forward, *args, **kwargs)
        for name in _CACHE_KWARGS:
            if kwargs.get(name) is not None:
                kwargs[name] = None
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        if self.activations is not None:
            with self.activations.hooks(index):  # sees the layer inputs the checkpoint saves
                return checkpoint(self._run_layer, index, forward, *args, use_reentrant=False, **kwargs)
        return checkpoint(self._run_layer, index, forward, *args, use_reentrant=False, **kwargs)

    def _run_layer(self, index: int, forward, *args, **kwargs):
        # Named ranges for torch.profiler (benchmarks/profile_step.py reads them); next to nothing when not profiling.
        with record_function(f"slide.{'backward' if self._backward else 'forward'} layer {index}"):
            if self._parked:
                self._unpark_ready()
            if self._backward:  # autograd is recomputing this layer for its backward
                self.window.ensure(range(index, index - self.depth, -1), evict=self._finish_layer_grads)
                if self.activations is not None:
                    self.activations.prefetch(index - 1)
                if self.layers[index].trainable:
                    self.window.attach_grads(index)
                    self._pending[index] = len(self.layers[index].trainable)
            else:
                self.window.ensure(range(index, index + self.depth), evict=self._finish_layer_grads)
            return forward(*args, **kwargs)

    # ---------------------------------------------------------------- backward
    def begin_backward(
        self, *, last_micro_batch: bool = False, clipping: bool = True, param_groups=None, step: int = 0,
        clip_value: float | None = None, observed: bool = False,
    ) -> None:
        """Call right before ``loss.backward()``.

        Args:
            last_micro_batch: this backward completes the gradients of an optimizer step.
            clipping: the step will clip gradients by their global norm, or in a way not known yet (updates must
                then wait for the whole gradient).
            param_groups: the optimizer's groups, read now when updates stream out of this backward.
            step: the global step this backward belongs to (named in error messages). Default ``0``.
            clip_value: the step will clamp every gradient element to ``[-clip_value, clip_value]`` and nothing
                else (``clip_grad_value`` with this value). Elementwise, so updates may still stream out of the
                backward, each clamping its own gradients. Default ``None``: no clipping by value.
            observed: user code may read or change the gradients or the hyperparameters between this backward and
                the step (``show_grads``): its updates wait for the step, and no gradient parks on the device.
        """
        self.hide_grads()
        self._backward = True
        self._step_index = step
        self._clipping = clipping
        stream = (last_micro_batch and not clipping and not observed and self.nonfinite != "skip"
                  and param_groups is not None and bool(self._optimizers))
        self._streaming = hyperparameters(param_groups) if stream else None
        self._stream_clip = None if clip_value is None else float(clip_value)
        # The step's updates wait for the end of backward: its layers' gradients may park (parked_grads).
        self._holding = last_micro_batch and not stream and bool(self._optimizers) and not observed
        if self.resident.trainable_numel:
            self.worker.wait(RESIDENT)  # a chunked update may still be reading last step's gradients
            self.resident_grads.zero_()
            for entry in self.resident.trainable:
                entry.param.grad = entry.view(self.resident_grads)

    def end_backward(self) -> None:
        """Call right after ``loss.backward()``: collect what is left on the device into the host accumulators."""
        self._backward = False
        for index in list(self._pending):
            self._finish_layer_grads(index)
        if self.resident.trainable_numel:
            if self._resident_updates_on_device():
                self.resident.grad_event = self._check_finite_on_device(
                    RESIDENT, self.resident_grads, self.resident.grad_empty
                )
                self.shards.mean(self.resident_grads)  # replicated: every rank updates all of it alike
                if self.resident.grad_empty:
                    self._resident_grad.copy_(self.resident_grads)
                else:
                    self._resident_grad.add_(self.resident_grads)
                self.resident.grad_empty = False
            elif self._streaming is not None and self.resident.grad_empty and RESIDENT in self._optimizers:
                # Left on the device: the update reads them in chunks (_step_resident_in_chunks), through buffers
                # made here, on the training thread (page-locked for this thread's device).
                if self._chunk_buffer is None:  # two chunks
                    numel = min(2 * self._resident_chunk(), self.resident.grad_numel)
                    self._chunk_buffer = host_empty(numel, MASTER_DTYPE, pin=self.pin)
                    if self.upload_staging is not None:
                        self._chunk_staging = torch.empty_like(self.upload_staging)
                self.resident.grad_event = self._check_finite_on_device(
                    RESIDENT, self.resident_grads[: self.resident.trainable_numel], True
                )
                produced = self.streams.record()
                with self.streams.on(self.streams.download):
                    self.streams.wait(produced)
                    self.shards.reduce_scatter(self.resident_grads, self.resident.numel)
                    self._resident_from_device = (self.streams.record(),)
            else:
                self._download(self.resident, self.resident_grads, RESIDENT)
            for entry in self.resident.trainable:
                entry.param.grad = None
            if self._streaming is not None and not self._resident_updates_on_device():
                chunked = self._resident_from_device
                ready = self.resident.grad_event if chunked is None else chunked[0]
                self._submit_update(RESIDENT, self._streaming, clip_value=self._stream_clip, ready=ready)
        if self._streaming is not None:
            # What the host has not started yet, it does in the next forward's order — from now on, not after the
            # device update below, which may wait for the end of backward on the device (its NaN/Inf check).
            self._prefer_forward_order()
            if self.resident.trainable_numel and self._resident_updates_on_device():
                self._update_resident_on_device(self._streaming, None, self._stream_clip)
        self._streamed = None if self._streaming is None else (self._stream_clip,)
        self.streamed_steps += self._streaming is not None
        self._streaming = None
        if self._parked:
            self._unpark_ready()
        self._step_open = bool(self._unparkable())  # a streamed step's updates are all queued unless some are parked

    def _prefer_forward_order(self) -> None:
        """Run the queued updates (and the disk tier's reads) in the order the next forward needs them."""
        self.worker.prefer(list(self._units()))
        if self.state_store is not None:
            self.state_store.prefer(list(self._units()))

    def _on_grad(self, index: int, param: torch.Tensor) -> None:
        left = self._pending.get(index)
        if left is None:
            raise RuntimeError(
                f"a gradient of layer {index} arrived after the layer left the window; slideformer needs each "
                "decoder layer's backward to finish before the layer below it starts, and a decoder layer's "
                "parameters to be used only inside its forward (not, say, in a loss term)"
            )
        if left == 1:
            self._finish_layer_grads(index)
        else:
            self._pending[index] = left - 1

    def _finish_layer_grads(self, index: int) -> None:
        """Send layer ``index``'s gradients to its host accumulator (no-op if they are not pending)."""
        if self._pending.pop(index, None) is None:
            return
        unit = self.layers[index]
        slot = self.window.slot_of[index]
        self.window.grads_copied(index, self._download(unit, self.window.grads_of(index), id(slot)))
        for entry in unit.trainable:
            entry.param.grad = None
        if self._streaming is not None and index not in self._parked:
            self._submit_update(index, self._streaming, clip_value=self._stream_clip, ready=unit.grad_event)

    def _download(self, unit: HostUnit, device_grads: torch.Tensor, staging_key) -> object:
        """Copy ``device_grads`` into ``unit``'s fp32 accumulator; returns the event after which the device buffer
        may be reused. The first micro-batch lands directly in the accumulator; later ones land in a page-locked
        staging buffer that the worker adds in. The gradients' finiteness flag goes down ahead of them, and, when
        the step clips by norm, their norm behind them (the first micro-batch's: a later one makes it the host's).

        With several ranks ``device_grads`` is padded for the collectives: a reduce-scatter on the download stream
        leaves this rank's shard averaged over ranks, and only that shard crosses to the host."""
        key = self._key_of(unit)
        index = -1 if key == RESIDENT else key
        self._check_finite_on_device(key, device_grads[: unit.trainable_numel], unit.grad_empty)
        produced = self.streams.record()
        with self.streams.on(self.streams.download):
            self.streams.wait(produced)
            self.shards.reduce_scatter(device_grads, unit.numel)
            device_grads = device_grads[unit.grad_start : unit.grad_stop]
            if unit.grad_empty:
                self._norm_down[index] = self._clipping
                if self._clipping:
                    # (the norm is made on this stream: its memory is reused only after the copy here)
                    norm = torch.linalg.vector_norm(device_grads, dtype=MASTER_DTYPE)
                    self._norms_host[index].copy_(norm, non_blocking=True)
                if self._parks(unit, key):
                    # Rather than wait for the host, or take a buffer ahead of gradients parked earlier. With every
                    # parking buffer taken: wait for a host buffer, send a parked layer that has landed down into
                    # it, and park in the buffer that frees (the host never waits on gradients still computing).
                    if not self._park_free:
                        self._wait_for_room()
                        self._unpark_ready()
                    return self._park(index, device_grads)
                if unit.grad is None:
                    unit.grad = self._resident_accumulator() if unit is self.resident else self._lend(index)
                copy_cast(unit.grad, device_grads, self.download_staging)
                unit.grad_empty = False
                unit.grad_event = self.streams.record()
                return unit.grad_event
            self._norm_down[index] = False  # a sum of micro-batches: its norm is taken on the host
            self.worker.wait(("add", staging_key))  # the staging buffer's previous contents were added
            staging = self._staging(staging_key, device_grads.numel())
            copy_cast(staging, device_grads, self.download_staging)
            copied = self.streams.record()
        self.worker.submit(("add", staging_key), functools.partial(self._add, unit, staging, copied))
        return copied

    def _staging(self, key, numel: int) -> torch.Tensor:
        buffer = self._host_staging.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._host_staging[key] = host_empty(numel, MASTER_DTYPE, pin=self.pin)
        return buffer[:numel]

    def _add(self, unit: HostUnit, staging: torch.Tensor, copied) -> None:
        self.worker.await_device(copied)
        unit.grad.add_(staging)

    # ---------------------------------------------------------------- state and lifetime
    @property
    def step_torn(self) -> bool:
        """Whether training stopped in the middle of an optimizer step, so that some units may hold its update and
        others not: a backward streaming updates (or ``step``) was interrupted, or an update failed."""
        return self._step_open or self.worker.failed

    def stats(self) -> dict[str, float]:
        """Cumulative figures since construction: ``host_busy`` (seconds the update thread ran updates and gradient
        additions), ``host_waiting`` (seconds of those it waited for the device: gradients still on their way),
        ``compute_blocked`` (seconds the training thread waited for an update it needs) and
        ``skipped_steps`` (optimizer steps skipped for a NaN/Inf loss or gradient), ``parked_layers`` (layers
        whose gradients waited on the device for a host buffer, ``parked_grads``) and ``streamed_steps`` (steps
        whose updates streamed out of their backward)."""
        return {
            "host_busy": self.worker.busy_seconds,
            "host_waiting": self.worker.waiting_seconds,
            "compute_blocked": self.worker.blocked_seconds,
            "skipped_steps": float(self.skipped_steps),
            "parked_layers": float(self.parked_total),
            "streamed_steps": float(self.streamed_steps),
        }

    def _sync_masters(self, gather: bool = True) -> None:
        """Finish queued updates and bring device-updated masters back to the host; with several ranks, fetch the
        other ranks' shards of every master (a collective: every rank calls this at the same point)."""
        self._apply_deferred_resident_update()
        while self._unparkable():
            self._unpark(min(self._unparkable()))
        self.worker.wait_all()
        if self.state_store is not None:
            self.state_store.flush()
        if self._resident_updates_on_device():
            self.resident.master.copy_(self._resident_master)
        if gather and not self._masters_current:
            state.gather_masters(self)
            self._masters_current = True

    def state_dict(self) -> Mapping[str, torch.Tensor]:
        """The root's state dict, every parameter given by its fp32 master (see ``state.state_dict``)."""
        return state.state_dict(self)

    def load_state_dict(self, values: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy ``values`` (names as in ``root.state_dict()``) into the masters and buffers (``state.load_state_dict``)."""
        state.load_state_dict(self, values, strict)

    def host_bytes(self) -> dict[str, int]:
        """Bytes of host memory the engine holds in tensors now, by kind (``state.host_bytes``)."""
        return state.host_bytes(self)

    def optimizer_state(self, param: nn.Parameter) -> dict | None:
        """``param``'s optimizer state, whole (a collective with several ranks; ``state.optimizer_state``)."""
        return state.optimizer_state(self, param)

    def load_optimizer_state(self, param: nn.Parameter, values: dict) -> None:
        """Load ``param``'s whole optimizer state (torch's layout; ``state.load_optimizer_state``)."""
        state.load_optimizer_state(self, param, values)

    def units(self) -> dict[Any, HostUnit]:
        """The host state of every unit: ``"resident"`` and each layer index, in forward order."""
        return self._units()

    def close(self, *, drain: bool = True, gather: bool = True) -> None:
        """Stop the worker and the disk tier's threads, leave every parameter on its host master and let go of the
        scratch memory (window slots, staging, pooled gradient buffers, parked activations). Masters and optimizer
        state stay, so a checkpoint can still be saved. Only the first call does anything.

        Args:
            drain: finish pending updates first and re-raise an update's failure (normal end); ``False`` drops
                the updates not yet started (the run is already failing: the masters may hold part of a step).
            gather: with several ranks, also complete the masters from the other ranks' shards (a collective:
                every rank must close alike; ``False`` when only this rank is stopping, e.g. after an exception).
        """
        if self._closed:
            return
        self._closed = True
        try:
            if drain:
                self._sync_masters(gather)  # re-raises an update's failure
                if self.state_store is not None:
                    self._state_cache.flush()
                    self._master_cache.flush()
        finally:
            if self.state_store is not None:  # first: an update waiting for a read is let go, not waited for
                self.state_store.close()
            self.worker.close(drain=False)
            self.shards.close()
            if not drain and self._resident_updates_on_device():
                try:  # the run failed: still hand back the latest resident weights if the device allows
                    self.resident.master.copy_(self._resident_master)
                except Exception:  # noqa: BLE001 - the original error is the one to report
                    pass
            self._release()

    def _release(self) -> None:
        if self._fraction_before is not None:  # the GPU cap ends with the engine, not with the process
            torch.cuda.set_per_process_memory_fraction(self._fraction_before, self.device)
            self._fraction_before = None
        self._backward = False
        self._pending.clear()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for block in self._wrapped:
            block.__dict__.pop("forward", None)
        self._wrapped = []
        for module in self._model_checkpointing:  # the model as the user left it
            module.gradient_checkpointing = True
        self._model_checkpointing = []
        self.window.clear()
        self.resident.park()
        self._resident_loaded = False
        if self.streams.cuda:
            torch.cuda.current_stream(self.device).synchronize()
            self.streams.upload.synchronize()
            self.streams.download.synchronize()
            self._chunk_stream.synchronize()
            if self._unpark_stream is not None:
                self._unpark_stream.synchronize()
        # No copy is in flight any more: drop the scratch buffers (nothing after close uses them).
        self._resident_deferred = None
        self.window.slots.clear()
        self.window.upload_staging = self.upload_staging = self.download_staging = None
        self.resident_weights = self.resident_grads = None
        self._host_staging.clear()
        self._chunk_buffer = self._chunk_staging = self._unpark_staging = None
        for unit in self.layers:
            unit.grad = None  # buffers lent by the pool
        self._lent.clear()
        self._parked.clear()
        self._park_free.clear()
        self.grad_pool = GradientPool(0, pin=False)
        self.activations = None
