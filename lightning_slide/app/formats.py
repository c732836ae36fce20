"""The record formats the app trains on, and how one record becomes token ids and labels.

- ``{"text": "..."}``: loss on every token.
- ``{"prompt": "...", "completion": "..."}`` (``"response"`` is an alias): loss on the completion. Both strings are
  tokenized as one sequence (a separate tokenization of each would not give the tokens the model sees).
- ``{"messages": [{"role": ..., "content": ...}, ...]}``, or ``prompt``/``completion`` given as message lists:
  conversational. The tokenizer's chat template renders the whole conversation, which is tokenized once; the loss is
  on the assistant turns (of the completion, for prompt/completion) and on the token that ends each of them.

How assistant turns are found (see :func:`chat_example`): each message's content is located, in order, in the one
rendering of the conversation, and the tokens that overlap an assistant content are trained, plus the tokens up to
and including the special token that closes the turn (``<|im_end|>``, ``<|eot_id|>``, ``</s>``...). Unlike rendering
prefixes of the conversation and comparing them, this works with templates that render a turn differently when it
is the last one (Qwen3 adds an empty ``<think>`` block to the final assistant turn only), and unlike
``return_assistant_tokens_mask`` it needs no ``{% generation %}`` markers, which real models' templates lack.
"""

from typing import Any

from lightning_slide.app.errors import DataError

IGNORE_INDEX = -100  # labels where no loss is taken: prompt and padding tokens
FORMATS = {
    "messages": '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    "prompt": '{"prompt": "...", "completion": "..."}',
    "text": '{"text": "..."}',
}


def record_format(record: dict) -> str:
    """``"messages"``, ``"prompt"`` or ``"text"``: which format the record's keys say (checked by :func:`problem`)."""
    if "messages" in record:
        return "messages"
    if "prompt" in record:
        return "prompt"
    return "text"


def completion_of(record: dict) -> Any:
    """The completion of a prompt/completion record (``response`` is the older name)."""
    return record["completion"] if record.get("completion") is not None else record.get("response")


def _messages_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "a non-empty list of messages"
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return 'messages that are {"role": "...", "content": "..."} with string values'
    return None


def problem(record: Any) -> str | None:
    """What is wrong with a record, in words (``None`` if it is a valid example of one of the formats)."""
    expected = "expected " + " or ".join(FORMATS.values())
    if not isinstance(record, dict):
        return f"{expected}, got {type(record).__name__}"
    fmt = record_format(record)
    if fmt == "text":
        ok = isinstance(record.get("text"), str)
        return None if ok else f"{expected}, got keys {sorted(record)}"
    if fmt == "messages":
        wrong = _messages_problem(record["messages"])
        return None if wrong is None else f'"messages" must be {wrong}'
    prompt, completion = record["prompt"], completion_of(record)
    if isinstance(prompt, str) and isinstance(completion, str):
        return None
    if isinstance(prompt, list) and isinstance(completion, list):
        wrong = _messages_problem(prompt) or _messages_problem(completion)
        return None if wrong is None else f'"prompt" and "completion" must each be {wrong}'
    return f'{expected} with "prompt" and "completion" both strings or both message lists, got keys {sorted(record)}'


def _overlapping(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens whose characters overlap ``[start, end)``."""
    return [i for i, (a, b) in enumerate(offsets) if b > start and a < end]


def _offsets(tokenizer: Any, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except NotImplementedError:
        raise DataError(
            "prompt/completion and conversational data need a fast tokenizer (one with "
            "tokenizer.json): character offsets tell which tokens are the completion"
        ) from None
    return enc["input_ids"], enc["offset_mapping"]


def text_example(tokenizer: Any, text: str, eos: list[int]) -> tuple[list[int], list[int]]:
    ids = tokenizer(text)["input_ids"] + eos
    return ids, list(ids)


def prompt_example(tokenizer: Any, prompt: str, completion: str, eos: list[int]) -> tuple[list[int], list[int]]:
    ids, offsets = _offsets(tokenizer, prompt + completion, add_special_tokens=True)
    trained = set(_overlapping(offsets, len(prompt), len(prompt) + len(completion)))
    labels = [t if i in trained else IGNORE_INDEX for i, t in enumerate(ids)]
    return ids + eos, labels + eos


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens, the added ones (e.g. ``<|im_end|>``) included."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}


def chat_example(
    tokenizer: Any,
    messages: list[dict],
    trained_from: int,
    special: set[int],
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation: the loss is on the assistant messages from index ``trained_from``.

    Raises ``ValueError`` (with what went wrong) when an assistant message is not found in the rendering.
    """
    # Absent keys come back as None from columnar files; templates test "is defined", so drop them
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids, offsets = _offsets(tokenizer, text, add_special_tokens=False)  # the template writes BOS itself
    labels = [IGNORE_INDEX] * len(ids)
    cursor = 0  # messages are found in order, so a reply quoted earlier in a user message is not taken for it
    for index, message in enumerate(messages):
        content = message["content"].strip()  # templates often trim it
        start = text.find(content, cursor) if content else -1
        if start < 0:
            if message["role"] == "assistant" and content:
                raise ValueError(
                    f"assistant message {index} was not found in the chat template's rendering of "
                    "the conversation (the template changes its text)"
                )
            continue  # some templates move or rewrite system and user messages: only replies must be found
        cursor = start + len(content)
        if message["role"] != "assistant" or index < trained_from:
            continue
        tokens = _overlapping(offsets, start, cursor)
        for i in tokens:
            labels[i] = ids[i]
        # The turn's end (whitespace, then a special token such as <|im_end|>) is what teaches the model to stop
        for i in range(tokens[-1] + 1, len(ids)):
            a, b = offsets[i]
            if ids[i] in special:
                labels[tokens[-1] + 1 : i + 1] = ids[tokens[-1] + 1 : i + 1]
                break
            if text[a:b].strip():
                break
    return ids, labels


def tokenize_record(tokenizer: Any, record: dict, special: set[int]) -> tuple[list[int], list[int]]:
    """Token ids and labels of one valid record (``EOS`` ends non-conversational ones; a chat template ends turns
    itself)."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    fmt = record_format(record)
    if fmt == "text":
        return text_example(tokenizer, record["text"], eos)
    if fmt == "messages":
        return chat_example(tokenizer, record["messages"], 0, special)
    prompt, completion = record["prompt"], completion_of(record)
    if isinstance(prompt, str):
        return prompt_example(tokenizer, prompt, completion, eos)
    return chat_example(tokenizer, prompt + completion, len(prompt), special)


def is_conversational(record: dict) -> bool:
    return record_format(record) == "messages" or isinstance(record.get("prompt"), list)
