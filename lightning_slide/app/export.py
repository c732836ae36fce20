"""Export trained weights as a Hugging Face model directory (safetensors, config, tokenizer)."""

import copy
from pathlib import Path

import torch


def export_hf(model: torch.nn.Module, tokenizer, out_dir: str | Path, dtype: torch.dtype | str = torch.float32,
              max_shard_size: str = "5GB") -> Path:
    """Write ``model`` and ``tokenizer`` so that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads them.

    Args:
        model: a Hugging Face ``PreTrainedModel`` whose parameters are on the host (as after a slideformer fit).
        tokenizer: its tokenizer (saved alongside, so the directory is self-contained).
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
    tokenizer.save_pretrained(out_dir)
    return out_dir
