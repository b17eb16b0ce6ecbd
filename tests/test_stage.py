"""The stage contract: fingerprints, atomic outputs, manifests, explain and gc."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import luigi
import pytest

from pipeline.stage import (FileHasher, StageKey, build_stage, existing_outputs, load_manifest,
                            verify_outputs)
from tasks.base import StageTask, walk_dag


class Source(StageTask):
    """Reads one input file; ``scale`` is significant, ``threads`` is not."""

    stage_name = "test_source"
    path = luigi.Parameter(description="input text file")
    scale = luigi.IntParameter(default=1, description="multiplier (significant)")
    threads = luigi.IntParameter(default=1, significant=False, description="execution detail")

    def stage_inputs(self):
        return {"text": self.path}

    def build(self, out):
        lines = Path(self.path).read_text().splitlines()
        (out.path / "lines.txt").write_text("\n".join(line * self.scale for line in lines))
        out.rows["lines"] = len(lines)


class Consumer(StageTask):
    stage_name = "test_consumer"
    path = luigi.Parameter(description="input text file")
    scale = luigi.IntParameter(default=1, description="passed upstream")
    fail_halfway = luigi.BoolParameter(default=False, significant=False, description="test hook")

    def requires(self):
        return {"source": Source(path=self.path, scale=self.scale)}

    def build(self, out):
        text = (self.upstream_dir("source") / "lines.txt").read_text()
        (out.path / "upper.txt").write_text(text.upper())
        if self.fail_halfway:
            raise RuntimeError("simulated crash half-way")
        out.rows["chars"] = len(text)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("alpha\nbeta\n")
    return path


def _fresh(task_cls, **kwargs):
    luigi.task_register.Register.clear_instance_cache()
    return task_cls(**kwargs)


def test_significant_parameter_changes_fingerprint_insignificant_does_not(text_file):
    base = _fresh(Source, path=str(text_file)).fingerprint()
    assert _fresh(Source, path=str(text_file), threads=8).fingerprint() == base
    assert _fresh(Source, path=str(text_file), scale=2).fingerprint() != base


def test_upstream_change_propagates(text_file):
    base = _fresh(Consumer, path=str(text_file)).fingerprint()
    changed = _fresh(Consumer, path=str(text_file), scale=3)
    assert changed.fingerprint() != base
    # The consumer's own parameters are identical apart from the one passed upstream.
    assert changed.upstream_tasks()["source"].fingerprint() != _fresh(Source, path=str(text_file)).fingerprint()


def test_one_byte_edit_of_an_input_changes_fingerprint(text_file):
    base = _fresh(Source, path=str(text_file)).fingerprint()
    text_file.write_bytes(text_file.read_bytes().replace(b"alpha", b"alphb"))
    assert _fresh(Source, path=str(text_file)).fingerprint() != base


def test_same_size_edit_within_same_mtime_is_caught_after_touch(tmp_path, text_file):
    """The fast path trusts (size, mtime); an edit keeping both is invisible until touched."""
    hasher = FileHasher(tmp_path / "cache.json")
    first = hasher.describe(text_file)["sha256"]
    stat = text_file.stat()
    text_file.write_text("alphb\nbeta\n")
    os.utime(text_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert hasher.describe(text_file)["sha256"] == first  # documented limitation of the fast path
    os.utime(text_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert hasher.describe(text_file)["sha256"] != first


def test_hash_cache_persists_and_skips_rehash(tmp_path, text_file, monkeypatch):
    cache = tmp_path / "cache.json"
    first = FileHasher(cache)
    digest = first.describe(text_file)["sha256"]
    first.save()
    import pipeline.stage as stage

    monkeypatch.setattr(stage.hashing, "sha256_file", lambda path: pytest.fail("re-hashed an unchanged file"))
    assert FileHasher(cache).describe(text_file)["sha256"] == digest


def test_directory_input_hash_covers_every_file(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "weights.bin").write_bytes(b"\x00" * 10)
    before = FileHasher().describe(folder)["sha256"]
    (folder / "weights.bin").write_bytes(b"\x00" * 9 + b"\x01")
    assert FileHasher().describe(folder)["sha256"] != before


def test_run_writes_manifest_and_second_run_is_noop(text_file, isolated_workdir):
    assert luigi.build([Consumer(path=str(text_file))], local_scheduler=True, log_level="ERROR")
    out = Consumer(path=str(text_file)).output_dir()
    manifest = load_manifest(out)
    assert manifest["fingerprint"] == out.name
    assert manifest["upstream"]["source"] == Source(path=str(text_file)).fingerprint()
    assert manifest["files"]["upper.txt"]["bytes"] == len("ALPHA\nBETA")
    assert manifest["rows"] == {"chars": len("alpha\nbeta")}
    assert "luigi" in manifest["libraries"] and manifest["timings"]["seconds"] >= 0
    src_manifest = load_manifest(Source(path=str(text_file)).output_dir())
    assert src_manifest["inputs"]["text"]["path"] == str(text_file)
    assert verify_outputs(out) == []

    mtime = (out / "manifest.json").stat().st_mtime_ns
    luigi.task_register.Register.clear_instance_cache()
    result = luigi.build([Consumer(path=str(text_file))], local_scheduler=True,
                         log_level="ERROR", detailed_summary=True)
    assert result.scheduling_succeeded
    summary = luigi.execution_summary._summary_dict(result.worker)
    assert summary["completed"] == set()
    assert {type(t).__name__ for t in summary["already_done"]} == {"Consumer"}
    assert (out / "manifest.json").stat().st_mtime_ns == mtime


def test_failure_half_way_leaves_no_output(text_file, isolated_workdir):
    ok = luigi.build([Consumer(path=str(text_file), fail_halfway=True)], local_scheduler=True,
                     log_level="CRITICAL")
    assert not ok
    stage_root = isolated_workdir / "test_consumer"
    # (the build's lock file stays: pipeline/locks.py says why; it names no holder now)
    leftovers = [p for p in stage_root.iterdir() if p.suffix != ".lock"] if stage_root.exists() else []
    assert leftovers == []
    # The upstream stage completed before the failure and stays valid.
    assert existing_outputs(isolated_workdir, "test_source")


def test_verify_detects_a_changed_file(text_file):
    assert luigi.build([Source(path=str(text_file))], local_scheduler=True, log_level="ERROR")
    out = Source(path=str(text_file)).output_dir()
    (out / "lines.txt").write_text("tampered")
    assert any("lines.txt" in p for p in verify_outputs(out))


def test_resumable_build_keeps_partial_dir_on_failure(tmp_path):
    key = StageKey("resumable", "1", {"a": 1})
    with pytest.raises(RuntimeError):
        with build_stage(tmp_path, key, resumable=True) as out:
            (out.path / "piece-0").write_text("done")
            raise RuntimeError("killed")
    with build_stage(tmp_path, key, resumable=True) as out:
        assert (out.path / "piece-0").read_text() == "done"
    assert (tmp_path / "resumable" / key.fingerprint() / "piece-0").exists()


def test_explain_names_changed_parameter_and_input(text_file, isolated_workdir):
    assert luigi.build([Consumer(path=str(text_file))], local_scheduler=True, log_level="ERROR")
    status = _fresh(Consumer, path=str(text_file)).explain()
    assert status.up_to_date and status.reasons == []
    status = _fresh(Source, path=str(text_file), scale=2).explain()
    assert not status.up_to_date
    assert any("parameter scale: 1 -> 2" in r for r in status.reasons)
    consumer = _fresh(Consumer, path=str(text_file), scale=2).explain()
    assert any("upstream test_source changed" in r for r in consumer.reasons)
    time.sleep(0.01)
    text_file.write_text("gamma\n")
    status = _fresh(Source, path=str(text_file)).explain()
    assert any("input file text" in r and "content changed" in r for r in status.reasons)


def test_walk_dag_lists_upstream_first(text_file):
    names = [type(t).__name__ for t in walk_dag(Consumer(path=str(text_file)))]
    assert names == ["Source", "Consumer"]


def test_manifest_is_json_with_sorted_keys(text_file):
    assert luigi.build([Source(path=str(text_file))], local_scheduler=True, log_level="ERROR")
    raw = (Source(path=str(text_file)).output_dir() / "manifest.json").read_text()
    assert json.loads(raw)["stage"] == "test_source"


BUILDER = """
import sys
from pathlib import Path
from pipeline.stage import StageAlreadyComplete, StageKey, build_stage
workdir, label = Path(sys.argv[1]), sys.argv[2]
try:
    with build_stage(workdir, StageKey("contended", "1", {"a": 1})) as out:
        (out.path / f"{label}.txt").write_text(label)
        print("inside", flush=True)
        sys.stdin.readline()          # hold the build open until the test says go
    print("built", flush=True)
except StageAlreadyComplete:
    print("skipped", flush=True)
"""


def _builder(tmp_path, label):
    import subprocess
    import sys

    script = tmp_path / "builder.py"
    script.write_text(BUILDER)
    root = Path(__file__).resolve().parents[1]
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "work"), label], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_local_build_waits_for_the_first_then_skips(tmp_path):
    """Two processes, one fingerprint, no luigid: the second neither deletes the first's
    partial directory nor publishes its own; it waits for the lock, sees the output, skips."""
    first = _builder(tmp_path, "first")
    assert first.stdout.readline().strip() == "inside"
    second = _builder(tmp_path, "second")
    time.sleep(1.5)                               # long enough for the second to reach the lock
    assert second.poll() is None, second.communicate()
    out_first, err_first = first.communicate("go\n", timeout=60)
    out_second, err_second = second.communicate("go\n", timeout=60)
    assert first.returncode == 0, err_first
    assert second.returncode == 0, err_second
    assert out_first.split() == ["built"]
    assert out_second.split() == ["skipped"]      # never got inside the build
    final = tmp_path / "work" / "contended" / StageKey("contended", "1", {"a": 1}).fingerprint()
    assert sorted(p.name for p in final.iterdir()) == ["first.txt", "manifest.json"]
    assert verify_outputs(final) == []


def test_temporary_names_are_unique_per_process(tmp_path):
    from pipeline.stage import temporary_name

    name = temporary_name(tmp_path / "last.pt")
    assert name.parent == tmp_path and name.name == f".last.pt.{os.getpid()}.tmp"


def test_a_damaged_upstream_file_is_named_and_explain_calls_it_broken(text_file, isolated_workdir):
    from pipeline.errors import InputError

    assert luigi.build([Source(path=str(text_file))], local_scheduler=True, log_level="ERROR")
    lines = _fresh(Source, path=str(text_file)).output_dir() / "lines.txt"
    original = lines.read_bytes()
    lines.write_bytes(original[:-1] + b"X")                  # same size, one byte flipped
    consumer = _fresh(Consumer, path=str(text_file))
    with pytest.raises(InputError, match=r"lines\.txt: upstream output is damaged: content differs"):
        consumer.run()
    lines.write_bytes(original + b"more")                    # resized
    status = _fresh(Source, path=str(text_file)).explain()
    assert status.broken and not status.up_to_date
    assert any("lines.txt" in r and "bytes, the manifest says" in r for r in status.reasons)
    lines.unlink()                                           # deleted
    status = _fresh(Source, path=str(text_file)).explain()
    assert status.broken and any("missing" in r for r in status.reasons)
    with pytest.raises(InputError, match=r"lines\.txt: upstream output is damaged: missing"):
        _fresh(Consumer, path=str(text_file)).run()
    assert not _fresh(Consumer, path=str(text_file)).output_dir().exists()


def test_a_flipped_byte_in_a_manifest_is_detected(text_file, isolated_workdir):
    from pipeline.errors import InputError
    from pipeline.stage import verify_upstream

    assert luigi.build([Source(path=str(text_file))], local_scheduler=True, log_level="ERROR")
    out = _fresh(Source, path=str(text_file)).output_dir()
    verify_upstream(out)
    path = out / "manifest.json"
    path.write_text(path.read_text().replace('"lines": 2', '"lines": 3'))   # still valid JSON
    with pytest.raises(InputError, match=r"manifest\.json: upstream output is damaged: content differs "
                                         r"from its own checksum"):
        verify_upstream(out)


def test_a_killed_writers_temporary_files_are_removed_when_the_build_resumes(tmp_path):
    """A SIGKILL mid-write leaves ``.<name>.<pid>.tmp`` (a 107 MB checkpoint, say) in the
    partial directory; the next build holds the lock, so the file is a dead writer's."""
    from pipeline.stage import partial_dir

    key = StageKey("resumable", "1", {"a": 2})
    partial = partial_dir(tmp_path / "resumable" / key.fingerprint())
    (partial / "checkpoints").mkdir(parents=True)
    (partial / "piece-0").write_text("done")
    (partial / "checkpoints" / ".last.pt.99999.tmp").write_bytes(b"\0" * 1000)
    (partial / ".student.99999.tmp").mkdir()
    with build_stage(tmp_path, key, resumable=True) as out:
        assert not (out.path / "checkpoints" / ".last.pt.99999.tmp").exists()
        assert not (out.path / ".student.99999.tmp").exists()
        assert (out.path / "piece-0").read_text() == "done"
    final = tmp_path / "resumable" / key.fingerprint()
    assert not list(final.rglob("*.tmp"))
