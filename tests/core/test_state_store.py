"""StateStore, the disk tier: arrays written behind updates and read ahead of them, in bounded memory."""

from __future__ import annotations

import threading
from concurrent.futures import TimeoutError as FutureTimeout

import pytest
import torch

from lightning_slide.engine.disk import StateStore

NUMEL = 1000  # elements per array: two arrays per unit, 8000 bytes


@pytest.fixture
def store(tmp_path):
    stores = []

    def make(in_flight: int, units: int = 4) -> StateStore:
        s = StateStore(tmp_path / "tier", in_flight=in_flight)
        for key in range(units):
            s.add(key, "exp_avg", NUMEL)
            s.add(key, "exp_avg_sq", NUMEL)
        stores.append(s)
        return s

    yield make
    for s in stores:
        s.close()


def values(key: int, version: int) -> dict[str, torch.Tensor]:
    return {
        "exp_avg": torch.full((NUMEL,), 10.0 * key + version),
        "exp_avg_sq": torch.arange(NUMEL, dtype=torch.float32) + key + version,
    }


def assert_equal(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert state.keys() == expected.keys()
    for name in state:
        assert torch.equal(state[name], expected[name]), name


class GatedState(dict):
    """A unit's arrays whose write-back waits for ``gate``: the writer thread iterates them, so this holds a write
    pending for as long as a test needs, deterministically (no sleep, no large file)."""

    def __init__(self, state, gate: threading.Event) -> None:
        super().__init__(state)
        self.gate = gate

    def items(self):
        assert self.gate.wait(10), "the test never opened the gate"
        return super().items()


def test_arrays_never_written_read_as_zeros_then_as_written(store):
    s = store(in_flight=2)
    state = s.read(0).result(timeout=10)
    assert_equal(state, {"exp_avg": torch.zeros(NUMEL), "exp_avg_sq": torch.zeros(NUMEL)})  # fresh moments
    for name, tensor in values(0, 1).items():
        state[name].copy_(tensor)  # the update changes them in place
    s.write(0, state)
    s.flush()
    assert_equal(s.read(0).result(timeout=10), values(0, 1))
    assert_equal(s.load(0), values(0, 1))  # inspection reads the same files
    assert s.path(0, "exp_avg").stat().st_size == 4 * NUMEL


def test_put_then_load_outside_the_update_pairing(store):
    s = store(in_flight=1)
    s.put(3, values(3, 7))
    assert_equal(s.load(3), values(3, 7))
    assert_equal(s.load(3, ["exp_avg"]), {"exp_avg": values(3, 7)["exp_avg"]})


def test_at_most_in_flight_units_are_read_ahead_and_a_write_frees_a_place(store):
    s = store(in_flight=2)
    reads = [s.read(key) for key in range(4)]
    first = [reads[0].result(timeout=10), reads[1].result(timeout=10)]
    with pytest.raises(FutureTimeout):  # both places are held until a unit is written back
        reads[2].result(timeout=0.3)
    assert not reads[3].done()
    unit_bytes = 2 * 4 * NUMEL
    assert s.allocated_bytes == s.peak_bytes == 2 * unit_bytes
    s.write(0, first[0])
    third = reads[2].result(timeout=10)
    assert not reads[3].done()
    s.write(1, first[1])
    s.write(2, third)
    s.write(3, reads[3].result(timeout=10))
    s.flush()
    assert s.peak_bytes == 2 * unit_bytes  # the buffers were reused, never more than two units' worth


def test_release_frees_a_place_without_writing(store):
    s = store(in_flight=1)
    state = s.read(0).result(timeout=10)
    state["exp_avg"].fill_(5.0)
    waiting = s.read(1)
    s.release(0, state)  # the update did not run: nothing is written
    waiting.result(timeout=10)
    assert_equal(s.load(0), {"exp_avg": torch.zeros(NUMEL), "exp_avg_sq": torch.zeros(NUMEL)})


def test_prefer_reorders_the_reads_not_started_yet(store):
    # One place: each read completes only once the unit before it is written back, so completion order is visible.
    s = store(in_flight=1)
    reads = {key: s.read(key) for key in range(4)}
    s.prefer([3, 2])  # as after a backward: the next forward's order; unit 1 was queued before and stays first
    order = []
    for _ in range(4):
        ready = [key for key, future in reads.items() if future.done()]
        if not ready:
            ready = [next(key for key, future in reads.items() if _wait(future))]
        assert len(ready) == 1, f"more than one unit in memory at once: {ready}"
        key = ready[0]
        order.append(key)
        s.write(key, reads.pop(key).result())
    assert order == [0, 1, 3, 2]


def _wait(future) -> bool:
    try:
        future.result(timeout=0.05)
        return True
    except FutureTimeout:
        return False


def test_a_read_waits_for_the_pending_write_back_of_the_same_unit(store):
    s = store(in_flight=2)  # a free place: only the pending write can hold the read back
    state = s.read(0).result(timeout=10)
    for name, tensor in values(0, 1).items():
        state[name].copy_(tensor)
    s.write(0, state)
    s.flush()  # version 1 on disk
    state = s.read(0).result(timeout=10)
    for name, tensor in values(0, 2).items():
        state[name].copy_(tensor)
    gate = threading.Event()
    s.write(0, GatedState(state, gate))  # version 2's write-back is pending
    reread = s.read(0)
    with pytest.raises(FutureTimeout):
        reread.result(timeout=0.3)  # it must not read version 1 from the file meanwhile
    gate.set()
    assert_equal(reread.result(timeout=10), values(0, 2))


def test_load_waits_for_the_pending_write_back_too(store):
    s = store(in_flight=1)
    state = s.read(1).result(timeout=10)
    for name, tensor in values(1, 4).items():
        state[name].copy_(tensor)
    gate = threading.Event()
    s.write(1, GatedState(state, gate))
    threading.Timer(0.2, gate.set).start()
    assert_equal(s.load(1), values(1, 4))


def test_the_directory_is_locked_until_close(tmp_path):
    first = StateStore(tmp_path, in_flight=1)
    assert first.lock.held
    with pytest.raises(RuntimeError, match="in use by another run"):
        StateStore(tmp_path, in_flight=1)
    first.close()
    assert not first.lock.held
    second = StateStore(tmp_path, in_flight=1)  # free again
    second.close()


def test_after_close_pending_writes_are_on_disk_and_reads_load_at_once(store):
    s = store(in_flight=1)
    state = s.read(2).result(timeout=10)
    state["exp_avg"].fill_(3.0)
    s.write(2, state)
    s.close()  # the write finishes first
    after = s.read(2)
    assert after.done() and torch.equal(after.result()["exp_avg"], torch.full((NUMEL,), 3.0))


def test_a_unit_of_another_size_reuses_the_room_of_pooled_buffers(store):
    """Buffers of the layers' size stay pooled between reads; a unit of another size (the resident parts' moments)
    takes their room instead of adding to it, so pooled and used buffers stay within ``in_flight`` units."""
    s = store(in_flight=2, units=2)
    s.add("resident", "exp_avg", NUMEL // 2)
    s.add("resident", "exp_avg_sq", NUMEL // 2)
    layers = [s.read(key).result(timeout=10) for key in (0, 1)]  # two layers' buffers at once
    for key, state in enumerate(layers):
        s.write(key, state)
    s.flush()  # both are pooled now
    s.write("resident", s.read("resident").result(timeout=10))
    s.flush()
    assert s.peak_bytes == 2 * 2 * 4 * NUMEL  # two layers' worth: no more
