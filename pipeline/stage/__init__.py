"""Content-addressed stage outputs: the one contract every stage of the DAG uses.

Luigi calls a task complete when its output exists and never looks further, so a rerun after a
parameter change would silently reuse stale data. We follow gokart and HF datasets: the output
*path* is derived from everything that determines the output's content, so "complete" keeps
meaning "exists", yet a changed input points to a new directory. Each output lives in
``<workdir>/<stage>/<fingerprint>/``, is built out of sight and published whole, carries a
manifest that says what it is, and is checked against that manifest before anything reads it.

One module per concern, in the order a build meets them:

* :mod:`~pipeline.stage.hashing` -- content hashes of input files, with a (size, mtime) cache
  so that a no-op rerun does not re-read gigabytes;
* :mod:`~pipeline.stage.fingerprint` -- :class:`StageKey`: stage, version, significant
  parameters, upstream fingerprints, input hashes -> the output's name;
* :mod:`~pipeline.stage.manifest` -- what an output records about itself, and which of it is
  run history (timings, pids) rather than content;
* :mod:`~pipeline.stage.partial` -- the build lock, the hidden partial directory, atomic writes
  of the pieces of resumable stages;
* :mod:`~pipeline.stage.build` -- :func:`build_stage`, the context manager a stage builds in;
* :mod:`~pipeline.stage.memory` -- a stage's peak memory for its run history, and the memory it
  freed given back before the next stage of the same process;
* :mod:`~pipeline.stage.on_store`, :mod:`~pipeline.stage.sync` -- the same contract on object
  storage (upload, manifest last; finished pieces copied to the store while a build runs);
* :mod:`~pipeline.stage.verify` -- an output checked against its manifest before it is read;
* :mod:`~pipeline.stage.explain` -- why a stage will run (the closest earlier output, diffed);
* :mod:`~pipeline.stage.garbage` -- what ``tinykd gc`` may delete.

Every public name is importable from ``pipeline.stage`` itself, which is how the rest of the
project imports them.
"""
from pipeline.stage.hashing import (FileHasher, sha256_file)
from pipeline.stage.fingerprint import (CONTRACT_VERSION, FINGERPRINT_LENGTH, canonical_json, StageKey)
from pipeline.stage.manifest import (MANIFEST_CHECKSUM_KEY, MANIFEST_NAME, RECORDED_LIBRARIES,
                                     RUN_HISTORY_DIRS, RUN_HISTORY_FIELDS, RUN_HISTORY_FILES, RUN_HISTORY_INFO_KEYS,
                                     library_versions, load_manifest, manifest_bytes, manifest_checksum,
                                     manifest_content, StageBuild, without_run_history)
from pipeline.stage.partial import (PARTIAL_SUFFIX, partial_dir, remove_stale_temporaries,
                                    StageAlreadyComplete, temporary_name, write_file_atomic)
from pipeline.stage.verify import (output_problems, store_output_problems, verify_outputs,
                                   verify_store_upstream, verify_upstream)
from pipeline.stage.sync import PartialSync
from pipeline.stage.on_store import (build_stage_on_store, fetch_output, store_output_complete,
                                     store_output_rel, store_partial_rel, upload_output)
from pipeline.stage.build import build_stage
from pipeline.stage.memory import measured as measured_memory, release_memory
from pipeline.stage.explain import (closest_output, diff_against_manifest, existing_outputs,
                                    existing_store_outputs, explain_key, load_store_manifest, manifest_task,
                                    StageStatus)
from pipeline.stage.garbage import (UNLOCKED_PARTIAL_GRACE_SECONDS, delete_entry, directory_bytes, gc_plan,
                                    GcDecision, human_age, store_workdir_entries, workdir_entries,
                                    WorkdirEntry)

__all__ = [
    "FileHasher", "sha256_file", "CONTRACT_VERSION", "FINGERPRINT_LENGTH", "canonical_json", "StageKey",
    "MANIFEST_CHECKSUM_KEY", "MANIFEST_NAME", "RECORDED_LIBRARIES", "RUN_HISTORY_DIRS", "RUN_HISTORY_FIELDS",
    "RUN_HISTORY_FILES", "RUN_HISTORY_INFO_KEYS", "library_versions", "load_manifest", "manifest_bytes",
    "manifest_checksum", "manifest_content", "StageBuild", "without_run_history", "PARTIAL_SUFFIX",
    "partial_dir", "remove_stale_temporaries", "StageAlreadyComplete", "temporary_name",
    "write_file_atomic", "output_problems", "store_output_problems", "verify_outputs",
    "verify_store_upstream", "verify_upstream", "PartialSync", "build_stage_on_store", "fetch_output",
    "store_output_complete", "store_output_rel", "store_partial_rel", "upload_output", "build_stage",
    "measured_memory", "release_memory",
    "closest_output", "diff_against_manifest", "existing_outputs", "existing_store_outputs",
    "explain_key", "load_store_manifest", "manifest_task", "StageStatus",
    "UNLOCKED_PARTIAL_GRACE_SECONDS", "delete_entry", "directory_bytes", "gc_plan", "GcDecision",
    "human_age", "store_workdir_entries", "workdir_entries", "WorkdirEntry"
]
