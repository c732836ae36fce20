"""GradNormMonitor: each optimizer step's gradient norm in the logs, without a hook that would hold slideformer's
updates back."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy


class GradNormMonitor(L.Callback):
    """Logs, as ``name``, the 2-norm over every gradient the optimizer steps, before clipping (what
    ``torch.nn.utils.clip_grad_norm_`` returns), at the optimizer steps Lightning logs (``log_every_n_steps``),
    through the Trainer's loggers as ``LearningRateMonitor`` does.

    Under slideformer the engine takes each layer's norm on its way (the updates keep streaming out of the backward),
    and a step's norm is logged, under its own step, once the next step's backward is done; the last step's at the end
    of training. Under other strategies it reads ``.grad`` in ``on_before_optimizer_step``.
    """

    def __init__(self, name: str = "grad_norm") -> None:
        self.name = name
        self._waiting: list[int] = []  # slideformer: steps whose norm is logged after the next backward

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
            raise ValueError(
                f"GradNormMonitor reads each parameter's whole .grad, which {type(trainer.strategy).__name__} shards "
                "across devices; log the value its clipping computes instead, or use one device, DDP or slideformer"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._waiting = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        step, tracked = trainer.global_step, getattr(trainer.strategy, "grad_norm", None)
        if tracked is not None:  # the strategy takes the norms itself (slideformer)
            self._log_waiting(trainer, tracked)
            self._waiting = [step]
        elif self._logged(trainer, step):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if grads:
                norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
                self._log(trainer, step, torch.linalg.vector_norm(norms).item())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tracked = getattr(trainer.strategy, "grad_norm", None)
        if tracked is not None:
            self._log_waiting(trainer, tracked)

    def _log_waiting(self, trainer: L.Trainer, tracked) -> None:
        for step in self._waiting:
            if self._logged(trainer, step):
                self._log(trainer, step, tracked(step))
        self._waiting = []

    @staticmethod
    def _logged(trainer: L.Trainer, step: int) -> bool:
        """Whether Lightning logs the metrics of optimizer step ``step`` (counted from 0)."""
        return (step + 1) % trainer.log_every_n_steps == 0

    def _log(self, trainer: L.Trainer, step: int, value: float | None) -> None:
        if value is None:  # (a step slideformer skipped updates nothing)
            return
        for logger in trainer.loggers:
            logger.log_metrics({self.name: value}, step=step)
