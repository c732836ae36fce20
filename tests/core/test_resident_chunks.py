"""A streamed step (no clipping, no accumulation) updates the host-updated resident parts chunk by chunk, reading
their gradients from the device through two chunk-sized buffers instead of a host accumulator as large as they are.
Cut into chunks or not, the update is the same, bit for bit, and so is the optimizer state a checkpoint reads."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import lightning_slide
from lightning_slide.engine.resident import ResidentParts
from tests.core.test_parity import assert_same_training
from tests.core.tiny import TinyLM, batches, initial_state, trainer

STEPS = 4


class _State(L.Callback):
    """The host-updated resident parts' optimizer state and gradient buffers at the end of training."""

    def on_train_end(self, trainer, module):
        engine = trainer.strategy.engine
        self.state = {n: engine.optimizer_state(p) for n, p in module.named_parameters() if "layers" not in n}
        self.accumulator = engine.resident.grad
        self.chunk = engine.resident_parts.chunk_buffer


def _train(chunk, monkeypatch, steps=STEPS, **options):
    monkeypatch.setattr(ResidentParts, "CHUNK", chunk)
    torch.manual_seed(123)
    module = TinyLM("llama", initial_state("llama"))
    seen = _State()
    strategy = lightning_slide.SlideFormerStrategy(window=2, tuning=dict(resident_optimizer="host"))
    options = {"gradient_clip_val": None, **options}
    trainer(strategy, max_steps=steps, accumulate_grad_batches=1, callbacks=[seen], **options).fit(
        module, batches(steps)
    )
    return module, seen


def test_resident_parts_updated_in_chunks_train_the_same(monkeypatch):
    whole, whole_seen = _train(10**9, monkeypatch)  # one chunk: larger than the resident parts
    chunked, seen = _train(1000, monkeypatch)  # the embedding and the head cut into several chunks each
    assert seen.accumulator is None and seen.chunk.numel() == 2000  # two chunks: no resident-sized host buffer
    assert whole.losses == chunked.losses
    theirs = dict(whole.named_parameters())
    for name, param in chunked.named_parameters():
        assert torch.equal(param, theirs[name]), name
    for name, state in seen.state.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(whole_seen.state[name][key])), (name, key)


@pytest.mark.parametrize("clip,accumulate", [(0.5, 1), (None, 2)])
def test_clipping_or_accumulation_keep_a_resident_accumulator(monkeypatch, clip, accumulate):
    monkeypatch.setattr(ResidentParts, "CHUNK", 1000)
    seen = _State()
    strategy = lightning_slide.SlideFormerStrategy(window=2, tuning=dict(resident_optimizer="host"))
    trainer(strategy, max_steps=2, accumulate_grad_batches=accumulate, gradient_clip_val=clip, callbacks=[seen]).fit(
        TinyLM("llama", initial_state("llama")), batches(4)
    )
    assert seen.accumulator is not None


def test_clipping_by_value_clamps_each_chunk(monkeypatch):
    """Clipping by value streams too: each chunk of the resident parts' gradients is clamped, as clip_grad_value_
    clamps them whole in plain training."""
    options = dict(gradient_clip_val=0.002, gradient_clip_algorithm="value")
    chunked, seen = _train(1000, monkeypatch, steps=8, **options)
    assert seen.accumulator is None
    torch.manual_seed(123)
    plain = TinyLM("llama", initial_state("llama"))
    trainer("auto", max_steps=8, accumulate_grad_batches=1, **options).fit(plain, batches(8))
    assert_same_training(chunked, plain)
