"""Hugging Face export: a model in memory (``export_hf``) or a checkpoint directory (``checkpoint_to_hf``) written
as a directory that ``AutoModelForCausalLM.from_pretrained`` loads."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

from lightning_slide.checkpoint.format import HF_CONFIG
from lightning_slide.checkpoint.reading import CheckpointReader


def export_hf(
    model: torch.nn.Module,
    tokenizer,
    out_dir: str | Path,
    dtype: torch.dtype | str = torch.float32,
    max_shard_size: str = "5GB",
) -> Path:
    """Write ``model`` (and ``tokenizer``) so that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads them.

    Args:
        model: a Hugging Face ``PreTrainedModel`` whose parameters are on the host (as after a slideformer fit).
        tokenizer: its tokenizer (saved alongside, so the directory is self-contained), or ``None``.
        out_dir: directory to create or overwrite.
        dtype: dtype of the saved weights; a dtype other than the parameters' makes one converted copy of the
            weights in host memory while saving. Default ``torch.float32``.
        max_shard_size: largest safetensors shard (with ``model.safetensors.index.json`` when sharded). Default "5GB".

    Returns the directory.
    """
    out_dir = Path(out_dir)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    state_dict = None  # save_pretrained reads the parameters in place
    if any(p.dtype != dtype for p in model.parameters()):
        state_dict, converted = {}, {}  # by storage, so tied weights stay one tensor (saved once)
        for name, tensor in model.state_dict().items():
            key = (tensor.data_ptr(), tensor.shape)
            if key not in converted:
                converted[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
            state_dict[name] = converted[key]
    model.save_pretrained(out_dir, state_dict=state_dict, max_shard_size=max_shard_size)
    if state_dict is not None:  # save_pretrained records the parameters' dtype; record the shards' instead
        config = copy.deepcopy(model.config)
        config.dtype = dtype
        config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def hf_info(module: torch.nn.Module) -> dict[str, Any] | None:
    """``{"prefix", "architecture", "config"}`` of the outermost Hugging Face ``PreTrainedModel`` inside ``module``
    (``prefix`` is its name in the module's state dict, e.g. ``"model."``), or ``None``."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    for name, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel):
            return {
                "prefix": f"{name}." if name else "",
                "architecture": type(sub).__name__,
                "config": sub.config.to_dict(),
            }
    return None


def checkpoint_to_hf(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    tokenizer=None,
    config=None,
    prefix: str | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Convert a checkpoint directory into a Hugging Face model directory (safetensors shards with their index,
    and the config) that ``AutoModelForCausalLM.from_pretrained`` loads.

    Args:
        checkpoint: a slideformer checkpoint directory (full or weights-only).
        out_dir: the Hugging Face directory to create or overwrite.
        dtype: dtype of the exported weights: a ``torch.dtype`` or its name, or ``"compute"`` for the training's
            compute dtype (bf16 under ``precision="bf16-true"``). Default ``torch.float32`` (the masters as they are).
        tokenizer: saved alongside when given (e.g. ``AutoTokenizer.from_pretrained(...)``). Default ``None``.
        config: the model's ``PretrainedConfig``. Default ``None``: the config recorded in the checkpoint (there is
            one when the LightningModule held a Hugging Face ``PreTrainedModel``).
        prefix: the model's name prefix in the LightningModule's state dict (e.g. ``"model."``). Default ``None``:
            the recorded one.
        max_shard_size: largest shard. Default ``"5GB"``.

    The model is built on the meta device and filled one unit at a time (already in ``dtype``), so host memory
    holds one copy of the weights in the exported dtype. Returns ``out_dir``.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    reader = CheckpointReader(checkpoint)
    recorded = None
    if (reader.path / HF_CONFIG).is_file():
        recorded = json.loads((reader.path / HF_CONFIG).read_text())
    if config is None:
        if recorded is None:
            raise ValueError(
                f"checkpoint {str(reader.path)!r} records no Hugging Face config (its LightningModule held no "
                "PreTrainedModel); pass checkpoint_to_hf(..., config=AutoConfig.from_pretrained(...), prefix=...)"
            )
        fields = dict(recorded["config"])
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if prefix is None:
        prefix = recorded["prefix"] if recorded is not None else ""
    if dtype == "compute":
        dtype = reader.index.get("compute_dtype", "float32")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype

    architecture = recorded and getattr(transformers, recorded.get("architecture", ""), None)
    with torch.device("meta"):
        model = architecture._from_config(config) if architecture else AutoModelForCausalLM.from_config(config)
    expected = set(model.state_dict())
    loaded: set[str] = set()
    for _, tensors in reader.model_units():
        mine = {
            k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix) and k[len(prefix) :] in expected
        }
        converted: dict[int, torch.Tensor] = {}  # tied names keep sharing one tensor
        for key, tensor in mine.items():
            if id(tensor) not in converted:
                converted[id(tensor)] = tensor.to(dtype) if tensor.is_floating_point() else tensor
            mine[key] = converted[id(tensor)]
        model.load_state_dict(mine, strict=False, assign=True)
        loaded.update(mine)
        del tensors, mine, converted
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(
            f"checkpoint {str(reader.path)!r} lacks {missing[:5]} ({len(missing)} tensors) of the "
            f"{type(model).__name__} under prefix {prefix!r}; pass the right config= and prefix="
        )
    model.tie_weights()
    return export_hf(model, tokenizer, out_dir, dtype=dtype, max_shard_size=max_shard_size)
