"""Build locks: one process builds a given stage output at a time, and others can tell.

Two ``tinykd run`` processes on one workdir (no luigid to arbitrate) may decide at the same
moment that a stage is missing. Without a lock both build it in the same partial directory,
and one may delete or overwrite the other's files. And ``tinykd gc`` must never remove a
partial directory that a live process is still writing.

A build therefore holds an exclusive ``fcntl.flock`` on ``<workdir>/<stage>/.<fingerprint>.lock``
for as long as it runs, and writes its owner (pid, host, start time) into that file. The kernel
releases a ``flock`` when its holder exits, however it exits (SIGKILL included), so a lock is
never left stale: "held" means a live process holds it *now*. Any process can ask
:func:`lock_holder` who that is without taking the lock away. Lock files are left in place
after release (deleting one while another process waits on it would let two processes "hold"
different files of the same name); they are a few bytes, and ``gc`` may remove unheld ones.

``flock`` is advisory and local to one kernel (and to NFS servers that implement it): workers
on several machines coordinate through luigid instead, which hands each task to one worker.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_SUFFIX = ".lock"


def lock_path(final_dir: Path | str) -> Path:
    """The lock file of the output ``<workdir>/<stage>/<fingerprint>``: ``.<fingerprint>.lock``."""
    final_dir = Path(final_dir)
    return final_dir.with_name(f".{final_dir.name}{LOCK_SUFFIX}")


def owner_record() -> dict:
    """Who this process is, as written into the lock files it holds."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}


class BuildLock:
    """An exclusive, process-lifetime lock on one stage output (a context manager).

    ``acquire(wait=True)`` blocks until the lock is free; ``acquire(wait=False)`` returns
    False at once when another process holds it.
    """

    def __init__(self, final_dir: Path | str):
        self.path = lock_path(final_dir)
        self._fd: int | None = None

    def acquire(self, wait: bool = True) -> bool:
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: this BuildLock is already held")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner_record()).encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)   # an unheld lock names nobody
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "BuildLock":
        self.acquire(wait=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(final_dir: Path | str) -> dict | None:
    """The owner record of the live process building ``final_dir``, or None if nobody is.

    Probes with a non-blocking ``flock`` and releases at once, so it never blocks a build. A
    holder that has not yet written its record is reported as ``{"pid": None, ...}``.
    """
    path = lock_path(final_dir)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            try:
                return json.loads(text)
            except ValueError:
                return {"pid": None, "host": None, "since": None}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
