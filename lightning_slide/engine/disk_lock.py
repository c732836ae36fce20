"""One run per disk-tier directory: an exclusive ``flock`` on ``lightning_slide.lock`` in it, from a store's creation
to its ``close``, so a second run (or a second fit in the same process) given the same directory is refused instead of
overwriting the first one's files. The OS drops the lock when the process ends, a crash or ``kill -9`` included: a
stale lock file never blocks a later run."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import weakref
from pathlib import Path

LOCK_FILE = "lightning_slide.lock"


class DirectoryLock:
    """An exclusive, non-blocking ``flock`` on ``directory/lightning_slide.lock``, held until ``release``.

    ``flock`` locks belong to an open file: a second lock in the same process conflicts too, and the OS releases
    the lock when the process dies, so a crashed run leaves no stale lock. The file records who holds it (host and
    process id), for the refusal's message; it is left in place (deleting it could let two runs lock two files).

    Raises:
        RuntimeError: another run holds the directory, naming it, the holder and what to change.
    """

    _fd: int | None = None  # the locked file (None: not held)

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = self._holder()
            os.close(self._fd)
            self._fd = None
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RuntimeError(
                f"offload_dir {str(directory)!r} is in use by another run ({holder}): two runs sharing the disk "
                "tier's files would overwrite each other's optimizer state and masters. Give this run its own "
                "offload_dir (e.g. a subdirectory per run), or wait for the other run to finish"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"host {socket.gethostname()}, process {os.getpid()}\n".encode(), 0)

    def _holder(self) -> str:
        try:
            return os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "holder unknown"
        except OSError:
            return "holder unknown"

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let the directory go (closing the file drops the lock); only the first call does anything."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:  # a store dropped without close (e.g. a failed construction) still lets go
        self.release()


# Directories whose master files the parameters of a live module still map (masters on disk, after its run closed):
# each keeps its lock until that module is collected, so that no other run rewrites what the module reads; the
# module's own next run (another fit, validate) takes the lock over.
_MAPPED_BY: dict[str, tuple[DirectoryLock, weakref.ref]] = {}


def take_lock(directory: Path, owner: object | None) -> DirectoryLock:
    """Lock ``directory`` for a store of ``owner``'s run: taken over from ``owner``'s earlier run when that run's
    masters stay mapped by it, refused while another live module maps them."""
    key = str(directory.resolve())
    held = _MAPPED_BY.pop(key, None)
    if held is not None:
        lock, module = held[0], held[1]()
        if module is not None and module is owner:
            return lock
        if module is not None:
            _MAPPED_BY[key] = held
            raise RuntimeError(
                f"offload_dir {str(directory)!r} holds the fp32 master files that the parameters of a "
                f"{type(module).__name__} trained before in this process still map: another run would overwrite "
                "its weights. Give this run its own offload_dir, or drop that module first (del it)"
            )
        lock.release()
    return DirectoryLock(directory)


def keep_lock(directory: Path, lock: DirectoryLock, owner: object) -> None:
    """Hold ``lock`` past its store's close until ``owner`` (whose parameters map the master files) is collected."""
    key = str(directory.resolve())

    def release(_ref, key=key, lock=lock) -> None:
        if _MAPPED_BY.get(key, (None,))[0] is lock:
            del _MAPPED_BY[key]
        lock.release()

    _MAPPED_BY[key] = (lock, weakref.ref(owner, release))
