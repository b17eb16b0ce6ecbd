"""Partial directories and atomic writes: a reader never sees half an output.

An output is built in a hidden sibling ``<stage>/.<fingerprint>.partial`` and renamed into
place only once complete, so a stage that fails leaves nothing a reader would take for an
output. Resumable stages (candidates, augmentation, cache shards, trainers) keep their partial
directory after a failure and write each piece atomically with :func:`write_file_atomic` (a
temporary name unique to the writer's pid, then a rename), so a rerun continues from the
pieces already finished.

**One fingerprint, one builder.** A build holds the output's
:class:`~pipeline.locks.BuildLock` from before it touches the partial directory until it is
published, so two local processes never write the same partial: the second waits and, once
the first has published, skips the stage (:class:`StageAlreadyComplete`). Holding the lock is
also what makes a leftover partial, or a stray temporary file in it, safe to delete or resume:
its writer is dead (:func:`prepare_partial`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.locks import BuildLock, lock_holder

LOG = logging.getLogger("tinykd.stage")


PARTIAL_SUFFIX = ".partial"


def partial_dir(final: Path) -> Path:
    return final.parent / f".{final.name}{PARTIAL_SUFFIX}"


class StageAlreadyComplete(FileExistsError):
    """The output exists: already before the build started, or published by another process
    while this one waited for the build lock. Nothing was written; the caller skips the stage."""


def temporary_name(path: Path) -> Path:
    """A hidden temporary sibling of ``path`` unique to this process (``.<name>.<pid>.tmp``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete ``.*.tmp`` files and directories below ``directory``; return what was removed.

    Call only while holding the directory's build lock: then every temporary file in it
    belongs to a writer that is dead (a killed run's half-written checkpoint, for instance).
    """
    removed = []
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in list(dirnames) + filenames:
            if name.startswith(".") and name.endswith(".tmp"):
                target = Path(dirpath) / name
                if target.is_dir():
                    shutil.rmtree(target, ignore_errors=True)
                    dirnames.remove(name)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        target.unlink()
                removed.append(target)
    return removed


def write_file_atomic(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename to ``path``: for pieces of resumable stages.

    The temporary name is unique to this process, and removed when ``write`` fails (a full
    disk must not leave a half-written copy behind).
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_json_atomic(path: Path, value: Any) -> None:
    write_file_atomic(path, lambda tmp: tmp.write_text(
        json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"))


def acquire_build_lock(final: Path) -> BuildLock:
    lock = BuildLock(final)
    if not lock.acquire(wait=False):
        holder = lock_holder(final) or {}
        LOG.info("%s is being built by pid %s on %s; waiting for it", final,
                 holder.get("pid"), holder.get("host"))
        lock.acquire(wait=True)
    return lock


def prepare_partial(final: Path, resumable: bool) -> Path:
    """The partial directory of ``final``, called under its build lock: whatever a dead process
    left there is removed (a resumable stage keeps its finished parts, minus temporary files)."""
    partial = partial_dir(final)
    if partial.exists() and not resumable:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(partial):
        LOG.warning("removed %s, a temporary file of an interrupted build", stale)
    return partial
