"""JSONLDataModule: labels, padding, packing, splits and errors."""

import pytest
from transformers import AutoTokenizer

from lightning_slide.app.data import IGNORE_INDEX, JSONLDataModule
from lightning_slide.app.errors import DataError
from lightning_slide.app.train import ASSETS

from .conftest import write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


def _data(path, tokenizer, **kwargs):
    dm = JSONLDataModule(str(path), tokenizer, **kwargs)
    dm.setup("fit")
    return dm


def test_prompt_response_loss_on_response_only(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Where is Oll?", "response": " In Arvenia."}] * 3)
    dm = _data(path, tokenizer, val_size=1)
    e = dm.train_set[0]
    prompt = tokenizer("Where is Oll?")["input_ids"]
    assert e["input_ids"][: len(prompt)] == prompt and e["input_ids"][-1] == tokenizer.eos_token_id
    assert e["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert e["labels"][len(prompt):] == e["input_ids"][len(prompt):]
    assert len(dm.val_set) == 1 and len(dm.train_set) == 2


def test_padding_is_masked_and_not_counted(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "a much longer line of text here"}])
    dm = _data(path, tokenizer, val_size=0, batch_size=2)
    batch = dm.collate(dm.train_set)
    lengths = [len(e["input_ids"]) for e in dm.train_set]
    assert batch["attention_mask"].sum().item() == sum(lengths)  # real tokens only
    short = lengths.index(min(lengths))
    assert (batch["labels"][short, min(lengths):] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][short, min(lengths):] == 0).all()


def test_packing_fills_blocks(text_jsonl, tokenizer):
    dm = _data(text_jsonl, tokenizer, val_size=0, pack=True, max_length=32)
    assert all(len(e["input_ids"]) == 32 for e in dm.train_set[:-1]) and len(dm.train_set[-1]) <= 32
    plain = _data(text_jsonl, tokenizer, val_size=0)
    assert sum(len(e["input_ids"]) for e in dm.train_set) == sum(len(e["input_ids"]) for e in plain.train_set)


def test_malformed_lines_are_named(tmp_path, tokenizer):
    bad_json = write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, "", '{"text": oops}'])
    with pytest.raises(DataError, match=r"a.jsonl:3: not valid JSON"):
        _data(bad_json, tokenizer)
    bad_keys = write_jsonl(tmp_path / "b.jsonl", [{"text": "ok"}, {"prompt": "only a prompt"}])
    with pytest.raises(DataError, match=r"b.jsonl:2: expected .*got keys \['prompt'\]"):
        _data(bad_keys, tokenizer)
    with pytest.raises(DataError, match="does not exist"):
        JSONLDataModule(str(tmp_path / "none.jsonl"), tokenizer)
    with pytest.raises(DataError, match="no examples"):
        _data(write_jsonl(tmp_path / "c.jsonl", [""]), tokenizer)


def test_too_long_says_what_to_change(text_jsonl, tokenizer):
    with pytest.raises(DataError, match=r"text.jsonl:1: .* longer than data.max_length=8; raise data.max_length"):
        _data(text_jsonl, tokenizer, max_length=8, context_length=128, val_size=0)
    with pytest.raises(DataError, match=r"longer than the model's context of 8 tokens"):
        _data(text_jsonl, tokenizer, max_length=8, context_length=8)
    with pytest.raises(DataError, match=r"data.max_length=64 is longer than the model's context of 32"):
        JSONLDataModule(str(text_jsonl), tokenizer, max_length=64, context_length=32)
    assert all(len(e["input_ids"]) <= 8 for e in _data(text_jsonl, tokenizer, max_length=8, truncate=True).train_set)
