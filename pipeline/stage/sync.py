"""Copying a resumable build's finished pieces to a store while it runs.

On a local workdir a killed resumable build leaves its partial directory for the next run. On
a store (a URL workdir shared by several machines) the next run may be on another machine, so
the finished pieces must reach the store before the process dies: :class:`PartialSync` copies
them to ``<stage>/.<fingerprint>.partial/`` every ``partial_sync_seconds`` and once more when
the build fails. Resumable builders write every piece atomically, so a visible file is a
finished one; a file is sent again when its size or mtime changes (a replaced checkpoint).
Checkpoints record the state of the other pieces, so they are copied first and uploaded last:
the store never pairs a checkpoint with an older, shorter ``metrics.jsonl``.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Mapping

from pipeline.stage.hashing import visible_files
from pipeline.stage.manifest import MANIFEST_NAME
from pipeline.store import Store

LOG = logging.getLogger("tinykd.stage")


def _syncable(path: Path, root: Path) -> bool:
    """A finished piece of a partial build: visible, not a temporary file, not the manifest."""
    parts = path.relative_to(root).parts
    return not any(p.startswith(".") for p in parts) and parts != (MANIFEST_NAME,)


class PartialSync:
    """Copies a resumable build's finished pieces to the store's partial prefix while it runs.

    Resumable builders write every piece atomically (a temporary name, then a rename), so a
    visible file is a finished one; a file is uploaded again when its size or mtime changes (a
    checkpoint replaced). A background thread syncs every ``every`` seconds; :meth:`stop` syncs
    a last time (after a failure, so another machine can continue from there).
    """

    def __init__(self, store: Store, local: Path, rel: str, every: float):
        self.store, self.local, self.rel, self.every = store, local, rel, every
        self._sent: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="tinykd-partial-sync", daemon=True)

    def start(self, already_there: Mapping[str, tuple[int, int]] | None = None) -> "PartialSync":
        self._sent.update(already_there or {})
        if self.every > 0:
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.sync()
            except Exception as exc:   # noqa: BLE001 - a failed sync only costs a resume later
                LOG.warning("could not copy finished parts to %s: %s", self.store.url_of(self.rel), exc)

    #: Pieces that record the state of the others (a trainer checkpoint holds the length of
    #: metrics.jsonl it continues from): copied first, uploaded last, so the store never holds
    #: one newer than the files it refers to, even when a sync is killed half-way.
    SNAPSHOT_FIRST = ("checkpoints/",)

    def sync(self) -> int:
        with self._lock:
            changed = []
            for file in sorted(visible_files(self.local)):
                if not _syncable(file, self.local):
                    continue
                try:
                    stat = file.stat()
                except FileNotFoundError:
                    continue
                name = file.relative_to(self.local).as_posix()
                if self._sent.get(name) != (stat.st_size, stat.st_mtime_ns):
                    changed.append((name, file, (stat.st_size, stat.st_mtime_ns)))
            late = [c for c in changed if c[0].startswith(self.SNAPSHOT_FIRST)]
            sent = 0
            with tempfile.TemporaryDirectory(dir=self.local.parent, prefix=".sync-") as snapshots:
                copies = []
                for name, file, stamp in late:
                    copy = Path(snapshots) / str(len(copies))
                    try:
                        shutil.copyfile(file, copy)
                    except FileNotFoundError:   # replaced meanwhile: the next sync sends it
                        continue
                    copies.append((name, copy, stamp))
                for name, file, stamp in [c for c in changed if c not in late] + copies:
                    try:
                        self.store.upload(file, f"{self.rel}/{name}")
                    except FileNotFoundError:   # replaced while we read it: the next sync sends it
                        continue
                    self._sent[name] = stamp
                    sent += 1
            return sent

    def stop(self, final_sync: bool) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if final_sync:
            try:
                self.sync()
            except Exception as exc:   # noqa: BLE001 - the build's own error matters more
                LOG.warning("could not copy finished parts to %s: %s", self.store.url_of(self.rel), exc)
