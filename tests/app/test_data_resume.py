"""Exact resume in the app: a run interrupted mid-epoch and resumed from last.ckpt ends where the uninterrupted run
does (the training loader's position in the epoch is in the checkpoint)."""

import lightning as L
import pytest
import torch

from lightning_slide.app.resume import ResumableLoader, ResumableSampler
from lightning_slide.app.train import train

from .conftest import FAST, compose_cfg

CRASH_STEP = 8  # epoch 1 (of 6 batches), its third batch: mid-epoch, and not the first epoch's order
RUN = [
    *FAST,
    "model.config.hidden_size=64",
    "model.config.num_hidden_layers=2",
    "model.warmup_steps=2",
    "data.batch_size=4",
    "data.val_size=8",
    "trainer.limit_train_batches=6",
    "trainer.max_steps=10",
    "+callbacks.model_checkpoint.every_n_train_steps=4",
    "sample_tokens=0",
    "export.enabled=false",
]


class Crash(RuntimeError):
    pass


class CrashAt(L.Callback):
    """Stops the run with an error before the batch that follows optimizer step ``step`` (its checkpoint is saved)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash(f"interrupted after step {self.step}")


@pytest.mark.parametrize("pack", [False, True])
def test_resume_mid_epoch_equals_the_uninterrupted_run(tmp_path, pack):
    run = [*RUN, f"data.pack={pack}"]
    uninterrupted = train(compose_cfg(*run, output_dir=tmp_path / "whole"))
    with pytest.raises(Crash):
        train(
            compose_cfg(
                *run,
                f"+callbacks.crash._target_={__name__}.CrashAt",
                f"+callbacks.crash.step={CRASH_STEP}",
                output_dir=tmp_path / "run",
            )
        )
    resumed = train(
        compose_cfg(
            *run, f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", output_dir=tmp_path / "resumed"
        )
    )
    assert resumed["trainer"].global_step == 10
    assert resumed["metric"] == uninterrupted["metric"]  # val/loss
    theirs = uninterrupted["module"].model.state_dict()
    for name, value in resumed["module"].model.state_dict().items():
        assert torch.equal(value, theirs[name]), name


def _batches(loader):
    return [batch.tolist() for batch in loader]


@pytest.mark.parametrize("ranks", [1, 2])
def test_loader_resumes_each_rank_at_its_next_batch(ranks):
    data = list(range(50))
    shards = []
    for rank in range(ranks):

        def loader(rank=rank):
            sampler = ResumableSampler(data, num_replicas=ranks, rank=rank, seed=3)
            sampler.set_epoch(2)  # as Lightning does each epoch: a different order than epoch 0
            return ResumableLoader(data, batch_size=4, sampler=sampler)

        whole, first = _batches(loader()), loader()
        taken = [batch.tolist() for _, batch in zip(range(3), first)]  # interrupted after 3 batches
        resumed = loader()
        resumed.load_state_dict(first.state_dict())
        assert first.state_dict() == {"epoch": 2, "batches": 3}
        assert taken + _batches(resumed) == whole
        shards.append(sorted(i for batch in whole for i in batch))
    assert sorted(i for shard in shards for i in shard) == data  # the ranks split the data
