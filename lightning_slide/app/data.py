"""A LightningDataModule for fine-tuning: text, prompt/completion or chat data, batched or packed, resumable.

Files are read and tokenized with Hugging Face ``datasets`` (Arrow, memory-mapped and cached on disk), so host memory
does not grow with the data set, and a second run (or another rank on the host) reuses the tokenization.
"""

import json
import logging
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import torch
from filelock import FileLock
from torch.utils.data import DataLoader

from lightning_slide.app.errors import DataError
from lightning_slide.app.formats import FORMATS, IGNORE_INDEX, is_conversational, problem, special_ids, tokenize_record
from lightning_slide.app.packing import PackedRows, collate_packed, collate_padded
from lightning_slide.app.resume import ResumableLoader, ResumableSampler

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # tokens per sequence unless set: long-context models would otherwise pad to 128k
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}  # datasets' loaders
Example = dict[str, list[int]]  # input_ids and labels of one sequence


def check_jsonl(path: Path) -> list[int]:
    """Check every line of a JSONL file is a record of one format; the blank lines' numbers (to name lines later).

    Raises ``DataError`` naming the file and line of the first malformed record. Reads line by line: nothing is kept.
    """
    blank, first = [], None
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                blank.append(number)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
            wrong = problem(record)
            if wrong:
                raise DataError(f"{path}:{number}: {wrong}")
            if first is None:
                first = (number, set(record))
            elif set(record) != first[1]:  # datasets reads a file as a table: one set of columns
                raise DataError(
                    f"{path}:{number}: keys {sorted(record)} differ from those of line {first[0]} "
                    f"({sorted(first[1])}); use one format per file"
                )
    if first is None:
        raise DataError(f"data file {str(path)!r} has no examples")
    return blank


class Locator:
    """Names an example for an error: ``file:line`` for JSONL (blank lines counted), else ``source row N``."""

    def __init__(self, source: str, blank_lines: list[int] | None = None) -> None:
        self.source, self.blank_lines = source, blank_lines

    def __call__(self, row: int) -> str:
        if self.blank_lines is None:
            return f"{self.source} row {row + 1}"
        line = row + 1
        for blank in self.blank_lines:  # ascending: each blank line up to here moves the record down one line
            if blank > line:
                break
            line += 1
        return f"{self.source}:{line}"


def load_source(path: str, cache_dir: str | None) -> tuple[datasets.Dataset, Locator]:
    """A local file (``.jsonl``, ``.json``, ``.parquet``, ``.arrow``), directory, or a Hugging Face hub data set already
    in the local cache, as an Arrow ``Dataset`` (its ``train`` split)."""
    p = Path(path)
    if p.is_file():
        if p.suffix not in BUILDERS:
            raise DataError(f"data file {path!r}: unknown type {p.suffix!r}; use one of {', '.join(BUILDERS)}")
        blank = check_jsonl(p) if p.suffix == ".jsonl" else None
        source, kwargs = BUILDERS[p.suffix], {"data_files": str(p)}
    else:
        blank, source, kwargs = None, path, {}
    try:
        data = datasets.load_dataset(source, split="train", cache_dir=cache_dir, **kwargs)
    except Exception as e:  # datasets raises many types; the user's fix is the path either way
        what = (
            "directory" if p.is_dir() else "file" if p.exists() else "path (not a file, directory or cached data set)"
        )
        raise DataError(f"data {what} {path!r} could not be read as a data set: {type(e).__name__}: {e}") from None
    if len(data) == 0:
        raise DataError(f"data {path!r} has no examples")
    return data, Locator(path, blank)


def too_long(where: str, length: int, max_length: int, context: int | None) -> str:
    """What to change when an example does not fit."""
    if context is not None and length > context:
        what = f"longer than the model's context of {context} tokens"
        fix = "set data.truncate=true (keeps the first data.max_length tokens), or shorten it"
    else:
        what = f"longer than data.max_length={max_length}"
        limit = f"up to the model's context of {context}" if context else "higher"
        fix = f"raise data.max_length ({limit}), or set data.truncate=true"
    return f"{where}: the example has {length} tokens, {what}; {fix}"


class Tokenize:
    """The ``Dataset.map`` function: checks and tokenizes a batch of records into ``input_ids``, ``labels`` and
    ``length``; too-long examples fail (naming them) or are truncated; examples left with no target are dropped.

    It holds only what the result depends on: ``datasets`` hashes it to name the cached result, so other options
    (batch size, packing...) reuse the same tokenization.
    """

    def __init__(self, tokenizer: Any, max_length: int, truncate: bool, context: int | None, locate: Locator) -> None:
        self.tokenizer, self.max_length, self.truncate, self.context = tokenizer, max_length, truncate, context
        self.locate = locate
        self.special = special_ids(tokenizer)

    def __call__(self, batch: dict[str, list], rows: list[int]) -> dict[str, list]:
        out = {"input_ids": [], "labels": [], "length": []}
        for i, row in enumerate(rows):
            record = {k: v[i] for k, v in batch.items() if v[i] is not None}
            wrong = problem(record)
            if wrong:
                raise DataError(f"{self.locate(row)}: {wrong}")
            if is_conversational(record) and not self.tokenizer.chat_template:
                raise DataError(
                    f"{self.locate(row)}: conversational data needs a chat template, and this tokenizer "
                    "has none: use an instruct model's tokenizer (model.tokenizer=...), or give plain "
                    f"{FORMATS['prompt']} records"
                )
            try:
                ids, labels = tokenize_record(self.tokenizer, record, self.special)
            except ValueError as e:
                raise DataError(f"{self.locate(row)}: {e}") from None
            if len(ids) > self.max_length:
                if not self.truncate:
                    raise DataError(too_long(self.locate(row), len(ids), self.max_length, self.context))
                ids, labels = ids[: self.max_length], labels[: self.max_length]
            if all(label == IGNORE_INDEX for label in labels[1:]):
                continue  # nothing to learn (e.g. truncated before the reply); a batch of these would give NaN
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["length"].append(len(ids))
        return out


FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"),
    }
)


class JSONLDataModule(L.LightningDataModule):
    """Tokenized fine-tuning data for causal LMs, with a validation split; the training loader resumes mid-epoch.

    Records are ``{"text"}`` (loss on every token), ``{"prompt", "completion"}`` (or ``"response"``; loss on the
    completion) or conversational ``{"messages": [{"role", "content"}, ...]}`` (rendered with the tokenizer's chat
    template; loss on assistant turns): see :mod:`lightning_slide.app.formats`. Non-conversational examples get the
    tokenizer's special tokens (e.g. BOS) and end with EOS. Sequences are padded per batch to the longest one, or
    packed: whole examples share rows of ``max_length`` tokens, each with its own positions and attention (see
    :mod:`lightning_slide.app.packing`). Padding has ``attention_mask`` 0 and label ``-100``.

    Args:
        path: training data: a ``.jsonl``, ``.json``, ``.parquet`` or ``.arrow`` file, a directory of them, or the
            name of a Hugging Face data set already in the local cache.
        tokenizer: the model's tokenizer (the app passes the model directory's).
        val_path: validation data, as ``path``. Default ``None``: hold out ``val_size`` of ``path``.
        val_size: examples held out of ``path`` for validation: a fraction if below 1, else a count; ``0`` for no
            validation. Default ``0.05``.
        max_length: tokens per sequence (per packed row), at most the model's context.
            Default ``None``: the model's context, capped at ``2048``.
        pack: pack whole examples into rows of up to ``max_length`` tokens instead of padding each. Default ``False``.
        truncate: cut examples longer than ``max_length`` instead of failing. Default ``False``.
        batch_size: sequences (rows, when packing) per micro-batch. Default ``4``.
        num_workers: DataLoader worker processes. Default ``0``.
        seed: seed of the validation split and of the shuffling. Default ``0``.
        context_length: the model's longest sequence, to check ``max_length`` against. Default ``None``.
        cache_dir: where ``datasets`` caches files and tokenizations. Default ``None``: its own (``HF_DATASETS_CACHE``).
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
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        for name, file in (("data.path", path), ("data.val_path", val_path)):
            if file is not None and Path(file).suffix in BUILDERS and not Path(file).exists():
                raise DataError(f"{name}: data file {str(file)!r} does not exist")
        if max_length is None:
            max_length = min(DEFAULT_MAX_LENGTH, context_length or DEFAULT_MAX_LENGTH)
        elif context_length is not None and max_length > context_length:
            raise DataError(
                f"data.max_length={max_length} is longer than the model's context of {context_length} "
                f"tokens (its max_position_embeddings): set data.max_length<={context_length}"
            )
        if val_size < 0:
            raise DataError(f"data.val_size must be >= 0, got {val_size}")
        self.path, self.val_path, self.val_size = path, val_path, val_size
        self.tokenizer = tokenizer
        self.max_length, self.pack, self.truncate = max_length, pack, truncate
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.context_length, self.cache_dir = context_length, cache_dir
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)  # any id: padding is masked out
        self.train_examples: datasets.Dataset | None = None  # tokenized examples, one per record
        self.val_examples: datasets.Dataset | list = []
        self.train_set: Any = None  # what the loaders draw from: the examples, or rows of them when packing
        self.val_set: Any = []
        self._train_loader: ResumableLoader | None = None
        self._loader_state: dict | None = None  # from a checkpoint, for the next training loader

    # ------------------------------------------------------------------ reading and tokenizing
    def setup(self, stage: str | None = None) -> None:
        """Read, check and tokenize once (raising ``DataError`` before any model is built). The first process on a
        host tokenizes while the others wait, then they read its cached result."""
        if self.train_set is not None:
            return
        cache = Path(self.cache_dir or datasets.config.HF_DATASETS_CACHE)
        cache.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache / "lightning_slide_tokenize.lock")):
            train = self._tokenized(self.path)
            if self.val_path is not None:
                val = self._tokenized(self.val_path)
            else:
                train, val = self._split(train)
        self.train_examples, self.val_examples = train, val
        self.train_set = PackedRows(train, self.max_length) if self.pack else train
        self.val_set = (PackedRows(val, self.max_length) if self.pack else val) if len(val) else []

    def _tokenized(self, path: str) -> datasets.Dataset:
        data, locate = load_source(path, self.cache_dir)
        tokenize = Tokenize(self.tokenizer, self.max_length, self.truncate, self.context_length, locate)
        tokenized = data.map(
            tokenize,
            batched=True,
            with_indices=True,
            remove_columns=data.column_names,
            features=FEATURES,
            desc=f"tokenizing {Path(path).name}",
        )
        if len(tokenized) < len(data):
            log.warning(
                "%s: %d of %d examples have no target token left (after truncation) and are skipped",
                path,
                len(data) - len(tokenized),
                len(data),
            )
        if len(tokenized) == 0:
            raise DataError(f"data {path!r} has no example with a target token")
        return tokenized

    def _split(self, data: datasets.Dataset) -> tuple[datasets.Dataset, datasets.Dataset | list]:
        if self.val_size == 0:
            return data, []
        n_val = max(round(self.val_size * len(data)), 1) if self.val_size < 1 else int(self.val_size)
        if n_val >= len(data):
            raise DataError(
                f"data.val_size={self.val_size} leaves no training examples out of {len(data)} in {self.path}"
            )
        split = data.train_test_split(test_size=n_val, seed=self.seed)
        return split["train"], split["test"]

    def sample_prompt(self, text_tokens: int = 16) -> tuple[list[int], str]:
        """The first validation example split for a sampling check: prompt token ids and the reference continuation
        (the first reply or completion, or what follows the first ``text_tokens`` tokens of a text)."""
        example = self.val_examples[0]
        ids, labels = example["input_ids"], example["labels"]
        cut = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        if cut == 0:  # plain text: no prompt, so take its beginning
            cut = min(text_tokens, len(ids) // 2)
        end = next((i for i in range(cut, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
        return ids[:cut], self.tokenizer.decode(ids[cut:end], skip_special_tokens=True)

    # ------------------------------------------------------------------ batches
    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        """A batch of examples (:func:`~lightning_slide.app.packing.collate_padded`) or of packed rows of them
        (:func:`~lightning_slide.app.packing.collate_packed`)."""
        return collate_packed(examples, self.pad_id) if self.pack else collate_padded(examples, self.pad_id)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        sampler = ResumableSampler(
            self.train_set,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            seed=self.seed,
        )
        loader = ResumableLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
        if self._loader_state is not None:
            loader.load_state_dict(self._loader_state)
            self._loader_state = None
        self._train_loader = loader
        return loader

    # Lightning also checkpoints the loader's own state, but restores it only into a loader made after the restore,
    # and configure_optimizers (estimated_stepping_batches) makes it before: the data module's state comes back first.
    def state_dict(self) -> dict[str, Any]:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loader_state = state.get("train_loader")
        if self._train_loader is not None and self._loader_state is not None:
            self._train_loader.load_state_dict(self._loader_state)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_set:
            return []
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
