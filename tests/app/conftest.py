import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from lightning_slide.app.train import ASSETS, CONF

FAST = ["experiment=smoke", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def compose_cfg(*overrides: str, output_dir: Path | None = None):
    """The app's config as ``slide-train`` composes it from these command-line overrides."""
    extra = [f"output_dir={output_dir}"] if output_dir is not None else []
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=[*overrides, *extra])


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama saved the way hub models are: bf16 shards with an index, tied embeddings, a tokenizer."""
    out = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="200KB")
    tokenizer.save_pretrained(out)
    assert (out / "model.safetensors.index.json").is_file()
    return out


@pytest.fixture
def text_jsonl(tmp_path) -> Path:
    lines = [
        {"text": f"The river Oll flows through city number {i}, which makes {w}."}
        for i, w in enumerate(["glass", "salt", "wool", "tea"] * 10)
    ]
    return write_jsonl(tmp_path / "text.jsonl", lines)
