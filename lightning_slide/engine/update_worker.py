"""The host thread: unit updates run on one background thread, in submission order or in the next forward's; the
compute side waits only for the unit it is about to load, so an update of layer ``i`` overlaps whatever runs before
layer ``i`` is needed."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from torch.profiler import record_function

_POLL_SECONDS = 2e-4  # how often an idle update thread looks whether a queued task's gradients have arrived


class UpdateWorker:
    """Runs host tasks on one background thread, in submission order unless told otherwise by ``prefer``.

    ``wait(key)`` blocks until the task submitted under ``key`` is done and re-raises its exception, if any.
    """

    def __init__(self) -> None:
        # (rank, key, task, future, ready event), in rank order: submission order unless `prefer` re-ranks
        self._queue: list[tuple] = []
        self._ranks = itertools.count()
        self._ready = threading.Condition()
        self._closed = False
        self._pending: dict[Hashable, Future] = {}
        self.busy_seconds = 0.0  # time the thread spent running tasks
        self.failed = False  # a task raised
        self.blocked_seconds = 0.0  # time callers of wait() spent blocked
        self.waiting_seconds = 0.0  # time tasks spent in await_device
        self._thread = threading.Thread(target=self._run, name="slide-update", daemon=True)
        self._thread.start()

    def submit(self, key: Hashable, fn: Callable[[], None], ready=None) -> None:
        """Queue ``fn`` under ``key``. ``ready``: an event (CUDA) the task's inputs wait for; while it has not
        happened, tasks queued after it whose own inputs are there may run first (only tasks given an event are
        passed over, so tasks without one keep their order)."""
        if key in self._pending:
            self.wait(key)
        future: Future = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the update worker is closed")
            self._queue.append((next(self._ranks), key, fn, future, ready))
            self._ready.notify()
        self._pending[key] = future

    def prefer(self, keys: list[Hashable]) -> None:
        """Run the queued tasks named in ``keys`` in that order, after the other tasks queued now.

        Updates are queued in backward order (last layer first) but the next forward needs them first layer first:
        reordering what is still queued when a backward ends lets that forward start as soon as its first layer is
        updated, while the host goes on with the rest. Tasks queued before stay ahead (a gradient addition must
        precede its unit's update)."""
        with self._ready:
            wanted = set(keys)
            waiting = {entry[1]: entry for entry in self._queue if entry[1] in wanted}
            if not waiting:
                return
            others = [entry for entry in self._queue if entry[1] not in waiting]
            ranked = [(next(self._ranks), *waiting[key][1:]) for key in keys if key in waiting]
            self._queue = others + ranked

    def _next(self):
        """The first queued task whose inputs are there, taken off the queue; ``None`` if every one waits."""
        for position, entry in enumerate(self._queue):
            ready = entry[4]
            if ready is None or ready.query():
                return self._queue.pop(position)
        return None

    def _run(self) -> None:
        while True:
            with self._ready:
                while True:
                    while not self._queue and not self._closed:
                        self._ready.wait()
                    if not self._queue:
                        return
                    entry = self._next()
                    if entry is not None:
                        break
                    self._ready.wait(_POLL_SECONDS)  # every queued task's gradients are on their way: look again
            _, key, fn, future, _ = entry
            if not future.set_running_or_notify_cancel():
                continue
            start = time.perf_counter()
            try:
                with record_function(f"slide.update {key}"):  # a named range for torch.profiler
                    fn()
            except BaseException as error:  # noqa: BLE001 - handed to whoever waits for this task
                self.failed = True
                future.set_exception(error)
            else:
                future.set_result(None)
            finally:
                self.busy_seconds += time.perf_counter() - start

    def await_device(self, event) -> None:
        """Inside a task: block until the device has reached ``event`` (``None``: at once), counting the wait in
        ``waiting_seconds`` (``busy_seconds`` minus it is the host's own work)."""
        if event is None or event.query():
            return
        start = time.perf_counter()
        event.synchronize()
        self.waiting_seconds += time.perf_counter() - start

    def done(self, key: Hashable) -> bool:
        """Whether nothing submitted under ``key`` is still to run (a failure counts as not done: wait raises it)."""
        future = self._pending.get(key)
        return future is None or (future.done() and future.exception() is None)

    def wait(self, key: Hashable, timeout: float | None = None) -> bool:
        """Block until the task submitted under ``key`` is done (re-raising its exception); ``timeout`` (seconds):
        give up after it. Returns whether the task is done."""
        future = self._pending.get(key)
        if future is None:
            return True
        start = None if future.done() else time.perf_counter()
        try:
            try:
                future.result(timeout)
            except FutureTimeout:
                if not future.done():
                    return False
                future.result()  # it ended meanwhile: its own result or error
        finally:
            if start is not None:
                self.blocked_seconds += time.perf_counter() - start
            if future.done():  # a wait interrupted by Ctrl+C leaves the task pending: draining still waits for it
                del self._pending[key]
        return True

    def wait_all(self) -> None:
        for key in list(self._pending):
            self.wait(key)

    def close(self, *, drain: bool = True) -> None:
        """Stop the thread. Safe to call twice.

        Args:
            drain: finish every pending task and re-raise the first failure (the normal end of training);
                ``False`` drops tasks not yet started and ignores failures (after an exception elsewhere).
        """
        try:
            if drain:
                self.wait_all()
        finally:
            with self._ready:
                self._closed = True
                for entry in self._queue:
                    entry[3].cancel()
                self._queue.clear()
                self._ready.notify()
            self._thread.join()
            self._pending.clear()
