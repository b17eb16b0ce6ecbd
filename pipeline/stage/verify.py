"""Checking an output against its manifest before anything reads it.

A stage output is only as good as its files. Before a stage reads an upstream output,
:func:`verify_upstream` (or :func:`verify_store_upstream` on a store) checks every file the
upstream manifest lists: present, at its recorded size, and with its sha256 -- unless the
upstream stage opts out because its files are large and checked as they are read (the teacher
cache's Parquet files carry page CRCs). No unlisted file may sit beside them either (readers
glob ``shards/part-*``: a stray file would be read). A truncated, deleted or flipped file then
fails the reader with one error naming it, instead of becoming a different result under the
same fingerprints. ``tinykd inspect --verify`` and ``explain`` use the same checks.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import InputError
from pipeline.stage.hashing import sha256_file, visible_files
from pipeline.stage.manifest import MANIFEST_CHECKSUM_KEY, MANIFEST_NAME, load_manifest, manifest_checksum
from pipeline.store import Store


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
        for file in sorted(visible_files(output_dir)):
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


def parse_store_manifest(store: Store, rel: str, raw: bytes) -> dict:
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
        manifest = parse_store_manifest(store, rel, raw)
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
