"""Stage fingerprints: the name of an output is a hash of everything that decides its content.

Luigi calls a task complete when its output exists and never looks further, so a rerun after
a parameter change would silently reuse stale data. We follow gokart and HF datasets: the
output *path* is derived from everything that determines the output's content, so "complete"
keeps meaning "exists", yet a changed input points to a new directory.

A :class:`StageKey` holds the stage name and an explicit, hand-bumped stage ``version`` (bump
it when the code that writes the output changes what it writes), the stage's *significant*
parameters (execution details such as thread counts are left out), the fingerprints of every
upstream stage (so a change propagates down the DAG) and the content hash of every input file
or directory the stage reads directly (:mod:`pipeline.stage.hashing`). Its fingerprint is the
sha256 of that document as canonical JSON (sorted keys, no whitespace, normalised types), cut
to :data:`FINGERPRINT_LENGTH` hex digits; the output lives in
``<workdir>/<stage>/<fingerprint>/``.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pipeline.stage.hashing import FileHasher


#: Bump when the fingerprint recipe or the manifest layout itself changes.
CONTRACT_VERSION = 1

FINGERPRINT_LENGTH = 16


def canonical_json(value: Any) -> str:
    """Serialise ``value`` deterministically (sorted keys, no whitespace, normalised types)."""
    return json.dumps(jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(jsonable(v) for v in value)
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
            "params": jsonable(dict(self.params)),
            "upstream": dict(sorted(self.upstream.items())),
            # Paths are not part of identity: the same bytes elsewhere are the same input.
            "inputs": {label: d["sha256"] for label, d in self.input_hashes(hasher).items()},
        }

    def fingerprint(self, hasher: FileHasher | None = None) -> str:
        blob = canonical_json(self.document(hasher)).encode()
        return hashlib.sha256(blob).hexdigest()[:FINGERPRINT_LENGTH]

    def output_dir(self, workdir: Path | str, hasher: FileHasher | None = None) -> Path:
        return Path(workdir) / self.stage / self.fingerprint(hasher)
