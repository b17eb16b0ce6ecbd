"""Content-addressed stage outputs: the one contract every stage of the DAG uses.

Luigi calls a task complete when its output exists and never looks further, so a rerun after
a parameter change would silently reuse stale data. We follow gokart and HF datasets: the
output *path* is derived from everything that determines the output's content, so "complete"
keeps meaning "exists", yet a changed input points to a new directory.

A stage's **fingerprint** is the sha256 of a canonical JSON document holding

* the stage name and an explicit, hand-bumped stage ``version`` (bump it when the code that
  writes the output changes what it writes);
* the stage's *significant* parameters (execution details such as thread counts are left out);
* the fingerprints of every upstream stage (so a change propagates down the DAG);
* the content hash (sha256) of every input file or directory the stage reads directly.

Hashing large inputs on every rerun would break the "no-op rerun in under two seconds" goal,
so :class:`FileHasher` keeps a small cache keyed on (path, size, mtime_ns): an unchanged file
is not re-read; a touched or edited one is.

Each output lives in ``<workdir>/<stage>/<fingerprint>/``. It is built in a hidden sibling
``.<fingerprint>.partial`` directory and renamed into place only once complete, so a reader
never sees half an output, and a stage that fails leaves nothing behind (resumable stages keep
their partial directory so a rerun can continue from the pieces already finished). Every
output carries a ``manifest.json``: parameters, upstream fingerprints, input hashes, library
versions, row counts, per-file checksums and timings. ``explain`` compares a key with the
closest existing manifest of the same stage (same task, most settings in common) to say *why*
a stage will run, and names the output it compared with.

**One fingerprint, one content.** A build holds the output's :class:`~pipeline.locks.BuildLock`
from before it touches the partial directory until the rename, so two local processes never
write the same partial: the second waits, and once the first has published, skips the stage
(:class:`StageAlreadyComplete`). Holding the lock is also what makes a leftover partial (or a
stray temporary file in it) safe to delete or resume: its writer is dead. Temporary files carry
the writer's pid. Before a stage reads an upstream output, :func:`verify_upstream` checks its
files against the upstream manifest (presence and size always, sha256 too unless the upstream
stage opts out because its files are large and checked as they are read: the teacher cache's
Parquet page CRCs), so a truncated, deleted or flipped file fails the reader, named, instead
of becoming a different result under the same fingerprints.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline.errors import InputError
from pipeline.locks import BuildLock, lock_holder
from pipeline.store import Store, copy_tree_to_local, is_url, open_store

LOG = logging.getLogger("tinykd.stage")
#: Bump when the fingerprint recipe or the manifest layout itself changes.
CONTRACT_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: The manifest's checksum of itself (absent from manifests written before it existed).
MANIFEST_CHECKSUM_KEY = "manifest_sha256"
PARTIAL_SUFFIX = ".partial"
#: Libraries whose versions are recorded in every manifest (recorded, not fingerprinted:
#: upgrading numpy should not invalidate a week of teacher caching).
RECORDED_LIBRARIES = ("torch", "transformers", "datasets", "pyarrow", "luigi", "numpy",
                      "bicleaner-ai-glove", "tqdm")
FINGERPRINT_LENGTH = 16
#: Manifest fields that describe one run rather than the output's content: the clock, the
#: machine and process, and how a resumed build got there. A resumed or concurrent build
#: equals an uninterrupted one in everything else (tests and scripts/soak.py compare so).
#: ``timings`` and ``host`` are top-level sections; the others are keys inside ``info``.
RUN_HISTORY_FIELDS = ("timings", "host", "libraries", "manifest_sha256")
RUN_HISTORY_INFO_KEYS = ("worker_pid", "shards_resumed", "resumed_from", "train_seconds",
                         "data_wait_share", "startup_wait_share", "mlm_forward_seconds",
                         "seconds", "data_wait_s", "step_s", "torch_threads")
#: Files whose content holds such fields (the distillation stages' logs: per-step wait and
#: step times, the run's timings); compared field by field without them.
RUN_HISTORY_FILES = ("metrics.json", "metrics.jsonl")


def canonical_json(value: Any) -> str:
    """Serialise ``value`` deterministically (sorted keys, no whitespace, normalised types)."""
    return json.dumps(_jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return repr(value)
        return value
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "name") and hasattr(value, "value"):  # enum members
        return value.name
    return str(value)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


class FileHasher:
    """sha256 of files and directories with a (size, mtime_ns) fast path.

    The cache is a JSON file (by default ``<workdir>/.hash-cache.json``). It is advisory: a
    corrupt or concurrently rewritten cache only costs a re-hash, never a wrong answer,
    because an entry is used only when the path, size and mtime all still match.
    """

    def __init__(self, cache_path: Path | None = None):
        self.cache_path = Path(cache_path) if cache_path else None
        self._entries: dict[str, list] = {}
        self._dirty = False
        if self.cache_path and self.cache_path.exists():
            try:
                self._entries = json.loads(self.cache_path.read_text())
            except (OSError, ValueError):
                self._entries = {}

    def file_sha256(self, path: Path) -> str:
        path = Path(path).resolve()
        stat = path.stat()
        key = str(path)
        cached = self._entries.get(key)
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            return cached[2]
        digest = sha256_file(path)
        self._entries[key] = [stat.st_size, stat.st_mtime_ns, digest]
        self._dirty = True
        return digest

    def describe(self, path: Path | str) -> dict:
        """Return ``{"path", "sha256", "bytes"}`` for a file, or a combined hash for a directory.

        A directory's hash covers every file below it (relative path + content), skipping
        hidden entries such as ``.git`` or editor swap files.
        """
        if is_url(path):
            return self._describe_remote(str(path))
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        if path.is_file():
            return {"path": str(path), "sha256": self.file_sha256(path), "bytes": path.stat().st_size}
        digest = hashlib.sha256()
        total = 0
        for file in sorted(_visible_files(path)):
            rel = file.relative_to(path).as_posix()
            digest.update(rel.encode() + b"\0" + self.file_sha256(file).encode() + b"\n")
            total += file.stat().st_size
        return {"path": str(path), "sha256": digest.hexdigest(), "bytes": total}

    def _describe_remote(self, url: str) -> dict:
        """An input on a store: the same recipe as a local file or directory, with the store's
        size + modification time as the fast path (an unchanged object is not downloaded)."""
        store = open_store(url)
        info = store.info("")
        if info.type.name == "File":
            objects = {"": info}
        else:
            objects = {rel: i for rel, i in store.list_files("").items()
                       if not any(part.startswith(".") for part in rel.split("/"))}
            if not objects:
                raise FileNotFoundError(f"input not found: {store.display}")
        digest, total, digests = hashlib.sha256(), 0, {}
        for rel in sorted(objects):
            size, mtime = objects[rel].size, objects[rel].mtime_ns
            key = f"{store.display}/{rel}" if rel else store.display
            cached = self._entries.get(key)
            if cached and cached[0] == size and cached[1] == mtime:
                digests[rel] = cached[2]
            else:
                digests[rel] = store.sha256(rel)
                self._entries[key] = [size, mtime, digests[rel]]
                self._dirty = True
            total += size
        if list(objects) == [""]:
            return {"path": store.display, "sha256": digests[""], "bytes": total}
        for rel in sorted(digests):
            digest.update(rel.encode() + b"\0" + digests[rel].encode() + b"\n")
        return {"path": store.display, "sha256": digest.hexdigest(), "bytes": total}

    def save(self) -> None:
        if not (self.cache_path and self._dirty):
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_name(f"{self.cache_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._entries))
        os.replace(tmp, self.cache_path)
        self._dirty = False


def _visible_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


@dataclass
class StageKey:
    """Everything that determines one stage output; its fingerprint names the output directory.

    ``inputs`` maps a label to a local file or directory read by the stage; ``upstream`` maps
    a label to the fingerprint of an upstream stage output.
    """

    stage: str
    version: str
    params: Mapping[str, Any] = field(default_factory=dict)
    upstream: Mapping[str, str] = field(default_factory=dict)
    inputs: Mapping[str, str | Path] = field(default_factory=dict)
    _input_hashes: dict | None = field(default=None, repr=False, compare=False)

    def input_hashes(self, hasher: FileHasher | None = None) -> dict[str, dict]:
        if self._input_hashes is None:
            hasher = hasher or FileHasher()
            self._input_hashes = {label: hasher.describe(p) for label, p in sorted(self.inputs.items())}
        return self._input_hashes

    def document(self, hasher: FileHasher | None = None) -> dict:
        """The canonical document hashed into the fingerprint (also stored in the manifest)."""
        return {
            "contract": CONTRACT_VERSION,
            "stage": self.stage,
            "version": str(self.version),
            "params": _jsonable(dict(self.params)),
            "upstream": dict(sorted(self.upstream.items())),
            # Paths are not part of identity: the same bytes elsewhere are the same input.
            "inputs": {label: d["sha256"] for label, d in self.input_hashes(hasher).items()},
        }

    def fingerprint(self, hasher: FileHasher | None = None) -> str:
        blob = canonical_json(self.document(hasher)).encode()
        return hashlib.sha256(blob).hexdigest()[:FINGERPRINT_LENGTH]

    def output_dir(self, workdir: Path | str, hasher: FileHasher | None = None) -> Path:
        return Path(workdir) / self.stage / self.fingerprint(hasher)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in RECORDED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


class StageBuild:
    """Handle given to a stage's build function while its output is being written.

    ``path`` is the (partial) output directory to write into. Record row counts in ``rows``,
    anything else worth keeping in ``info``, and time sub-steps with :meth:`timed`.
    """

    def __init__(self, path: Path, key: StageKey, fingerprint: str, hasher: FileHasher):
        self.path = path
        self.key = key
        self.fingerprint = fingerprint
        self.rows: dict[str, int] = {}
        self.info: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self._hasher = hasher

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 4)

    def manifest(self, started: float, finished: float) -> dict:
        files = {}
        for file in sorted(_visible_files(self.path)):
            rel = file.relative_to(self.path).as_posix()
            if rel == MANIFEST_NAME:
                continue
            files[rel] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
        manifest = {
            "stage": self.key.stage,
            "version": str(self.key.version),
            "fingerprint": self.fingerprint,
            "contract": CONTRACT_VERSION,
            "params": _jsonable(dict(self.key.params)),
            "upstream": dict(sorted(self.key.upstream.items())),
            "inputs": self.key.input_hashes(self._hasher),
            "libraries": library_versions(),
            "rows": self.rows,
            "info": _jsonable(self.info),
            "files": files,
            "timings": {
                "started": _iso(started),
                "finished": _iso(finished),
                "seconds": round(finished - started, 3),
                **self.timings,
            },
            "host": {"platform": platform.platform(), "argv": sys.argv[:1]},
        }
        manifest[MANIFEST_CHECKSUM_KEY] = manifest_checksum(manifest)
        return manifest


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own checksum field: a flipped
    byte in manifest.json (a row count, an info value) is then as detectable as one in a file."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM_KEY}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")


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


def _acquire_build_lock(final: Path) -> BuildLock:
    lock = BuildLock(final)
    if not lock.acquire(wait=False):
        holder = lock_holder(final) or {}
        LOG.info("%s is being built by pid %s on %s; waiting for it", final,
                 holder.get("pid"), holder.get("host"))
        lock.acquire(wait=True)
    return lock


def _prepare_partial(final: Path, resumable: bool) -> Path:
    """The partial directory of ``final``, called under its build lock: whatever a dead process
    left there is removed (a resumable stage keeps its finished parts, minus temporary files)."""
    partial = partial_dir(final)
    if partial.exists() and not resumable:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(partial):
        LOG.warning("removed %s, a temporary file of an interrupted build", stale)
    return partial


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
    lock = _acquire_build_lock(final)
    try:
        if final.exists():
            raise StageAlreadyComplete(f"{final} was published by another process while this one "
                                       "waited for its build lock")
        # Under the lock, a partial directory left here belongs to a dead process.
        partial = _prepare_partial(final, resumable)
        build = StageBuild(partial, key, fingerprint, hasher)
        started = time.time()
        try:
            yield build
            remove_stale_temporaries(partial)
            manifest = build.manifest(started, time.time())
            _write_json_atomic(partial / MANIFEST_NAME, manifest)
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


# --------------------------------------------------------------------------------------------
# The contract on a store (a URL workdir): local scratch, upload, manifest last
# --------------------------------------------------------------------------------------------

def store_output_rel(stage: str, fingerprint: str) -> str:
    """Where an output lives on a store: ``<stage>/<fingerprint>``."""
    return f"{stage}/{fingerprint}"


def store_partial_rel(stage: str, fingerprint: str) -> str:
    """Where a resumable build keeps its finished parts on a store: ``<stage>/.<fingerprint>.partial``."""
    return f"{stage}/.{fingerprint}{PARTIAL_SUFFIX}"


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """A manifest as written to disk (the same bytes locally and on a store)."""
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


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
        import threading

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
        import tempfile

        with self._lock:
            changed = []
            for file in sorted(_visible_files(self.local)):
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
            manifest = _parse_store_manifest(store, rel, store.read_bytes(f"{rel}/{MANIFEST_NAME}"))
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
    lock = _acquire_build_lock(final)
    try:
        if store_output_complete(store, rel):
            raise StageAlreadyComplete(f"{store.url_of(rel)} was published by another process "
                                       "while this one waited for its build lock")
        if final.exists():   # a local copy of an output since removed from the store
            shutil.rmtree(final)
        partial = _prepare_partial(final, resumable)
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
            _write_json_atomic(partial / MANIFEST_NAME, manifest)
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
        manifest = _parse_store_manifest(store, rel, raw)
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


def _parse_store_manifest(store: Store, rel: str, raw: bytes) -> dict:
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise InputError(f"manifest is not valid JSON ({exc})", store.url_of(f"{rel}/{MANIFEST_NAME}")) from None
    recorded = manifest.get(MANIFEST_CHECKSUM_KEY)
    if recorded is not None and recorded != manifest_checksum(manifest):
        raise InputError("manifest.json differs from its own checksum (edited or corrupt)",
                         store.url_of(f"{rel}/{MANIFEST_NAME}"))
    return manifest


def store_output_problems(store: Store, rel: str, checksums: bool = True,
                          hash_parquet: bool = True) -> list[tuple[str, str]]:
    """:func:`output_problems` for an output on a store: ``(object URL, problem)`` pairs.

    Sizes come from one listing; ``checksums`` streams every listed object through sha256
    (Parquet files only with ``hash_parquet``: the teacher cache's are checked by page CRC as
    the reader reads them)."""
    try:
        raw = store.read_bytes(f"{rel}/{MANIFEST_NAME}")
    except FileNotFoundError:
        return [(store.url_of(rel), "no manifest.json (not a completed stage output)")]
    try:
        manifest = _parse_store_manifest(store, rel, raw)
    except InputError as exc:
        return [(exc.path, exc.problem)]
    listed = manifest.get("files", {})
    present = store.list_files(rel)
    problems = []
    for name, expected in sorted(listed.items()):
        url = store.url_of(f"{rel}/{name}")
        if name not in present:
            problems.append((url, "missing (listed in the manifest)"))
        elif present[name].size != expected["bytes"]:
            problems.append((url, f"{present[name].size} bytes, the manifest says {expected['bytes']}"))
        elif checksums and (hash_parquet or not name.endswith(".parquet")) \
                and store.sha256(f"{rel}/{name}") != expected["sha256"]:
            problems.append((url, "content differs from the manifest (sha256)"))
    if listed:
        for name in sorted(present):
            if name != MANIFEST_NAME and name not in listed \
                    and not any(part.startswith(".") for part in name.split("/")):
                problems.append((store.url_of(f"{rel}/{name}"), "not listed in the manifest (a stray file)"))
    return problems


def verify_store_upstream(store: Store, rel: str, *, hash_parquet: bool = True) -> None:
    """:func:`verify_upstream` for an output a stage reads straight from the store."""
    problems = store_output_problems(store, rel, checksums=True, hash_parquet=hash_parquet)
    if problems:
        where, problem = problems[0]
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise InputError(f"upstream output is damaged: {problem}{more}; remove {store.url_of(rel)} "
                         "to rebuild it", where)


def _write_json_atomic(path: Path, value: Any) -> None:
    write_file_atomic(path, lambda tmp: tmp.write_text(
        json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"))


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


def without_run_history(value: Any) -> Any:
    """``value`` (parsed JSON) without the keys of :data:`RUN_HISTORY_INFO_KEYS`, at any depth."""
    if isinstance(value, dict):
        return {k: without_run_history(v) for k, v in value.items() if k not in RUN_HISTORY_INFO_KEYS}
    if isinstance(value, list):
        return [without_run_history(v) for v in value]
    return value


def manifest_content(manifest: Mapping[str, Any]) -> dict:
    """What a manifest says about the output's content: equal for a fresh, a resumed and a
    concurrent build of one fingerprint. Drops the run-history sections and keys, and the
    checksums of :data:`RUN_HISTORY_FILES` (compare those files with :func:`without_run_history`)."""
    content = {k: v for k, v in manifest.items() if k not in RUN_HISTORY_FIELDS}
    content["info"] = without_run_history(content.get("info", {}))
    content["files"] = {rel: entry for rel, entry in content.get("files", {}).items()
                        if Path(rel).name not in RUN_HISTORY_FILES}
    return content


def load_manifest(output_dir: Path | str) -> dict:
    path = Path(output_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest; not a completed stage output") from None
    except ValueError as exc:
        raise ValueError(f"{path}: manifest is not valid JSON ({exc})") from None


def output_problems(output_dir: Path | str, checksums: bool = True,
                    hash_parquet: bool = True) -> list[tuple[Path, str]]:
    """``(file, problem)`` for every way ``output_dir`` differs from its manifest (empty: OK).

    Every listed file must exist with its recorded size, and no unlisted visible file may sit
    beside them (readers glob ``shards/part-*``: a stray file would be read). ``checksums``
    also re-hashes each file (sha256), except Parquet files when ``hash_parquet`` is off:
    those carry page CRCs that their reader verifies on every read.
    """
    output_dir = Path(output_dir)
    manifest = load_manifest(output_dir)
    listed = manifest.get("files", {})
    problems = []
    if checksums and MANIFEST_CHECKSUM_KEY in manifest \
            and manifest[MANIFEST_CHECKSUM_KEY] != manifest_checksum(manifest):
        problems.append((output_dir / MANIFEST_NAME, "content differs from its own checksum"))
    for rel, expected in listed.items():
        file = output_dir / rel
        if not file.is_file():
            problems.append((file, "missing (listed in the manifest)"))
        elif file.stat().st_size != expected["bytes"]:
            problems.append((file, f"{file.stat().st_size} bytes, the manifest says {expected['bytes']}"))
        elif checksums and (hash_parquet or file.suffix != ".parquet") \
                and sha256_file(file) != expected["sha256"]:
            problems.append((file, "content differs from the manifest (sha256)"))
    if listed:  # outputs written before per-file checksums list nothing to compare with
        for file in sorted(_visible_files(output_dir)):
            rel = file.relative_to(output_dir).as_posix()
            if rel != MANIFEST_NAME and rel not in listed:
                problems.append((file, "not listed in the manifest (a stray file)"))
    return problems


def verify_outputs(output_dir: Path | str, checksums: bool = True) -> list[str]:
    """Re-checksum every file listed in the manifest; return a list of problems (empty: OK)."""
    return [f"{file}: {problem}" for file, problem in output_problems(output_dir, checksums)]


def verify_upstream(output_dir: Path | str, *, hash_parquet: bool = True) -> None:
    """Check an upstream output against its manifest before reading it; raise on any damage.

    Raises :class:`~pipeline.errors.InputError` naming the first damaged file (and how many
    more there are), so that a stage never turns a corrupt upstream file into an output of
    its own under the same fingerprints.
    """
    output_dir = Path(output_dir)
    if not (output_dir / MANIFEST_NAME).is_file():
        raise InputError("upstream output has no manifest.json (not a completed stage output)",
                         output_dir)
    try:
        problems = output_problems(output_dir, checksums=True, hash_parquet=hash_parquet)
    except ValueError as exc:   # an unreadable manifest
        raise InputError(str(exc), output_dir / MANIFEST_NAME) from None
    if problems:
        file, problem = problems[0]
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise InputError(f"upstream output is damaged: {problem}{more}; remove {output_dir} "
                         "to rebuild it", file)


def existing_outputs(workdir: Path | str, stage: str) -> list[Path]:
    """Completed outputs of ``stage``, newest first (by manifest modification time)."""
    root = Path(workdir) / stage
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
             and (d / MANIFEST_NAME).exists()]
    return sorted(found, key=lambda d: (d / MANIFEST_NAME).stat().st_mtime, reverse=True)


@dataclass
class StageStatus:
    stage: str
    fingerprint: str
    output_dir: Path
    up_to_date: bool
    reasons: list[str]
    #: The output exists but a file is missing, resized or unlisted: readers will refuse it.
    broken: bool = False


def explain_key(workdir: Path | str, key: StageKey, hasher: FileHasher | None = None,
                upstream_names: Mapping[str, str] | None = None, task: str | None = None,
                store: Store | None = None) -> StageStatus:
    """Say whether ``key``'s output exists and, if not, how it differs from the closest output.

    The comparison is with :func:`closest_output` (same task, most of the key in common), not
    with the newest output of the stage: the newest may be another task's, and "input file
    dev (…/CoLA/dev.tsv) content changed" says nothing about why RTE's stage will run.
    With a ``store`` the outputs are those on the store (``workdir`` is the local scratch).
    """
    hasher = hasher or FileHasher(Path(workdir) / ".hash-cache.json")
    if store is not None:
        return _explain_on_store(store, key, hasher, upstream_names or {}, task)
    fingerprint = key.fingerprint(hasher)
    final = Path(workdir) / key.stage / fingerprint
    if (final / MANIFEST_NAME).exists():
        try:   # sizes only: explain stays well under the no-op rerun's 2 s
            problems = [f"{file}: {problem}" for file, problem in output_problems(final, checksums=False)]
        except ValueError as exc:
            problems = [str(exc)]
        if problems:
            return StageStatus(key.stage, fingerprint, final, False,
                               problems + [f"remove {final} to rebuild it"], broken=True)
        return StageStatus(key.stage, fingerprint, final, True, [])
    previous = existing_outputs(workdir, key.stage)
    if not previous:
        return StageStatus(key.stage, fingerprint, final, False, ["no earlier output of this stage"])
    document = key.document(hasher)
    closest = closest_output(previous, document, task)
    if closest is None:
        others = sorted({manifest_task(load_manifest(p)) or "?" for p in previous})
        return StageStatus(key.stage, fingerprint, final, False,
                           [f"no earlier output of this stage for task {task} (earlier outputs: "
                            f"{len(previous)} of task(s) {', '.join(others)})"])
    path, old, in_common = closest
    reasons = _reasons_against_closest(document, old, in_common, path.name, upstream_names or {}, task)
    return StageStatus(key.stage, fingerprint, final, False, reasons)


def existing_store_outputs(store: Store, stage: str) -> list[str]:
    """Completed outputs of ``stage`` on a store (``<stage>/<fingerprint>``), newest first."""
    manifests = []
    for name, info in store.list_files(stage).items():
        parts = name.split("/")
        if len(parts) == 2 and parts[1] == MANIFEST_NAME and not parts[0].startswith("."):
            manifests.append((info.mtime_ns or 0, f"{stage}/{parts[0]}"))
    return [rel for _, rel in sorted(manifests, reverse=True)]


def load_store_manifest(store: Store, rel: str) -> dict:
    try:
        return json.loads(store.read_bytes(f"{rel}/{MANIFEST_NAME}"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{store.url_of(rel)}: no manifest; not a completed stage output") from None
    except ValueError as exc:
        raise ValueError(f"{store.url_of(rel)}/{MANIFEST_NAME}: manifest is not valid JSON ({exc})") from None


def _explain_on_store(store: Store, key: StageKey, hasher: FileHasher,
                      upstream_names: Mapping[str, str], task: str | None) -> StageStatus:
    fingerprint = key.fingerprint(hasher)
    rel = store_output_rel(key.stage, fingerprint)
    final = store.url_of(rel)
    if store.exists(f"{rel}/{MANIFEST_NAME}"):
        problems = [f"{where}: {problem}"   # sizes only, from one listing
                    for where, problem in store_output_problems(store, rel, checksums=False)]
        if problems:   # counted as incomplete on a store (store_output_complete): rebuilt
            return StageStatus(key.stage, fingerprint, final, False,
                               problems + ["damaged: the next run rebuilds it"], broken=True)
        return StageStatus(key.stage, fingerprint, final, True, [])
    previous = existing_store_outputs(store, key.stage)
    if not previous:
        return StageStatus(key.stage, fingerprint, final, False, ["no earlier output of this stage"])
    document = key.document(hasher)
    closest = closest_output(previous, document, task, load=lambda r: load_store_manifest(store, r))
    if closest is None:
        return StageStatus(key.stage, fingerprint, final, False,
                           [f"no earlier output of this stage for task {task} ({len(previous)} "
                            "earlier output(s) of other tasks)"])
    path, old, in_common = closest
    reasons = _reasons_against_closest(document, old, in_common, path.rsplit("/", 1)[-1],
                                       upstream_names, task)
    return StageStatus(key.stage, fingerprint, final, False, reasons)


def _reasons_against_closest(document: dict, old: dict, in_common: tuple[int, int], name: str,
                             upstream_names: Mapping[str, str], task: str | None) -> list[str]:
    """Why a stale output differs from ``name``, the closest earlier output (local or on a store)."""
    reasons = diff_against_manifest(document, old, upstream_names)
    if not reasons:
        reasons = ["same key as that output but another fingerprint (contract changed)"]
    same_task = f"same task {task}; " if task and manifest_task(old) == task else ""
    header = (f"compared with {name}, the closest earlier output ({same_task}"
              f"{in_common[0]} of {in_common[1]} settings in common):")
    return [header] + [f"  {r}" for r in reasons]


def manifest_task(manifest: Mapping[str, Any]) -> str | None:
    """The task a manifest's output was built for (its ``task`` parameter or info), if recorded."""
    task = (manifest.get("params") or {}).get("task") or (manifest.get("info") or {}).get("task")
    return str(task) if task else None


def _settings(document_or_manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting of a key, flattened: parameters, upstream fingerprints, input hashes."""
    settings = {f"param:{k}": v for k, v in (document_or_manifest.get("params") or {}).items()}
    settings.update({f"upstream:{k}": v for k, v in (document_or_manifest.get("upstream") or {}).items()})
    for label, value in (document_or_manifest.get("inputs") or {}).items():
        settings[f"input:{label}"] = value.get("sha256") if isinstance(value, Mapping) else value
    return settings


def closest_output(outputs: list, document: Mapping[str, Any], task: str | None = None,
                   load=load_manifest) -> tuple[Path, dict, tuple[int, int]] | None:
    """The earlier output most like ``document``: ``(path, manifest, (settings in common, of))``.

    Outputs of the same task come first (those whose task is not recorded next; another
    task's never, so None when only other tasks' exist), then the most settings in common
    (parameters, upstream fingerprints, input hashes), then the newest (``outputs`` is newest
    first).
    """
    wanted = _settings(document)
    best = None
    for order, path in enumerate(outputs):
        try:
            manifest = load(path)
        except (FileNotFoundError, ValueError):
            continue
        recorded = manifest_task(manifest)
        if task and recorded and recorded != task:
            continue
        theirs = _settings(manifest)
        common = sum(1 for name, value in wanted.items() if name in theirs and theirs[name] == value)
        rank = (bool(task) and recorded == task, common, -order)
        if best is None or rank > best[0]:
            best = (rank, path, manifest, (common, len(set(wanted) | set(theirs))))
    return None if best is None else best[1:]


def diff_against_manifest(document: dict, manifest: dict, upstream_names: Mapping[str, str]) -> list[str]:
    reasons = []
    if str(manifest.get("version")) != document["version"]:
        reasons.append(f"stage version {manifest.get('version')} -> {document['version']}")
    old_params, new_params = manifest.get("params", {}), document["params"]
    for name in sorted(set(old_params) | set(new_params)):
        if old_params.get(name, "<absent>") != new_params.get(name, "<absent>"):
            reasons.append(f"parameter {name}: {old_params.get(name, '<absent>')!r} -> "
                           f"{new_params.get(name, '<absent>')!r}")
    old_up, new_up = manifest.get("upstream", {}), document["upstream"]
    for label in sorted(set(old_up) | set(new_up)):
        if old_up.get(label) != new_up.get(label):
            name = upstream_names.get(label, label)
            reasons.append(f"upstream {name} changed ({old_up.get(label)} -> {new_up.get(label)})")
    old_inputs = {k: v.get("sha256") for k, v in manifest.get("inputs", {}).items()}
    for label in sorted(set(old_inputs) | set(document["inputs"])):
        if old_inputs.get(label) != document["inputs"].get(label):
            path = manifest.get("inputs", {}).get(label, {}).get("path", label)
            reasons.append(f"input file {label} ({path}) content changed")
    return reasons


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------------
# Garbage collection: what under a workdir no configuration references, and what is safe to go
# --------------------------------------------------------------------------------------------

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
    from pipeline.locks import LOCK_SUFFIX

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
    when = f" since {_iso(since)}" if isinstance(since, (int, float)) else ""
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
    from pipeline.locks import lock_holder, lock_path

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
    from pipeline.locks import lock_holder

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
