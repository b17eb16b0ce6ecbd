"""The stage contract on object storage (a moto S3 server): upload, manifest last, partial
prefix, fetched copies, verification, input hashing, gc, and one clear error per bad URL."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.stage import (MANIFEST_NAME, FileHasher, StageAlreadyComplete, StageKey, build_stage,
                            fetch_output, gc_plan, delete_entry, store_output_problems)
from pipeline.store import Store, open_store, redact
from tests.store_server import (PROJECT_ROOT, TEST_SECRET, s3, s3_environment,  # noqa: F401
                                start_moto_subprocess, without_aws)

KEY = StageKey(stage="toy", version="1", params={"n": 3})


def build_toy(store: Store, scratch: Path, key: StageKey = KEY, **kwargs) -> str:
    with build_stage(scratch, key, store=store, **kwargs) as out:
        (out.path / "data").mkdir()
        (out.path / "data" / "a.txt").write_text("alpha\n")
        (out.path / "b.bin").write_bytes(bytes(range(256)) * 40)
        out.rows["things"] = 2
    return key.fingerprint(FileHasher(scratch / ".hash-cache.json"))


def test_a_stage_uploads_its_files_then_the_manifest_and_is_complete_once(s3, tmp_path):
    store = open_store(s3.url())
    fingerprint = build_toy(store, tmp_path / "scratch")
    prefix = f"work/toy/{fingerprint}/"
    assert s3.keys("work/") == [prefix + "b.bin", prefix + "data/a.txt", prefix + MANIFEST_NAME]
    manifest = json.loads(store.read_bytes(f"toy/{fingerprint}/{MANIFEST_NAME}"))
    assert manifest["files"]["data/a.txt"]["bytes"] == 6 and manifest["rows"] == {"things": 2}
    # this machine keeps its copy; no partial left anywhere
    local = tmp_path / "scratch" / "toy" / fingerprint
    assert (local / MANIFEST_NAME).read_bytes() == store.read_bytes(f"toy/{fingerprint}/{MANIFEST_NAME}")
    assert not list((tmp_path / "scratch" / "toy").glob(".*.partial"))
    assert store_output_problems(store, f"toy/{fingerprint}") == []
    # another machine (another scratch) finds it complete and builds nothing
    with pytest.raises(StageAlreadyComplete):
        with build_stage(tmp_path / "other", KEY, store=store):
            pass
    # and fetches a checked copy of it
    fetched = fetch_output(store, "toy", fingerprint, tmp_path / "other")
    assert (fetched / "b.bin").read_bytes() == bytes(range(256)) * 40


def test_a_file_url_is_a_store_too(tmp_path):
    store = open_store(f"file://{tmp_path / 'bucket'}")
    fingerprint = build_toy(store, tmp_path / "scratch")
    assert (tmp_path / "bucket" / "toy" / fingerprint / MANIFEST_NAME).is_file()
    assert store_output_problems(store, f"toy/{fingerprint}") == []


def test_credentials_never_reach_the_manifest(s3, tmp_path):
    store = open_store(s3.url())
    fingerprint = build_toy(store, tmp_path / "scratch")
    everything = b"".join(store.read_bytes(f"toy/{fingerprint}/{name}")
                          for name in store.list_files(f"toy/{fingerprint}"))
    assert TEST_SECRET.encode() not in everything
    assert redact("s3://KEY:SECRET@bucket/p?secret_key=abc&region=x") == "s3://***@bucket/p?secret_key=%2A%2A%2A&region=x"


def test_a_failed_upload_leaves_no_complete_looking_output_and_a_rerun_finishes(s3, tmp_path, monkeypatch):
    store = open_store(s3.url())
    real_upload = Store.upload
    calls = []

    def failing_upload(self, local, rel):
        calls.append(rel)
        if len(calls) == 2:   # the first file is up, the second fails
            raise InputError("uploading failed: simulated", rel)
        return real_upload(self, local, rel)

    monkeypatch.setattr(Store, "upload", failing_upload)
    with pytest.raises(InputError):
        build_toy(store, tmp_path / "scratch")
    fingerprint = KEY.fingerprint(FileHasher(tmp_path / "scratch" / ".hash-cache.json"))
    assert not store.exists(f"toy/{fingerprint}/{MANIFEST_NAME}")
    assert store.list_files(f"toy/{fingerprint}")   # the first file is there: not an output
    assert store_output_problems(store, f"toy/{fingerprint}")[0][1].startswith("no manifest.json")
    monkeypatch.setattr(Store, "upload", real_upload)
    assert build_toy(store, tmp_path / "scratch") == fingerprint
    assert store_output_problems(store, f"toy/{fingerprint}") == []


def test_upload_removes_objects_a_killed_upload_left_that_the_manifest_does_not_list(s3, tmp_path):
    store = open_store(s3.url())
    fingerprint = KEY.fingerprint(FileHasher(tmp_path / "scratch" / ".hash-cache.json"))
    store.write_bytes(f"toy/{fingerprint}/leftover.tmp-part", b"half")
    build_toy(store, tmp_path / "scratch")
    assert "leftover.tmp-part" not in store.list_files(f"toy/{fingerprint}")


def test_a_resumable_build_continues_on_another_machine_from_the_partial_prefix(s3, tmp_path):
    store = open_store(s3.url())
    key = StageKey(stage="pieces", version="1", params={})
    with pytest.raises(RuntimeError):
        with build_stage(tmp_path / "machine-a", key, store=store, resumable=True,
                         partial_sync_seconds=0) as out:
            (out.path / "part-0.txt").write_text("zero\n")
            (out.path / ".part-1.txt.123.tmp").write_text("half")   # a piece being written
            raise RuntimeError("killed")
    fingerprint = key.fingerprint()
    assert sorted(store.list_files(f"pieces/.{fingerprint}.partial")) == ["part-0.txt"]
    seen = []
    with build_stage(tmp_path / "machine-b", key, store=store, resumable=True) as out:
        seen = sorted(p.name for p in out.path.iterdir())
        (out.path / "part-1.txt").write_text("one\n")
    assert seen == ["part-0.txt"]
    assert sorted(store.list_files(f"pieces/{fingerprint}")) == [MANIFEST_NAME, "part-0.txt", "part-1.txt"]
    assert store.list_files(f"pieces/.{fingerprint}.partial") == {}


def test_the_partial_sync_copies_finished_pieces_while_the_build_runs(s3, tmp_path):
    import time

    store = open_store(s3.url())
    key = StageKey(stage="pieces", version="1", params={"sync": True})
    with pytest.raises(RuntimeError):
        with build_stage(tmp_path / "scratch", key, store=store, resumable=True,
                         partial_sync_seconds=0.2) as out:
            (out.path / "part-0.txt").write_text("zero\n")
            deadline = time.time() + 20
            while not store.list_files(f"pieces/.{key.fingerprint()}.partial"):
                assert time.time() < deadline, "the finished piece was never copied"
                time.sleep(0.1)
            raise RuntimeError("stop here")


def test_a_checkpoint_reaches_the_store_after_the_log_it_refers_to(s3, tmp_path, monkeypatch):
    """A trainer checkpoint records the length of metrics.jsonl; uploaded last (from a copy
    taken first), the store never pairs it with an older, shorter log."""
    store = open_store(s3.url())
    order = []
    real_upload = Store.upload
    monkeypatch.setattr(Store, "upload", lambda self, local, rel: (order.append(rel.rsplit("/", 2)[-2:]),
                                                                   real_upload(self, local, rel)))
    key = StageKey(stage="trainer", version="1", params={})
    with pytest.raises(RuntimeError):
        with build_stage(tmp_path / "scratch", key, store=store, resumable=True, partial_sync_seconds=0) as out:
            (out.path / "checkpoints").mkdir()
            (out.path / "checkpoints" / "last.pt").write_bytes(b"step 2, log 10 bytes")
            (out.path / "metrics.jsonl").write_text("0123456789")
            (out.path / "zz-other.txt").write_text("x")
            raise RuntimeError("killed")
    assert order[-1] == ["checkpoints", "last.pt"] and len(order) == 3


def test_a_damaged_output_on_the_store_is_refused_by_name(s3, tmp_path):
    store = open_store(s3.url())
    fingerprint = build_toy(store, tmp_path / "scratch")
    store.write_bytes(f"toy/{fingerprint}/b.bin", b"x" * (256 * 40))   # same size, other bytes
    problems = store_output_problems(store, f"toy/{fingerprint}")
    assert problems == [(f"{s3.url()}/toy/{fingerprint}/b.bin", "content differs from the manifest (sha256)")]
    assert store_output_problems(store, f"toy/{fingerprint}", checksums=False) == []
    with pytest.raises(InputError, match="content differs") as raised:
        fetch_output(store, "toy", fingerprint, tmp_path / "elsewhere")
    assert raised.value.path.endswith("/b.bin")
    assert not (tmp_path / "elsewhere" / "toy" / fingerprint).exists()   # nothing half-fetched
    store.delete(f"toy/{fingerprint}/data/a.txt")
    assert ("missing (listed in the manifest)" in
            dict(store_output_problems(store, f"toy/{fingerprint}", checksums=False)).values())


def test_an_output_with_a_missing_file_counts_as_incomplete_and_is_rebuilt(s3, tmp_path):
    from tasks.base import StoreTarget

    store = open_store(s3.url())
    fingerprint = build_toy(store, tmp_path / "scratch")
    target = StoreTarget(store, f"toy/{fingerprint}")
    assert target.exists()
    store.delete(f"toy/{fingerprint}/data/a.txt")
    StoreTarget._complete.clear()   # a process remembers what it found complete: a new one
    assert not target.exists()   # Luigi will run the stage again
    assert not StoreTarget(store, f"toy/{fingerprint}", tmp_path / "scratch" / "toy" / fingerprint
                           / MANIFEST_NAME).exists()   # with this machine's copy of the manifest too
    assert build_toy(store, tmp_path / "other") == fingerprint   # not "already complete"
    assert target.exists() and store_output_problems(store, f"toy/{fingerprint}") == []


def test_remote_inputs_hash_like_local_ones_with_a_size_and_mtime_fast_path(s3, tmp_path, monkeypatch):
    local = tmp_path / "corpus"
    local.mkdir()
    (local / "a.txt").write_text("one\n")
    (local / "b.txt").write_text("two\n")
    store = open_store(s3.url("inputs/corpus"))
    for name in ("a.txt", "b.txt"):
        store.upload(local / name, name)
    hasher = FileHasher(tmp_path / "hash-cache.json")
    remote = hasher.describe(s3.url("inputs/corpus"))
    assert remote["sha256"] == FileHasher().describe(local)["sha256"]   # same bytes, same identity
    hasher.save()
    # unchanged objects are not read again
    real_sha256 = Store.sha256
    monkeypatch.setattr(Store, "sha256", lambda self, rel: pytest.fail(f"re-hashed {rel}"))
    assert FileHasher(tmp_path / "hash-cache.json").describe(s3.url("inputs/corpus")) == remote
    monkeypatch.setattr(Store, "sha256", real_sha256)
    store.write_bytes("b.txt", b"changed\n")
    assert FileHasher(tmp_path / "hash-cache.json").describe(s3.url("inputs/corpus"))["sha256"] != remote["sha256"]
    single = FileHasher().describe(s3.url("inputs/corpus/a.txt"))
    assert single["sha256"] == FileHasher().describe(local / "a.txt")["sha256"]


def test_gc_on_a_store_lists_then_deletes_unreferenced_outputs_and_keeps_young_uploads(s3, tmp_path):
    store = open_store(s3.url())
    keep = build_toy(store, tmp_path / "scratch")
    other = StageKey(stage="toy", version="1", params={"n": 4})
    drop = build_toy(store, tmp_path / "scratch", key=other)
    store.write_bytes("toy/0123456789abcdef/b.bin", b"killed upload")   # no manifest
    plan = gc_plan(tmp_path / "scratch", {f"toy/{keep}"}, store=store)
    decided = {d.entry.target: (d.entry.kind, d.delete) for d in plan}
    assert decided == {f"toy/{drop}": ("output", True), "toy/0123456789abcdef": ("incomplete", False)}
    later = gc_plan(tmp_path / "scratch", {f"toy/{keep}"}, store=store, now=__import__("time").time() + 7200)
    assert {d.entry.target: d.delete for d in later} == {f"toy/{drop}": True, "toy/0123456789abcdef": True}
    for decision in later:
        assert delete_entry(decision.entry, store)
    # (pyarrow leaves an empty "work/toy/" directory marker when it deletes a prefix's last object)
    assert sorted({k.split("/")[2] for k in s3.keys("work/") if not k.endswith("/")}) == [keep]


# --- bad URLs: one clear error at scheduling time, naming the URL, nothing left behind -------------

def _tinykd(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    empty = cwd / "empty-luigi.cfg"
    empty.write_text("")
    full_env = {**without_aws(os.environ), **env, "PYTHONPATH": str(PROJECT_ROOT),
                "LUIGI_CONFIG_PATH": str(empty), "HF_HUB_OFFLINE": "1", "TINYKD_SCRATCH": str(cwd / "scratch")}
    full_env.pop("TINYKD_WORKDIR", None)
    return subprocess.run([sys.executable, "-m", "tasks", "run", "PrepareData", "--PrepareData-task", "SST-2",
                           "--PrepareData-glue-dir", str(cwd / "nowhere"), *args],
                          env=full_env, cwd=cwd, capture_output=True, text=True, timeout=120)


def _assert_one_error(result, url: str, words: str, cwd: Path) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("tinykd run:")]
    assert len(errors) == 1 and url in errors[0] and words in errors[0], output
    assert TEST_SECRET not in output
    assert not (cwd / "scratch").exists()   # nothing written, not even a log


@pytest.mark.parametrize("url, words", [
    ("nosuchproto://bucket/work", "unknown storage protocol 'nosuchproto'"),
])
def test_an_unknown_protocol_is_one_error(url, words, tmp_path):
    result = _tinykd(["--pipeline-workdir", url], {}, tmp_path)
    _assert_one_error(result, url, words, tmp_path)


def test_a_missing_bucket_is_one_error(s3, tmp_path):
    url = "s3://no-such-bucket/work"
    result = _tinykd(["--pipeline-workdir", url], s3.env, tmp_path)
    _assert_one_error(result, url, "the bucket 'no-such-bucket' does not exist", tmp_path)
    assert s3.keys() == []


def test_an_unreachable_endpoint_is_one_error(tmp_path):
    from tests.store_server import free_port

    env = s3_environment(f"http://127.0.0.1:{free_port()}")   # nothing listens there
    result = _tinykd(["--pipeline-workdir", "s3://tinykd/work"], env, tmp_path)
    _assert_one_error(result, "s3://tinykd/work", "the storage endpoint cannot be reached", tmp_path)


def test_missing_or_wrong_credentials_are_one_error_without_the_secret(tmp_path):
    pytest.importorskip("moto.server")
    # moto checks signatures against its IAM users only when started with auth on
    server, endpoint = start_moto_subprocess({**without_aws(os.environ), "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        env = s3_environment(endpoint)
        missing = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        # and no profile files of whoever runs the tests
        missing.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
        result = _tinykd(["--pipeline-workdir", "s3://tinykd/work"], missing, tmp_path)
        _assert_one_error(result, "s3://tinykd/work", "no S3 credentials found", tmp_path)
        result = _tinykd(["--pipeline-workdir", "s3://tinykd/work"], env, tmp_path)   # unknown key
        _assert_one_error(result, "s3://tinykd/work", "access denied", tmp_path)
        # credentials in the URL itself are never echoed
        result = _tinykd(["--pipeline-workdir", f"s3://AKIAWRONG:{TEST_SECRET}@tinykd/work"], missing, tmp_path)
        _assert_one_error(result, "s3://***@tinykd/work", "access denied", tmp_path)
    finally:
        server.terminate()
        server.wait(timeout=30)
