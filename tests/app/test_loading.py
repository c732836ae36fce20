"""Loading a Hugging Face directory into host memory shard by shard, and its errors."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_slide.app.errors import ModelDirError, SlideAppError
from lightning_slide.app.loading import load_causal_lm, stored_bytes, weight_files


def test_loads_sharded_bf16_as_fp32_on_cpu(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings stay tied
    for (name, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert p.dtype == torch.float32 and p.device.type == "cpu" and torch.equal(p, q), name
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    torch.testing.assert_close(model(x).logits, reference(x).logits)


def _copy(src, dst, skip=()):
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n in skip])
    return dst


@pytest.mark.parametrize(
    "missing, message",
    [
        ("config.json", "no config.json"),
        ("tokenizer.json", "no tokenizer"),
        ("model-00002-of-", "lists shards that are missing: model-00002-of-"),
    ],
)
def test_missing_files_are_named(tiny_model_dir, tmp_path, missing, message):
    skip = [p.name for p in tiny_model_dir.iterdir() if p.name.startswith(missing)]
    if missing == "tokenizer.json":
        skip.append("tokenizer_config.json")
    broken = _copy(tiny_model_dir, tmp_path / "m", skip)
    with pytest.raises(ModelDirError, match=message):
        load_causal_lm(broken)


def test_missing_directory_and_weights(tiny_model_dir, tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        weight_files(tmp_path / "nowhere")
    broken = _copy(tiny_model_dir, tmp_path / "m", [p.name for p in tiny_model_dir.glob("model*")])
    (broken / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelDirError, match=r"no safetensors weights.*pytorch_model.bin"):
        weight_files(broken)


def test_foreign_tensors_are_refused(tiny_model_dir, tmp_path):
    broken = _copy(tiny_model_dir, tmp_path / "m")
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] = 1  # the shards hold layer 1, which this model does not have
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="not parameters of LlamaForCausalLM"):
        load_causal_lm(broken)


def test_room_to_load_is_checked_first(tiny_model_dir):
    fp32 = 4 * sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert load_causal_lm(tiny_model_dir, host_memory=fp32) is not None  # exactly enough
    with pytest.raises(SlideAppError, match="once in each of the 2 processes on this host"):
        load_causal_lm(tiny_model_dir, host_memory=fp32, copies=2)
    with pytest.raises(SlideAppError, match=r"in fp32 needs .* \(the model whole, before the strategy splits it\)"):
        load_causal_lm(tiny_model_dir, host_memory=fp32 - 1)


def test_as_stored_keeps_the_checkpoints_dtype_and_values(tiny_model_dir):
    fp32 = load_causal_lm(tiny_model_dir)
    stored = load_causal_lm(tiny_model_dir, as_stored=True, host_memory=stored_bytes(weight_files(tiny_model_dir)))
    assert stored_bytes(weight_files(tiny_model_dir)) * 2 == 4 * sum(p.numel() for p in fp32.parameters())
    assert stored.lm_head.weight is stored.model.embed_tokens.weight
    for (name, p), (_, q) in zip(stored.named_parameters(), fp32.named_parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p.float(), q), name  # the file's bf16, the same values
    with pytest.raises(SlideAppError, match="as stored needs"):
        load_causal_lm(tiny_model_dir, as_stored=True, host_memory=stored_bytes(weight_files(tiny_model_dir)) - 1)
