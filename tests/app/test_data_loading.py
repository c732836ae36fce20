"""Loading through Hugging Face datasets: file types and directories, cached tokenization shared between processes,
and errors that name the row."""

import json
import subprocess
import sys

import datasets
import pytest
from transformers import AutoTokenizer

from lightning_slide.app.data import JSONLDataModule
from lightning_slide.app.errors import DataError
from lightning_slide.app.train import ASSETS

from .conftest import write_jsonl

RECORDS = [{"prompt": f"Where is city {i}?", "completion": f" In country {i % 3}."} for i in range(12)]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


def _examples(path, tokenizer, cache_dir):
    dm = JSONLDataModule(str(path), tokenizer, val_size=0, cache_dir=str(cache_dir))
    dm.setup("fit")
    return dm.train_examples


def test_file_types_and_directories_give_the_same_examples(tmp_path, tokenizer):
    table = datasets.Dataset.from_list(RECORDS)
    (tmp_path / "dir").mkdir()
    sources = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", RECORDS),
        "json": tmp_path / "d.json",
        "parquet": tmp_path / "d.parquet",
        "directory": tmp_path / "dir",
    }
    sources["json"].write_text(json.dumps(RECORDS))
    table.to_parquet(str(sources["parquet"]))
    table.to_parquet(str(tmp_path / "dir" / "train.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    sources["arrow"] = next((tmp_path / "saved").glob("*.arrow"))
    expected = _examples(sources.pop("jsonl"), tokenizer, tmp_path / "cache")
    assert len(expected) == len(RECORDS)
    for kind, path in sources.items():
        assert _examples(path, tokenizer, tmp_path / "cache")[:] == expected[:], kind


CHILD = """
import sys
from transformers import AutoTokenizer
from lightning_slide.app.data import JSONLDataModule
dm = JSONLDataModule(sys.argv[1], AutoTokenizer.from_pretrained(sys.argv[2]), val_size=0, cache_dir=sys.argv[3])
dm.setup("fit")
print([f["filename"] for f in dm.train_examples.cache_files])
"""


def test_tokenization_is_cached_and_shared_between_processes(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(ASSETS / "tokenizer"), str(tmp_path / "c")],
        capture_output=True,
        text=True,
        check=True,
    )
    examples = _examples(path, tokenizer, tmp_path / "c")  # as a second rank on the host would: from the cache
    assert child.stdout.strip() == str([f["filename"] for f in examples.cache_files])
    assert all(str(tmp_path / "c") in f["filename"] for f in examples.cache_files)  # memory-mapped from disk


def test_errors_name_the_row_or_the_path(tmp_path, tokenizer, monkeypatch):
    datasets.Dataset.from_list([{"text": "fine"}, {"text": None}]).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad.parquet row 2: expected"):
        _examples(tmp_path / "bad.parquet", tokenizer, tmp_path / "cache")
    (tmp_path / "d.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"unknown type '.csv'; use one of .jsonl, .json, .parquet, .arrow"):
        _examples(tmp_path / "d.csv", tokenizer, tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # a hub name is looked up in the local cache only
    with pytest.raises(DataError, match=r"could not be read as a data set"):
        _examples("no-such-user/no-such-dataset-here", tokenizer, tmp_path / "cache")
