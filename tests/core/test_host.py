"""HostUnit (a unit's fp32 masters on the host) and GradientPool, through their public methods."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from lightning_slide.engine.host import GradientPool, HostUnit
from lightning_slide.engine.loans import GradientLoans
from lightning_slide.engine.update_worker import UpdateWorker


def block(frozen: tuple[str, ...] = ()) -> nn.Module:
    """A small block whose parameters are declared frozen-in-the-middle, to see the unit reorder them."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    for name, param in module.named_parameters():
        param.requires_grad_(name not in frozen)
    return module


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def shares(param: torch.Tensor, flat: torch.Tensor) -> bool:
    return param.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


def test_one_flat_master_holds_every_parameter_and_the_parameters_are_views_of_it():
    module = block()
    before = snapshot(module)
    params = list(module.parameters())
    unit = HostUnit("layer 0", list(module.named_parameters()))
    assert unit.master.dtype == torch.float32 and unit.master.numel() == unit.numel == sum(p.numel() for p in params)
    assert [p is e.param for p, e in zip(params, unit.entries)] == [True] * len(params)  # the same Python objects
    for e in unit.entries:
        assert shares(e.param, unit.master) and e.param.data_ptr() == unit.master[e.offset :].data_ptr()
        assert torch.equal(e.param.detach(), before[e.name])
    unit.master.add_(1.0)  # one copy: the module reads the masters
    assert torch.equal(module[0].weight.detach(), before["0.weight"] + 1)


def test_trainable_parameters_come_first_then_the_frozen_ones():
    unit = HostUnit("layer 0", list(block(frozen=("0.weight", "1.bias")).named_parameters()))
    assert [e.name for e in unit.entries] == ["0.bias", "1.weight", "2.weight", "2.bias", "0.weight", "1.bias"]
    assert [e.name for e in unit.trainable] == ["0.bias", "1.weight", "2.weight", "2.bias"]
    assert unit.trainable_numel == 3 + 3 + 6 + 2
    offsets = [e.offset for e in unit.entries]
    assert offsets == sorted(offsets) and offsets[0] == 0  # contiguous, in that order
    assert unit.grad.numel() == unit.grad_numel == unit.trainable_numel  # gradients: the trainable part only


def test_a_lent_gradient_accumulator_is_not_allocated_up_front():
    unit = HostUnit("layer 0", list(block().named_parameters()), own_grad=False)
    assert unit.grad is None and unit.grad_empty
    owned = HostUnit("resident", list(block().named_parameters()))
    assert torch.equal(owned.grad, torch.zeros(owned.trainable_numel)) and owned.grad_empty


def test_park_points_every_parameter_back_at_its_master_and_drops_its_gradient():
    module = block()
    unit = HostUnit("layer 0", list(module.named_parameters()))
    for e in unit.entries:  # as the window does: parameters pointed elsewhere, with gradients
        e.param.data = torch.zeros(e.shape)
        e.param.grad = torch.ones(e.shape)
    unit.park()
    for e in unit.entries:
        assert e.param.data_ptr() == unit.home(e).data_ptr() and e.param.grad is None


def test_a_compute_copy_follows_the_masters_when_refreshed():
    unit = HostUnit("layer 0", list(block().named_parameters()), weights_dtype=torch.bfloat16)
    assert unit.upload_source is unit.weights and unit.upload_pieces() == [(0, unit.weights)]
    assert torch.equal(unit.weights, unit.master.to(torch.bfloat16))
    unit.master.mul_(3.0)
    assert not torch.equal(unit.weights, unit.master.to(torch.bfloat16))  # stale until refreshed
    unit.refresh_weights()
    assert torch.equal(unit.weights, unit.master.to(torch.bfloat16))
    other = torch.randn(unit.numel)  # masters read from disk are handed in
    unit.refresh_weights(other)
    assert torch.equal(unit.weights, other.to(torch.bfloat16))


def test_without_a_compute_copy_uploads_read_the_masters_and_refresh_does_nothing():
    unit = HostUnit("layer 0", list(block().named_parameters()))
    assert unit.weights is None and unit.upload_source is unit.master
    unit.refresh_weights(torch.randn(unit.numel))
    assert unit.upload_pieces() == [(0, unit.master)]


def test_frozen_parameters_kept_in_the_compute_dtype_have_no_fp32_master():
    module = block(frozen=("0.weight",))
    before = snapshot(module)
    unit = HostUnit("layer 0", list(module.named_parameters()), frozen_dtype=torch.bfloat16)
    frozen = unit.entries[-1]
    assert frozen.name == "0.weight"
    assert unit.master.numel() == unit.trainable_numel  # masters for what is trained only
    assert unit.frozen.dtype == torch.bfloat16 and unit.frozen.numel() == unit.numel - unit.trainable_numel
    assert shares(frozen.param, unit.frozen) and frozen.param.dtype == torch.bfloat16
    assert torch.equal(frozen.param.detach(), before["0.weight"].to(torch.bfloat16))  # rounded as bf16-true does
    assert unit.upload_pieces() == [(0, unit.master), (unit.trainable_numel, unit.frozen)]
    for e in unit.trainable:
        assert shares(e.param, unit.master) and torch.equal(e.param.detach(), before[e.name])


def test_with_a_compute_copy_frozen_parameters_live_in_it_and_refresh_leaves_them_alone():
    module = block(frozen=("0.weight",))
    unit = HostUnit(
        "layer 0", list(module.named_parameters()), weights_dtype=torch.bfloat16, frozen_dtype=torch.bfloat16
    )
    assert unit.upload_pieces() == [(0, unit.weights)]
    assert unit.frozen.data_ptr() == unit.weights[unit.trainable_numel :].data_ptr()
    frozen_before = unit.frozen.clone()
    unit.refresh_weights(torch.zeros(unit.numel))  # a master-sized source: only the trainable part is read
    assert torch.equal(unit.frozen, frozen_before)
    assert torch.equal(unit.weights[: unit.trainable_numel], torch.zeros(unit.trainable_numel, dtype=torch.bfloat16))


def test_frozen_parameters_apart_need_the_whole_unit_in_one_process():
    with pytest.raises(ValueError, match="one process"):
        HostUnit(
            "layer 0", list(block(frozen=("0.weight",)).named_parameters()), span=(0, 5), frozen_dtype=torch.bfloat16
        )


def test_a_span_limits_gradients_and_refreshes_to_the_owned_part():
    module = block(frozen=("2.bias",))  # 27 trainable elements of 29
    unit = HostUnit("layer 0", list(module.named_parameters()), span=(13, 29), weights_dtype=torch.bfloat16)
    assert (unit.numel, unit.trainable_numel, unit.start, unit.stop) == (29, 27, 13, 29)
    assert (unit.grad_start, unit.grad_stop, unit.grad_numel) == (13, 27, 14)  # owned trainable elements
    assert unit.grad.numel() == 14
    assert torch.equal(unit.weights[13:], unit.master[13:].to(torch.bfloat16))
    unit.weights[:13] = 5.0  # another rank's part: not this rank's to write
    unit.refresh_weights(torch.zeros(unit.numel))
    assert torch.equal(unit.weights[13:], torch.zeros(16, dtype=torch.bfloat16))
    assert torch.equal(unit.weights[:13], torch.full((13,), 5.0, dtype=torch.bfloat16))


def test_a_shared_master_buffer_receives_only_the_owned_span():
    module = block()
    numel = sum(p.numel() for p in module.parameters())
    expected = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    shared = torch.full((numel,), -1.0)
    unit = HostUnit("layer 0", list(module.named_parameters()), span=(0, 10), master=shared)
    assert unit.master is shared
    assert torch.equal(shared[:10], expected[:10])
    assert torch.equal(shared[10:], torch.full((numel - 10,), -1.0))  # the other ranks write theirs
    with pytest.raises(ValueError, match="shared master buffer"):
        HostUnit("layer 1", list(block().named_parameters()), master=torch.empty(numel + 1))


def test_masters_in_a_file_are_mapped_views_and_need_a_compute_copy(tmp_path):
    module = block()
    before = snapshot(module)
    with pytest.raises(ValueError, match="compute copy"):
        HostUnit("layer 0", list(block().named_parameters()), master_path=tmp_path / "no.bin")
    path = tmp_path / "layer00000.master.bin"
    unit = HostUnit("layer 0", list(module.named_parameters()), weights_dtype=torch.bfloat16, master_path=path)
    assert unit.master is None and unit.master_bytes_in_memory == 0
    assert path.stat().st_size == 4 * unit.numel
    for e in unit.entries:
        assert shares(e.param, unit.rest) and torch.equal(e.param.detach(), before[e.name])
    on_disk = torch.from_file(str(path), size=unit.numel, dtype=torch.float32)
    assert torch.equal(on_disk, unit.rest)
    assert unit.upload_source is unit.weights


def test_gradient_pool_reuses_given_back_buffers():
    pool = GradientPool(7, pin=False)
    first, second = pool.take(), pool.take()
    assert first.numel() == 7 and first.dtype == torch.float32 and pool.allocated == 2
    pool.give(first)
    again = pool.take()
    assert again.data_ptr() == first.data_ptr() and pool.allocated == 2  # no new buffer: the high-water mark holds
    pool.give(again)
    pool.give(second)
    assert pool.allocated == 2


def test_gradient_pool_counts_buffers_taken_from_several_threads():
    # Buffers are taken on the training thread and given back by the update thread.
    pool = GradientPool(3, pin=False)
    taken: list[torch.Tensor] = []

    def take_and_give():
        for _ in range(50):
            buffer = pool.take()
            taken.append(buffer)
            pool.give(buffer)

    threads = [threading.Thread(target=take_and_give) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= pool.allocated <= 4  # at most one buffer per thread in use at once
    assert len({t.data_ptr() for t in taken}) == pool.allocated


def test_loans_lend_views_of_whole_pool_buffers_and_take_them_back_whole():
    """A layer borrows the front of a pool buffer (in bf16 for AdamW's host loop: half of it); giving it back
    returns the whole buffer, so a larger layer borrowing it next gets all it needs."""
    small, large = (HostUnit(name, list(nn.Linear(n, n).named_parameters())) for name, n in (("small", 2), ("big", 4)))
    worker = UpdateWorker()
    try:
        loans = GradientLoans([small, large], large.grad_numel, bound=4, worker=worker, pin=False)
        small.grad = loans.lend(0, bounded=False)
        assert small.grad.numel() == small.grad_numel and small.grad.dtype == torch.float32
        loans.give_back(small)
        large.grad = loans.lend(1, bounded=False, dtype=torch.bfloat16)
        assert large.grad.numel() == large.grad_numel and large.grad.dtype == torch.bfloat16
        loans.give_back(large)
        again = loans.lend(1, bounded=False)
        assert again.numel() == large.grad_numel and again.dtype == torch.float32 and loans.pool.allocated == 1
    finally:
        worker.close()
