"""The manifest: what an output is, how it was made, and how to check it.

Every output carries a ``manifest.json``, written last: the key it was built from (parameters,
upstream fingerprints, input hashes), row counts and stage-specific ``info``, the size and
sha256 of every file, library versions, timings and the host. The manifest also checksums
itself, so a flipped byte in a row count is as detectable as one in a data file.

Some fields describe one *run* rather than the output's content -- the clock, the process,
how a resumed build got there (:data:`RUN_HISTORY_FIELDS`, :data:`RUN_HISTORY_INFO_KEYS`). A
resumed or concurrent build equals an uninterrupted one in everything else, which is what
:func:`manifest_content` compares (the tests and ``scripts/soak.py`` rely on it).
:class:`StageBuild` is the handle a stage's build function writes into; it produces the
manifest when the build succeeds.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline.stage.fingerprint import CONTRACT_VERSION, StageKey, canonical_json, jsonable
from pipeline.stage.hashing import FileHasher, sha256_file, visible_files


MANIFEST_NAME = "manifest.json"

#: The manifest's checksum of itself (absent from manifests written before it existed).
MANIFEST_CHECKSUM_KEY = "manifest_sha256"

#: Libraries whose versions are recorded in every manifest (recorded, not fingerprinted:
#: upgrading numpy should not invalidate a week of teacher caching).
RECORDED_LIBRARIES = ("torch", "transformers", "datasets", "pyarrow", "luigi", "numpy",
                      "bicleaner-ai-glove", "tqdm")

#: Manifest fields that describe one run rather than the output's content: the clock, the
#: machine and process, and how a resumed build got there. A resumed or concurrent build
#: equals an uninterrupted one in everything else (tests and scripts/soak.py compare so).
#: ``timings`` and ``host`` are top-level sections; the others are keys inside ``info``.
RUN_HISTORY_FIELDS = ("timings", "host", "libraries", "manifest_sha256")

RUN_HISTORY_INFO_KEYS = ("worker_pid", "shards_resumed", "resumed_from", "train_seconds",
                         "data_wait_share", "startup_wait_share", "mlm_forward_seconds",
                         "seconds", "data_wait_s", "step_s", "torch_threads",
                         # where and how wide a training stage ran: its device lease and rank
                         # count (the result does not depend on them), and its throughput
                         "device_lease", "nproc", "examples_per_s",
                         # deployment timings (distill.speed, pipeline.deploy): latency,
                         # throughput and speed-ups, all under "speed" keys
                         "speed",
                         # the build's peak and end RSS (pipeline.stage.memory)
                         "memory")

#: Files whose content holds such fields (the distillation stages' logs: per-step wait and
#: step times, the run's timings); compared field by field without them.
RUN_HISTORY_FILES = ("metrics.json", "metrics.jsonl")
#: Directories of a stage output that hold run history only: the training stages' TensorBoard
#: event files (``tb/``: wall-clock stamps, host names in the file names, the values of
#: metrics.jsonl). Their checksums are not content.
RUN_HISTORY_DIRS = ("tb",)


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
        self._cpu_started = time.process_time()

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 4)

    def manifest(self, started: float, finished: float) -> dict:
        files = {}
        for file in sorted(visible_files(self.path)):
            rel = file.relative_to(self.path).as_posix()
            if rel == MANIFEST_NAME:
                continue
            files[rel] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
        manifest = {
            "stage": self.key.stage,
            "version": str(self.key.version),
            "fingerprint": self.fingerprint,
            "contract": CONTRACT_VERSION,
            "params": jsonable(dict(self.key.params)),
            "upstream": dict(sorted(self.key.upstream.items())),
            "inputs": self.key.input_hashes(self._hasher),
            "libraries": library_versions(),
            "rows": self.rows,
            "info": jsonable(self.info),
            "files": files,
            "timings": {
                "started": iso_time(started),
                "finished": iso_time(finished),
                "seconds": round(finished - started, 3),
                # CPU seconds of this process (all its threads) while the stage built: with
                # "seconds" and host.device, what the GLUE table's compute column reports
                "cpu_seconds": round(time.process_time() - self._cpu_started, 3),
                **self.timings,
            },
            "host": {"platform": platform.platform(), "argv": sys.argv[:1], "device": compute_device(),
                     "cpu_count": os.cpu_count()},
        }
        manifest[MANIFEST_CHECKSUM_KEY] = manifest_checksum(manifest)
        return manifest


def compute_device() -> str:
    """The accelerator this process used, for the run history: the CUDA device's name when
    torch is loaded and CUDA was initialised (never imported here: a torch-free stage is a
    CPU stage), else ``"cpu"``."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return f"cuda:{torch.cuda.get_device_name()}"
    except Exception:   # a broken CUDA setup must not fail a finished build
        pass
    return "cpu"


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own checksum field: a flipped
    byte in manifest.json (a row count, an info value) is then as detectable as one in a file."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM_KEY}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def iso_time(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """A manifest as written to disk (the same bytes locally and on a store)."""
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


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
    checksums of :data:`RUN_HISTORY_FILES` (compare those files with :func:`without_run_history`)
    and of the files under :data:`RUN_HISTORY_DIRS`."""
    content = {k: v for k, v in manifest.items() if k not in RUN_HISTORY_FIELDS}
    content["info"] = without_run_history(content.get("info", {}))
    content["files"] = {rel: entry for rel, entry in content.get("files", {}).items()
                        if Path(rel).name not in RUN_HISTORY_FILES
                        and Path(rel).parts[0] not in RUN_HISTORY_DIRS}
    return content


def load_manifest(output_dir: Path | str) -> dict:
    path = Path(output_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest; not a completed stage output") from None
    except ValueError as exc:
        raise ValueError(f"{path}: manifest is not valid JSON ({exc})") from None
