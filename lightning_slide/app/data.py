"""A LightningDataModule over local JSONL: plain text or prompt/response pairs, batched or packed."""

import json
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_slide.app.errors import DataError

IGNORE_INDEX = -100  # labels where no loss is taken: prompt and padding tokens
DEFAULT_MAX_LENGTH = 2048  # tokens per sequence unless set: long-context models would otherwise pad to 128k
Example = dict[str, list[int]]  # input_ids and labels of one sequence


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, str]]]:
    """``(line number, record)`` for every non-blank line; each record is ``{"text"}`` or ``{"prompt", "response"}``.

    Raises ``DataError`` naming the file and line of the first malformed record.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist (set data.path to a JSONL file)")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
            keys = set(record) if isinstance(record, dict) else set()
            fields = ("text",) if "text" in keys else ("prompt", "response")
            if not (keys >= set(fields) and all(isinstance(record[k], str) for k in fields)):
                got = f"keys {sorted(keys)}" if isinstance(record, dict) else type(record).__name__
                raise DataError(f'{path}:{number}: expected {{"text": "..."}} or {{"prompt": "...", "response": '
                                f'"..."}} with string values, got {got}')
            records.append((number, record))
    if not records:
        raise DataError(f"data file {str(path)!r} has no examples")
    return records


class JSONLDataModule(L.LightningDataModule):
    """Tokenized JSONL for causal-LM training, with a validation split.

    Each line is ``{"text": ...}`` (loss on every token) or ``{"prompt": ..., "response": ...}`` (loss on the response
    only). Examples get the tokenizer's special tokens (e.g. BOS) and end with EOS. Sequences are padded per batch to
    the longest one, or packed: concatenated and cut into ``max_length`` blocks (attention then crosses example
    borders, the usual trade for no padding). Padding has ``attention_mask`` 0 and label ``-100``, so it is neither
    trained nor counted.

    Args:
        path: JSONL training file.
        tokenizer: the model's tokenizer (the app passes the model directory's).
        val_path: JSONL validation file. Default ``None``: hold out ``val_size`` of ``path``.
        val_size: examples held out of ``path`` for validation: a fraction if below 1, else a count; ``0`` for no
            validation. Default ``0.05``.
        max_length: tokens per sequence (the block length when packing), at most the model's context.
            Default ``None``: the model's context, capped at ``2048``.
        pack: pack examples into full blocks instead of padding. Default ``False``.
        truncate: cut examples longer than ``max_length`` instead of failing. Default ``False``.
        batch_size: sequences per micro-batch. Default ``4``.
        num_workers: DataLoader worker processes (data is tokenized in memory, so 0 is usually enough). Default ``0``.
        seed: seed of the validation split. Default ``0``.
        context_length: the model's longest sequence, to check ``max_length`` against. Default ``None``.
    """

    def __init__(
        self,
        path: str,
        tokenizer: Any,
        val_path: str | None = None,
        val_size: float = 0.05,
        max_length: int | None = None,
        pack: bool = False,
        truncate: bool = False,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        context_length: int | None = None,
    ) -> None:
        super().__init__()
        for name, file in (("data.path", path), ("data.val_path", val_path)):
            if file is not None and not Path(file).is_file():
                raise DataError(f"{name}: data file {str(file)!r} does not exist")
        if max_length is None:
            max_length = min(DEFAULT_MAX_LENGTH, context_length or DEFAULT_MAX_LENGTH)
        elif context_length is not None and max_length > context_length:
            raise DataError(f"data.max_length={max_length} is longer than the model's context of {context_length} "
                            f"tokens (its max_position_embeddings): set data.max_length<={context_length}")
        if val_size < 0:
            raise DataError(f"data.val_size must be >= 0, got {val_size}")
        self.path, self.val_path, self.val_size = path, val_path, val_size
        self.tokenizer = tokenizer
        self.max_length, self.pack, self.truncate = max_length, pack, truncate
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.context_length = context_length
        self.eos_id = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id or 0)  # any id: padding is masked out
        self.train_set: list[Example] | None = None
        self.val_set: list[Example] = []

    # ------------------------------------------------------------------ reading and tokenizing
    def setup(self, stage: str | None = None) -> None:
        """Read, check and tokenize everything once (it raises ``DataError`` before any model is built)."""
        if self.train_set is not None:
            return
        records = read_jsonl(self.path)
        if self.val_path is not None:
            val_records = read_jsonl(self.val_path)
        else:
            records, val_records = self._split(records)
        self.train_set = self._sequences(self._tokenize(records, self.path))
        self.val_set = self._sequences(self._tokenize(val_records, self.val_path or self.path))

    def _split(self, records: list) -> tuple[list, list]:
        n_val = round(self.val_size * len(records)) if self.val_size < 1 else int(self.val_size)
        n_val = max(n_val, 1) if self.val_size > 0 else 0
        if n_val >= len(records):
            raise DataError(f"data.val_size={self.val_size} leaves no training examples out of {len(records)} in "
                            f"{self.path}")
        order = list(range(len(records)))
        random.Random(self.seed).shuffle(order)
        held_out = set(order[:n_val])
        return ([r for i, r in enumerate(records) if i not in held_out],
                [r for i, r in enumerate(records) if i in held_out])

    def _tokenize(self, records: list[tuple[int, dict]], path: str) -> list[Example]:
        if not records:
            return []
        tok = self.tokenizer
        eos = [] if self.eos_id is None else [self.eos_id]
        heads = [r["text"] if "text" in r else r["prompt"] for _, r in records]
        tails = ["" if "text" in r else r["response"] for _, r in records]
        head_ids = tok(heads)["input_ids"]  # one batched call: the Rust tokenizer parallelizes it
        tail_ids = tok(tails, add_special_tokens=False)["input_ids"]
        examples = []
        for (number, record), head, tail in zip(records, head_ids, tail_ids):
            ids = head + tail + eos
            labels = ([IGNORE_INDEX] * len(head) if "prompt" in record else list(head)) + tail + eos
            if len(ids) > self.max_length and not self.pack:
                if not self.truncate:
                    raise DataError(self._too_long(path, number, len(ids)))
                ids, labels = ids[: self.max_length], labels[: self.max_length]
            examples.append({"input_ids": ids, "labels": labels})
        return examples

    def _too_long(self, path: str, number: int, length: int) -> str:
        context = self.context_length
        if context is not None and length > context:
            what = f"longer than the model's context of {context} tokens"
            fix = "set data.truncate=true (keeps the first data.max_length tokens) or data.pack=true, or shorten it"
        else:
            what = f"longer than data.max_length={self.max_length}"
            limit = f"up to the model's context of {context}" if context else "higher"
            fix = f"raise data.max_length ({limit}), or set data.truncate=true or data.pack=true"
        return f"{path}:{number}: the example has {length} tokens, {what}; {fix}"

    def _sequences(self, examples: list[Example]) -> list[Example]:
        if not self.pack:
            return examples
        ids = [t for e in examples for t in e["input_ids"]]
        labels = [t for e in examples for t in e["labels"]]
        n = self.max_length  # the last block may be short: the collator pads it rather than dropping data
        return [{"input_ids": ids[i : i + n], "labels": labels[i : i + n]} for i in range(0, len(ids), n)]

    def sample_prompt(self, text_tokens: int = 16) -> tuple[list[int], str]:
        """The first validation example split for a sampling check: prompt token ids and the reference continuation
        (the response, or what follows the first ``text_tokens`` tokens of a text)."""
        example = self.val_set[0]
        ids, labels = example["input_ids"], example["labels"]
        cut = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        if cut == 0:  # plain text: no prompt, so take its beginning
            cut = min(text_tokens, len(ids) // 2)
        return ids[:cut], self.tokenizer.decode(ids[cut:], skip_special_tokens=True)

    # ------------------------------------------------------------------ batches
    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest sequence: ``input_ids``, ``attention_mask`` (0 on padding), ``labels`` (-100)."""
        longest = max(len(e["input_ids"]) for e in examples)
        batch = {name: torch.full((len(examples), longest), fill, dtype=torch.long)
                 for name, fill in (("input_ids", self.pad_id), ("attention_mask", 0), ("labels", IGNORE_INDEX))}
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(e["input_ids"])
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, :n] = torch.tensor(e["labels"])
        return batch

    def _loader(self, data: list[Example], shuffle: bool) -> DataLoader:
        return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, collate_fn=self.collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, shuffle=False) if self.val_set else []
