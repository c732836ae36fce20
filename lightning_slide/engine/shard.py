"""Data parallelism: which part of every unit each rank owns, and the collectives that move the rest.

With several ranks (one process per device, ``torch.distributed`` initialized by the strategy), every rank slides
the same layers through its own window over its own micro-batches. Each unit's flat parameter vector is cut into
``world`` equal shards; rank ``r`` owns elements ``[r * size, (r + 1) * size)``. A rank keeps the Adam moments and
the gradient accumulator of its shards only, and updates only its shards of the fp32 masters (one copy shared by the
ranks of a host, ``shared_masters.py``, or a copy each whose other shards are gathered when read):

upload     the rank copies its shard of a layer into the slot, then an all-gather on the device fills the rest
gradients  as a layer's gradients leave the GPU, a reduce-scatter (mean over ranks) leaves each rank the mean
           gradient of its shard, the only part it downloads
flags      a unit's "all finite" flag is reduced (minimum) with it, so every rank skips or stops alike
norm       the squared norms of the shards are summed over ranks on the host (a gloo group of the update thread)
state      a checkpoint reads each parameter's optimizer state whole: every rank adds its piece (host, same group,
           while the update thread is idle)

Collectives must be issued in the same order on every rank: the engine issues them from the training thread in
program order (uploads are never decided by timing with several ranks) and from the update thread only for the
clipping norm, once per step, on its own group (which the training thread borrows for checkpoints, when the update
thread is idle). One rank (or no process group) is the degenerate case: one shard
covering everything and no collective at all, so the single-device engine runs the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# torch 2.13 renamed these two (the old names warn there); older versions have only the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class Span:
    """A rank's shard of a unit: ``[start, stop)`` of the unit's flat vector (clipped to it;
    empty for a rank past the end), inside the device slice ``[lo, lo + size)`` that collectives use."""

    size: int  # elements per shard: ceil(numel / world)
    lo: int  # rank * size
    start: int
    stop: int
    world: int

    @property
    def padded(self) -> int:
        """Elements a device buffer needs for the collectives: ``world * size``."""
        return self.size * self.world


class Shards:
    """How data-parallel ranks split every unit.

    Args:
        data_parallel: shard over the default process group (``torch.distributed`` must be initialized); default
            ``False``: one rank, one shard, no collectives.
    """

    def __init__(self, data_parallel: bool = False) -> None:
        if data_parallel and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("data-parallel sharding needs torch.distributed initialized (the strategy does that)")
        self.world = dist.get_world_size() if data_parallel else 1
        self.rank = dist.get_rank() if data_parallel else 0
        # The update thread's own group (host tensors, gloo): its one collective per step (the clipping norm) must
        # not interleave with the training thread's on the default group.
        self._host_group = dist.new_group(backend="gloo") if self.active else None

    @property
    def active(self) -> bool:
        return self.world > 1

    def span(self, numel: int) -> Span:
        size = -(-numel // self.world) if numel else 0
        lo = self.rank * size
        return Span(size, lo, min(lo, numel), min(lo + size, numel), self.world)

    def padded(self, numel: int) -> int:
        """Elements of a device buffer through which a unit of ``numel`` elements is gathered or reduced."""
        return -(-numel // self.world) * self.world if numel else 0

    # ------------------------------------------------------------ device collectives (training thread)
    def gather(self, flat: torch.Tensor, numel: int) -> None:
        """Fill ``flat`` (at least ``padded(numel)`` elements) from every rank's shard, each already in place."""
        if not self.active or not numel:
            return
        span = self.span(numel)
        whole = flat[: span.size * self.world]
        _all_gather(whole, whole[span.lo : span.lo + span.size])

    def reduce_scatter(self, flat: torch.Tensor, numel: int) -> None:
        """Leave in this rank's shard of ``flat`` (padded with zeros past ``numel``) the mean over ranks."""
        if not self.active or not numel:
            return
        span = self.span(numel)
        whole = flat[: span.size * self.world]
        _reduce_scatter(whole[span.lo : span.lo + span.size], whole, op=dist.ReduceOp.AVG)

    def mean(self, tensor: torch.Tensor) -> None:
        """All-reduce ``tensor`` in place to its mean over ranks (replicated parts)."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.AVG)

    def sum(self, tensor: torch.Tensor) -> None:
        """All-reduce ``tensor`` in place to its sum over ranks."""
        if self.active:
            dist.all_reduce(tensor)

    def all_true(self, flags: torch.Tensor) -> None:
        """All-reduce boolean ``flags`` in place to their logical AND over ranks."""
        if self.active:
            dist.all_reduce(flags.view(torch.uint8), op=dist.ReduceOp.MIN)

    # ------------------------------------------------------------ host collectives (update thread)
    def host_sum(self, tensor: torch.Tensor) -> None:
        """All-reduce host ``tensor`` in place to its sum over ranks (the update thread's group)."""
        if self.active:
            dist.all_reduce(tensor, group=self._host_group)

    def host_max(self, tensor: torch.Tensor) -> None:
        """All-reduce host ``tensor`` in place to its maximum over ranks (the update thread's group)."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._host_group)

    def host_barrier(self) -> None:
        """Wait until every rank reaches this point (the update thread's group; call while that thread is idle)."""
        if self.active:
            dist.barrier(group=self._host_group)

    def host_objects(self, value) -> list:
        """Every rank's ``value`` (picklable), in rank order (the update thread's group, while it is idle)."""
        if not self.active:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value, group=self._host_group)
        return values

    def close(self) -> None:
        """Let the update thread's group go (the default group is the strategy's)."""
        if self._host_group is not None:
            dist.destroy_process_group(self._host_group)
            self._host_group = None
