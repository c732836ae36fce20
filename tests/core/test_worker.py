"""The host update worker: order of tasks, failures, and its thread's lifetime."""

import threading

import pytest

from lightning_slide.engine.update_worker import UpdateWorker


def test_prefer_runs_queued_updates_in_the_given_order_after_earlier_tasks():
    worker = UpdateWorker()
    gate, ran = threading.Event(), []
    worker.submit("gate", gate.wait)  # holds the thread while the queue is built
    worker.submit(("add", 3), lambda: ran.append("add 3"))
    for layer in (3, 2, 1, 0):  # queued in backward order
        worker.submit(layer, lambda layer=layer: ran.append(layer))
    worker.prefer(["resident", 0, 1, 2, 3])
    worker.submit("later", lambda: ran.append("later"))
    gate.set()
    worker.wait_all()
    assert ran == ["add 3", 0, 1, 2, 3, "later"]
    worker.close()


class _Landing:
    """Stands for a CUDA event: ``query()`` is whether the gradients it marks have landed."""

    def __init__(self):
        self.landed = False

    def query(self):
        return self.landed


def test_a_task_whose_gradients_are_still_on_their_way_is_passed_over_until_they_land():
    worker = UpdateWorker()
    gate, ran = threading.Event(), []
    worker.submit("gate", gate.wait)
    late, landed = _Landing(), _Landing()
    landed.landed = True
    worker.submit(0, lambda: ran.append(0), late)  # first in order, its gradients not there yet
    worker.submit(1, lambda: ran.append(1), landed)
    worker.submit(2, lambda: ran.append(2))  # no event: its inputs are there
    gate.set()
    worker.wait(1)
    worker.wait(2)
    assert ran == [1, 2] and not worker.done(0)
    late.landed = True
    worker.wait(0)
    assert ran == [1, 2, 0]
    worker.close()


def test_wait_with_a_timeout_says_whether_the_task_is_done():
    worker = UpdateWorker()
    gate = threading.Event()
    worker.submit("slow", gate.wait)
    assert worker.wait("slow", timeout=0.01) is False and not worker.done("slow")
    gate.set()
    assert worker.wait("slow", timeout=5) is True and worker.done("slow")

    def fail():
        raise ValueError("boom")

    worker.submit("bad", fail)
    with pytest.raises(ValueError, match="boom"):
        worker.wait("bad", timeout=5)
    worker.close(drain=False)


def test_failure_reaches_the_waiter_and_close_stops_the_thread():
    worker = UpdateWorker()

    def fail():
        raise ValueError("boom")

    worker.submit("bad", fail)
    with pytest.raises(ValueError, match="boom"):
        worker.wait("bad")
    gate = threading.Event()
    worker.submit("slow", gate.wait)
    ran = []
    worker.submit("dropped", lambda: ran.append("dropped"))
    threading.Timer(0.2, gate.set).start()  # the running task ends while close waits for it
    worker.close(drain=False)
    assert ran == []
    assert not any(t.name == "slide-update" for t in threading.enumerate())
    worker.close()  # twice is fine
