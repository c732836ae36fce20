"""The disk tier: optimizer state in real files, training unchanged."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import lightning_slide
from lightning_slide.engine.disk import check_disk_space
from tests.core.test_parity import assert_same_training
from tests.core.tiny import TinyLM, batches, initial_state, trainer


@pytest.mark.parametrize("clip, accumulate", [(0.5, 2), (None, 1)])
def test_optimizer_state_on_disk_trains_the_same(tmp_path, clip, accumulate):
    modules = []
    for strategy in ("auto", lightning_slide.SlideFormerStrategy(window=1, offload_dir=str(tmp_path))):
        torch.manual_seed(123)
        module = TinyLM("llama", initial_state("llama"))
        trainer(strategy, gradient_clip_val=clip, accumulate_grad_batches=accumulate, max_steps=6).fit(
            module, batches(6 * accumulate)
        )
        modules.append(module)
    plain, ours = modules
    assert_same_training(ours, plain)
    layer = sum(p.numel() for p in ours.model.model.layers[0].parameters())
    for name in ("exp_avg", "exp_avg_sq"):
        assert (tmp_path / f"layer00000.{name}.bin").stat().st_size == 4 * layer
        assert (tmp_path / f"resident.{name}.bin").exists()


def test_optimizer_state_dict_reads_the_disk_tier(tmp_path):
    captured = {}

    class Capture(L.Callback):
        def on_train_end(self, trainer, pl_module):
            captured["state"] = trainer.optimizers[0].state_dict()

    module = TinyLM("llama", initial_state("llama"))
    strategy = lightning_slide.SlideFormerStrategy(window=1, offload_dir=str(tmp_path))
    trainer(strategy, max_steps=2, callbacks=[Capture()]).fit(module, batches(4))
    state = captured["state"]["state"]
    assert len(state) == sum(len(g["params"]) for g in captured["state"]["param_groups"])
    assert all(s["exp_avg"].abs().sum() > 0 and float(s["step"]) == 2 for s in state.values())


def test_not_enough_disk_space_is_refused_up_front(tmp_path):
    with pytest.raises(ValueError, match=r"needs 8\.00 GiB under .* only 1\.00 GiB is free.*offload_dir"):
        check_disk_space(tmp_path, needed=8 * 2**30, free=2**30)
    check_disk_space(tmp_path, needed=1)  # the real free space of this disk
    with pytest.raises(ValueError, match="needs"):
        check_disk_space(tmp_path, needed=2**62)


def test_checkpoint_and_exact_resume_with_the_disk_tier(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(steps, name, state, ckpt_path=None):
        torch.manual_seed(123)
        module = TinyLM("llama", initial_state("llama"))
        saver = ModelCheckpoint(dirpath=tmp_path / name, save_last=True, every_n_train_steps=1)
        strategy = lightning_slide.SlideFormerStrategy(window=1, offload_dir=str(tmp_path / state))
        trainer(strategy, max_steps=steps, max_epochs=-1, enable_checkpointing=True, callbacks=[saver]).fit(
            module, batches(2), ckpt_path=ckpt_path
        )
        return module

    straight = run(5, "straight", "state-straight")
    run(3, "first", "state-first")
    resumed = run(5, "first", "state-resumed", ckpt_path="last")  # the optimizer state must come from the checkpoint
    assert resumed.losses == straight.losses[6:]
    theirs = dict(straight.named_parameters())
    for name, param in resumed.named_parameters():
        assert torch.equal(param, theirs[name]), name
