"""The app end to end in-process (Hydra compose API): training, overrides, export, and errors before heavy work."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_slide.app.errors import DataError, ModelDirError, SlideAppError
from lightning_slide.app.train import train

from .conftest import FAST, compose_cfg, write_jsonl


def _exported_equals_trained(result):
    trained = result["module"].model.state_dict()
    exported = AutoModelForCausalLM.from_pretrained(result["hf_dir"]).state_dict()
    assert trained.keys() == exported.keys()
    for name, tensor in trained.items():
        assert torch.equal(tensor.cpu(), exported[name]), name


def test_demo_trains_and_exports(tmp_path):
    result = train(
        compose_cfg(
            *FAST,
            "strategy.window=3",
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "data.batch_size=8",
            "model.lr=3e-3",
            "model.config.hidden_size=64",
            output_dir=tmp_path,
        )
    )
    trainer, module = result["trainer"], result["module"]
    assert trainer.global_step == 6 and trainer.strategy.options.window == 3  # overrides took effect
    assert next(iter(result["datamodule"].train_dataloader()))["input_ids"].shape[0] == 8
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == 3e-3
    assert module.model.config.hidden_size == 64
    assert result["metric"] < result["metric_before"]  # val/loss
    assert result["summary"].tokens > 0
    assert (tmp_path / "checkpoints" / "last.ckpt" / "index.json").is_file()  # a directory checkpoint
    header, *rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    logged = [dict(zip(header.split(","), row.split(","))) for row in rows]
    norms = {int(r["step"]) for r in logged if r.get("train/grad_norm")}  # the default callbacks' GradNormMonitor
    assert norms == set(range(6))
    _exported_equals_trained(result)
    model = AutoModelForCausalLM.from_pretrained(result["hf_dir"])
    ids = module.tokenizer("Where is", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5


def test_finetunes_a_model_directory(tiny_model_dir, text_jsonl, tmp_path):
    result = train(
        compose_cfg(
            *FAST,
            "model=causal_lm",
            f"model.path={tiny_model_dir}",
            "model.lr=1e-3",
            "model.warmup_steps=0",
            "data=jsonl",
            f"data.path={text_jsonl}",
            "data.max_length=32",
            "data.pack=true",
            "data.val_size=4",
            "export.dtype=float32",
            output_dir=tmp_path,
        )
    )
    assert result["trainer"].global_step == 4
    assert result["metric"] < result["metric_before"]  # val/loss
    _exported_equals_trained(result)
    # without export.dtype the export keeps the checkpoint's dtype (bf16 here)
    assert result["module"].checkpoint_dtype == torch.bfloat16


def test_resume_from_checkpoint(tmp_path):
    first = train(compose_cfg(*FAST, "model.config.hidden_size=64", "sample_tokens=0", output_dir=tmp_path / "a"))
    resumed = train(
        compose_cfg(
            *FAST,
            "model.config.hidden_size=64",
            "sample_tokens=0",
            "trainer.max_steps=6",
            f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}",
            output_dir=tmp_path / "b",
        )
    )
    assert resumed["trainer"].global_step == 6
    assert resumed["metric_before"] == pytest.approx(first["metric"], rel=1e-4)


def test_required_paths_are_named(tmp_path):
    with pytest.raises(SlideAppError, match=r"model.path=/path/to/model"):
        train(compose_cfg("model=qwen3_0_6b", output_dir=tmp_path))
    with pytest.raises(SlideAppError, match=r"data.path=train.jsonl"):
        train(compose_cfg("data=jsonl", output_dir=tmp_path))


def test_wrong_model_directory_for_the_shape(tiny_model_dir, tmp_path):
    with pytest.raises(ModelDirError, match=r"hidden_size=64 \(expected 4096\)"):
        train(compose_cfg("model=llama3_8b", f"model.path={tiny_model_dir}", output_dir=tmp_path))
    with pytest.raises(ModelDirError, match="does not exist"):
        train(compose_cfg("model=causal_lm", f"model.path={tmp_path / 'nowhere'}", output_dir=tmp_path))


def test_data_errors_come_before_training(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, "{not json"])
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        train(compose_cfg(*FAST, "data=jsonl", f"data.path={bad}", output_dir=tmp_path))
    with pytest.raises(DataError, match=r"demo.jsonl:\d+: the example has \d+ tokens, longer than data.max_length=4"):
        train(compose_cfg(*FAST, "data.max_length=4", output_dir=tmp_path))
    with pytest.raises(DataError, match=r"data.max_length=512 is longer than the model's context of 256 tokens"):
        train(compose_cfg(*FAST, "data.max_length=512", output_dir=tmp_path))
    assert not (tmp_path / "checkpoints").exists()  # nothing ran


def test_kernels_option_reaches_the_model(tmp_path):
    # Small, as the kernels run in Triton's interpreter on a CPU
    result = train(
        compose_cfg(
            *FAST,
            "kernels=all",
            "trainer.max_steps=1",
            "trainer.limit_val_batches=1",
            "model.config.hidden_size=32",
            "model.config.num_hidden_layers=1",
            "data.batch_size=2",
            "data.val_size=2",
            "export.enabled=false",
            "sample_tokens=0",
            output_dir=tmp_path,
        )
    )
    batch = next(iter(result["datamodule"].val_dataloader()))
    out = result["module"](batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
    assert out.logits is None and torch.isfinite(out.loss)  # the fused loss never builds the logits


def test_a_model_too_large_to_load_is_refused_before_it_is_built(tiny_model_dir, tmp_path):
    # slide-train loads (or builds) the model whole in fp32 before the strategy splits it: that must fit the host
    with pytest.raises(
        SlideAppError, match=r"building the model in fp32 needs [\d.]+ MiB of host memory .* more than the 64.00 KiB"
    ):
        train(compose_cfg(*FAST, "strategy.tuning.host_memory=64KiB", output_dir=tmp_path))
    with pytest.raises(SlideAppError, match=r"loading '.*' as stored needs .* strategy.tuning.host_memory"):
        train(
            compose_cfg(
                *FAST,
                "model=causal_lm",
                f"model.path={tiny_model_dir}",
                "strategy.tuning.host_memory=64KiB",
                output_dir=tmp_path,
            )
        )
    assert not (tmp_path / "checkpoints").exists()  # nothing ran


def test_a_bf16_checkpoint_loads_as_stored_and_trains_as_from_fp32(tiny_model_dir, tmp_path, monkeypatch):
    # slideformer makes fp32 masters of the bf16 weights as stored: half the host memory at setup, the same run
    from lightning_slide.app import module as app_module

    run = [*FAST, "model=causal_lm", f"model.path={tiny_model_dir}", "trainer.max_steps=3", "export.enabled=false"]
    real, dtypes = app_module.load_causal_lm, []

    def load(*args, force_fp32=False, **kwargs):
        model = real(*args, **{**kwargs, "as_stored": kwargs["as_stored"] and not force_fp32})
        dtypes.append(model.lm_head.weight.dtype)
        return model

    monkeypatch.setattr(app_module, "load_causal_lm", load)
    as_stored = train(compose_cfg(*run, output_dir=tmp_path / "stored"))
    monkeypatch.setattr(app_module, "load_causal_lm", lambda *a, **k: load(*a, force_fp32=True, **k))
    fp32 = train(compose_cfg(*run, output_dir=tmp_path / "fp32"))
    assert dtypes == [torch.bfloat16, torch.float32]  # as loaded
    trained, reference = as_stored["module"].model.state_dict(), fp32["module"].model.state_dict()
    assert as_stored["trainer"].global_step == 3 and trained.keys() == reference.keys()
    for name, tensor in trained.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, reference[name]), name


def test_the_summary_tells_the_disk_tier(tmp_path, caplog):
    offload = tmp_path / "offload"
    run = [*FAST, "trainer.max_steps=2", f"strategy.offload_dir={offload}", "strategy.offload=both"]
    with caplog.at_level("INFO", logger="lightning_slide.app.train"):
        result = train(compose_cfg(*run, "export.enabled=false", output_dir=tmp_path / "run"))
    files = sum(f.stat().st_size for f in offload.rglob("*") if f.is_file())
    assert result["trainer"].global_step == 2 and files > 0
    assert f"{files / 2**30:.2f} GiB in offload_dir (disk tier)" in caplog.text
