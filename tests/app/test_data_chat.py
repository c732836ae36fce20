"""Conversational data: one rendering with the chat template, loss on the assistant turns and the tokens that end
them, whatever the template does to the other turns."""

import pytest
from transformers import AutoTokenizer

from lightning_slide.app.data import IGNORE_INDEX, JSONLDataModule
from lightning_slide.app.errors import DataError
from lightning_slide.app.train import ASSETS

from .conftest import write_jsonl

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where is Oll?"},
    {"role": "assistant", "content": "In Arvenia."},
    {"role": "user", "content": "And Sarn?"},
    {"role": "assistant", "content": "In Beloria."},
]

# Like Qwen3's template: the last assistant turn gets an empty <think> block the earlier ones do not, so rendering
# prefixes of the conversation and comparing them would not find the earlier turns. No {% generation %} markers.
QWEN3_LIKE = (
    "{% for m in messages %}{{ '<|user|>' if m.role != 'assistant' else '<|assistant|>' }}"
    "{% if m.role == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m.content | trim }}{{ eos_token }}\n{% endfor %}"
)


@pytest.fixture
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


def _examples(tmp_path, tokenizer, records, **kwargs):
    dm = JSONLDataModule(
        str(write_jsonl(tmp_path / "chat.jsonl", records)),
        tokenizer,
        val_size=0,
        cache_dir=str(tmp_path / "cache"),
        **kwargs,
    )
    dm.setup("fit")
    return dm.train_examples


def _trained_text(tokenizer, example):
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


def test_messages_use_the_chat_template_and_train_assistant_turns(tmp_path, tokenizer):
    (example,) = _examples(tmp_path, tokenizer, [{"messages": CHAT}])
    assert example["input_ids"] == tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert _trained_text(tokenizer, example) == "In Arvenia.<|eos|>In Beloria.<|eos|>"  # with the turn's end


def test_template_rendering_the_last_turn_differently(tmp_path, tokenizer):
    tokenizer.chat_template = QWEN3_LIKE
    (example,) = _examples(tmp_path, tokenizer, [{"messages": [*CHAT[:4], {**CHAT[4], "content": " In Beloria. "}]}])
    text = tokenizer.decode(example["input_ids"])
    assert "<|assistant|>In Arvenia." in text and "<think>\n\n</think>\n\nIn Beloria." in text
    assert _trained_text(tokenizer, example) == "In Arvenia.<|eos|>In Beloria.<|eos|>"  # not the think block


def test_conversational_prompt_completion_trains_the_completion(tmp_path, tokenizer):
    (example,) = _examples(tmp_path, tokenizer, [{"prompt": CHAT[:4], "completion": CHAT[4:]}])
    assert _trained_text(tokenizer, example) == "In Beloria.<|eos|>"  # the prompt's assistant turn is context


def test_conversational_data_needs_a_chat_template(tmp_path, tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(DataError, match=r"chat.jsonl:1: conversational data needs a chat template"):
        _examples(tmp_path, tokenizer, [{"messages": CHAT}])


def test_malformed_conversations_are_named(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"chat.jsonl:2: \"messages\" must be .*\"role\""):
        _examples(tmp_path, tokenizer, [{"messages": CHAT}, {"messages": [{"role": "user"}]}])
    tokenizer.chat_template = "{% for m in messages %}{{ m.content | upper }}{% endfor %}"  # rewrites the replies
    with pytest.raises(DataError, match=r"chat.jsonl:1: assistant message 2 was not found"):
        _examples(tmp_path, tokenizer, [{"messages": CHAT}])


def test_truncation_that_leaves_no_reply_skips_the_example(tmp_path, tokenizer):
    long_question = {"role": "user", "content": "Where is Oll? " * 20}
    records = [{"messages": CHAT}, {"messages": [long_question, CHAT[2]]}]
    examples = _examples(tmp_path, tokenizer, records, max_length=40, truncate=True)
    assert len(examples) == 1 and _trained_text(tokenizer, examples[0]).startswith("In Arvenia.")
