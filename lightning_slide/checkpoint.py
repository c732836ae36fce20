"""Directory checkpoints in safetensors, and export to a Hugging Face model directory.

A slideformer checkpoint is a directory (named like a Lightning checkpoint, e.g. ``last.ckpt``, so that
``ModelCheckpoint`` finds and rotates it)::

    last.ckpt/
      model/resident.safetensors        fp32 masters of the resident parts (embeddings, norm, head) and the buffers
      model/layer-00000.safetensors     fp32 masters of decoder layer 0, one file per layer ...
      optimizer/resident.safetensors    optimizer state per parameter: "<parameter name>/exp_avg", ".../exp_avg_sq",
      optimizer/layer-00000.safetensors "<parameter name>/step" ... (absent in weights-only checkpoints)
      meta.pt                           Lightning's metadata (loops, schedulers, callbacks, hyperparameters, epoch,
                                        global step, optimizer param groups) with every tensor taken out
      meta.safetensors                  the tensors taken out of the metadata (e.g. ModelCheckpoint's scores)
      hf_config.json                    the Hugging Face config of the model inside the module, when there is one
      index.json                        written last: the format, every file with its size, tied-weight aliases

Saving writes one unit (layer) at a time from the tensors in place, so host memory never holds a second copy of the
model or optimizer. It writes into a hidden sibling directory (``.last.ckpt.tmp``), fsyncs every file and the
directories, and only then swaps it into place (one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux), so an
interrupted save never replaces or damages the previous checkpoint. ``index.json`` is the completion marker: a
directory without it is refused on load with an error saying so. A temporary directory left by an interrupted save
is never taken for a checkpoint (its name does not end in ``.ckpt``) and is removed by the next save to that path;
a save stopped by an exception or Ctrl+C removes it at once.

Loading maps the files (``read_mapped``): tensors are read as they are used, so the state dict of a model larger
than host memory costs no memory until it is copied into the module. Outside the strategy, ``load_from_checkpoint``
builds a LightningModule from a checkpoint (Lightning's own ``_load_state``), ``SlideCheckpointIO`` lets other
Lightning strategies read directories, and ``checkpoint_to_lightning`` writes one single-file Lightning checkpoint.

``export_hf`` writes a model as a Hugging Face directory; ``checkpoint_to_hf`` converts a checkpoint directory into
one (``python -m lightning_slide.checkpoint CKPT OUT [--dtype bfloat16]``; ``--lightning`` writes a Lightning file).
"""

from __future__ import annotations

import copy
import ctypes
import errno
import json
import os
import shutil
import struct
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors import safe_open
from safetensors.torch import save_file

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


# ---------------------------------------------------------------------------------------------------- saving
def save(
    path: str | os.PathLike,
    checkpoint: dict[str, Any],
    *,
    unit_of: Mapping[str, str],
    optimizer_params: list[str] | None = None,
    hf: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoint`` (the dict Lightning's ``dump_checkpoint`` makes) as a directory at ``path``, atomically.

    Args:
        path: the checkpoint directory to create or replace (a file or directory there is replaced only once the
            new checkpoint is complete on disk).
        checkpoint: Lightning's checkpoint dict; its ``"state_dict"`` tensors are written in place (no copies), its
            ``"optimizer_states"`` (at most one optimizer) per parameter. The dict itself is not modified.
        unit_of: parameter name (as in ``state_dict``) -> unit (``"resident"`` or a layer index as a string); names
            not in it (buffers, extra entries) go with the resident unit.
        optimizer_params: the name of each parameter in the optimizer's ``state_dict`` index order (required when
            ``checkpoint`` holds optimizer states).
        hf: ``{"prefix": ..., "architecture": ..., "config": {...}}`` of the Hugging Face model inside the module,
            for ``checkpoint_to_hf``; ``None`` when there is none.
        info: small JSON-able facts recorded in ``index.json`` (e.g. the compute dtype).

    Returns the checkpoint path.
    """
    path = Path(path)
    tmp = temp_path(path)
    remove(tmp)  # left by a save killed halfway
    try:
        _write_directory(tmp, checkpoint, unit_of, optimizer_params, hf, info)
    except BaseException:  # an error or Ctrl+C: leave nothing behind (the previous checkpoint is untouched)
        remove(tmp)
        raise
    _swap_into_place(tmp, path)
    return path


def _write_directory(
    tmp: Path,
    checkpoint: dict[str, Any],
    unit_of: Mapping[str, str],
    optimizer_params: list[str] | None,
    hf: dict[str, Any] | None,
    info: dict[str, Any] | None,
) -> None:
    """Write the complete checkpoint directory ``tmp`` (``save``'s arguments), every file and directory fsynced."""
    tmp.mkdir(parents=True)
    (tmp / "model").mkdir()
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    files: dict[str, int] = {}
    aliases: dict[str, str] = {}

    state = checkpoint.get("state_dict", {})
    groups = _group(state, unit_of)
    for unit, names in groups.items():
        rel = unit_file("model", unit)
        aliases.update(_write_tensors(tmp / rel, {n: state[n] for n in names}))
        files[rel] = (tmp / rel).stat().st_size
        if delay:
            time.sleep(delay)

    meta = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
    optimizer_states = checkpoint.get("optimizer_states")
    if optimizer_states is not None:
        if len(optimizer_states) > 1:
            raise ValueError(f"directory checkpoints hold one optimizer, got {len(optimizer_states)}")
        if optimizer_states:
            meta["slide_optimizer"] = _write_optimizer(
                tmp, optimizer_states[0], optimizer_params, unit_of, files, delay
            )
    meta_tensors: dict[str, torch.Tensor] = {}
    meta = _take_tensors(meta, meta_tensors)
    save_file(meta_tensors, tmp / META_TENSORS)
    torch.save(meta, tmp / META)
    if hf is not None:
        (tmp / HF_CONFIG).write_text(json.dumps(hf, indent=1, default=str))
    for name in (META_TENSORS, META, HF_CONFIG):
        if (tmp / name).exists():
            _fsync(tmp / name)
            files[name] = (tmp / name).stat().st_size

    index = {
        "format": FORMAT,
        "version": VERSION,
        "units": list(groups),
        "optimizer": optimizer_states is not None and bool(optimizer_states),
        "files": files,
        "aliases": aliases,
        **(info or {}),
    }
    (tmp / INDEX).write_text(json.dumps(index, indent=1))
    _fsync(tmp / INDEX)
    for directory in (tmp / "model", tmp / "optimizer", tmp):
        if directory.exists():
            _fsync(directory)


def _group(state: Mapping[str, Any], unit_of: Mapping[str, str]) -> dict[str, list[str]]:
    """State-dict names by unit, resident first, then layers in order."""
    groups: dict[str, list[str]] = {RESIDENT: []}
    for name in state:
        groups.setdefault(unit_of.get(name, RESIDENT), []).append(name)
    layers = sorted((u for u in groups if u != RESIDENT), key=int)
    return {u: groups[u] for u in [RESIDENT, *layers]}


def _write_tensors(file: Path, tensors: dict[str, torch.Tensor], copy_shared: bool = False) -> dict[str, str]:
    """Write ``tensors`` to ``file`` (fsynced). A tensor shared under several names (tied weights) is written once
    and the other names are returned as ``{alias: written name}``; with ``copy_shared`` each name gets a copy
    instead (for small tensors such as a shared step count)."""
    unique: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in tensors.items():
        if not torch.is_tensor(tensor):
            raise TypeError(f"state_dict entry {name!r} is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach()
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in seen:
            if not copy_shared:
                aliases[name] = seen[key]
                continue
            tensor = tensor.clone()
        seen[key] = name
        # Host tensors are written from where they are; device tensors (buffers) are small.
        unique[name] = tensor.cpu().contiguous()
    save_file(unique, file)
    _fsync(file)
    return aliases


def _write_optimizer(
    tmp: Path, state: Mapping, params: list[str] | None, unit_of: Mapping[str, str], files: dict[str, int], delay: float
) -> dict:
    """Write the optimizer's per-parameter state unit by unit (``state["state"]`` may compute each parameter's
    state when it is read, e.g. ``LazyOptimizerState``: only one unit's is held at a time); returns the tensor-free
    part (param groups with parameter names, non-tensor state values)."""
    if params is None:
        raise ValueError("save(optimizer_params=...) is required with optimizer states")
    groups = []
    for group in state["param_groups"]:
        groups.append(
            {**{k: v for k, v in group.items() if k != "params"}, "params": [params[i] for i in group["params"]]}
        )
    scalars: dict[str, dict] = {}
    (tmp / "optimizer").mkdir()
    for unit, indices in optimizer_read_order(params, unit_of).items():
        tensors = {}
        for index in indices:
            param_state = state["state"].get(index)
            for key, value in (param_state or {}).items():
                if torch.is_tensor(value):
                    tensors[f"{params[index]}/{key}"] = value
                else:
                    scalars.setdefault(params[index], {})[key] = value
        if not tensors:
            continue
        rel = unit_file("optimizer", unit)
        _write_tensors(tmp / rel, tensors, copy_shared=True)
        files[rel] = (tmp / rel).stat().st_size
        del tensors
        if delay:
            time.sleep(delay)
    return {"param_groups": groups, "scalars": scalars}


def optimizer_read_order(params: list[str], unit_of: Mapping[str, str]) -> dict[str, list[int]]:
    """The order in which ``save`` reads the optimizer's per-parameter states: unit by unit (resident first, then
    the layers), each unit's in index order. With several ranks each read is a collective, so the ranks that do not
    write read in this order too."""
    indices_of: dict[str, list[int]] = {}
    for index, name in enumerate(params):
        indices_of.setdefault(unit_of.get(name, RESIDENT), []).append(index)
    return {unit: indices_of[unit] for unit in sorted(indices_of, key=lambda u: -1 if u == RESIDENT else int(u))}


class LazyOptimizerState(Mapping):
    """``{index: state}`` of an optimizer's parameters in ``state_dict`` order, each state computed when read.

    Args:
        params: the parameters in the optimizer's ``state_dict`` index order.
        state_of: ``parameter -> state dict`` or ``None`` (not optimized: reading its index raises ``KeyError``).
    """

    def __init__(self, params: list, state_of) -> None:
        self.params, self.state_of = params, state_of

    def __getitem__(self, index: int) -> dict:
        if not isinstance(index, int) or not 0 <= index < len(self.params):
            raise KeyError(index)
        state = self.state_of(self.params[index])
        if state is None:
            raise KeyError(index)
        return state

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.params)))

    def __len__(self) -> int:
        return len(self.params)


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where the system
    or file system does not offer it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Make the complete directory ``tmp`` the checkpoint at ``path``; the previous one is removed afterwards."""
    if not path.exists() and not path.is_symlink():
        os.rename(tmp, path)
    elif _exchange(tmp, path):
        remove(tmp)  # now the previous checkpoint
    else:
        # No atomic exchange: two renames. A crash between them leaves the previous checkpoint at `old` and the new,
        # complete one at `tmp` (neither is damaged).
        old = path.with_name(f".{path.name}.old")
        remove(old)
        os.rename(path, old)
        os.rename(tmp, path)
        remove(old)
    _fsync(path.parent)


def remove(path: str | os.PathLike) -> None:
    """Remove a checkpoint: a directory (with its contents), a file or a link (not what it points to)."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------------- loading
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_mapped(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors ``file`` as a view of the file mapped into memory, copy-on-write.

    Nothing is read until a tensor is used, and what is read is page cache that the OS may drop again: a whole
    model's state dict built this way costs no host memory of its own, so ``module.load_state_dict`` (which walks
    the whole dict) reads it layer by layer, as it copies. Writing to a tensor never changes the file. A tensor
    whose dtype or alignment does not allow a view is read with ``safetensors`` instead (a copy).
    """
    file = Path(file)
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    start = 8 + length  # the data follows the header (safetensors' layout)
    storage = torch.UntypedStorage.from_file(str(file), shared=False, nbytes=file.stat().st_size)
    tensors, copies = {}, []
    for name, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        offset = start + info["data_offsets"][0]
        if dtype is None or offset % dtype.itemsize:
            copies.append(name)
            continue
        tensors[name] = torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, info["shape"])
    if copies:
        with safe_open(file, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in copies})
    return tensors


class CheckpointReader:
    """A complete checkpoint directory, read on demand.

    Args:
        path: the checkpoint directory.

    Raises:
        FileNotFoundError / ValueError: with what is wrong, when ``path`` is missing, incomplete (an interrupted
            save), of another format, has a malformed ``index.json``, or lacks a file its index lists.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.index = verify(self.path)

    @property
    def units(self) -> list[str]:
        return list(self.index["units"])

    @property
    def has_optimizer(self) -> bool:
        return bool(self.index["optimizer"])

    def read(self, rel: str) -> dict[str, torch.Tensor]:
        """Every tensor of one file (e.g. ``unit_file("model", "3")``), mapped (see ``read_mapped``)."""
        return read_mapped(self.path / rel)

    def meta(self, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's checkpoint dict without ``state_dict`` and ``optimizer_states``, its tensors put back."""
        from lightning.fabric.utilities.cloud_io import _load

        meta = _load(self.path / META, weights_only=weights_only)
        return _put_tensors(meta, self.read(META_TENSORS))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The module's state dict: every tensor mapped from its unit's file (read as it is used), tied names
        sharing one tensor. A plain dict: ``on_load_checkpoint`` hooks may rename or replace entries."""
        state: dict[str, torch.Tensor] = {}
        for _, tensors in self.model_units():
            state.update(tensors)
        return state

    def model_units(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """``(unit, {name: tensor})`` one unit at a time, aliases (tied names) included."""
        aliases = self.index.get("aliases", {})
        for unit in self.units:
            tensors = self.read(unit_file("model", unit))
            tensors.update({alias: tensors[name] for alias, name in aliases.items() if name in tensors})
            yield unit, tensors

    def optimizer_states(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(parameter name, state)`` for every parameter with optimizer state, one unit file at a time."""
        scalars = self.meta_optimizer().get("scalars", {})
        for unit in self.units:
            rel = unit_file("optimizer", unit)
            if rel not in self.index["files"]:
                continue
            states: dict[str, dict] = {}
            for key, tensor in self.read(rel).items():
                name, _, field = key.rpartition("/")
                states.setdefault(name, dict(scalars.get(name, {})))[field] = tensor
            yield from states.items()

    def meta_optimizer(self) -> dict:
        """The optimizer's param groups (parameters by name) and non-tensor state values; ``{}`` when none."""
        if not hasattr(self, "_meta_optimizer"):
            self._meta_optimizer = self.meta().get("slide_optimizer", {})
        return self._meta_optimizer

    def optimizer_problem(self) -> str | None:
        """What makes this checkpoint's optimizer state unfit to resume training from, or ``None``: its index and
        its metadata must agree on whether the optimizer was saved, and the index must list optimizer files."""
        groups = self.meta_optimizer().get("param_groups")
        if groups and not self.has_optimizer:
            return (
                f"its metadata records an optimizer ({sum(len(g['params']) for g in groups)} parameters) but "
                f"{INDEX} says no optimizer state was saved"
            )
        if self.has_optimizer and not groups:
            return f"{INDEX} says optimizer state was saved but {META} records no optimizer param groups"
        if self.has_optimizer and not any(rel.startswith("optimizer/") for rel in self.index["files"]):
            return f"{INDEX} says optimizer state was saved but lists no optimizer/ file"
        return None

    def refuse_optimizer_problem(self) -> None:
        """Raise ``ValueError`` naming the checkpoint and what is wrong, when ``optimizer_problem`` finds something."""
        problem = self.optimizer_problem()
        if problem:
            raise ValueError(
                f"checkpoint {str(self.path)!r} cannot resume training: {problem}. Resuming would restart the "
                "optimizer (fresh Adam moments) without a word. Resume from another checkpoint, or load the weights "
                "only: trainer.validate/test/predict(ckpt_path=...) or lightning_slide.load_from_checkpoint"
            )

    def torch_optimizer_state(self) -> dict[str, Any]:
        """The optimizer's ``state_dict`` in torch's layout (parameters numbered group by group), as a Lightning
        checkpoint's ``optimizer_states[0]`` holds it; the state tensors mapped from their files."""
        groups = self.meta_optimizer()["param_groups"]
        number = {}
        for group in groups:
            for name in group["params"]:
                number[name] = len(number)
        state = {number[name]: value for name, value in self.optimizer_states() if name in number}
        return {
            "state": dict(sorted(state.items())),
            "param_groups": [{**g, "params": [number[n] for n in g["params"]]} for g in groups],
        }


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


def load(path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
    """Lightning's checkpoint dict of a checkpoint directory for the slideformer strategy: the metadata,
    ``"state_dict"`` (tensors mapped from the files, see ``read_mapped``) and the ``CheckpointReader`` under
    ``READER_KEY`` (the strategy restores the optimizer from it, one unit at a time).

    Args:
        path: the checkpoint directory.
        weights_only: passed to ``torch.load`` for the (tensor-free) metadata, as Lightning does for its files.
    """
    reader, checkpoint = _read(path, weights_only)
    checkpoint[READER_KEY] = reader
    return checkpoint


def _read(path: str | os.PathLike, weights_only: bool | None) -> tuple[CheckpointReader, dict[str, Any]]:
    """The reader of a checkpoint directory and Lightning's dict of it without the optimizer state."""
    reader = CheckpointReader(path)
    checkpoint = reader.meta(weights_only=weights_only)
    reader._meta_optimizer = checkpoint.pop("slide_optimizer", {})
    checkpoint["state_dict"] = reader.state_dict()
    return reader, checkpoint


# ---------------------------------------------------------------------------------------------------- Lightning
def lightning_checkpoint(
    path: str | os.PathLike, *, map_location: Any = None, weights_only: bool | None = None, optimizer: bool = True
) -> dict[str, Any]:
    """A checkpoint directory as the dict a single-file Lightning checkpoint holds, for code outside slideformer:
    metadata, ``"state_dict"`` and (with ``optimizer`` and when saved) ``"optimizer_states"`` in torch's layout.

    Tensors are mapped from the files (``read_mapped``: no host memory until used) and stay on the host unless
    ``map_location`` (as for ``torch.load``: a device, a string, a ``{"cpu": device}`` dict or a callable) names
    another device. Optimizer state that the checkpoint's own records contradict (see
    ``CheckpointReader.optimizer_problem``) is left out with a warning: Lightning then refuses to resume from it.
    """
    reader, checkpoint = _read(path, weights_only)
    if optimizer:
        problem = reader.optimizer_problem()
        if problem is None and reader.has_optimizer:
            state = reader.torch_optimizer_state()
            missing = sum(len(group["params"]) for group in state["param_groups"]) - len(state["state"])
            if missing:
                problem = f"its optimizer files hold no state for {missing} parameters of its param groups"
            else:
                checkpoint["optimizer_states"] = [state]
        if problem is not None:
            from lightning.pytorch.utilities.rank_zero import rank_zero_warn

            rank_zero_warn(f"checkpoint {str(reader.path)!r}: optimizer state left out: {problem}")
    device = _mapped_device(map_location)
    if device is not None and device != torch.device("cpu"):
        moved: dict[int, torch.Tensor] = {}  # by tensor: tied names stay one tensor, as torch.load keeps them
        checkpoint = _rebuild(
            checkpoint, lambda x: moved.setdefault(id(x), x.to(device)) if torch.is_tensor(x) else _KEEP_WALKING
        )
    return checkpoint


def _mapped_device(map_location: Any) -> torch.device | None:
    """Where ``map_location`` (``torch.load``'s argument) sends tensors saved on the host; ``None``: the host."""
    if map_location is None:
        return None
    if callable(map_location):
        mapped = map_location(torch.UntypedStorage(1), "cpu")
        return None if mapped is None else mapped.device
    if isinstance(map_location, dict):
        map_location = map_location.get("cpu", "cpu")
    return torch.device(map_location)


def load_from_checkpoint(
    cls: type,
    checkpoint_path: str | os.PathLike,
    map_location: Any = None,
    hparams_file: str | os.PathLike | None = None,
    strict: bool | None = None,
    weights_only: bool | None = None,
    **kwargs: Any,
) -> Any:
    """``cls.load_from_checkpoint(checkpoint_path, ...)`` for slideformer checkpoint directories (and files).

    ``MyModule.load_from_checkpoint("last.ckpt")`` cannot open a directory; this returns the same thing::

        module = lightning_slide.load_from_checkpoint(MyModule, "last.ckpt", lr=1e-5)

    The module is built by Lightning's own loading code (``lightning.pytorch.core.saving._load_state``): the
    hyperparameters saved by ``save_hyperparameters()`` with ``kwargs`` overriding them, ``configure_model``,
    ``on_load_checkpoint`` (which sees the whole checkpoint dict and may change its ``"state_dict"``),
    ``strict``/``strict_loading`` and the device move behave as in ``load_from_checkpoint``. The trained weights
    are the fp32 masters, mapped from the checkpoint's files (``read_mapped``): loading reads them as it copies
    them, so host memory holds the module and no second copy of its weights. Arguments as Lightning's
    ``load_from_checkpoint``; ``cls`` may also be a ``LightningDataModule``. A single-file checkpoint goes to
    ``cls.load_from_checkpoint`` unchanged.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.core.saving import _load_state, load_hparams_from_tags_csv, load_hparams_from_yaml
    from lightning.pytorch.utilities.migration.utils import _pl_migrate_checkpoint
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

    if not Path(checkpoint_path).is_dir():
        return cls.load_from_checkpoint(
            checkpoint_path,
            map_location=map_location,
            hparams_file=hparams_file,
            strict=strict,
            weights_only=weights_only,
            **kwargs,
        )
    checkpoint = lightning_checkpoint(
        checkpoint_path, map_location=map_location, weights_only=weights_only, optimizer=False
    )
    checkpoint = _pl_migrate_checkpoint(checkpoint, checkpoint_path=Path(checkpoint_path))
    if hparams_file is not None:  # replaces the saved hyperparameters, as in Lightning
        suffix = Path(hparams_file).suffix.lower()
        if suffix not in (".csv", ".yml", ".yaml"):
            raise ValueError(f"hparams_file must be a .csv, .yml or .yaml file, got {str(hparams_file)!r}")
        read = load_hparams_from_tags_csv if suffix == ".csv" else load_hparams_from_yaml
        checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY] = read(hparams_file)
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {}).update(kwargs)
    if issubclass(cls, pl.LightningDataModule):
        return _load_state(cls, checkpoint, **kwargs)
    module = _load_state(cls, checkpoint, strict=strict, **kwargs)
    state = checkpoint["state_dict"]
    if not state:
        rank_zero_warn(f"The state dict in {str(checkpoint_path)!r} contains no parameters.")
        return module
    return module.to(next((t for t in state.values() if torch.is_tensor(t)), torch.tensor(0)).device)


def checkpoint_to_lightning(
    checkpoint: str | os.PathLike, out_file: str | os.PathLike, *, weights_only: bool = False
) -> Path:
    """Write a checkpoint directory as one Lightning checkpoint file (``torch.save``), for tools that read only
    those (``MyModule.load_from_checkpoint``, a plain Lightning strategy, ``torch.load``).

    Args:
        checkpoint: a slideformer checkpoint directory.
        out_file: the file to write (replaced atomically).
        weights_only: leave the optimizer state out. Default ``False``: kept, in torch's layout, so that plain
            Lightning can also resume training from the file.

    The file holds every tensor once in memory while it is written (as loading it later does): host memory for
    the whole checkpoint (about 4 bytes per parameter, 12 with the optimizer). Returns ``out_file``.
    """
    out_file = Path(out_file)
    data = lightning_checkpoint(checkpoint, optimizer=not weights_only)
    copied: dict[int, torch.Tensor] = {}  # own storages (a mapped file holds several dtypes); tied names stay one
    data = _rebuild(data, lambda x: copied.setdefault(id(x), x.clone()) if torch.is_tensor(x) else _KEEP_WALKING)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    torch.save(data, tmp)
    _fsync(tmp)
    os.replace(tmp, out_file)
    return out_file


class SlideCheckpointIO(TorchCheckpointIO):
    """Lets a Lightning strategy other than slideformer read slideformer checkpoint directories:
    ``Trainer(plugins=[lightning_slide.SlideCheckpointIO()])``, then ``trainer.validate/test/predict/fit(...,
    ckpt_path="last.ckpt")`` work as with a single-file checkpoint (``lightning_checkpoint``: the weights mapped
    from the files, the optimizer in torch's layout). Files are read, and checkpoints written, as by
    ``TorchCheckpointIO``."""

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if Path(path).is_dir():
            return lightning_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


# ---------------------------------------------------------------------------------------------------- export
def export_hf(
    model: torch.nn.Module,
    tokenizer,
    out_dir: str | Path,
    dtype: torch.dtype | str = torch.float32,
    max_shard_size: str = "5GB",
) -> Path:
    """Write ``model`` (and ``tokenizer``) so that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads them.

    Args:
        model: a Hugging Face ``PreTrainedModel`` whose parameters are on the host (as after a slideformer fit).
        tokenizer: its tokenizer (saved alongside, so the directory is self-contained), or ``None``.
        out_dir: directory to create or overwrite.
        dtype: dtype of the saved weights; a dtype other than the parameters' makes one converted copy of the
            weights in host memory while saving. Default ``torch.float32``.
        max_shard_size: largest safetensors shard (with ``model.safetensors.index.json`` when sharded). Default "5GB".

    Returns the directory.
    """
    out_dir = Path(out_dir)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    state_dict = None  # save_pretrained reads the parameters in place
    if any(p.dtype != dtype for p in model.parameters()):
        state_dict, converted = {}, {}  # by storage, so tied weights stay one tensor (saved once)
        for name, tensor in model.state_dict().items():
            key = (tensor.data_ptr(), tensor.shape)
            if key not in converted:
                converted[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
            state_dict[name] = converted[key]
    model.save_pretrained(out_dir, state_dict=state_dict, max_shard_size=max_shard_size)
    if state_dict is not None:  # save_pretrained records the parameters' dtype; record the shards' instead
        config = copy.deepcopy(model.config)
        config.dtype = dtype
        config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def hf_info(module: torch.nn.Module) -> dict[str, Any] | None:
    """``{"prefix", "architecture", "config"}`` of the outermost Hugging Face ``PreTrainedModel`` inside ``module``
    (``prefix`` is its name in the module's state dict, e.g. ``"model."``), or ``None``."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    for name, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel):
            return {
                "prefix": f"{name}." if name else "",
                "architecture": type(sub).__name__,
                "config": sub.config.to_dict(),
            }
    return None


def checkpoint_to_hf(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    tokenizer=None,
    config=None,
    prefix: str | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Convert a checkpoint directory into a Hugging Face model directory (safetensors shards with their index,
    and the config) that ``AutoModelForCausalLM.from_pretrained`` loads.

    Args:
        checkpoint: a slideformer checkpoint directory (full or weights-only).
        out_dir: the Hugging Face directory to create or overwrite.
        dtype: dtype of the exported weights: a ``torch.dtype`` or its name, or ``"compute"`` for the training's
            compute dtype (bf16 under ``precision="bf16-true"``). Default ``torch.float32`` (the masters as they are).
        tokenizer: saved alongside when given (e.g. ``AutoTokenizer.from_pretrained(...)``). Default ``None``.
        config: the model's ``PretrainedConfig``. Default ``None``: the config recorded in the checkpoint (there is
            one when the LightningModule held a Hugging Face ``PreTrainedModel``).
        prefix: the model's name prefix in the LightningModule's state dict (e.g. ``"model."``). Default ``None``:
            the recorded one.
        max_shard_size: largest shard. Default ``"5GB"``.

    The model is built on the meta device and filled one unit at a time (already in ``dtype``), so host memory
    holds one copy of the weights in the exported dtype. Returns ``out_dir``.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    reader = CheckpointReader(checkpoint)
    recorded = None
    if (reader.path / HF_CONFIG).is_file():
        recorded = json.loads((reader.path / HF_CONFIG).read_text())
    if config is None:
        if recorded is None:
            raise ValueError(
                f"checkpoint {str(reader.path)!r} records no Hugging Face config (its LightningModule held no "
                "PreTrainedModel); pass checkpoint_to_hf(..., config=AutoConfig.from_pretrained(...), prefix=...)"
            )
        fields = dict(recorded["config"])
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if prefix is None:
        prefix = recorded["prefix"] if recorded is not None else ""
    if dtype == "compute":
        dtype = reader.index.get("compute_dtype", "float32")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype

    architecture = recorded and getattr(transformers, recorded.get("architecture", ""), None)
    with torch.device("meta"):
        model = architecture._from_config(config) if architecture else AutoModelForCausalLM.from_config(config)
    expected = set(model.state_dict())
    loaded: set[str] = set()
    for _, tensors in reader.model_units():
        mine = {
            k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix) and k[len(prefix) :] in expected
        }
        converted: dict[int, torch.Tensor] = {}  # tied names keep sharing one tensor
        for key, tensor in mine.items():
            if id(tensor) not in converted:
                converted[id(tensor)] = tensor.to(dtype) if tensor.is_floating_point() else tensor
            mine[key] = converted[id(tensor)]
        model.load_state_dict(mine, strict=False, assign=True)
        loaded.update(mine)
        del tensors, mine, converted
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(
            f"checkpoint {str(reader.path)!r} lacks {missing[:5]} ({len(missing)} tensors) of the "
            f"{type(model).__name__} under prefix {prefix!r}; pass the right config= and prefix="
        )
    model.tie_weights()
    return export_hf(model, tokenizer, out_dir, dtype=dtype, max_shard_size=max_shard_size)


def _main(argv: Iterable[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lightning_slide.checkpoint",
        description="Convert a slideformer checkpoint directory into a Hugging Face model directory, or (--lightning) "
        "into one single-file Lightning checkpoint.",
    )
    parser.add_argument("checkpoint", help="checkpoint directory, e.g. outputs/.../checkpoints/last.ckpt")
    parser.add_argument("out", help="Hugging Face directory to write (with --lightning: the .ckpt file to write)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or 'compute'")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer directory to save alongside")
    parser.add_argument(
        "--lightning",
        action="store_true",
        help="write a single-file Lightning checkpoint (fp32 weights and optimizer state) instead",
    )
    parser.add_argument("--weights-only", action="store_true", help="with --lightning: leave the optimizer out")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.lightning:
        print(checkpoint_to_lightning(args.checkpoint, args.out, weights_only=args.weights_only))
        return
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    print(checkpoint_to_hf(args.checkpoint, args.out, dtype=args.dtype, tokenizer=tokenizer))


if __name__ == "__main__":
    _main()
