"""Packing keeps examples apart: a packed batch has the loss and gradients of the same examples unpacked
(token-weighted), with the model alone and through the slideformer strategy."""

import random

import datasets
import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

import lightning_slide
from lightning_slide.app.formats import IGNORE_INDEX
from lightning_slide.app.packing import PackedRows, collate_packed, collate_padded, model_inputs
from tests.core.tiny import CONFIGS, VOCAB, initial_state, trainer

FAMILIES = ["llama", "qwen3", "mistral"]  # mistral: a sliding window of 8, shorter than most examples
ROW = 40


def examples(count: int = 7, seed: int = 0) -> list[dict[str, list[int]]]:
    """Examples of 3 to 20 tokens; some have a prompt (no loss on it)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        ids = [rng.randrange(VOCAB) for _ in range(rng.randint(3, 20))]
        prompt = rng.choice([0, 0, len(ids) // 2])
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def packed_and_padded(data: list[dict]) -> tuple[dict, dict]:
    table = datasets.Dataset.from_list([{**e, "length": len(e["input_ids"])} for e in data])
    rows = PackedRows(table, ROW)
    packed = collate_packed([rows[r] for r in range(len(rows))], pad_id=0)
    assert packed["input_ids"].shape[0] < len(data)  # several examples share rows
    return packed, collate_padded(data, pad_id=0)


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**model_inputs(batch)).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_batch_equals_unpacked(family):
    model = AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="sdpa")
    model.load_state_dict(initial_state(family))
    packed, padded = packed_and_padded(examples())
    assert (packed["labels"] != IGNORE_INDEX).sum() == (padded["labels"][:, 1:] != IGNORE_INDEX).sum()
    loss, grads = loss_and_grads(model, packed)
    expected_loss, expected = loss_and_grads(model, padded)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_without_restarting_positions_examples_would_mix():
    """The test above can fail: the same packed rows with running positions give another loss."""
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    model.load_state_dict(initial_state("llama"))
    packed, padded = packed_and_padded(examples())
    mixed = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])}
    assert not torch.allclose(model(**model_inputs(mixed)).loss, model(**model_inputs(padded)).loss, atol=1e-4)


class OneStep(L.LightningModule):
    def __init__(self, family: str) -> None:
        super().__init__()
        self.model = AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="sdpa")
        self.model.load_state_dict(initial_state(family))

    def training_step(self, batch, batch_idx):
        return self.model(**model_inputs(batch)).loss

    def configure_optimizers(self):
        # The first Adam step is g / (|g| + eps): with a large eps, about the gradient itself, so steps compare it
        return torch.optim.Adam(self.parameters(), lr=1.0, eps=1.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_step_equals_unpacked_through_slideformer(family):
    updated = {}
    for name, batch in zip(("packed", "padded"), packed_and_padded(examples(seed=1))):
        module = OneStep(family)
        trainer(
            lightning_slide.SlideFormerStrategy(window=1),
            max_steps=1,
            accumulate_grad_batches=1,
            gradient_clip_val=None,
        ).fit(module, DataLoader([batch], batch_size=None))
        updated[name] = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    initial = initial_state(family)
    for k, value in updated["packed"].items():
        step = updated["padded"][k] - initial[k]
        assert step.abs().max() > 0 or "rotary" in k, f"{k} was not trained"
        torch.testing.assert_close(value - initial[k], step, rtol=1e-4, atol=1e-6, msg=k)
