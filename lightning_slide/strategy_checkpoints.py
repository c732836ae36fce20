"""The strategy's checkpoint hooks: Lightning's checkpoint paths (``ModelCheckpoint``, ``save_checkpoint``,
``fit(ckpt_path=...)``) over directory checkpoints (the ``checkpoint`` package) of the engine's fp32 masters and host
optimizer, written layer by layer, atomically; with several ranks, rank 0 writes while every rank adds its shard of
each parameter's optimizer state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_slide import checkpoint as slide_checkpoint
from lightning_slide.engine.blocks import find_parts
from lightning_slide.engine.optimizer import HostOptimizer


class CheckpointHooks:
    """Mixed into ``SlideFormerStrategy`` (ahead of Lightning's strategy, whose hooks these override); uses its
    ``engine``, ``optimizers``, ``blocks``, ``data_parallel`` and ``_torn``."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # masters and host optimizer exist only after setup

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._step_torn():
            return {}  # not saved (save_checkpoint says why)
        if self.engine is None:
            return super().lightning_module_state_dict()
        return self.engine.state_dict()

    def _step_torn(self) -> bool:
        return self._torn or (self.engine is not None and self.engine.step_torn)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` as a directory at ``filepath``: per-layer safetensors files of the fp32 masters and
        the optimizer state, and Lightning's metadata with no tensor pickled; layer by layer, atomically."""
        if storage_options is not None:
            raise TypeError(
                "slideformer writes directory checkpoints and takes no storage_options; call "
                "trainer.save_checkpoint(path) without them"
            )
        if not self.is_global_zero:
            if self.data_parallel and not self._step_torn():
                self._follow_save(checkpoint)
            return
        if self._step_torn():
            rank_zero_warn(
                f"slideformer: checkpoint {str(filepath)!r} not saved: training stopped in the middle of an optimizer "
                "step, so the weights hold part of it. Resume from the last complete checkpoint."
            )
            return
        module = self.lightning_module
        params = self._optimizer_param_names() if checkpoint.get("optimizer_states") else None
        slide_checkpoint.save(
            filepath,
            checkpoint,
            unit_of=self._checkpoint_units(module),
            optimizer_params=params,
            hf=slide_checkpoint.hf_info(module),
            info={"compute_dtype": str(self.precision_plugin.compute_dtype).removeprefix("torch.")},
        )

    def _follow_save(self, checkpoint: dict[str, Any]) -> None:
        """With several ranks, rank 0 writes the checkpoint and reads each parameter's optimizer state whole, a
        collective to which every rank adds its shard's piece: the other ranks take part here, in the same order."""
        states = checkpoint.get("optimizer_states")
        if not states:
            return
        order = slide_checkpoint.optimizer_read_order(
            self._optimizer_param_names(), self._checkpoint_units(self.lightning_module)
        )
        lazy = states[0]["state"]
        for indices in order.values():
            for index in indices:
                lazy.get(index)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The host optimizer's ``state_dict`` (torch's layout) with each parameter's state read from the engine only
        when accessed: saving writes it one layer at a time, so it is never gathered (with the disk tier too)."""
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps it
        if not isinstance(optimizer, HostOptimizer):
            return super().optimizer_state(optimizer)
        params, groups = [], []
        for group in optimizer.param_groups:
            indices = list(range(len(params), len(params) + len(group["params"])))
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": indices})
            params.extend(group["params"])
        return {
            "state": slide_checkpoint.LazyOptimizerState(params, optimizer.engine.optimizer_state),
            "param_groups": groups,
        }

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """A checkpoint directory (masters read lazily in ``load_model_state_dict``), or a single-file checkpoint
        saved by Lightning without this strategy."""
        if Path(checkpoint_path).is_dir():
            return slide_checkpoint.load(checkpoint_path, weights_only=weights_only)
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        """Copy the checkpoint's weights into the fp32 masters (one tensor at a time) and, when fitting, restore the
        host optimizer's state and param groups (Lightning does not: ``lightning_restore_optimizer`` is False)."""
        if self.engine is None:
            return super().load_model_state_dict(checkpoint, strict=strict)
        self.engine.load_state_dict(checkpoint["state_dict"], strict=strict)
        if self.optimizers and self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
            self._restore_optimizer(checkpoint)

    def remove_checkpoint(self, filepath: Any) -> None:
        """Remove a checkpoint directory (or file, or link)."""
        if self.is_global_zero:
            slide_checkpoint.remove(filepath)

    def _restore_optimizer(self, checkpoint: Any) -> None:
        optimizer = self.optimizers[0]
        reader = checkpoint.get(slide_checkpoint.READER_KEY)
        if reader is None:  # a single-file checkpoint: the optimizer's own state_dict layout
            if checkpoint.get("optimizer_states"):
                optimizer.load_state_dict(checkpoint["optimizer_states"][0])
            return
        reader.refuse_optimizer_problem()  # an index and metadata that disagree: never resume with fresh moments
        if not reader.has_optimizer:
            return  # weights only: Lightning refuses to resume training from it right after this
        module = self.lightning_module
        names = self._first_names(module)
        saved = reader.meta_optimizer()["param_groups"]
        mine = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        if [sorted(g["params"]) for g in saved] != [sorted(g) for g in mine]:
            raise ValueError(
                f"checkpoint {str(reader.path)!r} holds an optimizer whose parameter groups differ from what "
                "configure_optimizers returns now (the same groups with the same parameters are needed to resume); "
                "load the weights only (LightningModule.load_state_dict) or restore the original configure_optimizers"
            )
        for group, state in zip(optimizer.param_groups, saved):
            group.update({k: v for k, v in state.items() if k != "params"})
        params = dict(module.named_parameters())
        unrestored = {name for group in saved for name in group["params"]}
        for name, state in reader.optimizer_states():
            if name not in params:
                raise KeyError(f"checkpoint {str(reader.path)!r} has optimizer state for unknown parameter {name!r}")
            self.engine.load_optimizer_state(params[name], state)
            unrestored.discard(name)
        if unrestored:  # every optimized parameter's state is saved: some file is missing from the index
            raise ValueError(
                f"checkpoint {str(reader.path)!r} cannot resume training: its optimizer files hold no state for "
                f"{sorted(unrestored)[:5]} ({len(unrestored)} parameters of its param groups), so they would restart "
                "with fresh Adam moments. Resume from another checkpoint, or load the weights only"
            )

    def _optimizer_param_names(self) -> list[str]:
        """The name of each parameter of the optimizer, in its ``state_dict`` index order."""
        names = self._first_names(self.lightning_module)
        return [names[id(p)] for group in self.optimizers[0].param_groups for p in group["params"]]

    @staticmethod
    def _first_names(module: torch.nn.Module) -> dict[int, str]:
        """``id(parameter) -> name``, the first name of each parameter (tied parameters have several)."""
        return {id(p): n for n, p in module.named_parameters()}

    def _checkpoint_units(self, module: torch.nn.Module) -> dict[str, str]:
        """Parameter name -> ``"resident"`` or the layer index (as a string): how a checkpoint's files are split."""
        if self.engine is not None:
            units = {id(e.param): str(key) for key, unit in self.engine.units().items() for e in unit.entries}
        else:  # after teardown: the same split, found again
            parts = find_parts(module, self.options.blocks)
            units = {id(p): str(i) for i in range(len(parts.blocks)) for _, p in parts.block_parameters(i)}
        return {
            n: units.get(id(p), slide_checkpoint.RESIDENT) for n, p in module.named_parameters(remove_duplicate=False)
        }
