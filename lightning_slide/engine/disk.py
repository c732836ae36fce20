"""The disk tier: per-unit flat arrays in files, read ahead of each unit's update and written behind it.

What lives on disk is chosen with ``offload`` (see :func:`parse_offload`): the optimizer state (a unit's Adam
moments: two flat arrays laid out like its trainable parameters, in the optimizer's state dtype: fp32, or bf16 with
``lightning_slide.optim.AdamW``), the fp32 masters of the decoder layers (one flat array laid out like the unit), or
both. Each array is one file per unit (``layer00003.exp_avg.bin``, ``layer00003.master.bin``), its raw elements in
the machine's byte order, rewritten in place (never truncated: the master files are also memory-mapped, see
``HostUnit.keep_master_in``).

A reader thread loads every array of a unit whose update is queued, at most ``in_flight`` units ahead, so reading
overlaps the updates before it; a writer thread writes them back after the update and only then frees the place,
so host memory holds at most ``in_flight`` units' arrays whatever the model size. Reads run in the order the
updates will (``prefer`` reorders them with the update worker's queue). No deadlock: a read waiting for a place
waits for an update that does not wait for it, as long as every update queued after it in the worker that holds a
place is also queued after it here (same order), or every outstanding read fits in ``in_flight`` (the engine sizes
it so for updates streamed out of a backward, the one case whose updates are reordered). The buffers are reused (a pool
per array size and dtype shared by two or more units), so a step does not page-fault fresh memory for every layer.

One run at a time: a store locks its directory from creation to ``close`` (see ``disk_lock``).

Set ``LIGHTNING_SLIDE_DISK_NOCACHE=1`` to make every write reach the device (``fdatasync``) and drop the files from
the page cache after each read and write (``posix_fadvise(DONTNEED)``): what a machine whose RAM cannot cache the
files sees. The benchmarks use it to measure the disk, not the page cache.
"""

from __future__ import annotations

import heapq
import itertools
import os
import shutil
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import torch

from lightning_slide.engine.disk_lock import keep_lock, take_lock
from lightning_slide.engine.sizes import human

#: What may live on disk: the optimizer state, the decoder layers' fp32 masters.
OFFLOAD_KINDS = ("optimizer", "masters")
MASTER = "master"  # name of the master array of a unit in the store
NOCACHE_ENV = "LIGHTNING_SLIDE_DISK_NOCACHE"


def parse_offload(offload, offload_dir) -> frozenset[str]:
    """The set of things on disk for ``offload`` (``None``, ``"optimizer"``, ``"masters"``, ``"both"`` or a list of
    ``"optimizer"``/``"masters"``; an empty list: nothing) with ``offload_dir``; ``None`` means ``"optimizer"`` when
    there is an ``offload_dir``, nothing otherwise. Raises ``ValueError`` with what to change."""
    if offload is None:
        return frozenset(("optimizer",)) if offload_dir is not None else frozenset()
    many = isinstance(offload, Iterable) and not isinstance(offload, (str, Mapping))
    names = list(offload) if many else [offload]  # anything else is one name, refused below unless it is one
    if names == ["both"]:
        names = list(OFFLOAD_KINDS)
    if any(n not in OFFLOAD_KINDS for n in names):
        raise ValueError(
            f"offload must be 'optimizer', 'masters', 'both' or a list of {list(OFFLOAD_KINDS)}, got {offload!r}"
        )
    if names and offload_dir is None:
        raise ValueError(f"offload={offload!r} puts state on disk: set offload_dir to a directory for its files")
    if not names and offload_dir is not None:
        raise ValueError(
            f"offload={offload!r} puts nothing under offload_dir: name what goes there or drop offload_dir"
        )
    return frozenset(names)


def check_disk_space(directory: str | Path, needed: int, free: int | None = None, what: str = "") -> None:
    """Raise a clear error when ``directory``'s file system has fewer than ``needed`` bytes free.
    ``what``: what the bytes are for, said in the error (e.g. ``"fp32 masters 12.00 GiB + optimizer state ..."``)."""
    free = shutil.disk_usage(directory).free if free is None else free
    if needed > free:
        raise ValueError(
            f"the disk tier needs {human(needed)} under {str(directory)!r}{f' ({what})' if what else ''} but only "
            f"{human(free)} is free; free some space, choose another offload_dir, or keep less on disk "
            "(offload='optimizer' or 'masters' instead of both, or offload_dir=None)"
        )


def existing_bytes(paths: Iterable[Path]) -> int:
    """Bytes already held by those of ``paths`` that exist (files a run rewrites in place need no new space)."""
    return sum(p.stat().st_size for p in paths if p.is_file())


def unit_file(key: Hashable, name: str) -> str:
    """The name of unit ``key``'s array ``name``'s file (``layer00003.master.bin``, ``resident.exp_avg.bin``)."""
    return f"{'resident' if key == 'resident' else f'layer{key:05d}'}.{name}.bin"


def reusable_bytes(directory: str | Path, layers: int, on_disk: Iterable[str]) -> int:
    """Bytes the files of a run with ``layers`` decoder layers and ``on_disk`` (``OFFLOAD_KINDS``) already hold in
    ``directory`` (this run's, written so far, or an earlier run's): the run rewrites them in place, so they count as
    room for it."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0

    def rewritten(path: Path) -> bool:
        return ("masters" if path.name.endswith(f".{MASTER}.bin") else "optimizer") in on_disk

    paths = (p for key in ["resident", *range(layers)] for p in directory.glob(unit_file(key, "*")))
    return existing_bytes(p for p in paths if rewritten(p))


def nocache_default() -> bool:
    return os.environ.get(NOCACHE_ENV, "") not in ("", "0")


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of the contiguous CPU ``tensor``, any dtype (bf16 has no NumPy type: viewed as bytes first)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")


def write_array(path: Path, tensor: torch.Tensor, nocache: bool | None = None) -> None:
    """Write the flat CPU ``tensor`` (its raw elements, any dtype) as the whole of ``path``, in place (the file is
    created, or truncated only when its size differs: a memory map of it stays valid). ``nocache``: sync and drop it
    from the page cache (default: ``LIGHTNING_SLIDE_DISK_NOCACHE``)."""
    nocache = nocache_default() if nocache is None else nocache
    data = _bytes(tensor.detach().contiguous())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], written)
        if os.fstat(fd).st_size != len(data):
            os.ftruncate(fd, len(data))
        if nocache:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_array(path: Path, out: torch.Tensor, nocache: bool | None = None) -> torch.Tensor:
    """Fill the flat contiguous CPU tensor ``out`` (any dtype) from ``path`` (which must hold exactly its bytes);
    returns ``out``."""
    nocache = nocache_default() if nocache is None else nocache
    data = _bytes(out)
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size != len(data):
            raise ValueError(f"{path} has {os.fstat(fd).st_size} bytes, expected {len(data)}")
        done = 0
        while done < len(data):
            count = os.preadv(fd, [data[done:]], done)
            if count <= 0:
                raise OSError(f"short read of {path}")
            done += count
        if nocache:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return out


class Array(NamedTuple):
    """The shape of one array in a ``StateStore``: flat, ``numel`` elements of ``dtype``."""

    numel: int
    dtype: torch.dtype = torch.float32

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class StateStore:
    """Flat arrays of every unit (fp32 masters; moments in the optimizer's state dtype), in files under ``directory``.

    Args:
        directory: where the files live (created if missing); one file per unit and array name.
        in_flight: most units whose arrays may be in host memory at once through ``read`` (>= 1).

    ``add(key, name, numel, dtype)`` declares an array; ``read(key)`` loads every array of ``key`` ahead (holding one of
    the ``in_flight`` places) and ``write(key, state)`` writes them behind and frees the place. An array never
    written reads as zeros (fresh optimizer state). ``allocated_bytes``/``peak_bytes``: host bytes of the buffers
    the store holds for reads (in use or pooled) now / at most.

    The store locks ``directory`` (``DirectoryLock``) until ``close`` — or, when ``mapped_by`` is set (its module's
    parameters map the master files), until that module is collected; the module's next store takes the lock over.
    Creating a store on a directory in use, in this process or another, raises ``RuntimeError`` saying so.
    """

    def __init__(self, directory: str | Path, in_flight: int, owner: object | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # first: nothing below touches the files of another run
        self.lock = take_lock(self.directory, owner)
        self.mapped_by: object | None = None  # the module whose parameters map the master files (open_tier)
        self.layout: dict[Hashable, dict[str, Array]] = {}
        self.nocache = nocache_default()
        self._slots = threading.Semaphore(max(1, in_flight))
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slide-disk-read")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slide-disk-write")
        self._writes: dict[Hashable, Future] = {}
        self._queue: list[tuple[int, Hashable, Future]] = []  # reads not started, a heap by rank
        self._ranks = itertools.count()
        self._on_disk: set[tuple[Hashable, str]] = set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._free: dict[Array, list[torch.Tensor]] = {}  # pooled buffers by size and dtype
        self.allocated_bytes = 0
        self.peak_bytes = 0

    def add(self, key: Hashable, name: str, numel: int, dtype: torch.dtype = torch.float32) -> None:
        """Declare the array ``name`` of unit ``key`` (``numel`` elements of ``dtype``, its files' too)."""
        self.layout.setdefault(key, {})[name] = Array(numel, dtype)

    def holds(self, key: Hashable) -> bool:
        return bool(self.layout.get(key))

    def path(self, key: Hashable, name: str) -> Path:
        return self.directory / unit_file(key, name)

    def paths(self) -> list[Path]:
        return [self.path(key, name) for key, arrays in self.layout.items() for name in arrays]

    def mark_written(self, key: Hashable, name: str) -> None:
        """Record that ``path(key, name)`` holds the array (written outside the store, e.g. a layer's masters)."""
        self._on_disk.add((key, name))

    # ------------------------------------------------------------ reads and writes paired with updates
    def read(self, key: Hashable) -> Future:
        """Start loading every array of ``key``; the future gives ``{name: flat tensor}``, each in its ``add``'s
        dtype. Holds a place until ``write`` or ``release``. After ``close`` it loads at once, on the calling thread,
        holding nothing."""
        future: Future = Future()
        if self._closed.is_set():
            future.set_result(self.load(key))
            return future
        with self._lock:
            heapq.heappush(self._queue, (next(self._ranks), key, future))
        self._reader.submit(self._read_next)
        return future

    def prefer(self, keys: list[Hashable]) -> None:
        """Do the reads not started yet of ``keys`` in that order, after the other reads queued now (as
        ``UpdateWorker.prefer`` does with the updates)."""
        with self._lock:
            waiting = {entry[1]: entry for entry in self._queue if entry[1] in set(keys)}
            if waiting:
                others = [entry for entry in self._queue if entry[1] not in waiting]
                ranked = [(next(self._ranks), *waiting[key][1:]) for key in keys if key in waiting]
                self._queue = others + ranked
                heapq.heapify(self._queue)

    def _read_next(self) -> None:
        with self._lock:
            _, key, future = heapq.heappop(self._queue)
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(self._read(key))
        except BaseException as error:  # noqa: BLE001 - handed to the update that waits for this read
            future.set_exception(error)

    def _read(self, key: Hashable) -> dict[str, torch.Tensor]:
        while not self._slots.acquire(timeout=0.1):  # bounded memory: wait for a write to free a place
            if self._closed.is_set():
                raise RuntimeError("the disk tier was closed")
        state: dict[str, torch.Tensor] = {}
        try:
            self._wait_write(key)
            for name, array in self.layout[key].items():
                state[name] = self._take(array)
                self._fill(key, name, state[name])
            return state
        except BaseException:
            self.release(key, state)  # the buffers back to the pool, the place freed
            raise

    def write(self, key: Hashable, state: dict[str, torch.Tensor]) -> None:
        """Write ``key``'s arrays back behind the caller, then free the buffers and the place (once per read)."""
        self._writes[key] = self._writer.submit(self._write, key, state)

    def _write(self, key: Hashable, state: dict[str, torch.Tensor]) -> None:
        try:
            for name, tensor in state.items():
                self._write_file(key, name, tensor)
        finally:
            self.release(key, state)

    def release(self, key: Hashable, state: dict[str, torch.Tensor] | None = None) -> None:
        """Free the place of a read whose arrays are not written back (its update did not run)."""
        for tensor in (state or {}).values():
            self._give(tensor)
        self._slots.release()

    # ------------------------------------------------------------ outside the update pairing
    def load(self, key: Hashable, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """``key``'s arrays (``names``, default all) in new tensors, now, on the calling thread (for inspection:
        checkpoints, ``state_dict``); waits for a pending write of ``key`` first."""
        self._wait_write(key)
        names = list(self.layout[key]) if names is None else list(names)
        arrays = {name: self.layout[key][name] for name in names}
        return {name: self._fill(key, name, torch.empty(a.numel, dtype=a.dtype)) for name, a in arrays.items()}

    def put(self, key: Hashable, state: dict[str, torch.Tensor]) -> None:
        """Write ``key``'s arrays in ``state`` now (e.g. when a checkpoint is loaded, or a layer's first masters)."""
        self._wait_write(key)
        for name, tensor in state.items():
            self._write_file(key, name, tensor)

    def flush(self) -> None:
        """Wait until every write has reached the files (re-raises a failed write)."""
        for future in list(self._writes.values()):
            future.result()

    def close(self) -> None:
        """Stop the threads (pending writes finish) and unlock the directory. ``load`` and ``put`` still work on
        the files afterwards (a checkpoint saved after the fit), but the directory is no longer reserved."""
        try:
            self._closed.set()
            with self._lock:
                for *_, future in self._queue:
                    future.cancel()
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._writer.shutdown(wait=True)
            with self._lock:
                self._queue.clear()
                self._free.clear()
                self.allocated_bytes = 0
        finally:  # after the last write: another run may take the directory now, unless parameters map its files
            if self.mapped_by is None:
                self.lock.release()
            else:
                keep_lock(self.directory, self.lock, self.mapped_by)

    # ------------------------------------------------------------ internals
    def _wait_write(self, key: Hashable) -> None:
        pending = self._writes.get(key)
        if pending is not None:
            pending.result()  # the previous update's arrays must be on disk before they are read again

    def _write_file(self, key: Hashable, name: str, tensor: torch.Tensor) -> None:
        declared = self.layout.get(key, {}).get(name)
        if declared is not None and declared != Array(tensor.numel(), tensor.dtype):
            raise ValueError(f"{self.path(key, name).name} holds {declared}, not {tensor.numel()} {tensor.dtype}")
        write_array(self.path(key, name), tensor, self.nocache)
        self._on_disk.add((key, name))

    def _fill(self, key: Hashable, name: str, out: torch.Tensor) -> torch.Tensor:
        if (key, name) not in self._on_disk:
            return out.zero_()
        return read_array(self.path(key, name), out, self.nocache)

    def _take(self, array: Array) -> torch.Tensor:
        with self._lock:
            free = self._free.get(array)
            if free:
                return free.pop()
            # A size or dtype not pooled (the resident parts' arrays, say): pooled buffers of other kinds make room,
            # so that pooled and used buffers together stay within the in_flight units' bytes.
            room = array.nbytes
            for kind in sorted(self._free, key=lambda a: a.nbytes, reverse=True):
                while self._free[kind] and room > 0:
                    self._free[kind].pop()
                    self.allocated_bytes -= kind.nbytes
                    room -= kind.nbytes
            self.allocated_bytes += array.nbytes
            self.peak_bytes = max(self.peak_bytes, self.allocated_bytes)
        return torch.empty(array.numel, dtype=array.dtype)

    def _give(self, tensor: torch.Tensor) -> None:
        array = Array(tensor.numel(), tensor.dtype)
        shared = sum(array in arrays.values() for arrays in self.layout.values()) >= 2
        with self._lock:
            if shared and not self._closed.is_set():
                self._free.setdefault(array, []).append(tensor)  # a kind other units read too: keep it
            else:
                self.allocated_bytes -= array.nbytes


def check_tier_space(store: StateStore, parts, offload: frozenset[str]) -> None:
    """Before anything is written to ``store``'s directory: room for the masters' files, and for the optimizer state
    at 4 bytes per trainable parameter of the model split into ``parts`` at least (Adam's two moments in bf16, the
    least a supported optimizer keeps: the optimizer is not known yet; its exact needs, 8 bytes with fp32 moments,
    are checked when it is attached, before any of its files is written)."""
    held = reusable_bytes(store.directory, len(parts.blocks), offload)  # an earlier run's, rewritten in place
    needed, what = 0, []
    if "masters" in offload:
        masters = sum(store.layout[i][MASTER].nbytes for i in range(len(parts.blocks)))
        held_masters = existing_bytes(store.path(i, MASTER) for i in range(len(parts.blocks)))
        needed, held = masters - held_masters, held - held_masters
        what.append(f"fp32 masters {human(masters)}")
    if "optimizer" in offload:
        params = [*parts.resident, *(np for i in range(len(parts.blocks)) for np in parts.block_parameters(i))]
        moments = 2 * torch.bfloat16.itemsize * sum(p.numel() for _, p in params if p.requires_grad)
        needed += max(0, moments - held)
        what.append(f"optimizer state at least {human(moments)}")
    check_disk_space(store.directory, needed, what=" + ".join(what))


def place_optimizer_state(
    store: StateStore | None, units: dict, names: tuple[str, ...], keys: list, dtype: torch.dtype = torch.float32
) -> list:
    """Give the optimizer state arrays ``names`` of units ``keys`` (``units[key].grad_numel`` elements of ``dtype``,
    the optimizer's state dtype, each) files in ``store``, after checking the disk has room for them; returns the
    keys whose state is on disk (none without a store)."""
    if store is None or not keys:
        return []
    for key in keys:
        for name in names:
            store.add(key, name, units[key].grad_numel, dtype)
    paths = [store.path(key, name) for key in keys for name in names]
    moments = sum(store.layout[key][name].nbytes for key in keys for name in names)
    what = f"optimizer state {human(moments)} in {str(dtype).removeprefix('torch.')}"
    check_disk_space(store.directory, moments - existing_bytes(paths), what=what)
    return keys


def open_tier(
    directory: str | None, in_flight: int, parts, offload: frozenset[str], owner: object | None = None
) -> StateStore | None:
    """The disk tier of a run (``None`` without a directory): a ``StateStore`` holding the layers' master files when
    ``offload`` puts the masters on disk, once the disk is known to have room (the directory unlocked at once if
    not). ``owner``: the module trained; with the masters on disk its parameters map their files after the run, so
    the directory stays locked until it is collected."""
    if directory is None:
        return None
    store = StateStore(directory, in_flight=in_flight, owner=owner)
    if "masters" in offload:
        for i in range(len(parts.blocks)):
            store.add(i, MASTER, sum(p.numel() for _, p in parts.block_parameters(i)))
    try:
        check_tier_space(store, parts, offload)
    except BaseException:
        store.close()  # unlock the directory now, not when the failed engine is collected
        raise
    if "masters" in offload:
        store.mapped_by = owner
    return store


class OneUnitCache:
    """The disk-tier arrays of the last unit read outside an update, kept until another unit is read.

    A checkpoint reads or writes a unit parameter by parameter: this lets it touch the unit's files once. Changes
    made through the cached arrays (``mark_changed``) reach the files when another unit is read or at ``flush``.

    Args:
        load: ``key -> arrays`` (a tensor, or a dict of tensors), read from the files.
        store: ``(key, arrays) -> None``, writing changed arrays back.
    """

    def __init__(self, load: Callable[[Hashable], Any], store: Callable[[Hashable, Any], None]) -> None:
        self._load = load
        self._store = store
        self._key: Hashable | None = None
        self._arrays: Any = None
        self._changed = False

    def get(self, key: Hashable) -> Any:
        if self._arrays is None or self._key != key:
            self.flush()
            self._arrays, self._key = self._load(key), key
        return self._arrays

    def mark_changed(self) -> None:
        """The cached arrays were written to: store them before they are dropped."""
        self._changed = True

    def flush(self) -> None:
        arrays, key, changed = self._arrays, self._key, self._changed
        self._arrays, self._key, self._changed = None, None, False
        if arrays is not None and changed:
            self._store(key, arrays)

    @property
    def nbytes(self) -> int:
        if self._arrays is None:
            return 0
        tensors = self._arrays.values() if isinstance(self._arrays, dict) else [self._arrays]
        return sum(t.nbytes for t in tensors)
