"""Shards: how data-parallel ranks split each unit, with one process and with two gloo processes."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_slide.engine.shard import Shards


def test_one_process_is_inactive_and_its_one_span_covers_everything():
    shards = Shards()
    assert not shards.active and (shards.world, shards.rank) == (1, 0)
    for numel in (0, 1, 7, 1000):
        span = shards.span(numel)
        assert (span.start, span.stop, span.lo, span.size, span.world) == (0, numel, 0, numel, 1)
        assert span.padded == shards.padded(numel) == numel  # no padding: no collective


def test_one_process_collectives_leave_tensors_alone():
    shards = Shards()
    flat = torch.arange(6.0)
    shards.gather(flat, 5)
    shards.reduce_scatter(flat, 5)
    shards.mean(flat)
    shards.host_sum(flat)
    shards.host_max(flat)
    flags = torch.tensor([True, False])
    shards.all_true(flags)
    assert torch.equal(flat, torch.arange(6.0)) and flags.tolist() == [True, False]
    assert shards.host_objects({"a": 1}) == [{"a": 1}]
    shards.host_barrier()
    shards.close()


def test_data_parallel_without_a_process_group_is_refused():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed initialized"):
        Shards(data_parallel=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        shards = Shards(data_parallel=True)
        assert shards.active and (shards.world, shards.rank) == (2, rank)
        numel = 7  # odd: the last shard is short and the device buffers are padded
        span = shards.span(numel)
        assert (span.size, span.lo, span.padded) == (4, 4 * rank, 8) and shards.padded(numel) == 8
        assert (span.start, span.stop) == ((0, 4), (4, 7))[rank]
        assert shards.span(1) == type(span)(1, rank, min(rank, 1), 1, 2)  # rank 1 owns nothing of a 1-element unit

        # gather: each rank has only its own shard in place; afterwards every rank holds the whole vector.
        whole = torch.arange(1.0, 9.0)
        flat = torch.full((8,), -1.0)
        flat[span.lo : span.lo + span.size] = whole[span.lo : span.lo + span.size]
        shards.gather(flat, numel)
        assert torch.equal(flat, whole)

        # reduce_scatter: each rank's shard becomes the mean over ranks of that shard.
        grads = torch.arange(8.0) * (rank + 1)  # rank 0: x, rank 1: 2x -> mean 1.5x
        shards.reduce_scatter(grads, numel)
        assert torch.equal(
            grads[span.lo : span.lo + span.size], (torch.arange(8.0) * 1.5)[span.lo : span.lo + span.size]
        )

        flags = torch.tensor([True, rank == 0])
        shards.all_true(flags)
        assert flags.tolist() == [True, False]
        total = torch.tensor([float(rank + 1)])
        shards.host_sum(total)
        assert total.item() == 3.0
        assert shards.host_objects(rank) == [0, 1]
        shards.close()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_split_gather_and_reduce_scatter():
    mp.spawn(_two_ranks, args=(_free_port(),), nprocs=2, join=True)
