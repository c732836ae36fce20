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

The resident parts (embeddings, final norm, output head) keep one compute copy on the device for the whole step;
the first ``tuning.device_layers`` layers never slide and are updated there (``device_units.py``). On the CPU the
same bookkeeping runs with synchronous copies (tests). This module never imports Lightning: the strategy drives it
through ``prepare_forward``, ``begin_backward``, ``end_backward``, ``step``, ``zero_grad``, ``state_dict``, ``close``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from lightning_slide.engine import checks, state
from lightning_slide.engine.activations import ActivationOffload
from lightning_slide.engine.blocks import find_parts
from lightning_slide.engine.checks import GradientChecks, Verdict, decide
from lightning_slide.engine.device_units import DeviceUnit, check_device_layers, keep_layers, let_layers_slide
from lightning_slide.engine.disk import open_tier
from lightning_slide.engine.downloads import GradientDownloads
from lightning_slide.engine.host import MASTER_DTYPE, RESIDENT, HostUnit, build_units
from lightning_slide.engine.loans import GradientLoans
from lightning_slide.engine.model_hooks import ModelHooks
from lightning_slide.engine.optimizer import hyperparameters
from lightning_slide.engine.options import SlideOptions, check_count
from lightning_slide.engine.parking import Parking
from lightning_slide.engine.plan import (
    STAGING_NUMEL,
    ModelShape,
    Settings,
    check_device,
    device_bytes,
    grads_in_flight,
)
from lightning_slide.engine.resident import ResidentParts
from lightning_slide.engine.shard import Shards
from lightning_slide.engine.streams import MemoryCap, Streams
from lightning_slide.engine.update_worker import UpdateWorker
from lightning_slide.engine.updates import HostUpdates
from lightning_slide.engine.window import Window


@dataclass
class StepMode:
    """How the current optimizer step runs, in the order its phases set it."""

    step: int = 0  # the global step of the current backward, for messages
    backward: bool = False  # autograd is running a backward: a layer's forward now is its recompute
    last_micro_batch: bool = False  # this backward completes the step's gradients
    clipping: bool = False  # the step clips by the global norm, or in a way not known before its end
    streaming: list[dict] | None = None  # the hyperparameters while updates stream out of this backward
    clip_value: float | None = None  # the value streamed updates clamp gradients to (clipping by value)
    holding: bool = False  # the step's updates wait for the end of its backward: gradients may park meanwhile
    streamed: bool = False  # the last backward's updates streamed: the step only checks its clipping
    skip: bool = False  # a NaN/Inf loss: the step drops its gradients
    narrow_grads: bool = False  # layer gradients may stay in the compute dtype on the host (``gradient_dtype``)
    open: bool = False  # some of the step's updates are queued, not all of them yet


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
        data_parallel: this process is one rank of the default ``torch.distributed`` process group: it keeps and
            updates its shard of every unit (``shard.py``). Every rank must make the same calls in the same order.

    Construction moves every parameter into fp32 host masters (``host.build_units``) and the resident parts onto the
    device. How each option acts: the README's options table and ``docs/how-it-works.md``; figures: BENCHMARKS.md.
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
        grad_buffers, parked_grads = options.tuning.grad_buffers, options.tuning.parked_now
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
        kept = options.tuning.device_layers_now
        on_device = check_device_layers(kept, len(parts.blocks), self.shards, masters_on_disk)
        depth = min(window, len(parts.blocks) - on_device)
        self.grad_buffers = grads_in_flight(depth, grad_buffers)
        # The planner's fixed device buffers (lightning_slide/engine/plan.py): what the lines below allocate.
        self.device_plan = device_bytes(
            ModelShape.of(root, parts.blocks_path),
            Settings.of(options, compute_dtype=compute_dtype, device=self.device.type, ranks=self.shards.world),
        )
        if memory_limit is not None:
            check_device(self.device_plan, memory_limit, window)
            MemoryCap.check(self.device, memory_limit)  # before anything is allocated; the cap is set below
        parts.check_unshared()
        self.compute_dtype = compute_dtype
        self.blocks_path = parts.blocks_path
        self.streams = Streams(self.device)
        self.pin = self.streams.cuda
        # With the masters on disk the compute copy is kept whatever the compute dtype (it is all the host has).
        compute_copy = host_weights == "compute" and (compute_dtype != MASTER_DTYPE or masters_on_disk)
        self.host_weights = host_weights
        self.offload_dir = offload_dir
        # Updates streamed out of a backward: at most grad_buffers layers (the gradient buffers lent) and the
        # resident parts are outstanding, and they are reordered when the backward ends: every read fits.
        self.state_store = open_tier(offload_dir, self.grad_buffers + 1, parts, self.offload, owner=root)
        self.layers, self.resident, self._masters_shared = build_units(
            parts,
            shards=self.shards,
            pin=self.pin,
            compute_dtype=compute_dtype,
            compute_copy=compute_copy,
            state_store=self.state_store if masters_on_disk else None,
            resident_on_device=resident_on_device,
        )
        # Whether the masters outside this rank's shards hold the other ranks' latest updates (see _sync_masters).
        self.masters_current = True
        self.unit_key = {id(e.param): key for key, unit in self.units().items() for e in unit.entries}

        largest = max(u.numel for u in [self.resident, *self.layers])
        staging = min(largest, STAGING_NUMEL)  # device staging for copies that cast
        self.upload_staging = torch.empty(staging, dtype=MASTER_DTYPE, device=self.device) if cast else None
        self.download_staging = torch.empty(staging, dtype=MASTER_DTYPE, device=self.device) if cast else None
        self.downloads = GradientDownloads(self)  # gradients to the host accumulators
        self.worker = UpdateWorker()
        self.loans = GradientLoans(
            self.layers, max(u.grad_numel for u in self.layers), self.grad_buffers, self.worker, self.pin
        )
        self.parking = Parking(self)  # layers' gradients held on the device for a host buffer (parked_grads)
        self.streamed_steps = 0  # optimizer steps whose updates streamed out of their backward, since construction
        self.set_parking(parked_grads)

        self.device_layers = {i: DeviceUnit.layer(self, i) for i in range(on_device)}
        self.activations = ActivationOffload(self.device, self.streams) if offload_activations else None
        # Prefetching only what is already updated depends on timing; with several ranks every rank must issue the
        # same all-gathers in the same order, so each load waits for its update instead.
        may_load = self.parking.settled if not self.shards.active else (lambda index: True)
        self.window = Window(
            self.layers,
            depth,
            self.device,
            compute_dtype,
            self.streams,
            self.upload_staging,
            before_load=self.parking.before_load,
            may_load=may_load,
            shards=self.shards,
            pinned=set(self.device_layers),
        )
        self.resident_parts = ResidentParts(self, self.resident, resident_on_device)
        self.updates = HostUpdates(self)  # one optimizer per unit (attach_optimizer)
        self._state_cache, self._master_cache = state.disk_caches(self)
        self._clip_norm: float | None = None
        self._clip_value: float | None = None
        self.nonfinite = options.nonfinite
        self.skipped_steps = 0  # optimizer steps skipped for a NaN/Inf loss or gradient
        self.gradient_checks = GradientChecks(len(self.layers), self.device, self.pin)  # finite flags, norms
        self.mode = StepMode()  # how the current optimizer step and its backward run

        self._closed = False
        self._pending: dict[int, int] = {}  # layer -> parameter gradients still to land in this backward
        self.model_hooks: ModelHooks | None = None
        self._shown: list[tuple[nn.Parameter, torch.Tensor]] = []  # gradients shown to user code (show_grads)
        self._memory_cap = MemoryCap(self.device, memory_limit)  # restored by _release, also after a failure
        try:
            # Buffers and other non-parameter state (e.g. torchmetrics states) go to the device; parameters stay.
            root._apply(lambda t: t if isinstance(t, nn.Parameter) else t.to(self.device))
            self.prepare_forward()
        except BaseException:
            self.close(drain=False)
            raise
        self.model_hooks = ModelHooks(self, root, parts)

    def on_device(self) -> list[DeviceUnit]:
        """The units updated on the device: the first layers kept there, the resident parts when updated there."""
        resident = self.resident_parts.device if self.resident.trainable_numel else None
        return [d for d in [*self.device_layers.values(), resident] if d is not None and d.updates]

    def keep_on_device(self, count: int) -> None:
        """Keep the first ``count`` layers on the device from now on (``device_layers="auto"``: more at the first
        batch, fewer when a larger batch needs their room); the others slide."""
        if count < len(self.device_layers):
            let_layers_slide(self, count)
        else:
            keep_layers(self, count)

    def units(self) -> dict[Any, HostUnit]:
        """The host state of every unit by key: ``"resident"`` and each layer index, in the order the next forward
        needs them."""
        return {RESIDENT: self.resident, **dict(enumerate(self.layers))}

    # ---------------------------------------------------------------- set-up: the optimizer
    def attach_optimizer(self, optimizer: Optimizer) -> None:
        """Rebuild ``optimizer`` over the host masters, one fused optimizer per unit (``updates.HostUpdates``)."""
        self.updates.attach(optimizer)

    def clip_grad_norm(self, max_norm: float) -> None:
        """Clip the global gradient norm to ``max_norm`` at the next step (exactly as ``clip_grad_norm_``)."""
        self._clip_norm = float(max_norm)

    def clip_grad_value(self, clip_value: float) -> None:
        """Clamp every gradient element to ``[-clip_value, clip_value]`` at the next step."""
        self._clip_value = float(clip_value)

    def track_grad_norms(self) -> None:
        """Take every unit's gradient norm from now on, for ``grad_norm``: on the device where a step has one
        micro-batch, else in the host's sum of the last one (``checks.py``)."""
        self.gradient_checks.track = True

    def grad_norm(self, step: int) -> float | None:
        """The 2-norm of global step ``step``'s gradients over every parameter the optimizer steps, before clipping
        (``track_grad_norms``); ``None`` untracked, for a step that queued no update, or one before the last two.
        Read once the next step's backward has begun, it waits for nothing (that step's forward waited for every
        update of this one); earlier, it finishes this step's updates first. With several ranks a collective (every
        rank calls it at the same point)."""
        if not self.gradient_checks.track:
            return None
        if step >= self.mode.step:
            self._finish_queued()
        total = self.gradient_checks.total(step)
        if self.shards.active:  # this rank's shards: their squares summed over ranks
            squares = torch.zeros((), device=self.device) if total is None else total.square().to(self.device)
            self.shards.sum(squares)
            total = None if total is None else squares.sqrt()
        return None if total is None else total.item()

    # ---------------------------------------------------------------- forward
    def prepare_forward(self) -> None:
        """Make the resident parts' compute copy current; call before every forward."""
        self.hide_grads()  # before the window moves a layer, which drops its parameters' .grad
        for device in self.device_layers.values():
            device.apply_deferred()
            device.point_at_weights()  # (user code between steps may have pointed them at their masters)
        self.resident_parts.load()

    def forward_layer(self, index: int, forward, *args, **kwargs):
        """Layer ``index``'s forward under the engine: checkpointed when it will be recomputed for its backward."""
        if not torch.is_grad_enabled():
            return self._run_layer(index, forward, *args, **kwargs)
        if self.activations is not None:
            with self.activations.hooks(index):  # sees the layer inputs the checkpoint saves
                return checkpoint(self._run_layer, index, forward, *args, use_reentrant=False, **kwargs)
        return checkpoint(self._run_layer, index, forward, *args, use_reentrant=False, **kwargs)

    def _run_layer(self, index: int, forward, *args, **kwargs):
        # Named ranges for torch.profiler (benchmarks/profile_step.py reads them); next to nothing when not profiling.
        with record_function(f"slide.{'backward' if self.mode.backward else 'forward'} layer {index}"):
            if self.parking:
                self.parking.unpark_ready()
            if self.mode.backward:  # autograd is recomputing this layer for its backward
                self.window.ensure(range(index, index - self.window.depth, -1), evict=self._finish_layer_grads)
                if self.activations is not None:
                    self.activations.prefetch(index - 1)
                if self.layers[index].trainable:
                    device = self.device_layers.get(index)
                    self.window.attach_grads(index) if device is None else device.attach_grads()
                    self._pending[index] = len(self.layers[index].trainable)
            else:
                self.window.ensure(range(index, index + self.window.depth), evict=self._finish_layer_grads)
            return forward(*args, **kwargs)

    # ---------------------------------------------------------------- backward
    def begin_backward(
        self,
        *,
        last_micro_batch: bool = False,
        clipping: bool = True,
        param_groups=None,
        step: int = 0,
        clip_value: float | None = None,
        observed: bool = False,
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
        stream = (
            last_micro_batch
            and not clipping
            and not observed
            and self.nonfinite != "skip"
            and param_groups is not None
            and bool(self.updates)
        )
        mode = self.mode
        mode.backward, mode.step, mode.clipping, mode.last_micro_batch = True, step, clipping, last_micro_batch
        self.gradient_checks.open_step(step)
        mode.streaming = hyperparameters(param_groups) if stream else None
        mode.clip_value = None if clip_value is None else float(clip_value)
        # The step's updates wait for the end of backward: its layers' gradients may park (parked_grads).
        mode.holding = last_micro_batch and not stream and bool(self.updates) and not observed
        # Nothing adds to or shows the host gradients of a step's only micro-batch.
        mode.narrow_grads = (
            last_micro_batch and not observed and not self.shards.active and self.compute_dtype != MASTER_DTYPE
        )
        self.resident_parts.begin_backward()

    def gradient_dtype(self, key) -> torch.dtype:
        """The dtype layer ``key``'s gradients of this backward cross to the host in: the compute dtype, as the
        device computed them (half the copy, and the update reads half), when nothing adds to or shows them there
        before an update whose kernel widens (and clamps) them itself; else fp32. Exact either way."""
        optimizer = self.updates.optimizers.get(key)
        if self.mode.narrow_grads and optimizer is not None and optimizer.takes(self.compute_dtype):
            return self.compute_dtype
        return MASTER_DTYPE

    def end_backward(self) -> None:
        """Call right after ``loss.backward()``: collect what is left on the device into the host accumulators."""
        self.mode.backward = False
        for index in list(self._pending):
            self._finish_layer_grads(index)
        self.resident_parts.end_backward(self.mode.streaming, self.mode.clip_value)
        if self.mode.streaming is not None:
            # What the host has not started yet, it does in the next forward's order — from now on, not after the
            # device update below, which may wait for the end of backward on the device (its NaN/Inf check).
            self.updates.prefer_forward_order()
            for device in self.on_device():
                device.update(self.mode.streaming, None, self.mode.clip_value, self.mode.step)
        self.mode.streamed = self.mode.streaming is not None
        self.streamed_steps += self.mode.streamed
        self.mode.streaming = None
        if self.parking:
            self.parking.unpark_ready()
        self.mode.open = bool(self.parking.ready())  # a streamed step's updates are all queued unless some are parked

    def on_grad(self, index: int, param: torch.Tensor) -> None:
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
        """Send layer ``index``'s gradients to its host accumulator, or its device one for a layer kept on the device
        (no-op if they are not pending)."""
        if self._pending.pop(index, None) is None:
            return
        unit, device = self.layers[index], self.device_layers.get(index)
        if device is not None:
            device.take_grads()
        else:
            slot = self.window.slot_of[index]
            self.window.grads_copied(index, self.downloads.send(unit, self.window.grads_of(index), id(slot)))
        for entry in unit.trainable:
            entry.param.grad = None
        if self.mode.streaming is not None and device is None and index not in self.parking:
            self.updates.submit(index, self.mode.streaming, clip_value=self.mode.clip_value, ready=unit.grad_event)

    # ---------------------------------------------------------------- update (the step)
    def zero_grad(self) -> None:
        """Start a new accumulation: the next micro-batch's gradients overwrite the host accumulators.

        A unit whose update is still queued is left alone: that update empties it when it has consumed it.
        """
        self.hide_grads()
        for key, unit in self.units().items():
            if self.worker.done(key):
                unit.grad_empty = True
                self.loans.give_back(unit)
        self.parking.drop_unqueued()  # parked for a step that was skipped

    def skip_step(self) -> None:
        """Skip the current optimizer step: its gradients are dropped when ``step`` comes (a NaN/Inf loss)."""
        self.mode.skip = True

    def step(self, param_groups: list[dict]) -> None:
        """Queue the host update of every unit not already updated by this step's backward."""
        self.hide_grads()
        clip_norm, clip_value = self._clip_norm, self._clip_value
        self._clip_norm = self._clip_value = None
        # Slots hold copies of the weights being updated: drop them (the next forward reloads from the masters).
        self.window.clear()
        self.resident_parts.loaded = False
        if self.mode.skip:
            self.mode.skip = False
            self.skipped_steps += 1
            self.zero_grad()
            return
        if self.mode.streamed:
            self.mode.streamed, streamed_clip = False, self.mode.clip_value
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
        keys = [key for key, unit in self.units().items() if not unit.grad_empty or key in self.parking]
        verdict = Verdict()
        # Skipping a step needs every unit's flag before any update (the clipping norm sees NaN/Inf by itself).
        check = clip_norm is None and self.nonfinite == "skip"
        if check:
            self.worker.submit(
                "norm",
                functools.partial(decide, verdict, functools.partial(checks.finite_task, self, list(keys), verdict)),
            )
        on_device = [d for d in self.on_device() if d.key in keys]
        keys = [key for key in keys if key not in {d.key for d in on_device}]
        if clip_norm is not None:
            units = [self.units()[key] for key in keys]
            device_norms = [d.norms() for d in on_device]
            self.worker.submit(
                "norm",
                functools.partial(
                    decide,
                    verdict,
                    functools.partial(checks.clip_task, self, clip_norm, self.mode.step, units, device_norms, verdict),
                ),
            )
        for device in on_device:
            if clip_norm is None and not check:
                device.update(hyper, None, clip_value, self.mode.step)
            else:  # needs the step's verdict: done before the next forward
                device.defer(hyper, verdict, clip_value, self.mode.step)
        for key in keys:
            if key in self.parking:  # queued when it goes down, first layer first as host buffers free
                self.parking.give_update(key, (hyper, verdict, clip_value, self.mode.step))
            else:
                self.updates.submit(key, hyper, verdict, clip_value)
        self.mode.open = bool(self.parking)
        self.parking.unpark_ready()

    def key_of(self, unit: HostUnit):
        return RESIDENT if unit is self.resident else self.layers.index(unit)

    def flush_disk_caches(self) -> None:
        """Write a checkpoint's changes to the disk tier's arrays (loaded or read since) before a unit reads them."""
        self._state_cache.flush()
        self._master_cache.flush()

    # ---------------------------------------------------------------- next forward: a load waits for its update
    def set_parking(self, count: int) -> None:
        """Let ``count`` layers' gradients park on the device from now on (``parked_grads``): buffers added are
        allocated now, buffers beyond it let go (a longer batch's activations need the room)."""
        check_count("parked_grads", count, minimum=0)
        self.parking.resize(count)

    # ---------------------------------------------------------------- what user code between steps sees
    def show_grads(self) -> None:
        """Show the step's gradients so far to user hooks, as plain training does (``state.show_grads``)."""
        state.show_grads(self)

    def hide_grads(self) -> None:
        """Take back the gradients ``show_grads`` gave, keeping what user code did to them."""
        state.hide_grads(self)

    def finish_updates(self) -> None:
        """Finish every queued update and point every parameter at its fp32 master: the module then holds the
        weights of the last optimizer step, as plain training's does between steps. Costs the overlap of those
        updates with the next forward. With several ranks a collective (every rank calls it)."""
        self.hide_grads()
        self._sync_masters()
        self.window.clear()
        for unit in [self.resident, *(d.unit for d in self.device_layers.values())]:
            unit.park()
        self.resident_parts.parked()

    # ---------------------------------------------------------------- state and lifetime
    @property
    def step_torn(self) -> bool:
        """Whether training stopped in the middle of an optimizer step, so that some units may hold its update and
        others not: a backward streaming updates (or ``step``) was interrupted, or an update failed."""
        return self.mode.open or self.worker.failed

    def stats(self) -> dict[str, float]:
        """Cumulative figures since construction: seconds the update thread worked (``host_busy``) and of those waited
        for the device (``host_waiting``), seconds the training thread waited for an update (``compute_blocked``),
        and counts of skipped steps, parked layers and steps whose updates streamed out of their backward."""
        return {
            "host_busy": self.worker.busy_seconds,
            "host_waiting": self.worker.waiting_seconds,
            "compute_blocked": self.worker.blocked_seconds,
            "skipped_steps": float(self.skipped_steps),
            "parked_layers": float(self.parking.total),
            "streamed_steps": float(self.streamed_steps),
        }

    def _sync_masters(self, gather: bool = True) -> None:
        """Finish queued updates and bring device-updated masters back to the host; with several ranks, fetch the
        other ranks' shards of every master (a collective: every rank calls this at the same point)."""
        self._finish_queued()
        if self.state_store is not None:
            self.state_store.flush()
        for device in self.on_device():
            device.to_host()
        if gather and not self.masters_current:
            state.gather_masters(self)
            self.masters_current = True

    def _finish_queued(self) -> None:
        """Run every update queued, deferred or parked."""
        for device in self.on_device():
            device.apply_deferred()
        self.parking.unpark_all()
        self.worker.wait_all()

    def state_dict(self) -> Mapping[str, torch.Tensor]:
        """The root's state dict, every parameter given by its fp32 master (see ``state.state_dict``)."""
        return state.state_dict(self)

    def load_state_dict(self, values: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy ``values`` (names as in ``root.state_dict()``) into the masters and buffers."""
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
                    self.flush_disk_caches()
        finally:
            if self.state_store is not None:  # first: an update waiting for a read is let go, not waited for
                self.state_store.close()
            self.worker.close(drain=False)
            self.shards.close()
            if not drain:
                try:  # the run failed: still hand back the latest device-updated weights if the device allows
                    for device in self.on_device():
                        device.to_host()
                except Exception:  # noqa: BLE001 - the original error is the one to report
                    pass
            self._release()

    def _release(self) -> None:
        self._memory_cap.release()  # the GPU cap ends with the engine, not with the process
        self.mode.backward = False
        self._pending.clear()
        if self.model_hooks is not None:
            self.model_hooks.remove()  # the model as the user gave it
        self.window.clear()
        for unit in [self.resident, *(d.unit for d in self.device_layers.values())]:
            unit.park()
        if self.streams.cuda:
            torch.cuda.current_stream(self.device).synchronize()
            self.streams.upload.synchronize()
            self.streams.download.synchronize()
        # No copy is in flight any more: drop the scratch buffers (nothing after close uses them).
        self.resident_parts.close()
        for device in self.device_layers.values():
            device.close()
        self.window.slots.clear()
        self.window.upload_staging = self.upload_staging = self.download_staging = None
        self.downloads.staging.clear()
        self.parking.close()
        self.loans.close()
        self.activations = None
