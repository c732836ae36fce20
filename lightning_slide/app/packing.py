"""Packing: several whole examples per row, each still trained as if it were alone.

A packed row gives each example positions that restart at 0, and no attention mask: from the restarts Hugging Face
models keep attention inside each example (a block-diagonal causal mask with SDPA and eager attention, the
variable-length kernels with flash attention), and RoPE sees the same positions as unpacked. The first token of each
example gets no label, so the last token of one example is not trained to predict the next example. The loss of a
packed batch is then the token-weighted loss of its examples unpacked (``tests/app/test_data_packing.py``).
"""

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_slide.app.formats import IGNORE_INDEX


def pack(lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Row boundaries of a greedy packing in order: row ``r`` holds examples ``starts[r]`` to ``starts[r + 1]``.

    Examples are never split (an example's second half would have lost its context), so each is at most
    ``max_length`` tokens (checked, or truncated, when tokenizing).
    """
    starts, used = [0], 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > max_length:
            starts.append(i)
            used = 0
        used += n
    starts.append(len(lengths))
    return np.asarray(starts, dtype=np.int64)


class PackedRows(Dataset):
    """Rows of whole examples over a tokenized dataset (``input_ids``, ``labels`` columns): only row boundaries are
    held in memory; item ``r`` is the list of examples of row ``r``."""

    def __init__(self, examples: Any, max_length: int) -> None:
        self.examples = examples
        self.starts = pack(np.asarray(examples["length"]), max_length)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, row: int) -> list[dict[str, list[int]]]:
        columns = self.examples[int(self.starts[row]) : int(self.starts[row + 1])]
        return [{"input_ids": ids, "labels": labels} for ids, labels in zip(columns["input_ids"], columns["labels"])]


def collate_padded(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: ``input_ids``, ``attention_mask`` (0 on padding), ``labels`` (-100)."""
    longest = max(len(e["input_ids"]) for e in examples)
    batch = {
        name: torch.full((len(examples), longest), fill, dtype=torch.long)
        for name, fill in (("input_ids", pad_id), ("attention_mask", 0), ("labels", IGNORE_INDEX))
    }
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][row, :n] = torch.tensor(e["input_ids"])
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = torch.tensor(e["labels"])
    return batch


def collate_packed(rows: list[list[dict[str, list[int]]]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels``, ``position_ids`` (restarting per example) and ``attention_mask`` (1 on real tokens:
    it counts them, the model is not given it, see :func:`model_inputs`). Padding closes each row as an example of
    its own that nothing attends to."""
    longest = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    batch = {
        name: torch.full((len(rows), longest), fill, dtype=torch.long)
        for name, fill in (("input_ids", pad_id), ("labels", IGNORE_INDEX), ("position_ids", 0), ("attention_mask", 0))
    }
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e["input_ids"])
            batch["input_ids"][r, at : at + n] = torch.tensor(e["input_ids"])
            batch["labels"][r, at + 1 : at + n] = torch.tensor(e["labels"][1:])
            batch["position_ids"][r, at : at + n] = torch.arange(n)
            at += n
        batch["position_ids"][r, at:] = torch.arange(longest - at)
        batch["attention_mask"][r, :at] = 1
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """The keyword arguments of a Hugging Face causal LM for a batch, packed or not.

    A packed batch is given positions and no attention mask: models look for restarting positions only when there
    is no mask, and only without a KV cache (hence ``use_cache=False``, which training never needs anyway).
    """
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    return {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "labels": batch["labels"],
        "use_cache": False,
    }
