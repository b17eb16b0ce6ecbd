"""Teacher stages under Luigi: shards as tasks, parallel workers, luigid, resume after a kill."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import luigi
import pytest

from pipeline.stage import load_manifest
from tests.test_cache import SENTENCES, make_teacher

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def write_glue(root: Path, rows: int = 36) -> Path:
    """A small SST-2 in the GLUE layout (``rows`` train rows, 8 dev rows)."""
    root = root / "glue" / "SST-2"
    root.mkdir(parents=True)
    train = [f"{SENTENCES[i % len(SENTENCES)]} {'good' if i % 2 else 'bad'}\t{i % 2}" for i in range(rows)]
    dev = [f"{SENTENCES[i]} {'good' if i % 2 else 'bad'}\t{i % 2}" for i in range(8)]
    (root / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(train) + "\n")
    (root / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(dev) + "\n")
    return root.parent


@pytest.fixture
def glue_dir(tmp_path) -> Path:
    return write_glue(tmp_path)


@pytest.fixture(scope="module")
def slower_classifier_dir(tmp_path_factory, minilm_dir) -> Path:
    """Wide enough that a shard takes a moment, so a second worker has time to join."""
    return make_teacher(tmp_path_factory.mktemp("clf-wide"), minilm_dir, hidden_size=256)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, minilm_dir) -> Path:
    return make_teacher(tmp_path_factory.mktemp("clf"), minilm_dir)


def _config_args(glue_dir: Path, teacher: Path) -> list[str]:
    return ["--PrepareData-source", "glue", "--PrepareData-glue-dir", str(glue_dir),
            "--PrepareData-task", "SST-2", "--FineTuneTeacher-teacher", str(teacher),
            "--FineTuneTeacher-finetune", "auto"]


CACHE_ARGS = ["--examples", "train", "--shard-size", "6", "--student-layers", "2",
              "--max-seq-length", "64"]
WIDE_ARGS = ["--examples", "train", "--shard-size", "40", "--student-layers", "2",
             "--max-seq-length", "64", "--forward-batch-size", "8"]


def test_local_workers_build_every_shard_then_the_cache(glue_dir, classifier_dir, tmp_path, isolated_workdir):
    """``--workers 2`` (forked task processes, as ``tinykd run`` does it) builds all six shards."""
    argv = [*CACHE_ARGS, *_config_args(glue_dir, classifier_dir)]
    # A fresh process: forking a process that already ran torch (pytest here) can crash the
    # children in OpenMP; the tinykd/luigi parent process never imports torch.
    result = subprocess.run(_luigi_command([*argv, "--local-scheduler", "--workers", "2"]),
                            env=_environment(isolated_workdir, tmp_path), cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    from luigi.cmdline_parser import CmdlineParser

    import tasks.teacher  # noqa: F401

    with CmdlineParser.global_instance(["TeacherCache", *argv]) as parser:
        task = parser.get_task_obj()
        assert task.complete()  # the same fingerprint as the subprocess computed
        shards = sorted((isolated_workdir / "teacher_cache_shard").glob("[!.]*"))
        assert len(shards) == 6  # 36 examples / 6
        info = load_manifest(task.output_dir())["info"]
        assert [s["index"] for s in info["shards"]] == list(range(6))
        assert info["hidden_layers"] == [0, 2, 4] and info["attention_layers"] == [2, 4]  # 4 -> 2 uniform
        teacher_info = load_manifest(tasks.teacher.FineTuneTeacher().output_dir())["info"]
        assert teacher_info["skipped_finetune"] is True and "accuracy" in teacher_info["dev"]
        from pipeline.cache.reader import open_cache

        reader = open_cache(task.output_dir())
        assert reader.num_examples == 36 and reader.verify() == []
        ids = sorted(i for b in reader.batches(8) for i in b["ids"])
        assert ids == sorted(f"train-{i}" for i in range(36))
        # A no-op rerun: everything complete, nothing is rewritten.
        before = {p: p.stat().st_mtime_ns for p in isolated_workdir.rglob("manifest.json")}
        assert luigi.build([task], local_scheduler=True, log_level="ERROR")
        assert {p: p.stat().st_mtime_ns for p in isolated_workdir.rglob("manifest.json")} == before


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _environment(workdir: Path, tmp_path: Path) -> dict:
    env = dict(os.environ, TINYKD_WORKDIR=str(workdir), PYTHONPATH=str(PROJECT_ROOT),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    empty_cfg = tmp_path / "empty-luigi.cfg"
    empty_cfg.write_text("")
    env["LUIGI_CONFIG_PATH"] = str(empty_cfg)
    return env


def _luigi_command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "luigi", "--module", "tasks.teacher", "TeacherCache", *argv]


RUNNING = re.compile(r"running\s+TeacherCacheShard\(.*?shard_index=(\d+)")
DONE = re.compile(r"done\s+TeacherCacheShard\(.*?shard_index=(\d+)")


@pytest.mark.slow
def test_two_workers_under_luigid_split_the_shards_and_run_each_once(slower_classifier_dir, tmp_path):
    """A real central scheduler, two worker processes: every shard runs exactly once."""
    glue_dir, classifier_dir = write_glue(tmp_path, rows=240), slower_classifier_dir
    workdir = tmp_path / "work"
    env = _environment(workdir, tmp_path)
    port = _free_port()
    luigid_bin = Path(sys.executable).parent / "luigid"
    (tmp_path / "luigid-logs").mkdir()
    scheduler = subprocess.Popen(
        [str(luigid_bin), "--port", str(port), "--logdir", str(tmp_path / "luigid-logs"),
         "--state-path", str(tmp_path / "luigid-state.pickle")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("localhost", port), timeout=1).close()
                break
            except OSError:
                assert scheduler.poll() is None and time.time() < deadline, "luigid did not start"
                time.sleep(0.2)
        # Build the upstream first, so both workers see the six shards in requires().
        argv = [*WIDE_ARGS, *_config_args(glue_dir, classifier_dir), "--scheduler-host", "localhost",
                "--scheduler-port", str(port), "--workers", "1",
                # Luigi's pid lock refuses a second identical command on one host; on several
                # hosts (the usual luigid set-up) it is not needed.
                "--no-lock"]
        prepare = subprocess.run(
            [sys.executable, "-m", "luigi", "--module", "tasks.teacher", "FineTuneTeacher",
             *_config_args(glue_dir, classifier_dir)[:-4], "--teacher", str(classifier_dir),
             "--scheduler-host", "localhost", "--scheduler-port", str(port)],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert prepare.returncode == 0, prepare.stderr[-3000:]
        workers = [subprocess.Popen(_luigi_command(argv), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        logs = [w.communicate(timeout=300)[0] for w in workers]
        assert all(w.returncode == 0 for w in workers), "\n".join(logs)[-4000:]
    finally:
        scheduler.terminate()
        scheduler.wait(timeout=30)
    ran = [sorted(int(i) for i in DONE.findall(log)) for log in logs]
    started = sorted(int(i) for log in logs for i in RUNNING.findall(log))
    assert started == list(range(6)), logs  # each shard started once, by one worker
    assert sorted(ran[0] + ran[1]) == list(range(6))
    assert ran[0] and ran[1], f"both workers should take shards: {ran}\n" + logs[0 if not ran[0] else 1]
    stage = workdir / "teacher_cache_shard"
    assert len([d for d in stage.iterdir() if not d.name.startswith(".")]) == 6
    cache_dirs = [d for d in (workdir / "teacher_cache").iterdir() if not d.name.startswith(".")]
    assert len(cache_dirs) == 1
    info = load_manifest(cache_dirs[0])["info"]
    assert sum(s["rows"] for s in info["shards"]) == 240
    pids = {load_manifest(d)["info"]["worker_pid"] for d in stage.glob("[!.]*")}
    assert len(pids) >= 2


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_completed_shards(glue_dir, classifier_dir, tmp_path):
    workdir = tmp_path / "work"
    env = _environment(workdir, tmp_path)
    argv = [*CACHE_ARGS, *_config_args(glue_dir, classifier_dir), "--local-scheduler", "--workers", "1"]
    stage = workdir / "teacher_cache_shard"
    first = subprocess.Popen(_luigi_command(argv), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    done: list[Path] = []
    while len(done) < 2:
        assert first.poll() is None, "the run finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.1)
        done = [d for d in stage.glob("*") if not d.name.startswith(".")] if stage.exists() else []
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    kept = {d: (d / "manifest.json").stat().st_mtime_ns for d in stage.iterdir() if not d.name.startswith(".")}
    assert 2 <= len(kept) < 6
    second = subprocess.run(_luigi_command(argv), env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    rerun = sorted(int(i) for i in RUNNING.findall(second.stdout + second.stderr))
    assert len(rerun) == 6 - len(kept)  # only the shards the killed run had not finished
    for directory, mtime in kept.items():
        assert (directory / "manifest.json").stat().st_mtime_ns == mtime
    assert len([d for d in stage.iterdir() if not d.name.startswith(".")]) == 6
