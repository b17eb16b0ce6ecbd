"""Garbage collection: what under a workdir no configuration references, and what may go.

Content addressing never overwrites: every changed parameter leaves the old output beside the
new one (readable for comparison, until the disk fills). ``tinykd gc`` lists every output,
partial build and lock file under the workdir, keeps what the given configurations reference,
and decides for the rest whether deleting it is safe -- never what a live process is building
(its build lock has a holder), never a partial without a lock file that changed recently, and,
with ``--older-than``, nothing younger than that. On a store no lock reaches across machines,
so partial prefixes and manifest-less uploads count as possibly live for a grace period.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipeline.locks import LOCK_SUFFIX, lock_holder, lock_path
from pipeline.stage.manifest import MANIFEST_NAME, iso_time
from pipeline.stage.partial import PARTIAL_SUFFIX
from pipeline.store import Store


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())

#: A partial directory with no lock file to ask (written by a tinykd that took no build locks)
#: counts as possibly live while anything in it changed more recently than this.
UNLOCKED_PARTIAL_GRACE_SECONDS = 3600.0


@dataclass
class WorkdirEntry:
    """One thing under ``<workdir>/<stage>/``: a completed output, a partial build, a lock file."""

    kind: str        # "output", "partial" or "lock"; on a store also "incomplete" (no manifest)
    path: Path       # the directory or file itself (on a store: its redacted URL)
    target: Path     # the output it belongs to: <workdir>/<stage>/<fingerprint> (on a store: "<stage>/<fingerprint>")
    bytes: int
    modified: float  # newest modification time inside it (seconds since the epoch)
    rel: str | None = None   # on a store: the prefix to delete


@dataclass
class GcDecision:
    entry: WorkdirEntry
    delete: bool
    reason: str


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    if path.is_dir():
        for dirpath, _, filenames in os.walk(path):
            for name in filenames:
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, (Path(dirpath) / name).stat().st_mtime)
    return newest


def workdir_entries(workdir: Path | str) -> list[WorkdirEntry]:
    """Every stage output, partial directory and build-lock file under ``workdir``."""
    base = Path(workdir)
    if not base.is_dir():
        return []
    entries = []
    for stage_dir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for entry in sorted(stage_dir.iterdir()):
            name = entry.name
            if entry.is_dir() and name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
                kind, target = "partial", stage_dir / name[1:-len(PARTIAL_SUFFIX)]
            elif entry.is_file() and name.startswith(".") and name.endswith(LOCK_SUFFIX):
                kind, target = "lock", stage_dir / name[1:-len(LOCK_SUFFIX)]
            elif entry.is_dir() and not name.startswith("."):
                kind, target = "output", entry
            else:
                continue
            try:
                size = directory_bytes(entry) if entry.is_dir() else entry.stat().st_size
                modified = _newest_mtime(entry)
            except FileNotFoundError:   # removed while we looked (a build finishing)
                continue
            entries.append(WorkdirEntry(kind, entry, target, size, modified))
    return entries


def store_workdir_entries(store: Store) -> list[WorkdirEntry]:
    """Every stage output, partial prefix and incomplete output (objects under
    ``<stage>/<fingerprint>/`` without a manifest: a killed upload) on a store, from one listing."""
    groups: dict[tuple[str, str], list] = {}
    for name, info in store.list_files("").items():
        parts = name.split("/")
        if len(parts) < 3 or parts[0].startswith("."):
            continue   # top-level files (none are written) and hidden top-level prefixes
        groups.setdefault((parts[0], parts[1]), []).append((parts[2:], info))
    entries = []
    for (stage, entry), objects in sorted(groups.items()):
        if entry.startswith(".") and entry.endswith(PARTIAL_SUFFIX):
            kind, fingerprint = "partial", entry[1:-len(PARTIAL_SUFFIX)]
        elif not entry.startswith("."):
            has_manifest = any(p == [MANIFEST_NAME] for p, _ in objects)
            kind, fingerprint = ("output" if has_manifest else "incomplete"), entry
        else:
            continue
        rel = f"{stage}/{entry}"
        modified = max((i.mtime.timestamp() if i.mtime else 0.0) for _, i in objects)
        entries.append(WorkdirEntry(kind, store.url_of(rel), f"{stage}/{fingerprint}",
                                    sum(i.size for _, i in objects), modified, rel))
    return entries


def human_age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f} {unit}"
    return f"{seconds:.0f} s"


def _holder_text(holder: Mapping[str, Any]) -> str:
    since = holder.get("since")
    when = f" since {iso_time(since)}" if isinstance(since, (int, float)) else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{when}"


def gc_plan(workdir: Path | str, referenced: set[Path], *, older_than: float | None = None,
            unreferenced_because: str = "not referenced", now: float | None = None,
            store: Store | None = None) -> list[GcDecision]:
    """Decide, for every unreferenced entry under ``workdir``, whether it may be deleted and why.

    Entries of referenced outputs are not listed (a referenced partial is a resumable build).
    An unreferenced entry is kept when a live process holds its build lock
    (:func:`pipeline.locks.lock_holder`), when it is a partial directory without a lock file
    that changed within :data:`UNLOCKED_PARTIAL_GRACE_SECONDS`, or when ``older_than`` (seconds)
    is given and it changed more recently than that.

    With a ``store`` the entries are the store's (``referenced`` holds ``<stage>/<fingerprint>``
    strings). No lock reaches across machines there, so a partial prefix or an incomplete
    output (an upload in progress, or a killed one) counts as possibly live for the same grace
    period after its newest object was written.
    """
    now = time.time() if now is None else now
    decisions = []
    for entry in (store_workdir_entries(store) if store is not None else workdir_entries(workdir)):
        if entry.target in referenced:
            continue
        age = now - entry.modified
        if store is not None and entry.kind in ("partial", "incomplete") \
                and age < UNLOCKED_PARTIAL_GRACE_SECONDS:
            decisions.append(GcDecision(entry, False, (
                f"kept: {'a partial build' if entry.kind == 'partial' else 'an upload without its manifest'}"
                f" on the store, written to {human_age(age)} ago (may be live on another machine)")))
            continue
        if store is None and entry.kind in ("partial", "lock"):
            holder = lock_holder(entry.target)
            if holder is not None:
                decisions.append(GcDecision(entry, False, f"kept: being built by {_holder_text(holder)}"))
                continue
        if entry.kind == "partial":
            if not lock_path(entry.target).exists() and age < UNLOCKED_PARTIAL_GRACE_SECONDS:
                decisions.append(GcDecision(entry, False, (
                    f"kept: a partial build with no lock file to ask, written to {human_age(age)} ago "
                    "(may be live)")))
                continue
        if older_than is not None and age < older_than:
            decisions.append(GcDecision(entry, False, (
                f"kept: {unreferenced_because}, but changed {human_age(age)} ago "
                f"(younger than {human_age(older_than)})")))
            continue
        what = {"output": "output", "partial": "partial build, no live holder",
                "lock": "build lock, no holder",
                "incomplete": "incomplete output (an upload that never wrote its manifest)"}[entry.kind]
        decisions.append(GcDecision(entry, True, f"{what}; {unreferenced_because}; "
                                                 f"changed {human_age(age)} ago"))
    # a lock file goes after its partial directory: while it exists, a new build of the same
    # output still meets the lock that tells it (and delete_entry) who is building
    return sorted(decisions, key=lambda d: d.entry.kind == "lock")


def delete_entry(entry: WorkdirEntry, store: Store | None = None) -> bool:
    """Delete one garbage entry; False (nothing touched) when a build took its lock meanwhile.
    On a store an output's manifest goes first, so that it is never complete-looking while
    its files are being removed."""
    if store is not None:
        if entry.kind == "output":
            store.delete(f"{entry.rel}/{MANIFEST_NAME}")
        store.delete_tree(entry.rel)
        return True
    if entry.kind in ("partial", "lock") and lock_holder(entry.target) is not None:
        return False
    if entry.kind == "lock":
        with contextlib.suppress(FileNotFoundError):
            entry.path.unlink()
    else:
        shutil.rmtree(entry.path, ignore_errors=True)
    return True
