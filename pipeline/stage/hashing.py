"""Content hashes of a stage's input files, cheap enough to take on every rerun.

A fingerprint covers the *bytes* a stage reads (a GLUE directory, a GloVe file, a corpus), not
their paths: the same file elsewhere is the same input, an edited one is a new input. Reading
gigabytes on every ``tinykd run`` would break the "no-op rerun in under two seconds" goal, so
:class:`FileHasher` remembers each file's sha256 under its ``(path, size, mtime_ns)`` in a small
JSON cache (``<workdir>/.hash-cache.json``): an unchanged file is not re-read, a touched or
edited one is. The cache is advisory -- an entry is used only when all three still match, so
a corrupt or concurrently rewritten cache costs a re-hash, never a wrong answer. A directory
hashes as the list of its visible files (relative path + content hash); hidden entries such as
``.git`` or editor swap files are not part of an input. An input on a store (a URL) hashes
with the store's size + modification time as the fast path.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from pipeline.store import is_url, open_store


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
        for file in sorted(visible_files(path)):
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


def visible_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name
