"""The batches the app's data module yields keep prompt masking: the loss is on the completion only."""

import pytest
from transformers import AutoTokenizer

from lightning_slide.app.data import IGNORE_INDEX, JSONLDataModule
from lightning_slide.app.train import ASSETS

from .conftest import write_jsonl

PROMPT, COMPLETION = "Where is Oll?", " In Arvenia."


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


@pytest.mark.parametrize("pack", [False, True])
def test_training_batches_mask_the_prompt_and_label_the_completion(tmp_path, tokenizer, pack):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": PROMPT, "completion": COMPLETION}] * 6)
    dm = JSONLDataModule(
        str(path), tokenizer, val_size=0, batch_size=2, pack=pack, max_length=64, cache_dir=str(tmp_path / "cache")
    )
    dm.setup("fit")
    example = tokenizer(PROMPT + COMPLETION)["input_ids"] + [tokenizer.eos_token_id]
    prompt = len(tokenizer(PROMPT)["input_ids"])
    n = len(example)
    seen = 0
    for batch in dm.train_dataloader():
        ids, labels = batch["input_ids"], batch["labels"]
        for row in range(ids.shape[0]):
            # Padded: one example per row. Packed: whole examples one after another, as many as fit.
            for at in range(0, int(batch["attention_mask"][row].sum()), n):
                assert ids[row, at : at + n].tolist() == example
                assert (labels[row, at : at + prompt] == IGNORE_INDEX).all(), "the prompt must carry no loss"
                assert labels[row, at + prompt : at + n].tolist() == example[prompt:]
                seen += 1
    assert seen == 6
