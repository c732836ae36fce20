"""The checkpoint directory's layout: file names, the ``index.json`` that completes a directory (and its
validation), and the tensors taken out of Lightning's metadata (``meta.pt``) into ``meta.safetensors``.

The format itself is described in the package docstring (``lightning_slide.checkpoint``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

FORMAT = "lightning-slide-checkpoint"
VERSION = 1
INDEX = "index.json"  # written last: a directory without it is an interrupted save
META = "meta.pt"
META_TENSORS = "meta.safetensors"
HF_CONFIG = "hf_config.json"
RESIDENT = "resident"
#: Key of the loaded checkpoint dict holding the ``CheckpointReader`` (masters and optimizer state are read lazily).
READER_KEY = "slideformer_checkpoint"
#: Seconds to sleep after writing each unit's file (default 0). For crash tests: makes a save slow, deterministically.
DELAY_ENV = "LIGHTNING_SLIDE_SAVE_DELAY_S"
_TENSOR_REF = "__slide_tensor__"  # placeholder for a tensor taken out of the metadata


def unit_file(kind: str, unit: str) -> str:
    """Relative path of one unit's file: ``kind`` is ``"model"`` or ``"optimizer"``, ``unit`` ``"resident"`` or a
    layer index (as a string)."""
    name = RESIDENT if unit == RESIDENT else f"layer-{int(unit):05d}"
    return f"{kind}/{name}.safetensors"


def temp_path(path: str | os.PathLike) -> Path:
    """The hidden sibling a save of ``path`` writes into before swapping it into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory checkpoint (complete or not)."""
    return Path(path).is_dir()


# ---------------------------------------------------------------------------------------------------- index
def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Check that ``path`` is a complete directory checkpoint; returns its index.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is incomplete (an interrupted save), of another format, has a malformed index, or lacks
            a listed file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    index_file = path / INDEX
    if not index_file.is_file():
        raise ValueError(
            f"{str(path)!r} is not a complete slideformer checkpoint (no {INDEX}): it is what an interrupted save "
            "leaves behind. Resume from an earlier checkpoint (ckpt_path=...) and delete this directory."
        )
    index = _read_index(index_file)
    for rel, size in index["files"].items():
        file = path / rel
        if not file.is_file() or file.stat().st_size != size:
            found = file.stat().st_size if file.is_file() else "missing"
            raise ValueError(f"checkpoint {str(path)!r} is damaged: {rel} should have {size} bytes, found {found}")
    return index


def _read_index(file: Path) -> dict[str, Any]:
    """The parsed ``index.json`` at ``file``; ``ValueError`` naming the file and what is wrong with it."""
    try:
        index = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _malformed(file, f"it is not valid JSON ({error})") from None
    if isinstance(index, dict) and index.get("format") == FORMAT and _newer(index.get("version")):
        raise ValueError(
            f"{str(file.parent)!r} was written by a newer lightning-slide (format version {index['version']}, this "
            f"one reads up to {VERSION}); upgrade lightning-slide"
        )
    problem = _index_problem(index)
    if problem is not None:
        raise _malformed(file, problem)
    return index


def _malformed(file: Path, problem: str) -> ValueError:
    return ValueError(
        f"checkpoint index {str(file)!r} is malformed: {problem}. lightning-slide writes it last and never edits it: "
        "the directory was changed by hand or by another program. Use another checkpoint, or restore this one's "
        f"{INDEX} from a copy"
    )


def _newer(version: Any) -> bool:
    return isinstance(version, int) and not isinstance(version, bool) and version > VERSION


def _index_problem(index: Any) -> str | None:
    """What is wrong with a parsed index (a sentence), or ``None``."""
    if not isinstance(index, dict):
        return f"it holds a JSON {type(index).__name__}, not an object"
    if index.get("format") != FORMAT:
        return f"its format is {index.get('format')!r}, not {FORMAT!r} (not a lightning-slide checkpoint index)"
    version = index.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        return f"'version' is {version!r}, not a format version this lightning-slide reads (1 to {VERSION})"
    expected = {"units": list, "optimizer": bool, "files": dict}
    for key, kind in expected.items():
        if key not in index:
            return f"key {key!r} is missing"
        if not isinstance(index[key], kind):
            return f"{key!r} is a {type(index[key]).__name__}, not a {kind.__name__}"
    bad = [u for u in index["units"] if not (u == RESIDENT or (isinstance(u, str) and u.isdigit()))]
    if bad:
        return f"'units' holds {bad[:3]}: each unit is {RESIDENT!r} or a layer number as a string"
    for rel, size in index["files"].items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"'files' names {rel!r}, outside the checkpoint directory"
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return f"'files' gives {rel!r} a size of {size!r}, not a number of bytes"
    unlisted = [unit_file("model", u) for u in index["units"] if unit_file("model", u) not in index["files"]]
    if unlisted:
        return f"'files' does not list {unlisted[:3]}, the model file of a unit in 'units'"
    aliases = index.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        return "'aliases' must map tensor names to tensor names"
    return None


# ---------------------------------------------------------------------------------------------------- metadata
def _rebuild(obj: Any, leaf) -> Any:
    """``obj`` rebuilt through plain dicts, lists and (named) tuples; ``leaf(x)`` returns the replacement of ``x``,
    or ``_KEEP_WALKING`` to descend into it (or keep it as is)."""
    replaced = leaf(obj)
    if replaced is not _KEEP_WALKING:
        return replaced
    if isinstance(obj, dict):
        items = {k: _rebuild(v, leaf) for k, v in obj.items()}
        try:
            return type(obj)(items)
        except TypeError:
            return items
    if isinstance(obj, (list, tuple)):
        items = [_rebuild(v, leaf) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuples take fields
    return obj


_KEEP_WALKING = object()


def _take_tensors(obj: Any, out: dict[str, torch.Tensor]) -> Any:
    """``obj`` with every tensor inside plain dicts, lists and tuples replaced by a reference into ``out``."""

    def take(x):
        if not torch.is_tensor(x):
            return _KEEP_WALKING
        key = f"t{len(out)}"
        out[key] = x.detach().cpu().contiguous().clone()
        return {_TENSOR_REF: key}

    return _rebuild(obj, take)


def _put_tensors(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of ``_take_tensors``."""

    def put(x):
        if isinstance(x, dict) and set(x) == {_TENSOR_REF}:
            return tensors[x[_TENSOR_REF]]
        return _KEEP_WALKING

    return _rebuild(obj, put)
