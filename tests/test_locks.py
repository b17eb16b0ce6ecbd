"""Build locks: held exactly while a live process builds, named by its owner, freed by SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from pipeline.locks import BuildLock, lock_holder, lock_path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def hold_in_child(final_dir: Path) -> subprocess.Popen:
    """A child process that takes the lock of ``final_dir``, says so, and sleeps."""
    code = textwrap.dedent(f"""
        import sys, time
        from pipeline.locks import BuildLock
        lock = BuildLock({str(final_dir)!r}); lock.acquire()
        print("held", flush=True); time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert child.stdout.readline().strip() == "held"
    return child


def test_lock_file_sits_beside_the_output(tmp_path):
    assert lock_path(tmp_path / "augment" / "abc123") == tmp_path / "augment" / ".abc123.lock"


def test_another_process_sees_the_holder_until_it_is_killed(tmp_path):
    final = tmp_path / "teacher_cache" / "f00d"
    assert lock_holder(final) is None                      # no lock file at all
    child = hold_in_child(final)
    try:
        holder = lock_holder(final)
        assert holder["pid"] == child.pid and holder["host"]
        assert BuildLock(final).acquire(wait=False) is False
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert lock_holder(final) is None                      # the kernel released it
    lock = BuildLock(final)
    assert lock.acquire(wait=False) is True
    assert lock_holder(final)["pid"] == os.getpid()
    lock.release()
    assert lock_holder(final) is None and lock_path(final).exists()


def test_a_waiting_build_gets_the_lock_when_the_holder_exits(tmp_path):
    final = tmp_path / "s" / "fp"
    child = hold_in_child(final)
    started = time.monotonic()
    subprocess.Popen(["sh", "-c", f"sleep 0.5; kill -9 {child.pid}"])
    with BuildLock(final) as lock:
        assert lock.held and time.monotonic() - started >= 0.4
    child.wait()
