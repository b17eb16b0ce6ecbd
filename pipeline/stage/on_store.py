"""The stage contract on a store (a URL workdir): local scratch, upload, manifest last.

Object stores have no rename, so "publish atomically" becomes "upload the files, then the
manifest": an output on a store is complete exactly when its ``manifest.json`` exists and
every file it lists is there at its recorded size (:func:`store_output_complete`); anything
else -- a killed upload, a deleted object -- counts as incomplete, and is rebuilt with its
manifest deleted first. The build itself runs in this machine's scratch directory under the
same local build lock as a local workdir (machines are kept apart by luigid), and the built
directory stays there as this machine's copy. Downstream stages on other machines fetch an
upstream output once into their scratch, checking every file (:func:`fetch_output`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline.errors import InputError
from pipeline.locks import BuildLock
from pipeline.stage.fingerprint import StageKey
from pipeline.stage.hashing import FileHasher
from pipeline.stage.manifest import MANIFEST_NAME, StageBuild, manifest_bytes
from pipeline.stage.partial import (PARTIAL_SUFFIX, StageAlreadyComplete, acquire_build_lock, prepare_partial,
                                    remove_stale_temporaries, write_json_atomic)
from pipeline.stage.sync import PartialSync
from pipeline.stage.verify import parse_store_manifest, store_output_problems
from pipeline.store import Store, copy_tree_to_local

LOG = logging.getLogger("tinykd.stage")


def store_output_rel(stage: str, fingerprint: str) -> str:
    """Where an output lives on a store: ``<stage>/<fingerprint>``."""
    return f"{stage}/{fingerprint}"


def store_partial_rel(stage: str, fingerprint: str) -> str:
    """Where a resumable build keeps its finished parts on a store: ``<stage>/.<fingerprint>.partial``."""
    return f"{stage}/.{fingerprint}{PARTIAL_SUFFIX}"


def upload_output(store: Store, local: Path, rel: str, manifest: Mapping[str, Any]) -> None:
    """Publish the local directory ``local`` as the store output ``rel``: every file the manifest
    lists, then objects left there by a killed upload and not listed are removed, then
    ``manifest.json`` last (the object whose existence makes the output complete)."""
    for name in sorted(manifest.get("files", {})):
        store.upload(local / name, f"{rel}/{name}")
    for name in store.list_files(rel):
        if name != MANIFEST_NAME and name not in manifest.get("files", {}):
            store.delete(f"{rel}/{name}")
    store.write_bytes(f"{rel}/{MANIFEST_NAME}", manifest_bytes(manifest))


def store_output_complete(store: Store, rel: str, local_manifest: Path | None = None) -> bool:
    """Whether the store output ``rel`` is complete: its manifest exists, and every file it
    lists is there with its size (checksums are checked by the readers). A damaged output
    counts as incomplete, so Luigi rebuilds it.

    One listing of the output's prefix; the manifest itself is downloaded only when this
    machine has no copy of it (``local_manifest``: one fingerprint has one file list and one
    set of sizes wherever it was built), which keeps a no-op rerun to one request per stage.
    """
    present = store.list_files(rel)
    if MANIFEST_NAME not in present:
        return False
    try:
        if local_manifest is not None and local_manifest.is_file():
            manifest = json.loads(local_manifest.read_text())
        else:
            manifest = parse_store_manifest(store, rel, store.read_bytes(f"{rel}/{MANIFEST_NAME}"))
    except (FileNotFoundError, ValueError, InputError):
        return False
    listed = manifest.get("files", {})
    return all(name in present and present[name].size == entry["bytes"] for name, entry in listed.items())


def _damaged_store_output(store: Store, rel: str) -> bool:
    """True (and its manifest removed, so that nothing takes it for complete while it is
    rebuilt) when the store output ``rel`` exists but is damaged; False when absent or sound."""
    if not store.exists(f"{rel}/{MANIFEST_NAME}"):
        return False
    problems = store_output_problems(store, rel, checksums=False)
    if not problems:
        raise StageAlreadyComplete(f"{store.url_of(rel)} already exists; the stage is complete")
    LOG.warning("%s is damaged (%s: %s); rebuilding it", store.url_of(rel), *problems[0])
    store.delete(f"{rel}/{MANIFEST_NAME}")
    return True


@contextlib.contextmanager
def build_stage_on_store(store: Store, scratch: Path | str, key: StageKey, *, resumable: bool = False,
                         hasher: FileHasher | None = None,
                         partial_sync_seconds: float = 60.0) -> Iterator[StageBuild]:
    """The stage contract on a store without rename.

    The build runs in ``<scratch>/<stage>/.<fingerprint>.partial`` (a local directory, under the
    same local build lock as a local workdir: processes sharing this scratch never write one
    partial together; machines are kept apart by luigid). On success its files are uploaded to
    ``<stage>/<fingerprint>/`` on the store, ``manifest.json`` last, the store's partial prefix
    is removed, and the local directory becomes ``<scratch>/<stage>/<fingerprint>``: this
    machine's copy, which its downstream stages read without a download.

    A resumable build starts from the parts under the store's partial prefix
    (``<stage>/.<fingerprint>.partial/``, written by any machine) and copies its own finished
    parts there while it runs (:class:`PartialSync`) and once more when it fails.
    """
    hasher = hasher or FileHasher(Path(scratch) / ".hash-cache.json")
    fingerprint = key.fingerprint(hasher)
    rel = store_output_rel(key.stage, fingerprint)
    _damaged_store_output(store, rel)   # raises StageAlreadyComplete when it is there and sound
    final = Path(scratch) / key.stage / fingerprint
    lock = acquire_build_lock(final)
    try:
        if store_output_complete(store, rel):
            raise StageAlreadyComplete(f"{store.url_of(rel)} was published by another process "
                                       "while this one waited for its build lock")
        if final.exists():   # a local copy of an output since removed from the store
            shutil.rmtree(final)
        partial = prepare_partial(final, resumable)
        partial_rel = store_partial_rel(key.stage, fingerprint)
        syncer = None
        if resumable:
            fetched = copy_tree_to_local(store, partial_rel, partial)
            if fetched:
                LOG.info("resuming %s from %d part(s) under %s", rel, len(fetched), store.url_of(partial_rel))
            remote = {name: info for name, info in store.list_files(partial_rel).items()}
            known = {}
            for name, info in remote.items():
                local_file = partial / name
                if local_file.exists() and local_file.stat().st_size == info.size and name in fetched:
                    known[name] = (info.size, local_file.stat().st_mtime_ns)
            syncer = PartialSync(store, partial, partial_rel, partial_sync_seconds).start(known)
        build = StageBuild(partial, key, fingerprint, hasher)
        started = time.time()
        try:
            yield build
            if syncer is not None:
                syncer.stop(final_sync=False)
            remove_stale_temporaries(partial)
            manifest = build.manifest(started, time.time())
            write_json_atomic(partial / MANIFEST_NAME, manifest)
            upload_output(store, partial, rel, manifest)
        except BaseException:
            if syncer is not None:
                syncer.stop(final_sync=True)
            else:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        finally:
            hasher.save()
        if resumable:
            store.delete_tree(partial_rel)
        os.rename(partial, final)
    finally:
        lock.release()


def fetch_output(store: Store, stage: str, fingerprint: str, scratch: Path | str) -> Path:
    """This machine's copy of the store output ``<stage>/<fingerprint>``, downloaded once into
    ``<scratch>/<stage>/<fingerprint>`` and checked on the way (every listed file, its size and
    sha256, the manifest's own checksum). A stage that needs an upstream output as local files
    (a teacher model directory, word vectors, augmented shards) reads this copy.

    Raises :class:`~pipeline.errors.InputError` naming the object at fault when the output is
    incomplete or damaged on the store; nothing half-downloaded is left under the final name.
    """
    rel = store_output_rel(stage, fingerprint)
    final = Path(scratch) / stage / fingerprint
    if (final / MANIFEST_NAME).is_file():
        return final
    with BuildLock(final):   # one download per output and scratch directory
        if (final / MANIFEST_NAME).is_file():
            return final
        try:
            raw = store.read_bytes(f"{rel}/{MANIFEST_NAME}")
        except FileNotFoundError:
            raise InputError("upstream output has no manifest.json on the store (not a completed "
                             "stage output)", store.url_of(rel)) from None
        manifest = parse_store_manifest(store, rel, raw)
        tmp = final.with_name(f".{final.name}.fetch.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for name, expected in sorted(manifest.get("files", {}).items()):
                try:
                    digest = store.download(f"{rel}/{name}", tmp / name)
                except FileNotFoundError:
                    raise InputError("upstream output is damaged: listed in the manifest, missing on "
                                     f"the store; remove {store.url_of(rel)} to rebuild it",
                                     store.url_of(f"{rel}/{name}")) from None
                size = (tmp / name).stat().st_size
                if size != expected["bytes"] or digest != expected["sha256"]:
                    what = (f"{size} bytes, the manifest says {expected['bytes']}" if size != expected["bytes"]
                            else "content differs from the manifest (sha256)")
                    raise InputError(f"upstream output is damaged: {what}; remove {store.url_of(rel)} "
                                     "to rebuild it", store.url_of(f"{rel}/{name}"))
            (tmp / MANIFEST_NAME).write_bytes(raw)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
