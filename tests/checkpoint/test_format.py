"""Directory checkpoints through Lightning's own paths: layout, atomic replacement, refusal of incomplete ones,
weights-only checkpoints, single-file Lightning checkpoints, and export to a Hugging Face directory."""

from __future__ import annotations

import json
import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lightning_slide
from lightning_slide import checkpoint as slide_checkpoint
from lightning_slide.checkpoint import INDEX, META, temp_path
from tests.core.tiny import TinyLM, batches, initial_state, trainer


def slide(window: int = 1) -> lightning_slide.SlideFormerStrategy:
    return lightning_slide.SlideFormerStrategy(window=window)


def tensors_in(obj) -> list:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_in(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v)]
    return []


class CaptureOptimizerState(L.Callback):
    """The host optimizer's state of every parameter at the end of training, by parameter name."""

    def on_train_end(self, trainer, pl_module):
        self.state = {}
        for name, param in pl_module.named_parameters():
            state = trainer.strategy.engine.optimizer_state(param)
            self.state[name] = {k: v.clone() for k, v in state.items()}


def test_model_checkpoint_writes_per_layer_directories_without_pickled_tensors(tmp_path):
    module = TinyLM("llama", initial_state("llama"))
    capture = CaptureOptimizerState()
    # top-1 without a monitor keeps only the newest: the step-1 and step-2 directories must be removed
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=1, every_n_train_steps=1)
    run = trainer(slide(), max_steps=3, enable_checkpointing=True, callbacks=[saver, capture])
    run.fit(module, batches(6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=3.ckpt", "last.ckpt"]

    run.save_checkpoint(tmp_path / "after_fit.ckpt")  # after fit: the engine is gone, the host state is not
    for ckpt in (tmp_path / "last.ckpt", tmp_path / "after_fit.ckpt"):
        layers = [f"layer-{i:05d}.safetensors" for i in range(4)]
        assert sorted(p.name for p in (ckpt / "model").iterdir()) == sorted(["resident.safetensors", *layers])
        assert sorted(p.name for p in (ckpt / "optimizer").iterdir()) == sorted(["resident.safetensors", *layers])
        layer2 = load_file(ckpt / "model" / "layer-00002.safetensors")
        assert layer2 and all(n.startswith("model.model.layers.2.") for n in layer2)
        masters = {}
        for file in (ckpt / "model").iterdir():
            masters.update(load_file(file))
        for name, param in module.named_parameters():
            assert torch.equal(masters[name], param.detach()), name
        states = {}
        for file in (ckpt / "optimizer").iterdir():
            states.update(load_file(file))
        for name, state in capture.state.items():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(states[f"{name}/{key}"], state[key]), (name, key)
            assert state["exp_avg"].abs().sum() > 0
        meta = torch.load(ckpt / META, weights_only=True)  # plain data: loads without unpickling any class
        assert not tensors_in(meta), "tensors were pickled into the metadata"
        assert meta["global_step"] == 3 and meta["lr_schedulers"] and "loops" in meta
        assert json.loads((ckpt / INDEX).read_text())["compute_dtype"] == "float32"


def test_save_replaces_atomically_and_an_interrupted_save_leaves_the_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    units = {"w": "0"}

    def save(value, **extra):
        state = {"w": torch.full((3,), float(value)), "resident": torch.zeros(2), **extra}
        slide_checkpoint.save(path, {"state_dict": state, "global_step": value}, unit_of=units)

    def stored():
        checkpoint = slide_checkpoint.load(path)
        return checkpoint["global_step"], checkpoint["state_dict"]["w"][0].item()

    save(1)
    assert stored() == (1, 1.0)
    save(2)  # over an existing checkpoint: one atomic exchange
    assert stored() == (2, 2.0)
    monkeypatch.setattr(slide_checkpoint.writing, "_exchange", lambda a, b: False)
    save(3)  # where the exchange is not available: two renames
    assert stored() == (3, 3.0)
    with pytest.raises(TypeError, match="not a tensor"):  # a save that fails after writing its first file
        save(4, broken="not a tensor")
    assert stored() == (3, 3.0), "a failed save damaged the previous checkpoint"
    assert not temp_path(path).exists()  # its partial directory is removed at once
    (temp_path(path) / "model").mkdir(parents=True)  # what a killed save leaves: aside, never named like a checkpoint
    save(5)
    assert stored() == (5, 5.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # ... and the next save removes it


def test_incomplete_or_damaged_checkpoint_is_refused(tmp_path):
    module = TinyLM("llama", initial_state("llama"))
    run = trainer(slide(), max_steps=1)
    run.fit(module, batches(2))
    good = tmp_path / "good.ckpt"
    run.save_checkpoint(good)
    incomplete, damaged = tmp_path / "incomplete.ckpt", tmp_path / "damaged.ckpt"
    shutil.copytree(good, incomplete)
    (incomplete / INDEX).unlink()
    shutil.copytree(good, damaged)
    layer = damaged / "model" / "layer-00001.safetensors"
    layer.write_bytes(layer.read_bytes()[:-8])
    for path, message in ((incomplete, "interrupted save"), (damaged, "damaged: model/layer-00001")):
        with pytest.raises(ValueError, match=message):
            trainer(slide(), max_steps=2).fit(TinyLM("llama", initial_state("llama")), batches(4), ckpt_path=path)


def test_weights_only_checkpoints(tmp_path):
    module = TinyLM("qwen3", initial_state("qwen3"))
    saver = ModelCheckpoint(
        dirpath=tmp_path / "cb", save_last=True, save_top_k=0, save_weights_only=True, every_n_train_steps=1
    )
    run = trainer(slide(), max_steps=2, enable_checkpointing=True, callbacks=[saver])
    run.fit(module, batches(4))
    run.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    validation = batches(2, seed=5)
    expected = run.validate(module, validation, verbose=False)[0]["val_loss"]
    untrained = trainer(slide()).validate(TinyLM("qwen3", initial_state("qwen3")), validation, verbose=False)
    assert untrained[0]["val_loss"] != pytest.approx(expected)  # so that equal losses show the weights were loaded
    for ckpt in (tmp_path / "cb" / "last.ckpt", tmp_path / "weights.ckpt"):
        assert not (ckpt / "optimizer").exists()
        assert json.loads((ckpt / INDEX).read_text())["optimizer"] is False
        fresh = TinyLM("qwen3", initial_state("qwen3"))
        loaded = trainer(slide()).validate(fresh, validation, ckpt_path=ckpt, verbose=False)[0]["val_loss"]
        assert loaded == pytest.approx(expected, rel=1e-6)
    with pytest.raises(KeyError, match="save_weights_only"):  # Lightning's own refusal to resume training from it
        trainer(slide(), max_steps=3).fit(
            TinyLM("qwen3", initial_state("qwen3")), batches(6), ckpt_path=tmp_path / "weights.ckpt"
        )


def test_single_file_lightning_checkpoint_resumes(tmp_path):
    # One optimizer step per epoch (2 micro-batches): Lightning resumes exactly at epoch boundaries.
    plain_run = trainer("auto", max_steps=2, max_epochs=-1)
    plain_run.fit(TinyLM("llama", initial_state("llama")), batches(2))
    plain_run.save_checkpoint(tmp_path / "plain.ckpt")
    assert (tmp_path / "plain.ckpt").is_file()
    resumed = []
    for strategy in ("auto", slide()):
        module = TinyLM("llama", initial_state("llama"))
        trainer(strategy, max_steps=5, max_epochs=-1).fit(module, batches(2), ckpt_path=tmp_path / "plain.ckpt")
        resumed.append(module)
    plain, ours = resumed
    assert len(ours.losses) == len(plain.losses) > 0
    for a, b in zip(ours.losses, plain.losses):
        assert abs(a - b) <= 1e-5 * abs(b)
    theirs = dict(plain.named_parameters())
    for name, param in ours.named_parameters():
        assert torch.allclose(param, theirs[name], rtol=1e-5, atol=1e-7), name


def test_checkpoint_to_hugging_face(tmp_path):
    # Tied embeddings, bf16 compute: export in fp32 (the masters) and in the compute dtype, sharded.
    module = TinyLM("gemma_tied", initial_state("gemma_tied"))
    run = trainer(slide(), precision="bf16-true", max_steps=2)
    run.fit(module, batches(4))
    ckpt = tmp_path / "last.ckpt"
    run.save_checkpoint(ckpt)
    trained = {n: p.detach() for n, p in module.model.named_parameters()}
    assert not torch.equal(
        trained["model.embed_tokens.weight"], initial_state("gemma_tied")["model.embed_tokens.weight"]
    )

    out = slide_checkpoint.checkpoint_to_hf(ckpt, tmp_path / "fp32", max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.model.embed_tokens.weight is loaded.lm_head.weight or torch.equal(
        loaded.model.embed_tokens.weight, loaded.lm_head.weight
    )
    for name, param in loaded.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param.detach(), trained[name]), name

    slide_checkpoint._main([str(ckpt), str(tmp_path / "bf16"), "--dtype", "compute"])  # the command line
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    for name, param in loaded.named_parameters():
        assert param.dtype == torch.bfloat16 and torch.equal(param.detach(), trained[name].bfloat16()), name


def test_the_app_exports_with_the_same_function():
    from lightning_slide.app import export, train

    assert export.export_hf is slide_checkpoint.export_hf and train.export_hf is slide_checkpoint.export_hf
