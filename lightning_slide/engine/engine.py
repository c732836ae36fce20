"""The sliding engine: one training step's data flow, in one place.

forward    layer i:  load i (and prefetch the next layers) into window slots -> compute i under non-reentrant
                     checkpointing, so only the layer's input is kept
backward   layer i:  autograd recomputes i: load i (and prefetch the layers below) -> attach zeroed slot grads
                     -> autograd fills them -> when the last parameter's gradient lands, add them into the layer's
                     fp32 host accumulator and let the slot go
step                 global norm over the host gradients (when clipping) -> submit host updates in forward order
                     (resident parts, layer 0, 1, ...) to the update worker
next forward         loading layer i waits only for layer i's update

The resident parts (embeddings, final norm, output head) keep one compute copy on the device for the whole step.
This module never imports Lightning: the strategy drives it through ``prepare_forward``, ``begin_backward``,
``end_backward``, ``step``, ``zero_grad``, ``state_dict`` and ``close``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.checkpoint import checkpoint

from lightning_slide.engine.blocks import find_parts
from lightning_slide.engine.host import HostUnit
from lightning_slide.engine.optimizer import UnitOptimizer, UpdateWorker, check_optimizer, hyperparameters
from lightning_slide.engine.window import Window

RESIDENT = "resident"
# Key-value caches written in forward would be written again by the recompute in backward.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class SlidingEngine:
    """Trains ``root`` with only ``window`` of its decoder layers on ``device`` at a time.

    Args:
        root: the module whose parameters are trained (e.g. a LightningModule wrapping a Hugging Face causal LM).
        window: decoder layers held on the compute device at once; clamped to the number of layers.
        device: the compute device (a CUDA device, or the CPU for tests).
        compute_dtype: dtype of the weights used for compute (``torch.bfloat16`` or ``torch.float32``).
        blocks_path: dotted path of the decoder layer list inside ``root``; ``None`` searches for it.

    Construction moves every parameter into fp32 host masters (one copy) and the resident parts onto the device.
    """

    def __init__(
        self,
        root: nn.Module,
        *,
        window: int,
        device: torch.device,
        compute_dtype: torch.dtype,
        blocks_path: str | None = None,
    ) -> None:
        parts = find_parts(root, blocks_path)
        self.root = root
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.blocks_path = parts.blocks_path
        pin = self.device.type == "cuda"
        self.layers = [HostUnit(f"layer {i}", parts.block_parameters(i), pin=pin) for i in range(len(parts.blocks))]
        self.resident = HostUnit(RESIDENT, parts.resident, pin=pin)
        self._check_unshared()

        self.worker = UpdateWorker()
        self.window = Window(self.layers, min(window, len(self.layers)), self.device, compute_dtype, self.worker.wait)
        self.resident_weights = torch.empty(self.resident.numel, dtype=compute_dtype, device=self.device)
        self.resident_grads = torch.empty(self.resident.trainable_numel, dtype=compute_dtype, device=self.device)
        self._resident_loaded = False
        self._optimizers: dict[Any, UnitOptimizer] = {}
        self._clip_norm: float | None = None
        self._clip_value: float | None = None

        self._backward = False
        self._pending: dict[int, int] = {}  # layer -> parameter gradients still to land in this backward
        for module in root.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(self.device)
        self._wrapped = list(parts.blocks)
        for index, block in enumerate(parts.blocks):
            block.forward = functools.partial(self._forward_layer, index, block.forward)
        self._hooks = [
            entry.param.register_post_accumulate_grad_hook(functools.partial(self._on_grad, index))
            for index, unit in enumerate(self.layers)
            for entry in unit.trainable
        ]
        self.prepare_forward()

    def _check_unshared(self) -> None:
        seen: dict[int, str] = {}
        for unit in [self.resident, *self.layers]:
            for entry in unit.entries:
                if id(entry.param) in seen and seen[id(entry.param)] != unit.name:
                    raise ValueError(
                        f"parameter {entry.name} is shared between {seen[id(entry.param)]} and {unit.name}; "
                        "slideformer needs each decoder layer to own its parameters"
                    )
                seen[id(entry.param)] = unit.name

    @property
    def depth(self) -> int:
        return self.window.depth

    # ---------------------------------------------------------------- optimizer
    def attach_optimizer(self, optimizer: Optimizer) -> None:
        """Rebuild ``optimizer`` over the host masters, one fused optimizer per unit."""
        check_optimizer(optimizer)
        group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        units = {RESIDENT: self.resident, **dict(enumerate(self.layers))}
        known = {id(e.param) for u in units.values() for e in u.entries}
        if any(pid not in known for pid in group_of):
            raise ValueError("the optimizer holds tensors that are not parameters of the LightningModule")
        self._optimizers = {key: UnitOptimizer(unit, optimizer, group_of) for key, unit in units.items()}

    def clip_grad_norm(self, max_norm: float) -> None:
        """Clip the global gradient norm to ``max_norm`` at the next step (exactly as ``clip_grad_norm_``)."""
        self._clip_norm = float(max_norm)

    def clip_grad_value(self, clip_value: float) -> None:
        """Clamp every gradient element to ``[-clip_value, clip_value]`` at the next step."""
        self._clip_value = float(clip_value)

    def zero_grad(self) -> None:
        """Start a new accumulation: the next micro-batch's gradients overwrite the host accumulators."""
        for unit in [self.resident, *self.layers]:
            unit.grad_empty = True

    def step(self, param_groups: list[dict]) -> None:
        """Submit the host update of every unit, in the order the next forward needs them."""
        hyper = hyperparameters(param_groups)
        coefficient = self._clip_coefficient()
        clip_value, self._clip_norm, self._clip_value = self._clip_value, None, None
        # Slots hold copies of the weights being updated: drop them (the next forward reloads from the masters).
        self.window.clear()
        self._resident_loaded = False
        for key, optimizer in self._optimizers.items():
            self.worker.submit(key, functools.partial(self._update, optimizer, hyper, coefficient, clip_value))

    def _clip_coefficient(self) -> torch.Tensor | None:
        if self._clip_norm is None:
            return None
        grads = [g for key, opt in self._optimizers.items() if not opt.unit.grad_empty for g in opt.grads]
        if not grads:
            return None
        norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
        total = torch.linalg.vector_norm(norms)
        return torch.clamp(self._clip_norm / (total + 1e-6), max=1.0)

    @staticmethod
    def _update(optimizer: UnitOptimizer, hyper, coefficient, clip_value) -> None:
        if optimizer.unit.grad_empty:  # no gradient reached this unit since the last step
            return
        optimizer.step(hyper, coefficient, clip_value)
        optimizer.unit.grad_empty = True

    # ---------------------------------------------------------------- forward
    def prepare_forward(self) -> None:
        """Make the resident parts' compute copy current; call before every forward."""
        if self._resident_loaded:
            return
        self.worker.wait(RESIDENT)
        self.resident_weights.copy_(self.resident.master)
        for entry in self.resident.entries:
            entry.param.data = entry.view(self.resident_weights)
        self._resident_loaded = True

    def _forward_layer(self, index: int, forward, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self._run_layer(index, forward, *args, **kwargs)
        for name in _CACHE_KWARGS:
            if kwargs.get(name) is not None:
                kwargs[name] = None
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        return checkpoint(self._run_layer, index, forward, *args, use_reentrant=False, **kwargs)

    def _run_layer(self, index: int, forward, *args, **kwargs):
        if self._backward:  # autograd is recomputing this layer for its backward
            self.window.ensure(range(index, index - self.depth, -1), evict=self._finish_layer_grads)
            if self.layers[index].trainable:
                self.window.attach_grads(index)
                self._pending[index] = len(self.layers[index].trainable)
        else:
            self.window.ensure(range(index, index + self.depth), evict=self._finish_layer_grads)
        return forward(*args, **kwargs)

    # ---------------------------------------------------------------- backward
    def begin_backward(self) -> None:
        """Call right before ``loss.backward()``."""
        self._backward = True
        if self.resident.trainable_numel:
            self.resident_grads.zero_()
            for entry in self.resident.trainable:
                entry.param.grad = entry.view(self.resident_grads)

    def end_backward(self) -> None:
        """Call right after ``loss.backward()``: collect what is left on the device into the host accumulators."""
        self._backward = False
        for index in list(self._pending):
            self._finish_layer_grads(index)
        if self.resident.trainable_numel:
            self.resident.accumulate(self.resident_grads)
            for entry in self.resident.trainable:
                entry.param.grad = None

    def _on_grad(self, index: int, param: torch.Tensor) -> None:
        left = self._pending.get(index)
        if left is None:
            raise RuntimeError(
                f"a gradient of layer {index} arrived after the layer left the window; slideformer needs each "
                "decoder layer's backward to finish before the layer below it starts"
            )
        if left == 1:
            self._finish_layer_grads(index)
        else:
            self._pending[index] = left - 1

    def _finish_layer_grads(self, index: int) -> None:
        """Move layer ``index``'s gradients into its host accumulator (no-op if they are not pending)."""
        if self._pending.pop(index, None) is None:
            return
        unit = self.layers[index]
        unit.accumulate(self.window.grads_of(index))
        for entry in unit.trainable:
            entry.param.grad = None

    # ---------------------------------------------------------------- state and lifetime
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The root's state dict with every parameter given by its fp32 master (host memory, no copies)."""
        self.worker.wait_all()
        masters = {id(e.param): e.view(u.master) for u in [self.resident, *self.layers] for e in u.entries}
        state = self.root.state_dict()
        for name, param in self.root.named_parameters(remove_duplicate=False):
            if name in state and id(param) in masters:
                state[name] = masters[id(param)]
        return state

    def optimizer_state(self, param: nn.Parameter) -> dict | None:
        self.worker.wait_all()
        for optimizer in self._optimizers.values():
            state = optimizer.state_of(param)
            if state is not None:
                return state
        return None

    def load_optimizer_state(self, param: nn.Parameter, state: dict) -> None:
        self.worker.wait_all()
        for optimizer in self._optimizers.values():
            if id(param) in optimizer.masters:
                optimizer.load_state_of(param, state)
                return
        raise KeyError("parameter is not optimized by the host optimizer")

    def close(self, *, drain: bool = True) -> None:
        """Stop the worker and leave every parameter on its host master. Safe to call twice.

        Args:
            drain: finish pending updates first and re-raise an update's failure (normal end); ``False`` drops
                them (the run is already failing).
        """
        try:
            self.worker.close(drain=drain)
        finally:
            self._release()

    def _release(self) -> None:
        self._backward = False
        self._pending.clear()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for block in self._wrapped:
            block.__dict__.pop("forward", None)
        self._wrapped = []
        self.window.clear()
        self.resident.park()
        self._resident_loaded = False
