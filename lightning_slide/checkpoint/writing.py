"""Saving: a checkpoint directory written one unit (layer) at a time from the tensors in place, into a hidden
sibling directory that is fsynced and then swapped into place atomically (see the package docstring)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lightning_slide.checkpoint.format import (
    DELAY_ENV,
    FORMAT,
    HF_CONFIG,
    INDEX,
    META,
    META_TENSORS,
    RESIDENT,
    VERSION,
    _take_tensors,
    temp_path,
    unit_file,
)


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
