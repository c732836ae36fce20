"""The contract: training with strategy="slideformer" equals plain Lightning training."""

from __future__ import annotations

import pytest
import torch

import lightning_slide
from tests.core.tiny import TinyLM, batches, initial_state, relative_error, trainer

TOLERANCE = 1e-5


def train(family, strategy, *, steps=10, accumulate=2, callbacks=(), **module_options):
    torch.manual_seed(123)
    module = TinyLM(family, initial_state(family), **module_options)
    run = trainer(strategy, max_steps=steps, accumulate_grad_batches=accumulate, callbacks=list(callbacks))
    run.fit(module, batches(steps * accumulate))
    return module


_reference: dict = {}


def reference(family, **options):
    key = (family, tuple(sorted(options.items())))
    if key not in _reference:
        _reference[key] = train(family, "auto", **options)
    return _reference[key]


def assert_same_training(ours, plain, tolerance=TOLERANCE):
    assert len(ours.losses) == len(plain.losses) > 0
    for step, (a, b) in enumerate(zip(ours.losses, plain.losses)):
        assert abs(a - b) <= tolerance * abs(b), f"loss {step}: {a} vs {b}"
    assert sum(plain.losses[-4:]) < sum(plain.losses[:4])  # it trained
    theirs = dict(plain.named_parameters())
    for name, param in ours.named_parameters():
        assert param.device.type == "cpu" and param.dtype == torch.float32
        error = relative_error(param.detach(), theirs[name].detach())
        assert error <= tolerance, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma_tied"])
@pytest.mark.parametrize("window", [1, 2, "all"])
def test_parity_with_plain_training(family, window):
    plain = reference(family)
    depth = 99 if window == "all" else window
    ours = train(family, lightning_slide.SlideFormerStrategy(window=depth))
    assert_same_training(ours, plain)
