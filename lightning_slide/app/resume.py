"""A training loader that Lightning checkpoints, so that a run resumed mid-epoch continues with the next batch.

Lightning saves the ``state_dict`` of a training DataLoader that has one (with the loops' state) and gives it back
through ``load_state_dict`` before iterating again; without it, a resumed run would restart the epoch's data from
its first batch while its step count carried on.
"""

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Shuffles anew each epoch (seeded with ``seed + epoch``, so any epoch's order can be made again) and shards it
    across ranks, starting ``start`` indices into the epoch when resuming.

    It is torch's ``DistributedSampler`` (with one rank when there is one device) so that Lightning keeps it rather
    than putting its own sampler in its place on several devices; Lightning calls ``set_epoch`` each epoch.
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` whose state is the epoch and the batches yielded in it.

    Batches are counted as the training loop takes them (not as workers prefetch them), so a checkpoint written after
    batch ``k`` records ``k + 1`` and the resumed loader skips that many batches' indices without loading them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch, self.batches = 0, 0
        self._resume_at: dict | None = None

    def __iter__(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler
        resume, self._resume_at = self._resume_at, None
        # a checkpoint from the end of an epoch resumes at the next epoch's start: nothing to skip then
        skip = resume["batches"] if resume is not None and resume["epoch"] == sampler.epoch else 0
        sampler.start = skip * self.batch_size
        self.epoch, self.batches = sampler.epoch, skip
        for batch in super().__iter__():
            self.batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = dict(state)
