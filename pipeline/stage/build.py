"""Building one stage output: the context manager every stage's build function runs inside.

:func:`build_stage` ties the contract together: the fingerprint names the output
(:mod:`~pipeline.stage.fingerprint`), the build lock and the partial directory keep half an
output out of sight (:mod:`~pipeline.stage.partial`), the manifest is written last
(:mod:`~pipeline.stage.manifest`), and the rename publishes it. With a store the same steps run
against object storage (:mod:`~pipeline.stage.on_store`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from pipeline.stage.fingerprint import StageKey
from pipeline.stage.hashing import FileHasher
from pipeline.stage.manifest import MANIFEST_NAME, StageBuild
from pipeline.stage.on_store import build_stage_on_store
from pipeline.stage.partial import (StageAlreadyComplete, acquire_build_lock, prepare_partial,
                                    remove_stale_temporaries, write_json_atomic)
from pipeline.store import Store


@contextlib.contextmanager
def build_stage(workdir: Path | str, key: StageKey, *, resumable: bool = False,
                hasher: FileHasher | None = None, store: Store | None = None,
                partial_sync_seconds: float = 60.0) -> Iterator[StageBuild]:
    """Build one stage output atomically, holding its build lock throughout.

    With a ``store`` (a URL workdir), ``workdir`` is this machine's local scratch directory and
    the output goes to the store instead: see :func:`build_stage_on_store`.

    Yields a :class:`StageBuild` whose ``path`` is a hidden partial directory. On normal exit
    the manifest is written and the directory renamed to ``<workdir>/<stage>/<fingerprint>``.
    On an exception the partial directory is removed, unless ``resumable`` is set: then it is
    kept so that the next attempt can skip the pieces it already holds (a killed process
    cannot clean up anyway, so resumable builders must write each piece atomically).

    Raises :class:`StageAlreadyComplete` (before yielding) when the output exists, including
    when another process published it while this one waited for the lock.
    """
    hasher = hasher or FileHasher(Path(workdir) / ".hash-cache.json")
    if store is not None:
        with build_stage_on_store(store, workdir, key, resumable=resumable, hasher=hasher,
                                  partial_sync_seconds=partial_sync_seconds) as build:
            yield build
        return
    fingerprint = key.fingerprint(hasher)
    final = Path(workdir) / key.stage / fingerprint
    if final.exists():
        raise StageAlreadyComplete(f"{final} already exists; the stage is complete")
    lock = acquire_build_lock(final)
    try:
        if final.exists():
            raise StageAlreadyComplete(f"{final} was published by another process while this one "
                                       "waited for its build lock")
        # Under the lock, a partial directory left here belongs to a dead process.
        partial = prepare_partial(final, resumable)
        build = StageBuild(partial, key, fingerprint, hasher)
        started = time.time()
        try:
            yield build
            remove_stale_temporaries(partial)
            manifest = build.manifest(started, time.time())
            write_json_atomic(partial / MANIFEST_NAME, manifest)
        except BaseException:
            if not resumable:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        finally:
            hasher.save()
        try:
            os.rename(partial, final)
        except OSError:
            # A worker on another machine (luigid, shared filesystem: flock does not reach
            # it) published the same fingerprint first; its output is equivalent, and the
            # partial is ours to remove.
            if final.exists():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                raise
    finally:
        lock.release()
