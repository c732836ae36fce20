"""How the engine hooks into the user's model, and how it lets go: each decoder layer's forward runs through the
engine (load, checkpoint, recompute), its parameters tell the engine when their gradients land, the model's own
activation checkpointing is off on the layers, and a forward that touches a resident part brings its compute copy
up to date (also when user code calls the model outside a step, a callback that generates, say)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from lightning_slide.engine.blocks import ModelParts
    from lightning_slide.engine.engine import SlidingEngine


# Key-value caches written in forward would be written again by the recompute in backward.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _without_cache(forward_layer, index: int, forward, *args, **kwargs):
    if torch.is_grad_enabled():
        kwargs.update({name: None for name in _CACHE_KWARGS if kwargs.get(name) is not None})
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
    return forward_layer(index, forward, *args, **kwargs)


class ModelHooks:
    """The engine's hooks on ``root``, split into ``parts``; ``remove`` leaves the model as the user gave it."""

    def __init__(self, engine: SlidingEngine, root: nn.Module, parts: ModelParts) -> None:
        self.blocks = list(parts.blocks)
        # Hugging Face's gradient_checkpointing_enable would recompute each layer a second time inside the engine's
        # recompute: off while the engine runs.
        self.checkpointing = [
            m for block in self.blocks for m in block.modules() if getattr(m, "gradient_checkpointing", False) is True
        ]
        for module in self.checkpointing:
            module.gradient_checkpointing = False
        for index, block in enumerate(self.blocks):
            block.forward = functools.partial(_without_cache, engine.forward_layer, index, block.forward)
        self.handles = [
            entry.param.register_post_accumulate_grad_hook(functools.partial(engine.on_grad, index))
            for index, unit in enumerate(engine.layers)
            for entry in unit.trainable
        ]
        resident = {id(e.param) for e in engine.resident.entries}
        self.handles += [
            module.register_forward_pre_hook(lambda *_: engine.prepare_forward())
            for module in root.modules()
            if any(id(p) in resident for p in module.parameters(recurse=False))
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        for module in self.checkpointing:
            module.gradient_checkpointing = True
        self.handles, self.blocks, self.checkpointing = [], [], []
