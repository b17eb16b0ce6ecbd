"""Why a stage will run: a key compared with the closest output built before.

``tinykd explain`` walks the DAG and, for each stage whose output does not exist, says what
changed. Comparing with the *newest* output of the stage would mislead ("input file dev
(…/CoLA/dev.tsv) content changed" says nothing about why RTE's stage will run), so
:func:`closest_output` picks the earlier output of the same task with the most settings in
common (parameters, upstream fingerprints, input hashes), and :func:`diff_against_manifest`
lists the settings that differ. An existing output whose files no longer match its manifest
is reported as broken, with the command that rebuilds it. The checks use sizes only, which
keeps ``explain`` well under the no-op rerun's two seconds; outputs on a store are listed
with one request per stage.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipeline.stage.fingerprint import StageKey
from pipeline.stage.hashing import FileHasher
from pipeline.stage.manifest import MANIFEST_NAME, load_manifest
from pipeline.stage.on_store import store_output_rel
from pipeline.stage.verify import output_problems, store_output_problems
from pipeline.store import Store


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
