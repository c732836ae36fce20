"""SlidePrecision: compute in bf16 (or fp32) while the fp32 masters stay on the host."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Literal

import torch
from lightning.fabric.plugins.precision.utils import _convert_fp_tensor
from lightning.fabric.utilities.types import Optimizable
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning_utilities import apply_to_collection
from torch import Tensor, nn

SUPPORTED_PRECISIONS = ("bf16-true", "32-true")
_DTYPES = {"bf16-true": torch.bfloat16, "32-true": torch.float32}


def planned_clipping(trainer: Trainer, module: LightningModule | None) -> tuple[bool, float | None]:
    """How each optimizer step will clip, as known before its backward: ``(whole, value)``. ``whole``: by the
    global norm, or by ``module``'s own ``configure_gradient_clipping``, which may clip any way (the updates must
    wait for every gradient); ``value``: only by Lightning's clipping by value at this value, elementwise (updates
    may stream, each clamping its own gradients)."""
    clip = trainer.gradient_clip_val or None
    if clip is None:
        return False, None
    own_hook = module is not None and is_overridden("configure_gradient_clipping", module, LightningModule)
    if trainer.gradient_clip_algorithm == "value" and not own_hook:
        return False, float(clip)
    return True, None


class SlidePrecision(Precision):
    """Precision plugin of the slideformer strategy.

    Args:
        precision: ``"bf16-true"`` (default: bf16 weights and activations for compute, fp32 masters and optimizer
            on the host) or ``"32-true"`` (fp32 compute; used by the parity tests).

    Unlike Lightning's ``HalfPrecision`` it never casts the module: the model is built and kept in fp32 on the host
    (the masters), and the engine makes compute-dtype copies of the layers in the window. Gradient clipping is
    recorded here and applied exactly by the host optimizer once every gradient has arrived.
    """

    def __init__(self, precision: Literal["bf16-true", "32-true"] = "bf16-true") -> None:
        if precision not in SUPPORTED_PRECISIONS:
            raise ValueError(
                f"The slideformer strategy supports precision {' or '.join(map(repr, SUPPORTED_PRECISIONS))}, "
                f"got {precision!r}. Pass Trainer(precision='bf16-true') (bf16 compute, fp32 masters) or '32-true'."
            )
        self.precision = precision

    @property
    def compute_dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    def convert_module(self, module: nn.Module) -> nn.Module:
        return module

    def tensor_init_context(self) -> AbstractContextManager:
        return nullcontext()  # masters are created in fp32

    def module_init_context(self) -> AbstractContextManager:
        return nullcontext()

    @contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        # As with Lightning's "bf16-true": tensors created inside forward default to the compute dtype.
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.compute_dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(default)

    def convert_input(self, data: Any) -> Any:
        return apply_to_collection(data, function=_convert_fp_tensor, dtype=Tensor, dst_type=self.compute_dtype)

    def clip_grad_by_norm(self, optimizer: Optimizable, clip_val: int | float) -> None:
        _unwrap(optimizer).clip_grad_norm(clip_val)

    def clip_grad_by_value(self, optimizer: Optimizable, clip_val: int | float) -> None:
        _unwrap(optimizer).clip_grad_value(clip_val)


def _unwrap(optimizer: Any) -> Any:
    return getattr(optimizer, "_optimizer", optimizer)
