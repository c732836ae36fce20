"""Swap the Triton kernels into Hugging Face causal LMs held anywhere inside a module.

Everything is done per instance: a patched module gets its own ``forward`` attribute (``nn.Module.__call__`` looks
there first), parameters and buffers stay where they are, so ``state_dict`` / ``save_pretrained`` see no change and
other models in the process keep the stock code.

- ``rmsnorm``: each ``<Family>RMSNorm`` forward becomes :func:`rms_norm` (offset 1 for the Gemma families).
- ``swiglu``: each ``<Family>MLP`` forward becomes ``down(swiglu(gate(x), up(x)))`` when its activation is SiLU or
  tanh-GeLU.
- ``rope``: HF attention calls the module-level ``apply_rotary_pos_emb`` of its modeling file, which is not reachable
  per instance. That name is replaced once by a dispatcher that runs the original function *unless* the call comes
  from inside a patched attention module (a context variable set by that module's forward), and then uses
  :func:`apply_rope` for shapes it supports. Unpatched models therefore run exactly the original function.
- ``fused_linear_cross_entropy``: ``<Family>ForCausalLM.forward`` with ``labels`` (and ``logits_to_keep=0``)
  computes the loss with :func:`fused_linear_cross_entropy` straight from the final hidden states and returns
  ``logits=None``: the point is never to build them. Without labels, or with ``logits_to_keep`` set, the stock
  forward runs and logits come back as usual (generation and evaluation are unchanged).
"""

from __future__ import annotations

import contextvars
import inspect
import sys
import types
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from lightning_slide.engine.options import KERNEL_NAMES, parse_kernels

from ._common import INTERPRETED
from .fused_linear_cross_entropy import fused_linear_cross_entropy
from .rmsnorm import rms_norm
from .rope import apply_rope
from .rope import supports as rope_supports
from .swiglu import swiglu

# transformers model families (the `transformers.models.<name>` package) and their RMSNorm weight offset.
_FAMILIES = {"llama": 0.0, "qwen2": 0.0, "qwen3": 0.0, "mistral": 0.0, "gemma": 1.0, "gemma2": 1.0, "gemma3": 1.0}
_ACTIVATIONS = {  # activation module class name -> swiglu() activation
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
}
_MARK = "_lightning_slide_kernels"  # per-instance set of the kernels applied to that module


def _family(module: nn.Module) -> str | None:
    parts = type(module).__module__.split(".")
    if len(parts) == 4 and parts[:2] == ["transformers", "models"] and parts[3] == f"modeling_{parts[2]}":
        return parts[2]
    return None


def _mark(module: nn.Module, name: str) -> bool:
    """Record that `name` is applied to `module`; False if it already was (so patching is idempotent)."""
    done = module.__dict__.setdefault(_MARK, set())
    if name in done:
        return False
    done.add(name)
    return True


# ---------------------------------------------------------------------------------------------------- rmsnorm
def _rmsnorm_forward(self, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(self, "variance_epsilon", None)
    return rms_norm(x, self.weight, self.eps if eps is None else eps, self._lightning_slide_offset)


def _patch_rmsnorm(module: nn.Module, family: str) -> bool:
    if not type(module).__name__.endswith("RMSNorm") or not isinstance(getattr(module, "weight", None), nn.Parameter):
        return False
    if not (hasattr(module, "variance_epsilon") or hasattr(module, "eps")) or module.weight.dim() != 1:
        return False
    if _mark(module, "rmsnorm"):
        module._lightning_slide_offset = _FAMILIES[family]
        module.forward = types.MethodType(_rmsnorm_forward, module)
    return True


# ---------------------------------------------------------------------------------------------------- swiglu
def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self._lightning_slide_activation))


def _patch_mlp(module: nn.Module, family: str) -> bool:
    if not type(module).__name__.endswith("MLP"):
        return False
    if not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    activation = _ACTIVATIONS.get(type(module.act_fn).__name__)
    if isinstance(module.act_fn, nn.GELU) and module.act_fn.approximate == "tanh":
        activation = "gelu_tanh"
    if activation is None:
        return False
    if _mark(module, "swiglu"):
        module._lightning_slide_activation = activation
        module.forward = types.MethodType(_mlp_forward, module)
    return True


# ---------------------------------------------------------------------------------------------------- rope
_ROPE_ON = contextvars.ContextVar("lightning_slide_rope", default=False)


def _rope_dispatcher(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if _ROPE_ON.get() and rope_supports(q, k, cos, sin, unsqueeze_dim):
            return apply_rope(q, k, cos, sin, unsqueeze_dim)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.__wrapped__ = original
    apply_rotary_pos_emb.__doc__ = original.__doc__
    apply_rotary_pos_emb._lightning_slide = True
    return apply_rotary_pos_emb


def _install_rope_dispatcher(modeling) -> bool:
    fn = getattr(modeling, "apply_rotary_pos_emb", None)
    if fn is None:
        return False
    if not getattr(fn, "_lightning_slide", False):
        modeling.apply_rotary_pos_emb = _rope_dispatcher(fn)
    return True


def _attention_forward(self, *args, **kwargs):
    token = _ROPE_ON.set(True)
    try:
        return self._lightning_slide_forward(*args, **kwargs)
    finally:
        _ROPE_ON.reset(token)


def _patch_attention(module: nn.Module, family: str) -> bool:
    if not type(module).__name__.endswith("Attention") or not hasattr(module, "q_proj"):
        return False
    if not _install_rope_dispatcher(sys.modules[type(module).__module__]):
        return False
    if _mark(module, "rope"):
        module._lightning_slide_forward = module.forward  # the class's (or an earlier override's) bound forward
        module.forward = types.MethodType(_attention_forward, module)
    return True


# ---------------------------------------------------------------------------------------------------- loss
def _cache_field(output_cls) -> str:
    # transformers renamed `past_key_values` to `cache` in 5.x; read and write whichever the output class has.
    return "cache" if "cache" in getattr(output_cls, "__dataclass_fields__", {}) else "past_key_values"


def _causal_lm_forward(self, *args, **kwargs):
    stock = type(self).forward
    bound = inspect.signature(stock).bind(self, *args, **kwargs).arguments
    bound.pop("self")
    extra = bound.pop("kwargs", {})
    labels = bound.get("labels")
    logits_to_keep = bound.get("logits_to_keep", 0)
    if labels is None or not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        return stock(self, *args, **kwargs)
    bound.pop("labels")
    bound.pop("logits_to_keep", None)
    return_dict = extra.pop("return_dict", None)
    return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict

    # As the stock forward: every remaining argument goes to the backbone, loss options are read from kwargs.
    outputs = self.model(**bound, **extra)
    hidden = outputs[0]
    ignore_index = extra.get("ignore_index", -100)
    shift_labels = extra.get("shift_labels")
    if shift_labels is None:  # position t is scored against token t + 1; the last position has no target
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    num_items = extra.get("num_items_in_batch")
    loss = fused_linear_cross_entropy(
        hidden,
        self.lm_head.weight,
        shift_labels.to(hidden.device),
        ignore_index=ignore_index,
        reduction="mean" if num_items is None else "sum",
        softcap=getattr(self.config, "final_logit_softcapping", None),
    )
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)

    from transformers.modeling_outputs import CausalLMOutputWithPast

    field = _cache_field(CausalLMOutputWithPast)
    out = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
        **{field: getattr(outputs, field, None)},
    )
    return out if return_dict else out.to_tuple()


def _patch_causal_lm(module: nn.Module, family: str) -> bool:
    if not type(module).__name__.endswith("ForCausalLM"):
        return False
    head = getattr(module, "lm_head", None)
    if (
        not isinstance(head, nn.Linear)
        or head.bias is not None
        or not isinstance(getattr(module, "model", None), nn.Module)
    ):
        return False
    if _mark(module, "fused_linear_cross_entropy"):
        module.forward = types.MethodType(_causal_lm_forward, module)
    return True


_PATCHERS = {
    "rmsnorm": _patch_rmsnorm,
    "rope": _patch_attention,
    "swiglu": _patch_mlp,
    "fused_linear_cross_entropy": _patch_causal_lm,
}


def _requested(kernels: str | Iterable[str]) -> list[str]:
    return list(parse_kernels(kernels))  # the one parser of kernel names (engine/options.py)


def apply_kernels(model: nn.Module, kernels: str | Iterable[str] = "all") -> list[str]:
    """Swap Triton kernels into the Hugging Face causal LMs found anywhere inside ``model``.

    Args:
        model: any module holding one or more transformers models (Llama, Qwen2, Qwen3, Mistral, Gemma, Gemma2,
            Gemma3 families), e.g. a LightningModule with the HF model as an attribute.
        kernels: ``"all"`` (default), ``"none"``, or a list of names from :data:`KERNEL_NAMES`.

    Returns:
        The kernel names, in :data:`KERNEL_NAMES` order, that are now active on at least one module (applying again
        is harmless and returns the same list).

    Raises:
        ValueError: for a name not in :data:`KERNEL_NAMES` (the message lists the valid ones).

    Models of other families are left untouched, with a warning. With ``fused_linear_cross_entropy`` a causal LM
    called with ``labels`` returns ``logits=None``.
    """
    names = _requested(kernels)
    if not names:
        return []
    from transformers import PreTrainedModel

    applied: set[str] = set()
    unsupported: list[str] = []
    for module in model.modules():
        family = _family(module)
        if family in _FAMILIES:
            for name in names:
                if _PATCHERS[name](module, family):
                    applied.add(name)
        elif isinstance(module, PreTrainedModel) and family is not None:
            unsupported.append(type(module).__name__)
    if unsupported or not applied:
        found = f"unsupported model(s) {sorted(set(unsupported))}" if unsupported else "no Hugging Face model"
        warnings.warn(
            f"apply_kernels: {found} in {type(model).__name__} left untouched; supported families: {sorted(_FAMILIES)}",
            stacklevel=2,
        )
    return [n for n in KERNEL_NAMES if n in applied]


def active_kernels(model: nn.Module) -> list[str]:
    """The kernel names, in :data:`KERNEL_NAMES` order, active on at least one module inside ``model`` (whoever
    applied them)."""
    active = set().union(*(module.__dict__.get(_MARK, ()) for module in model.modules()))
    return [n for n in KERNEL_NAMES if n in active]


def running_kernels(model: nn.Module, device: torch.device) -> tuple[list[str], str | None]:
    """The kernels active inside ``model`` that actually run on ``device``, and why the others (if any) fall back
    to torch's ops there (``None`` when none does)."""
    active = active_kernels(model)
    if not active or device.type == "cuda" or INTERPRETED:
        return active, None
    return [], (
        f"kernels {', '.join(active)} fall back to torch's ops: Triton runs on the CPU only in its interpreter "
        "(set TRITON_INTERPRET=1 before importing triton)"
    )
