"""CausalLMModule: optimizer groups and LR schedule."""

import math

import torch

from lightning_slide.app.module import CausalLMModule, warmup_cosine
from lightning_slide.app.train import ASSETS


def test_weight_decay_groups():
    module = CausalLMModule(
        config={
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "attention_bias": True,
        },
        tokenizer=str(ASSETS / "tokenizer"),
        weight_decay=0.1,
    )
    module.configure_model()
    decay, no_decay = module.parameter_groups()
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 and "embed" not in names[id(p)] for p in decay["params"])
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "model.embed_tokens.weight" in no_decay_names and "model.norm.weight" in no_decay_names
    assert any(n.endswith("q_proj.bias") for n in no_decay_names)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.model.parameters()))


def test_warmup_then_cosine():
    lr = [warmup_cosine(s, warmup_steps=10, total_steps=110, decay="cosine", min_lr_ratio=0.1) for s in range(110)]
    assert lr[0] == 0.1 and lr[9] == 1.0 and lr[10] == 1.0
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert math.isclose(warmup_cosine(110, 10, 110, "cosine", 0.1), 0.1)
    assert warmup_cosine(50, 10, 110, "constant", 0.1) == 1.0
    assert warmup_cosine(5, 0, 0, "cosine", 0.1) == 1.0  # unbounded training: no decay


def test_moments_choose_the_optimizer():
    import pytest

    from lightning_slide import optim

    with pytest.raises(ValueError, match="moments must be 'fp32' or 'bf16'"):
        CausalLMModule(config={"model_type": "llama"}, tokenizer=str(ASSETS / "tokenizer"), moments="fp16")
    module = CausalLMModule(
        config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1},
        tokenizer=str(ASSETS / "tokenizer"),
        moments="bf16",
    )
    module.configure_model()
    module.trainer = type("Trainer", (), {"estimated_stepping_batches": 10})()  # what configure_optimizers reads
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, optim.AdamW) and optimizer.state_dtype == torch.bfloat16
