"""What a run did, in a few lines: losses before and after, trained tokens per second, peak memory of each tier."""

import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

_LAST = 10  # the final train loss is the mean of this many last steps: one batch is too noisy


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def peak_memory(output_dir: str | Path | None = None, offload_dir: str | Path | None = None) -> dict[str, int | None]:
    """Peak bytes per tier: ``gpu`` (allocated by torch, ``None`` without CUDA), ``host`` (peak resident set of this
    process), ``disk`` (what the run wrote under ``output_dir``) and ``offload`` (the disk tier's files under
    ``offload_dir``, which keep their size while the run goes)."""
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"gpu": gpu, "host": host, "disk": _size(output_dir), "offload": _size(offload_dir)}


def _size(directory: str | Path | None) -> int | None:
    """Bytes of the files under ``directory`` (``None`` when there is none)."""
    if directory is None or not Path(directory).is_dir():
        return None
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def batch_tokens(batch: Any) -> int | None:
    """Trained tokens of a batch: the ones of its ``attention_mask`` (padding is not trained), else every element of
    its ``input_ids`` or of a tensor batch; ``None`` for a batch of another form."""
    if isinstance(batch, dict):
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        batch = batch.get("input_ids")
    return batch.numel() if isinstance(batch, torch.Tensor) else None


class RunSummary(L.Callback):
    """Counts real (non-padding) tokens, training time and train losses during ``fit``; :meth:`report` formats them.

    Training time runs from each batch's start to its end (data loading, validation and checkpointing excluded), so
    tokens per second measure the training steps themselves; the rate after the first batch is reported beside it,
    as the first one also warms up (kernels, the host loop, allocators) and weighs much in a short run. With several
    devices the tokens are every rank's (summed when training ends); losses, time and memory are this rank's.
    """

    def __init__(self) -> None:
        self.tokens = 0
        self.steps = 0
        self.seconds = 0.0
        self.first_tokens = 0  # of the first batch, so the rate after it can be told apart
        self.first_seconds = 0.0
        self.losses: list[float] = []
        self.ranks = 1
        self.counts_tokens = True  # False once a batch had no tokens to count
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:  # a module may return nothing (manual optimization)
            self.losses.append(float(loss))  # syncs with the device, so the time below includes the step's work
        self.seconds += time.perf_counter() - self._start
        tokens = batch_tokens(batch)
        if tokens is None:
            self.counts_tokens = False
        else:
            self.tokens += tokens
        if self.steps == 0:
            self.first_tokens, self.first_seconds = tokens or 0, self.seconds
        self.steps += 1

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.ranks = trainer.world_size
        if self.ranks > 1:  # every rank calls this: a collective
            tokens = torch.tensor([float(self.tokens), float(self.first_tokens)], device=trainer.strategy.root_device)
            self.tokens, self.first_tokens = (int(t) for t in trainer.strategy.reduce(tokens, reduce_op="sum").tolist())

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_second_after_first(self) -> float | None:
        """The rate over every batch but the first; ``None`` with one batch."""
        seconds = self.seconds - self.first_seconds
        return (self.tokens - self.first_tokens) / seconds if self.steps > 1 and seconds > 0 else None

    def report(
        self,
        before: float | None,
        after: float | None,
        output_dir: str | Path | None,
        metric: str = "val/loss",
        offload_dir: str | Path | None = None,
    ) -> list[str]:
        """Lines for the end of a run; ``before`` and ``after`` are the values of ``metric`` around training;
        ``offload_dir``: the strategy's disk tier, if any."""
        lines = []
        if self.losses:
            last = self.losses[-_LAST:]
            lines.append(
                f"train loss: {self.losses[0]:.3f} (first batch) -> {sum(last) / len(last):.3f} "
                f"(mean of the last {len(last)})"
            )
        if after is not None:
            start = "" if before is None else f"{before:.3f} (before training) -> "
            lines.append(f"{metric}:".ljust(12) + f"{start}{after:.3f} (after)")
        ranks = f" on {self.ranks} devices" if self.ranks > 1 else ""
        if self.counts_tokens:
            after_first = self.tokens_per_second_after_first
            steady = "" if after_first is None else f", {after_first:,.0f} after the first batch"
            lines.append(
                f"throughput: {self.tokens_per_second:,.0f} tokens/s{ranks} ({self.tokens:,} real tokens in "
                f"{self.steps} batches, {self.seconds:.1f} s of training steps{steady}; padding not counted)"
            )
        else:
            lines.append(
                f"throughput: {self.steps / max(self.seconds, 1e-9):.2f} batches/s{ranks} ({self.steps} "
                f"batches in {self.seconds:.1f} s of training steps; their tokens are not counted)"
            )
        peak = peak_memory(output_dir, offload_dir)
        gpu = "no CUDA" if peak["gpu"] is None else _gib(peak["gpu"])
        disk = "" if peak["disk"] is None else f", disk {_gib(peak['disk'])} (run outputs)"
        disk += "" if peak["offload"] is None else f", {_gib(peak['offload'])} in offload_dir (disk tier)"
        per_rank = " of rank 0" if self.ranks > 1 else ""
        lines.append(f"peak memory{per_rank}: GPU {gpu}, host {_gib(peak['host'])} (peak RSS){disk}")
        return lines
