"""Window: the compute-device slots the decoder layers slide through, driven through its public methods."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_slide.engine.host import HostUnit
from lightning_slide.engine.streams import Streams
from lightning_slide.engine.window import Window
from tests.core.tiny import ACCELERATOR

DEVICE = torch.device("cuda" if ACCELERATOR == "gpu" else "cpu")


def layer_units(count: int = 4, frozen_bias: bool = False) -> list[HostUnit]:
    """``count`` small layers of growing size, each its own host unit (fp32 masters)."""
    torch.manual_seed(0)
    units = []
    for i in range(count):
        module = nn.Linear(3 + i, 2)
        if frozen_bias:
            module.bias.requires_grad_(False)
        units.append(HostUnit(f"layer {i}", list(module.named_parameters())))
    return units


class Recorder:
    """The engine's side of the window: which layers were read (``before_load``) and evicted, and which may be
    prefetched now."""

    def __init__(self, ready=lambda index: True) -> None:
        self.loaded: list[int] = []
        self.evicted: list[int] = []
        self.ready = ready

    def window(self, units, depth, dtype=torch.float32) -> Window:
        return Window(
            units, depth, DEVICE, dtype, Streams(DEVICE), None, before_load=self.loaded.append, may_load=self.ready
        )


def in_slot(param: torch.Tensor, window: Window, index: int) -> bool:
    slot = window.slot_of[index]
    return param.untyped_storage().data_ptr() == slot.weights.untyped_storage().data_ptr()


def at_home(unit: HostUnit) -> bool:
    return all(e.param.data_ptr() == unit.home(e).data_ptr() and e.param.grad is None for e in unit.entries)


@pytest.mark.parametrize("depth", [0, 5])
def test_a_depth_outside_one_to_the_layer_count_is_refused(depth):
    with pytest.raises(ValueError, match="between 1 and 4"):
        Recorder().window(layer_units(), depth)


def test_depth_slots_each_sized_for_the_largest_layer():
    units = layer_units(frozen_bias=True)  # gradients cover the trainable part only
    window = Recorder().window(units, 3)
    assert len(window.slots) == len(window.weights) == 3
    for slot in window.slots:
        assert slot.weights.numel() == max(u.numel for u in units) and slot.weights.device.type == DEVICE.type
        assert slot.grads.numel() == max(u.trainable_numel for u in units)


def test_ensure_loads_the_first_wanted_and_prefetches_up_to_depth_in_order():
    units, engine = layer_units(), Recorder()
    window = engine.window(units, 2)
    window.ensure(range(0, 4), evict=engine.evicted.append)
    assert engine.loaded == [0, 1] and sorted(window.slot_of) == [0, 1]  # never more than depth
    for index in (0, 1):
        for e in units[index].entries:
            assert in_slot(e.param, window, index)
            assert torch.equal(e.param.detach().cpu(), e.view(units[index].master))  # the masters' values


def test_prefetch_stops_at_the_first_layer_whose_update_is_not_done():
    # Layer 1 is not ready: prefetch stays in order and does not skip ahead to layer 2.
    units, engine = layer_units(), Recorder(ready=lambda index: index != 1)
    window = engine.window(units, 3)
    window.ensure([0, 1, 2], evict=engine.evicted.append)
    assert sorted(window.slot_of) == [0]


def test_the_first_wanted_layer_loads_even_when_it_is_not_ready():
    # ensure blocks on the first layer's update (before_load), it never skips it.
    units, engine = layer_units(), Recorder(ready=lambda index: False)
    window = engine.window(units, 2)
    window.ensure([2, 3], evict=engine.evicted.append)
    assert engine.loaded == [2] and sorted(window.slot_of) == [2]


def test_indices_outside_the_layers_are_ignored():
    # The forward asks for range(i, i + depth) and the backward for range(i, i - depth, -1): both run off the ends.
    units, engine = layer_units(), Recorder()
    window = engine.window(units, 3)
    window.ensure(range(3, 6), evict=engine.evicted.append)
    assert sorted(window.slot_of) == [3]
    window.ensure(range(1, -2, -1), evict=engine.evicted.append)
    assert engine.loaded == [3, 1, 0] and sorted(window.slot_of) == [0, 1, 3]


def test_a_slot_is_reused_after_evicting_a_layer_not_wanted_and_the_callback_sees_it_still_loaded():
    units, engine = layer_units(), Recorder()
    window = engine.window(units, 2)
    window.ensure([0, 1], evict=engine.evicted.append)
    slot_of_0 = window.slot_of[0]
    seen = []

    def evict(index):  # before the slot is reused: the engine collects the layer's gradients here
        seen.append((index, index in window.slot_of, in_slot(units[index].entries[0].param, window, index)))

    window.ensure([1, 2], evict=evict)
    assert seen == [(0, True, True)]
    assert engine.loaded == [0, 1, 2]  # layer 1 stayed loaded: not read again
    assert window.slot_of[2] is slot_of_0 and slot_of_0.occupant == 2
    assert at_home(units[0])


def test_slots_hold_the_masters_cast_to_the_compute_dtype():
    units, engine = layer_units(), Recorder()
    window = engine.window(units, 1, dtype=torch.bfloat16)
    window.ensure([2], evict=engine.evicted.append)
    for e in units[2].entries:
        assert e.param.dtype == torch.bfloat16
        assert torch.equal(e.param.detach().cpu(), e.view(units[2].master).to(torch.bfloat16))


def test_attach_grads_gives_trainable_parameters_zeroed_views_of_the_slot():
    units, engine = layer_units(frozen_bias=True), Recorder()
    window = engine.window(units, 1)
    window.ensure([1], evict=engine.evicted.append)
    window.slots[0].grads.fill_(7.0)  # what an earlier occupant left behind
    window.attach_grads(1)
    weight, bias = (e.param for e in units[1].entries)
    assert bias.grad is None  # frozen: no gradient
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    grads = window.grads_of(1)
    assert grads.numel() == units[1].trainable_numel
    weight.grad.add_(1.0)  # autograd accumulates into the view: the slot's flat buffer sees it
    assert torch.equal(grads, torch.ones_like(grads))


@pytest.mark.skipif(ACCELERATOR != "cpu", reason="CUDA records real events")
def test_events_are_none_on_the_cpu():
    units, engine = layer_units(), Recorder()
    window = engine.window(units, 2)
    window.ensure([0, 1], evict=engine.evicted.append)
    window.grads_copied(0, window.streams.record())
    window.release(0)
    assert all(s.ready is None and s.free is None and s.grads_free is None for s in window.slots)


def test_release_and_clear_park_parameters_back_on_their_masters():
    units, engine = layer_units(), Recorder()
    window = engine.window(units, 3)
    window.ensure([0, 1, 2], evict=engine.evicted.append)
    window.attach_grads(0)
    window.release(0)
    assert at_home(units[0]) and 0 not in window.slot_of
    assert sum(slot.occupant is None for slot in window.slots) == 1
    window.clear()
    assert window.slot_of == {} and all(slot.occupant is None for slot in window.slots)
    assert all(at_home(u) for u in units)
    assert engine.evicted == []  # releasing is not evicting: the engine's callback is for slot reuse only
