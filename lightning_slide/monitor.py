"""SlideMonitor: the strategy's own metrics, logged through Lightning's logger at every optimizer step."""

from __future__ import annotations

import resource
import time
from typing import Any

import lightning as L
import torch


def count_tokens(batch: Any) -> int:
    """Real tokens in a batch: the sum of ``attention_mask`` if present, else the size of ``input_ids`` or of the
    first tensor found."""
    if isinstance(batch, dict):
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        if "input_ids" in batch:
            return batch["input_ids"].numel()
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        return next(
            (count_tokens(item) for item in batch if torch.is_tensor(item) or isinstance(item, (dict, list, tuple))), 0
        )
    return batch.numel() if torch.is_tensor(batch) else 0


class SlideMonitor(L.Callback):
    """Logs, per optimizer step (accumulated micro-batches together), under ``slide/``:

    - ``tokens_per_sec``: real tokens (``attention_mask`` sum when the batch has one) per second, from the start of
      an optimizer step's first micro-batch to the end of its last (the device is synchronised there, once a step),
      summed over all ranks with several devices;
    - ``tflops``: 6 · parameters · tokens / step seconds / 1e12 (the usual dense-transformer estimate);
    - ``peak_gpu_gib``: peak GPU memory allocated by torch (GiB; absent on the CPU);
    - ``peak_host_gib``: peak resident host memory of the process (GiB);
    - ``host_busy_share``: share of the step the host update thread was running;
    - ``compute_blocked_share``: share of the step the training thread waited for a host update;
    - ``gpu_busy_share``: 1 - ``compute_blocked_share``, an estimate of the share of the step the GPU had work
      queued (the GPU can only run dry while the training thread is blocked);
    - ``skipped_steps``: optimizer steps skipped so far for a NaN/Inf loss or gradient (``nonfinite="skip"``);
    - ``parked_layers``: layers whose gradients waited on the GPU for a host buffer in this step (``parked_grads``).

    Added by ``SlideFormerStrategy(monitor=True)`` (the default) unless the Trainer already has one.
    """

    def __init__(self) -> None:
        self._tokens = 0
        self._stats0: dict[str, float] | None = None
        self._start: float | None = None  # when the optimizer step's first micro-batch began

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._start is None:
            self._start = time.perf_counter()
            self._stats0 = self._engine_stats(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._tokens += count_tokens(batch)
        if trainer.fit_loop._should_accumulate():
            return  # an optimizer step spans the whole accumulation window: no device sync in between
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)  # once per optimizer step, to time it
        seconds = max(time.perf_counter() - self._start, 1e-9)
        if trainer.world_size > 1:  # every rank's tokens (one small collective per optimizer step)
            total = torch.tensor(float(self._tokens), device=trainer.strategy.root_device)
            self._tokens = int(trainer.strategy.reduce(total, reduce_op="sum").item())
        stats = self._engine_stats(trainer)
        params = sum(p.numel() for p in module.parameters())
        metrics = {
            "slide/tokens_per_sec": self._tokens / seconds,
            "slide/tflops": 6 * params * self._tokens / seconds / 1e12,
            "slide/peak_host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            metrics["slide/peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if stats and self._stats0:
            blocked = min(1.0, (stats["compute_blocked"] - self._stats0["compute_blocked"]) / seconds)
            metrics["slide/host_busy_share"] = min(1.0, (stats["host_busy"] - self._stats0["host_busy"]) / seconds)
            metrics["slide/compute_blocked_share"] = blocked
            metrics["slide/gpu_busy_share"] = 1.0 - blocked
            metrics["slide/skipped_steps"] = stats["skipped_steps"]
            metrics["slide/parked_layers"] = stats["parked_layers"] - self._stats0["parked_layers"]
        module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        self._tokens, self._stats0, self._start = 0, None, None

    @staticmethod
    def _engine_stats(trainer: L.Trainer) -> dict[str, float]:
        engine = getattr(trainer.strategy, "engine", None)
        return engine.stats() if engine is not None else {}
