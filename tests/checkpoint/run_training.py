"""A training child process for the crash tests: trains a tiny Llama with slideformer (CPU, 32-true, accumulation 2,
clipping, warm-up scheduler), saving ``last.ckpt`` after every optimizer step.

    python tests/checkpoint/run_training.py --dir CKPT_DIR --steps N [--hang-at K | --slow-after K] [--resume] [--out F]

--hang-at K     once the checkpoint of step K is written, create CKPT_DIR/../ready and sleep (the parent kills it)
--slow-after K  once the checkpoint of step K is written, make every later save sleep 60 s after each file
                (through lightning_slide.checkpoint.DELAY_ENV) and create CKPT_DIR/../ready
--resume        start from ckpt_path="last"
--out F         write the losses of this run (JSON) and the final parameters (F.safetensors)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.core.tiny

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import lightning_slide  # noqa: E402
from lightning_slide.checkpoint import DELAY_ENV  # noqa: E402
from tests.core.tiny import TinyLM, batches, initial_state, trainer  # noqa: E402

FAMILY = "llama"
BATCHES_PER_EPOCH = 2  # one optimizer step per epoch: Lightning resumes exactly only at epoch boundaries


def build(ckpt_dir: str, steps: int, callbacks=()) -> tuple[TinyLM, L.Trainer]:
    module = TinyLM(FAMILY, initial_state(FAMILY))
    saver = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=1)
    run = trainer(
        lightning_slide.SlideFormerStrategy(window=1),
        max_steps=steps,
        max_epochs=-1,
        enable_checkpointing=True,
        callbacks=[saver, *callbacks],
    )
    return module, run


class AfterCheckpoint(L.Callback):
    """At the start of the batch after step ``step`` (its checkpoint is on disk by then): ``slow`` sets the save
    delay, then the parent is told through the ``ready`` file; without ``slow`` the process then hangs."""

    def __init__(self, step: int, ready: Path, slow: bool) -> None:
        self.step, self.ready, self.slow = step, ready, slow

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.ready.exists():
            if self.slow:
                os.environ[DELAY_ENV] = "60"
            self.ready.touch()
            if not self.slow:
                time.sleep(600)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--hang-at", type=int)
    parser.add_argument("--slow-after", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    ready = Path(args.dir).parent / "ready"
    callbacks = []
    if args.hang_at is not None:
        callbacks.append(AfterCheckpoint(args.hang_at, ready, slow=False))
    if args.slow_after is not None:
        callbacks.append(AfterCheckpoint(args.slow_after, ready, slow=True))
    module, run = build(args.dir, args.steps, callbacks)
    run.fit(module, batches(BATCHES_PER_EPOCH), ckpt_path="last" if args.resume else None)
    if args.out:
        Path(args.out).write_text(json.dumps(module.losses))
        save_file({n: p.detach().contiguous() for n, p in module.named_parameters()}, args.out + ".safetensors")


if __name__ == "__main__":
    main()
