"""host_weights='compute': layers upload from a bf16 host copy kept by the host optimizer, training unchanged."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import lightning_slide
from tests.core.tiny import TinyLM, batches, initial_state, trainer


@pytest.mark.parametrize("clip, accumulate", [(0.5, 2), (None, 1)])  # updates after backward / streamed from it
def test_bf16_host_copy_trains_exactly_like_fp32_uploads(clip, accumulate):
    seen = {}

    class Look(L.Callback):
        def on_train_end(self, trainer, pl_module):
            engine = trainer.strategy.engine
            engine.finish_updates()
            seen[engine.host_weights] = [(u.weights, u.master.clone()) for u in engine.layers]

    modules = {}
    for host_weights in ("fp32", "compute"):
        torch.manual_seed(123)
        module = TinyLM("llama", initial_state("llama"))
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


def test_host_weights_is_validated():
    with pytest.raises(ValueError, match="host_weights.*'auto', 'fp32' or 'compute'"):
        lightning_slide.SlideFormerStrategy(tuning=dict(host_weights="bf16"))
