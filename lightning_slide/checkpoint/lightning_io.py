"""Checkpoint directories for code outside the slideformer strategy: the dict a single-file Lightning checkpoint
holds (``lightning_checkpoint``), ``load_from_checkpoint``, ``SlideCheckpointIO`` for other strategies, and
conversion into one single-file Lightning checkpoint (``checkpoint_to_lightning``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_slide.checkpoint.format import _KEEP_WALKING, _rebuild
from lightning_slide.checkpoint.reading import _read
from lightning_slide.checkpoint.writing import _fsync


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
