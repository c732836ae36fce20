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

``export_hf`` writes a model as a Hugging Face directory; ``checkpoint_to_hf`` converts a checkpoint directory into
one (``python -m lightning_slide.checkpoint CKPT OUT [--dtype bfloat16]``).
"""

from __future__ import annotations

import copy
import ctypes
import errno
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
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


def _write_directory(tmp: Path, checkpoint: dict[str, Any], unit_of: Mapping[str, str],
                     optimizer_params: list[str] | None, hf: dict[str, Any] | None, info: dict[str, Any] | None) -> None:
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


def _write_optimizer(tmp: Path, state: Mapping, params: list[str] | None, unit_of: Mapping[str, str],
                     files: dict[str, int], delay: float) -> dict:
    """Write the optimizer's per-parameter state unit by unit (``state["state"]`` may compute each parameter's
    state when it is read, e.g. ``LazyOptimizerState``: only one unit's is held at a time); returns the tensor-free
    part (param groups with parameter names, non-tensor state values)."""
    if params is None:
        raise ValueError("save(optimizer_params=...) is required with optimizer states")
    groups = []
    for group in state["param_groups"]:
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [params[i] for i in group["params"]]})
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
class CheckpointReader:
    """A complete checkpoint directory, read on demand.

    Args:
        path: the checkpoint directory.

    Raises:
        FileNotFoundError / ValueError: with what is wrong, when ``path`` is missing, incomplete (an interrupted
            save), of another format, or lacks a file its index lists.
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
        """Every tensor of one file (e.g. ``unit_file("model", "3")``), on the host."""
        with safe_open(self.path / rel, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def meta(self, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's checkpoint dict without ``state_dict`` and ``optimizer_states``, its tensors put back."""
        from lightning.fabric.utilities.cloud_io import _load

        meta = _load(self.path / META, weights_only=weights_only)
        return _put_tensors(meta, self.read(META_TENSORS))

    def state_dict(self) -> LazyStateDict:
        return LazyStateDict(self)

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
        if not hasattr(self, "_meta_optimizer"):
            self._meta_optimizer = self.meta().get("slide_optimizer", {})
        return self._meta_optimizer


class LazyStateDict(Mapping):
    """The model's state dict of a checkpoint directory; a tensor is read from its unit's file when accessed, so
    loading it into existing tensors never holds more than one tensor extra."""

    def __init__(self, reader: CheckpointReader) -> None:
        self.reader = reader
        self._file_of: dict[str, str] = {}
        for unit in reader.units:
            rel = unit_file("model", unit)
            with safe_open(reader.path / rel, framework="pt") as f:
                for key in f.keys():
                    self._file_of[key] = rel
        self._aliases = dict(reader.index.get("aliases", {}))
        self._handles: dict[str, Any] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        stored = self._aliases.get(name, name)
        rel = self._file_of[stored]  # KeyError for unknown names, as a dict
        if rel not in self._handles:
            self._handles[rel] = safe_open(self.reader.path / rel, framework="pt")
        return self._handles[rel].get_tensor(stored)

    def __iter__(self) -> Iterator[str]:
        yield from self._file_of
        yield from self._aliases

    def __len__(self) -> int:
        return len(self._file_of) + len(self._aliases)

    def by_unit(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """``(unit, {name: tensor})`` one unit at a time, aliases included."""
        for unit in self.reader.units:
            tensors = self.reader.read(unit_file("model", unit))
            tensors.update({a: tensors[n] for a, n in self._aliases.items() if n in tensors})
            yield unit, tensors


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Check that ``path`` is a complete directory checkpoint; returns its index.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is incomplete (an interrupted save), of another format, or lacks a listed file.
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
    index = json.loads(index_file.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r}: {INDEX} is not a {FORMAT} index (format {index.get('format')!r})")
    if index.get("version", 0) > VERSION:
        raise ValueError(
            f"{str(path)!r} was written by a newer lightning-slide (format version {index['version']}, this one "
            f"reads up to {VERSION}); upgrade lightning-slide"
        )
    for rel, size in index["files"].items():
        file = path / rel
        if not file.is_file() or file.stat().st_size != size:
            found = file.stat().st_size if file.is_file() else "missing"
            raise ValueError(f"checkpoint {str(path)!r} is damaged: {rel} should have {size} bytes, found {found}")
    return index


def load(path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
    """Lightning's checkpoint dict of a checkpoint directory: the metadata, ``"state_dict"`` as a ``LazyStateDict``
    (masters read on access) and the ``CheckpointReader`` under ``READER_KEY`` (for the optimizer state).

    Args:
        path: the checkpoint directory.
        weights_only: passed to ``torch.load`` for the (tensor-free) metadata, as Lightning does for its files.
    """
    reader = CheckpointReader(path)
    checkpoint = reader.meta(weights_only=weights_only)
    reader._meta_optimizer = checkpoint.pop("slide_optimizer", {})
    checkpoint["state_dict"] = reader.state_dict()
    checkpoint[READER_KEY] = reader
    return checkpoint


# ---------------------------------------------------------------------------------------------------- export
def export_hf(model: torch.nn.Module, tokenizer, out_dir: str | Path, dtype: torch.dtype | str = torch.float32,
              max_shard_size: str = "5GB") -> Path:
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
            return {"prefix": f"{name}." if name else "", "architecture": type(sub).__name__,
                    "config": sub.config.to_dict()}
    return None


def checkpoint_to_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
                     dtype: torch.dtype | str = torch.float32, tokenizer=None, config=None, prefix: str | None = None,
                     max_shard_size: str = "5GB") -> Path:
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
    for _, tensors in reader.state_dict().by_unit():
        mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and k[len(prefix):] in expected}
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
        description="Convert a slideformer checkpoint directory into a Hugging Face model directory.",
    )
    parser.add_argument("checkpoint", help="checkpoint directory, e.g. outputs/.../checkpoints/last.ckpt")
    parser.add_argument("out_dir", help="Hugging Face directory to write")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or 'compute'")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer directory to save alongside")
    args = parser.parse_args(None if argv is None else list(argv))
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    print(checkpoint_to_hf(args.checkpoint, args.out_dir, dtype=args.dtype, tokenizer=tokenizer))


if __name__ == "__main__":
    _main()
