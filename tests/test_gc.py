"""`tinykd gc` is safe by construction (issue 15, item 2): a partial directory a live process
holds is never touched, outputs referenced by any declared configuration are kept, an age
filter keeps recent work, and every line says why."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import luigi

from pipeline.locks import lock_holder, lock_path
from pipeline.stage import partial_dir
import tasks.cli as cli
from tasks.cli import main
from tests.test_cli import Wrapper
from tests.test_stage import Consumer

PROJECT_ROOT_FOR_SUBPROCESS = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent("""
    import sys, pathlib
    from pipeline.locks import BuildLock
    final = pathlib.Path(sys.argv[1])
    lock = BuildLock(final)
    assert lock.acquire(wait=False)
    partial = final.parent / f".{final.name}.partial"
    partial.mkdir(parents=True)
    (partial / "piece-00000.parquet").write_bytes(b"x" * 1000)
    print("ready", flush=True)
    sys.stdin.read()      # hold the lock until the test closes our stdin
""")


def _age(path, days: float) -> None:
    """Make everything under ``path`` look ``days`` old."""
    stamp = time.time() - days * 86400
    for dirpath, _, files in os.walk(path):
        for name in files:
            os.utime(os.path.join(dirpath, name), (stamp, stamp))
        os.utime(dirpath, (stamp, stamp))
    if os.path.isfile(path):
        os.utime(path, (stamp, stamp))


def test_gc_never_deletes_a_partial_that_a_live_process_holds(tmp_path, isolated_workdir, capsys):
    text = tmp_path / "in.txt"
    text.write_text("a\n")
    assert luigi.build([Consumer(path=str(text))], local_scheduler=True, log_level="ERROR")
    other = isolated_workdir / "test_consumer" / "0123456789abcdef"   # another run's output, in progress
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(other)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=PROJECT_ROOT_FOR_SUBPROCESS,
                             env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT_FOR_SUBPROCESS)})
    try:
        assert child.stdout.readline().strip() == "ready"
        _age(partial_dir(other), days=30)          # old, unreferenced: only the lock protects it
        _age(lock_path(other), days=30)
        assert lock_holder(other)["pid"] == child.pid
        luigi.task_register.Register.clear_instance_cache()
        assert main(["gc", "--delete", "Consumer", "--path", str(text)]) == 0
        out = capsys.readouterr().out
        assert partial_dir(other).is_dir() and lock_path(other).exists()
        assert f"kept: being built by pid {child.pid} on " in out, out
        assert "0 unreferenced output(s)" in out
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    # the holder is gone: the partial and its lock file are garbage now, and both go
    luigi.task_register.Register.clear_instance_cache()
    assert main(["gc", "Consumer", "--path", str(text)]) == 0
    out = capsys.readouterr().out
    assert "partial build, no live holder; not referenced by Consumer" in out
    assert "build lock, no holder" in out
    luigi.task_register.Register.clear_instance_cache()
    assert main(["gc", "--delete", "Consumer", "--path", str(text)]) == 0
    assert not partial_dir(other).exists() and not lock_path(other).exists()
    assert Consumer(path=str(text)).output_dir().is_dir()


def _profile(tmp_path, name, text, scale):
    path = tmp_path / f"{name}.cfg"
    path.write_text(f"[Source]\npath = {text}\nscale = {scale}\n")
    return path


def _build_under(profile) -> list:
    with cli.configuration(str(profile)):
        task = Wrapper()
        assert luigi.build([task], local_scheduler=True, log_level="ERROR")
        return [task.output_dir(), task.upstream_dir("source")]


def test_gc_keeps_what_any_declared_configuration_references(tmp_path, isolated_workdir, capsys):
    text = tmp_path / "in.txt"
    text.write_text("a\nb\n")
    profiles = {name: _profile(tmp_path, name, text, scale) for name, scale in (("a", 1), ("b", 2), ("c", 3))}
    outputs = {name: _build_under(profile) for name, profile in profiles.items()}

    # one profile alone: the other profiles' outputs are garbage (and said to be, and why)
    assert main(["gc", "--config", str(profiles["a"]), "Wrapper"]) == 0
    out = capsys.readouterr().out
    assert "4 unreferenced output(s)" in out
    assert f"not referenced by Wrapper under --config {profiles['a']}" in out

    # the declared set: only c's outputs go
    argv = ["gc", "--config", str(profiles["a"]), "--config", str(profiles["b"]), "Wrapper"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 unreferenced output(s)" in out
    for path in outputs["c"]:
        assert f"would delete" in out and str(path) in out
    assert "not referenced by Wrapper under any of 2 configurations" in out
    assert main([argv[0], "--delete", *argv[1:]]) == 0
    assert not any(p.exists() for p in outputs["c"])
    assert all(p.exists() for name in "ab" for p in outputs[name])


def test_gc_older_than_keeps_recent_work(tmp_path, isolated_workdir, capsys):
    text = tmp_path / "in.txt"
    text.write_text("a\n")
    for scale in (1, 2, 3):
        luigi.task_register.Register.clear_instance_cache()
        assert luigi.build([Consumer(path=str(text), scale=scale)], local_scheduler=True, log_level="ERROR")
    luigi.task_register.Register.clear_instance_cache()
    old = Consumer(path=str(text), scale=1)
    old_dirs = [old.output_dir(), old.upstream_dir("source")]
    for path in old_dirs:
        _age(path, days=10)
    luigi.task_register.Register.clear_instance_cache()
    assert main(["gc", "--older-than", "7d", "--delete", "Consumer", "--path", str(text), "--scale", "3"]) == 0
    out = capsys.readouterr().out
    assert not any(p.exists() for p in old_dirs)           # unreferenced and 10 days old
    luigi.task_register.Register.clear_instance_cache()
    recent = Consumer(path=str(text), scale=2)
    assert recent.output_dir().exists() and recent.upstream_dir("source").exists()
    assert "younger than 7.0 d" in out and "2 unreferenced output(s)" in out
    assert main(["gc", "--older-than", "soon"]) == 2
    assert "--older-than 'soon'" in capsys.readouterr().err


def test_gc_without_arguments_prints_one_line_when_the_dag_cannot_be_walked(monkeypatch, capsys):
    """Item 8: the default roots (Ablations, ExportStudent) need a GLUE directory; say so in one line."""
    from luigi.configuration import LuigiConfigParser

    monkeypatch.delenv("GLUE_DIR", raising=False)
    # the project's own luigi.cfg, as a user's `tinykd gc` in the checkout reads it
    monkeypatch.setattr(LuigiConfigParser, "_config_paths", [str(PROJECT_ROOT_FOR_SUBPROCESS / "luigi.cfg")])
    monkeypatch.setattr(LuigiConfigParser, "_instance", None)
    assert main(["gc"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("tinykd gc: cannot walk the DAG of Ablations and ExportStudent under the "
                               "current configuration, "
                               "so nothing is collected: source=glue needs PrepareData's glue_dir")
