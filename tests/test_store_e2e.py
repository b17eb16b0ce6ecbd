"""Two machines, one bucket, one luigid: the DAG on a moto S3 workdir, for real.

Each worker is its own ``tinykd run`` process with its own scratch directory; they share only
the bucket (moto's S3 server on 127.0.0.1) and a real ``luigid``. The read-only inputs (the
task's TSV files, the tiny teacher) stand in for what every machine has locally. Afterwards a
third process, with a fresh scratch directory, finds the whole DAG complete and runs nothing.
A SIGKILL in the middle of an upload (scripts/soak_store.py) leaves no output that looks
complete, and a rerun finishes it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.stage import store_output_problems
from pipeline.store import open_store
from tests.store_server import PROJECT_ROOT, TEST_SECRET, s3, start_luigid  # noqa: F401
from tests.tiny_dag import tiny_stages, tiny_task

RUNNING = re.compile(r"running\s+(\w+)\[([0-9a-f]{16})\]")

CONFIG = tiny_stages(TeacherCache={"shard_size": 4, "num_threads": 1},
                     DistillIntermediate={"num_threads": 1}, DistillPrediction={"num_threads": 1})


def _environment(s3, config: Path, scratch: Path) -> dict:  # noqa: F811
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TINYKD_"))}
    env.update(s3.env, PYTHONPATH=str(PROJECT_ROOT), LUIGI_CONFIG_PATH=str(config), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               TINYKD_WORKDIR=s3.url(), TINYKD_SCRATCH=str(scratch))
    return env


def _tinykd(args: list[str], env: dict, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_two_workers_under_luigid_share_one_bucket_and_a_third_finds_everything_done(
        s3, tmp_path, minilm_dir):  # noqa: F811
    config = tmp_path / "luigi.cfg"
    config.write_text(tiny_task(tmp_path / "inputs", minilm_dir, train_rows=48, dev_rows=12) + CONFIG)
    scheduler, port = start_luigid(tmp_path, _environment(s3, config, tmp_path / "scratch-luigid"))
    central = ["--scheduler-host", "localhost", "--scheduler-port", str(port), "--workers", "1"]
    try:
        # the upstream first (any machine), so that both workers see the 12 shards in requires()
        prepared = _tinykd(["run", "FineTuneTeacher", *central],
                           _environment(s3, config, tmp_path / "scratch-0"), tmp_path)
        assert prepared.returncode == 0, prepared.stdout[-3000:] + prepared.stderr[-3000:]
        workers = [subprocess.Popen([sys.executable, "-m", "tasks", "run", "DistillPrediction", *central],
                                    env=_environment(s3, config, tmp_path / f"scratch-{n}"), cwd=tmp_path,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for n in (1, 2)]
        logs = [w.communicate(timeout=600)[0] for w in workers]
        assert all(w.returncode == 0 for w in workers), "\n".join(logs)[-6000:]
    finally:
        scheduler.terminate()
        scheduler.wait(timeout=30)
    store = open_store(s3.url())
    ran = [RUNNING.findall(log) for log in logs]
    everything = ran[0] + ran[1]
    assert len(everything) == len(set(everything)), f"a task ran twice: {everything}"
    shards = sorted(fp for family, fp in everything if family == "TeacherCacheShard")
    assert len(shards) == 12
    assert ran[0] and ran[1], f"both workers should take work: {ran}"
    pids = set()
    for fingerprint in shards:
        manifest = json.loads(store.read_bytes(f"teacher_cache_shard/{fingerprint}/manifest.json"))
        pids.add(manifest["info"]["worker_pid"])
        assert store_output_problems(store, f"teacher_cache_shard/{fingerprint}") == []
    assert len(pids) == 2   # the shards were built by both workers
    stages = {family for family, _ in everything}
    assert {"TeacherCache", "DistillIntermediate", "DistillPrediction"} <= stages
    # nothing of one worker's scratch is another's, and nothing secret reached a manifest
    for key in s3.keys("work/"):
        if key.endswith("manifest.json"):
            text = s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read().decode()
            assert TEST_SECRET not in text and s3.env["AWS_ACCESS_KEY_ID"] not in text
    assert not [k for k in s3.keys("work/") if ".partial/" in k]   # every partial prefix cleaned up

    # a third machine, fresh scratch: the whole DAG is complete, nothing runs, nothing downloads
    third_env = _environment(s3, config, tmp_path / "scratch-3")
    started = time.perf_counter()
    third = _tinykd(["run", "DistillPrediction"], third_env, tmp_path)
    seconds = time.perf_counter() - started
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert RUNNING.findall(third.stdout + third.stderr) == []
    assert "complete ones were encountered" in third.stdout or "already" in third.stdout
    explained = _tinykd(["explain", "DistillPrediction"], third_env, tmp_path)
    assert explained.returncode == 0, explained.stderr
    states = [line.split()[0] for line in explained.stdout.splitlines() if line[:1] in ("u", "w", "b")]
    assert states and set(states) == {"up"}, explained.stdout
    assert s3.url() in explained.stdout
    collected = _tinykd(["gc", "DistillPrediction"], third_env, tmp_path)   # a dry run
    assert collected.returncode == 0, collected.stderr
    assert f"gc of {s3.url()}" in collected.stdout
    assert "0 unreferenced output(s)" in collected.stdout, collected.stdout
    print("worker tasks:", [sorted({f for f, _ in r}) for r in ran], [len(r) for r in ran])
    print(f"no-op rerun against the bucket (a fresh process, incl. interpreter start): {seconds:.2f} s")


@pytest.mark.slow
def test_sigkill_during_uploads_leaves_no_complete_looking_output_and_a_rerun_finishes(tmp_path):
    pytest.importorskip("moto.server")
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "soak_store.py"), "--kills", "3",
                             "--workdir", str(tmp_path)],
                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[0])
    assert report["kills"] == 3 and report["killed_mid_upload"] == 3
    assert report["complete_looking_after_kill"] == 0
    assert report["final_complete"] and report["final_problems"] == []
