"""The Hydra configs: defaults, groups, overrides and strict checking, without training."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from lightning_slide.app.train import CONF

from .conftest import compose_cfg

SHAPES = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if p.stem not in ("causal_lm", "tiny_llama"))


def test_defaults_are_the_demo_on_slideformer():
    cfg = compose_cfg(output_dir="/tmp/x")
    assert cfg.strategy._target_ == "lightning_slide.SlideFormerStrategy" and cfg.strategy.window == 2
    assert cfg.model.config.model_type == "llama" and cfg.model.path is None
    assert cfg.data.path.endswith("assets/demo.jsonl") and cfg.kernels.names == "none"
    assert cfg.trainer.precision in ("bf16-true", "32-true")
    assert not OmegaConf.missing_keys(cfg)


def test_overrides_take_effect():
    cfg = compose_cfg(
        "model=qwen3_0_6b",
        "model.path=/models/Qwen3-0.6B",
        "strategy.window=3",
        "trainer.max_steps=200",
        "data=jsonl",
        "data.path=train.jsonl",
        "kernels=all",
    )
    assert cfg.model.path == "/models/Qwen3-0.6B" and cfg.model.expect.hidden_size == 1024
    assert cfg.strategy.window == 3 and cfg.trainer.max_steps == 200
    assert cfg.data.path == "train.jsonl" and cfg.kernels.names == "all"


@pytest.mark.parametrize("name", SHAPES)
def test_model_shapes_need_a_path(name):
    cfg = compose_cfg(f"model={name}", output_dir="/tmp/x")
    assert OmegaConf.missing_keys(cfg) == {"model.path"}
    # the whole shape (slide-plan plans from it without a directory; a directory must match it)
    assert set(cfg.model.expect) == {
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "tie_word_embeddings",
    }


def test_shapes_cover_the_issue():
    wanted = {
        "llama3_1b",
        "llama3_3b",
        "llama3_8b",
        "llama3_70b",
        "qwen3_0_6b",
        "qwen3_1_7b",
        "qwen3_4b",
        "qwen3_8b",
        "qwen3_14b",
        "qwen3_32b",
        "mistral_7b",
    }
    assert wanted <= set(SHAPES)


def test_unknown_option_is_refused():
    with pytest.raises(ConfigCompositionException, match="strategy.windw"):
        compose_cfg("strategy.windw=3")
    with pytest.raises(ConfigCompositionException, match="model/no_such_model"):
        compose_cfg("model=no_such_model")


def test_experiment_preset_composes():
    cfg = compose_cfg("experiment=qwen3_8b_sft", "model.path=/m", "data.path=d.jsonl")
    assert cfg.model.expect.hidden_size == 4096 and cfg.strategy.window == 3 and cfg.data.pack
