"""host_weights='compute': layers upload from a bf16 host copy kept by the host optimizer, training unchanged."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

import lightning_slide
from lightning_slide import optim
from tests.core.tiny import TinyLM, batches, initial_state, trainer


@pytest.mark.parametrize(
    ("clip", "accumulate", "moments"),
    [
        (0.5, 2, torch.float32),
        (None, 1, torch.float32),
        (0.5, 1, torch.bfloat16),
        (None, 2, torch.bfloat16),
        (None, 1, "adam"),
    ],
)  # updates after backward / streamed from it
def test_bf16_host_copy_trains_exactly_like_fp32_uploads(clip, accumulate, moments):
    """AdamW's own host kernel writes the copy in its own pass, fp32 moments or bf16: no refresh of it after the
    update; torch's fused kernel (Adam) is followed by a refresh."""
    seen, refreshes = {}, {}

    class Look(L.Callback):
        def on_train_start(self, trainer, pl_module):
            refreshes[trainer.strategy.engine.host_weights] = counted = []
            for unit in trainer.strategy.engine.layers:
                refresh = unit.refresh_weights
                unit.refresh_weights = lambda *args, refresh=refresh: (counted.append(1), refresh(*args))

        def on_train_end(self, trainer, pl_module):
            engine = trainer.strategy.engine
            engine.finish_updates()
            seen[engine.host_weights] = [(u.weights, u.master.clone()) for u in engine.layers]

    optimizer = {torch.float32: "adamw", "adam": "adam"}.get(moments)
    optimizer = optimizer or functools.partial(optim.AdamW, lr=3e-3, betas=(0.9, 0.95))
    modules = {}
    for host_weights in ("fp32", "compute"):
        torch.manual_seed(123)
        module = TinyLM("llama", initial_state("llama"), optimizer=optimizer)
        strategy = lightning_slide.SlideFormerStrategy(window=1, tuning=dict(host_weights=host_weights))
        trainer(
            strategy,
            precision="bf16-true",
            gradient_clip_val=clip,
            accumulate_grad_batches=accumulate,
            max_steps=5,
            callbacks=[Look()],
        ).fit(module, batches(5 * accumulate))
        modules[host_weights] = module
    assert modules["compute"].losses == modules["fp32"].losses
    theirs = dict(modules["fp32"].named_parameters())
    for name, param in modules["compute"].named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, theirs[name]), name
    assert all(weights is None for weights, _ in seen["fp32"])
    for weights, master in seen["compute"]:  # the copy is the masters' latest values, in bf16
        assert weights.dtype == torch.bfloat16 and torch.equal(weights, master.to(torch.bfloat16))
    assert (len(refreshes["compute"]) > 0) == (moments == "adam")


def test_host_weights_is_validated():
    with pytest.raises(ValueError, match="host_weights.*'auto', 'fp32' or 'compute'"):
        lightning_slide.SlideFormerStrategy(tuning=dict(host_weights="bf16"))


def test_masters_on_disk_with_bf16_moments_train_exactly_like_fp32_uploads(tmp_path):
    """With the masters on disk the layers upload from the bf16 copy, which AdamW's host loop writes from the
    masters it has just read and updated, in the same pass."""
    modules = {}
    for offload in (None, "both"):
        torch.manual_seed(123)
        optimizer = functools.partial(optim.AdamW, lr=3e-3, betas=(0.9, 0.95))
        module = TinyLM("llama", initial_state("llama"), optimizer=optimizer)
        options = dict(offload=offload, offload_dir=str(tmp_path / "tier")) if offload else {}
        strategy = lightning_slide.SlideFormerStrategy(window=1, **options)
        trainer(strategy, precision="bf16-true", max_steps=5, accumulate_grad_batches=1).fit(module, batches(5))
        modules[offload] = module
    assert modules["both"].losses == modules[None].losses
    theirs = dict(modules[None].named_parameters())
    for name, param in modules["both"].named_parameters():
        assert torch.equal(param, theirs[name]), name
