"""Loading: a complete checkpoint directory read on demand (``CheckpointReader``), its tensors mapped from the
files (``read_mapped``), and the checkpoint dict the slideformer strategy restores from (``load``)."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lightning_slide.checkpoint.format import INDEX, META, META_TENSORS, READER_KEY, _put_tensors, unit_file, verify

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
