"""JSONLDataModule: labels of the plain formats, padding, packing, splits and errors."""

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
    dm = JSONLDataModule(str(path), tokenizer, cache_dir=str(path.parent / "cache"), **kwargs)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("completion_key", ["completion", "response"])
def test_prompt_completion_loss_on_completion_only(tmp_path, tokenizer, completion_key):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Where is Oll?", completion_key: " In Arvenia."}] * 3)
    dm = _data(path, tokenizer, val_size=1)
    e = dm.train_examples[0]
    whole = tokenizer("Where is Oll? In Arvenia.")["input_ids"]  # one sequence, as the model will see it
    prompt = tokenizer("Where is Oll?")["input_ids"]
    assert e["input_ids"] == whole + [tokenizer.eos_token_id]
    assert e["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert e["labels"][len(prompt) :] == e["input_ids"][len(prompt) :]
    assert len(dm.val_set) == 1 and len(dm.train_set) == 2


def test_padding_is_masked_and_not_counted(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "a much longer line of text here"}])
    dm = _data(path, tokenizer, val_size=0, batch_size=2)
    examples = [dm.train_set[i] for i in range(2)]
    batch = dm.collate(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["attention_mask"].sum().item() == sum(lengths)  # real tokens only
    short = lengths.index(min(lengths))
    assert (batch["labels"][short, min(lengths) :] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][short, min(lengths) :] == 0).all()


def test_packing_keeps_whole_examples(text_jsonl, tokenizer):
    dm = _data(text_jsonl, tokenizer, val_size=0, pack=True, max_length=48)
    plain = _data(text_jsonl, tokenizer, val_size=0)
    rows = [dm.train_set[r] for r in range(len(dm.train_set))]
    assert all(sum(len(e["input_ids"]) for e in row) <= 48 for row in rows) and len(rows) < len(plain.train_set)
    assert [e for row in rows for e in row] == [
        {"input_ids": e["input_ids"], "labels": e["labels"]} for e in plain.train_examples
    ]
    batch = dm.collate(rows[:2])
    starts = (batch["position_ids"] == 0).nonzero().tolist()  # each example restarts at 0, padding too
    assert len(starts) == len(rows[0]) + len(rows[1]) + (batch["attention_mask"] == 0).any(1).sum().item()
    assert all(batch["labels"][r, c] == IGNORE_INDEX for r, c in starts)  # no example predicts the next one


def test_truncate_works_with_packing(text_jsonl, tokenizer):
    with pytest.raises(DataError, match=r"text.jsonl:1: the example has \d+ tokens, longer than data.max_length=8"):
        _data(text_jsonl, tokenizer, val_size=0, pack=True, max_length=8)
    dm = _data(text_jsonl, tokenizer, val_size=0, pack=True, max_length=8, truncate=True)
    assert all(len(row) == 1 and len(row[0]["input_ids"]) == 8 for row in (dm.train_set[r] for r in range(40)))


def test_malformed_lines_are_named(tmp_path, tokenizer):
    bad_json = write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, "", '{"text": oops}'])
    with pytest.raises(DataError, match=r"a.jsonl:3: not valid JSON"):
        _data(bad_json, tokenizer)
    bad_keys = write_jsonl(tmp_path / "b.jsonl", [{"text": "ok"}, {"prompt": "only a prompt"}])
    with pytest.raises(DataError, match=r"b.jsonl:2: expected .*got keys \['prompt'\]"):
        _data(bad_keys, tokenizer)
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"text": "ok"}, {"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match=r"m.jsonl:2: keys \['completion', 'prompt'\] differ .* one format per file"):
        _data(mixed, tokenizer)
    with pytest.raises(DataError, match="does not exist"):
        JSONLDataModule(str(tmp_path / "none.jsonl"), tokenizer)
    with pytest.raises(DataError, match="no examples"):
        _data(write_jsonl(tmp_path / "c.jsonl", [""]), tokenizer)


def test_lines_are_named_past_blank_lines(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "short"}, "", "", {"text": "a much longer line " * 4}])
    with pytest.raises(DataError, match=r"d.jsonl:4: the example has"):
        _data(path, tokenizer, max_length=8, val_size=0)


def test_too_long_says_what_to_change(text_jsonl, tokenizer):
    with pytest.raises(DataError, match=r"text.jsonl:1: .* longer than data.max_length=8; raise data.max_length"):
        _data(text_jsonl, tokenizer, max_length=8, context_length=128, val_size=0)
    with pytest.raises(DataError, match=r"longer than the model's context of 8 tokens"):
        _data(text_jsonl, tokenizer, max_length=8, context_length=8)
    with pytest.raises(DataError, match=r"data.max_length=64 is longer than the model's context of 32"):
        JSONLDataModule(str(text_jsonl), tokenizer, max_length=64, context_length=32)
    dm = _data(text_jsonl, tokenizer, max_length=8, truncate=True)
    assert all(len(e["input_ids"]) <= 8 for e in dm.train_examples)
