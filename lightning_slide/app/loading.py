"""Load a Hugging Face causal LM into host memory, one safetensors shard at a time.

The model is built on the meta device (no memory), then every shard is read tensor by tensor, converted to fp32 on
the CPU (or kept as stored, for slideformer, which makes its own fp32 masters) and *assigned* into the model
(``load_state_dict(assign=True)``): the loaded tensors become the parameters, so host memory peaks at one model plus
one shard, never two copies of the model, and nothing touches the GPU. That peak is checked before anything loads.
"""

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from lightning_slide.app.errors import ModelDirError, SlideAppError
from lightning_slide.engine.machine import host_available
from lightning_slide.engine.sizes import human

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors shards of a model directory (``model.safetensors`` or the shards an index lists).

    Raises ``ModelDirError`` naming what is missing: the directory, ``config.json``, weights, a shard, the tokenizer.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(
            f"model directory {str(path)!r} does not exist (set model.path to a local Hugging Face "
            "model directory: config.json, *.safetensors, tokenizer files)"
        )
    if not (path / "config.json").is_file():
        raise ModelDirError(f"model directory {str(path)!r} has no config.json")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelDirError(f"model directory {str(path)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    if (path / INDEX).is_file():
        shards = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            raise ModelDirError(
                f"model directory {str(path)!r}: {INDEX} lists shards that are missing: {', '.join(missing)}"
            )
        return [path / name for name in shards]
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if found:  # unindexed shards (some exporters write them): load them all
        return [path / name for name in found]
    other = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    hint = f" (found {', '.join(other)}; convert them to safetensors)" if other else ""
    raise ModelDirError(f"model directory {str(path)!r} has no safetensors weights ({SINGLE} or {INDEX}){hint}")


def load_config(path: str | Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config, after checking that the directory holds config, weights and tokenizer."""
    weight_files(path)
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def stored_bytes(shards: list[Path]) -> int:
    """Bytes of the tensors in ``shards`` as stored (read from their headers, not their data)."""
    total = 0
    for shard in shards:
        with safe_open(shard, framework="pt", device="cpu") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                total += math.prod(piece.get_shape()) * _ELEMENT_BYTES.get(piece.get_dtype(), 4)
    return total


_ELEMENT_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def check_room_to_load(needed: int, what: str, host_memory: int | None = None, copies: int = 1) -> None:
    """Raise ``SlideAppError`` when ``copies`` copies of a model of ``needed`` bytes need more host memory than
    ``host_memory`` (default: what the OS reports available now) — before any is made. ``copies``: the processes of
    this host that each load one (data-parallel ranks)."""
    available = host_available() if host_memory is None else host_memory
    if copies * needed > available:
        ranks = f", once in each of the {copies} processes on this host" if copies > 1 else ""
        raise SlideAppError(
            f"{what} needs {human(copies * needed)} of host memory (the model whole, before the strategy splits it"
            f"{ranks}), more than the {human(available)} available; use a machine with more host memory or a "
            "smaller model (if the OS reports too little, e.g. in a VM whose memory grows, set "
            "strategy.tuning.host_memory)"
        )


def build_causal_lm(
    config: PretrainedConfig, trust_remote_code: bool = False, host_memory: int | None = None, copies: int = 1
) -> torch.nn.Module:
    """A randomly initialized fp32 model on the CPU (the demo model, or any shape to train from scratch), after
    checking that the host has room for it (:func:`check_room_to_load`)."""
    with torch.device("meta"):
        shape_only = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    fp32 = 4 * sum(p.numel() for p in shape_only.parameters())
    check_room_to_load(fp32, "building the model in fp32", host_memory, copies)
    with torch.device("cpu"):  # explicit: the caller may run under a Lightning init context that targets the GPU
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)


def load_causal_lm(
    path: str | Path,
    trust_remote_code: bool = False,
    host_memory: int | None = None,
    copies: int = 1,
    as_stored: bool = False,
) -> torch.nn.Module:
    """The model of a local Hugging Face directory on the CPU (fp32 weights, or as stored), loaded shard by shard.

    Args:
        path: directory with ``config.json``, ``model.safetensors`` or an index and its shards, and a tokenizer.
        trust_remote_code: allow the directory's own modeling code (off by default: it runs arbitrary code).
        host_memory, copies: what :func:`check_room_to_load` checks before the first shard is read.
        as_stored: keep each weight in the dtype of its file (a bf16 checkpoint takes half the memory of fp32) for
            a strategy that makes its own fp32 masters from them (slideformer: the same values, so the same training).
    """
    shards = weight_files(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    needed = stored_bytes(shards) if as_stored else 4 * sum(p.numel() for p in model.parameters())
    how = "as stored" if as_stored else "in fp32"
    check_room_to_load(needed, f"loading {str(path)!r} {how}", host_memory, copies)
    expected = set(model.state_dict())
    loaded: set[str] = set()
    for shard in shards:
        with safe_open(shard, framework="pt", device="cpu") as f:
            # Converting tensor by tensor keeps at most one shard (in fp32) besides the model.
            tensors = {key: _read(f, key, as_stored) for key in f.keys()}
        unexpected = sorted(set(tensors) - expected)
        if unexpected:
            raise ModelDirError(
                f"{shard}: tensors {unexpected[:5]} are not parameters of {type(model).__name__} "
                "(a different architecture, or a checkpoint layout this loader does not convert)"
            )
        model.load_state_dict(tensors, strict=False, assign=True)
        loaded |= tensors.keys()
        del tensors
    model.tie_weights()  # re-point tied heads (e.g. lm_head -> embed_tokens) at the assigned tensors
    _materialize_buffers(model)
    still_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise ModelDirError(
            f"model directory {str(path)!r}: the weights lack {still_meta[:5]} ({len(still_meta)} tensors in all)"
        )
    return model


def _read(f, key: str, as_stored: bool) -> torch.Tensor:
    tensor = f.get_tensor(key)
    return tensor if as_stored else tensor.to(torch.float32)


def _materialize_buffers(model: torch.nn.Module) -> None:
    """Recompute buffers that are not in checkpoints (rotary ``inv_freq``) on the CPU: they were born on meta."""
    for module in model.modules():
        if any(
            buf.is_meta and name in module._non_persistent_buffers_set
            for name, buf in module.named_buffers(recurse=False)
        ):
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)  # the model's own init recomputes them, as from_pretrained does
