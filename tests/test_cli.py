"""`tinykd explain` and `tinykd gc` on a small real DAG (the stage-contract test tasks)."""
from __future__ import annotations

import luigi

from tasks.cli import explain_lines, main, referenced_outputs, unreferenced_outputs
from tasks.base import StageTask
from tests.test_stage import Consumer, Source


def _clear():
    luigi.task_register.Register.clear_instance_cache()


def test_explain_reports_stale_stages_and_why(tmp_path, capsys):
    text = tmp_path / "in.txt"
    text.write_text("a\nb\n")
    assert luigi.build([Consumer(path=str(text))], local_scheduler=True, log_level="ERROR")
    _clear()
    assert main(["explain", "Consumer", "--path", str(text)]) == 0
    out = capsys.readouterr().out
    assert out.count("up to date") == 2 and "will run" not in out
    _clear()
    assert main(["explain", "Consumer", "--path", str(text), "--scale", "2"]) == 0
    out = capsys.readouterr().out
    assert "will run    Source" in out and "parameter scale: 1 -> 2" in out
    assert "will run    Consumer" in out and "upstream test_source changed" in out


def test_gc_dry_run_then_delete_keeps_referenced(tmp_path, capsys, isolated_workdir):
    text = tmp_path / "in.txt"
    text.write_text("a\nb\n")
    for scale in (1, 2):
        _clear()
        assert luigi.build([Consumer(path=str(text), scale=scale)], local_scheduler=True, log_level="ERROR")
    _clear()
    keep = Consumer(path=str(text), scale=2)
    garbage = unreferenced_outputs(referenced_outputs(keep))
    # the two outputs of scale 1 and their (unheld) build lock files
    outputs = [p for p in garbage if p.suffix != ".lock"]
    assert {p.parent.name for p in outputs} == {"test_source", "test_consumer"} and len(outputs) == 2
    assert sorted(p.name for p in garbage if p.suffix == ".lock") == sorted(f".{p.name}.lock" for p in outputs)
    assert keep.output_dir() not in garbage
    _clear()
    assert main(["gc", "Consumer", "--path", str(text), "--scale", "2"]) == 0
    assert "2 unreferenced output(s) and 2 build lock file(s)" in capsys.readouterr().out
    assert all(p.exists() for p in garbage)  # dry run deletes nothing
    _clear()
    assert main(["gc", "--delete", "Consumer", "--path", str(text), "--scale", "2"]) == 0
    assert not any(p.exists() for p in garbage)
    assert keep.output_dir().exists() and keep.upstream_dir("source").exists()


def test_explain_lines_marks_downstream_of_stale(tmp_path):
    text = tmp_path / "in.txt"
    text.write_text("x\n")
    lines = explain_lines(Consumer(path=str(text)))
    assert lines[0].startswith("will run    Source") and "no earlier output" in lines[1]
    assert any("upstream Source will run first" in line for line in lines)


def test_run_reports_the_outcome_and_ends_with_luigis_summary(tmp_path, capsys):
    text = tmp_path / "in.txt"
    text.write_text("a\n")
    assert main(["run", "Consumer", "--path", str(text), "--module", "tests.test_stage", "--no-lock"]) == 0
    captured = capsys.readouterr()
    out = captured.out.rstrip()
    assert out.endswith("===== Luigi Execution Summary =====") and "2 ran successfully" in out
    # the console has one scheduling line, not Luigi's one per task (those stay in the run log)
    assert "INFO: scheduled 2 tasks: 2 to run, 0 up to date" in captured.err
    assert "Informed scheduler" not in captured.err
    _clear()
    # A failing task is a failing command (Luigi's scheduling still "succeeded").
    assert main(["run", "Consumer", "--path", str(text), "--scale", "3", "--fail-halfway",
                 "--module", "tests.test_stage", "--no-lock"]) == 1
    assert "1 failed" in capsys.readouterr().out


class Wrapper(StageTask):
    """Requires ``Source()`` with no arguments: Source's path and scale come from the command
    line (``--Source-path``), the way tinykd's stages take their upstream parameters."""

    stage_name = "test_wrapper"

    def requires(self):
        return {"source": Source()}

    def build(self, out):
        out.rows["chars"] = len((self.upstream_dir("source") / "lines.txt").read_text())


def test_upstream_command_line_parameters_reach_the_whole_dag(tmp_path, capsys):
    """`--Source-scale 2` applies to the Source that Wrapper requires, in every command."""
    text = tmp_path / "in.txt"
    text.write_text("a\n")
    upstream_args = ["--Source-path", str(text), "--Source-scale", "2"]
    assert main(["run", "Wrapper", *upstream_args, "--module", "tests.test_cli", "--no-lock"]) == 0
    capsys.readouterr()
    _clear()
    assert main(["explain", "Wrapper", *upstream_args]) == 0
    out = capsys.readouterr().out
    assert out.count("up to date") == 2 and "will run" not in out, out
    _clear()
    assert main(["gc", "Wrapper", *upstream_args]) == 0
    assert "0 unreferenced output(s)" in capsys.readouterr().out


def _tinykd(argv, workdir, log):
    """``python -m tasks ARGV`` in a subprocess on ``workdir``, output to the file ``log``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TINYKD_WORKDIR": str(workdir), "PYTHONPATH": str(root)}
    return subprocess.Popen([sys.executable, "-m", "tasks", *argv], cwd=root, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_for(predicate, what, timeout=60):
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_second_identical_run_on_another_workdir_is_not_refused(tmp_path, isolated_workdir):
    """Luigi's pid lock made the second command exit 0 having done nothing."""
    from pipeline.locks import BuildLock

    text = tmp_path / "in.txt"
    text.write_text("a\n")
    argv = ["run", "Consumer", "--path", str(text), "--module", "tests.test_stage"]
    # Hold the first run inside its first stage: it waits for this build lock.
    held = BuildLock(Source(path=str(text)).output_dir())
    held.acquire()
    first = _tinykd(argv, isolated_workdir, tmp_path / "first.log")
    try:
        _wait_for(lambda: "running   Source" in (tmp_path / "first.log").read_text(), "the first run")
        other = tmp_path / "other-work"
        second = _tinykd(argv, other, tmp_path / "second.log")
        assert second.wait(timeout=120) == 0, (tmp_path / "second.log").read_text()
        assert list((other / "test_consumer").glob("[!.]*")), (tmp_path / "second.log").read_text()
        assert first.poll() is None                     # still waiting for the lock
    finally:
        held.release()
    assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()


class Fan(StageTask):
    """Three independent Source stages, then this one: work that two workers share."""

    stage_name = "test_fan"
    path = luigi.Parameter(description="input text file")

    def requires(self):
        return {f"source{i}": Source(path=self.path, scale=i) for i in (1, 2, 3)}

    def build(self, out):
        out.rows["sources"] = 3


def test_every_worker_under_luigid_exits_0_when_the_dag_completed(tmp_path, isolated_workdir):
    """Two workers, one central scheduler. Each runs some stages, and neither saw the other
    run all of its share: Luigi calls those "not granted run permission" (exit 1 before),
    and the worker that ran out of work first ended before the DAG was complete."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.locks import BuildLock

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    luigid = Path(sys.executable).parent / "luigid"
    scheduler = subprocess.Popen([str(luigid), "--port", str(port), "--logdir", str(tmp_path),
                                  "--state-path", str(tmp_path / "state.pickle")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    text = tmp_path / "in.txt"
    text.write_text("a\n")
    argv = ["run", "Fan", "--path", str(text), "--module", "tests.test_cli", "--verbose",
            "--scheduler-host", "localhost", "--scheduler-port", str(port)]   # full task lines
    # Every Source waits for a lock the test holds, so the test decides who finishes when.
    held = {i: BuildLock(Source(path=str(text), scale=i).output_dir()) for i in (1, 2, 3)}
    for lock in held.values():
        lock.acquire()
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]

    def running(scale):
        import re
        line = re.compile(rf"running\s+Source\(path=[^,]*, scale={scale}\)")
        return [n for n, log in enumerate(logs) if line.search(log.read_text())]

    try:
        def listening():
            try:
                socket.create_connection(("localhost", port), timeout=1).close()
                return True
            except OSError:
                return False
        _wait_for(listening, "luigid")
        workers = [_tinykd(argv, isolated_workdir, log) for log in logs]
        _wait_for(lambda: sum(bool(running(i)) for i in (1, 2, 3)) == 2, "two Sources running")
        first, second = [i for i in (1, 2, 3) if running(i)]
        held[second].release()                # its worker moves on to the third Source
        third = ({1, 2, 3} - {first, second}).pop()
        _wait_for(lambda: running(third), "the third Source")
        held[first].release()                 # its worker finds nothing left to run
        import time
        time.sleep(2.0)
        held[third].release()
        codes = [w.wait(timeout=120) for w in workers]
    finally:
        for lock in held.values():
            lock.release()
        scheduler.terminate()
        scheduler.wait(timeout=30)
    assert codes == [0, 0], "\n".join(log.read_text()[-2500:] for log in logs)
    assert Fan(path=str(text)).output_dir().exists()


def test_explain_calls_an_output_with_a_missing_file_broken(tmp_path, capsys):
    text = tmp_path / "in.txt"
    text.write_text("a\n")
    assert luigi.build([Consumer(path=str(text))], local_scheduler=True, log_level="ERROR")
    _clear()
    (Source(path=str(text)).output_dir() / "lines.txt").unlink()
    _clear()
    lines = explain_lines(Consumer(path=str(text)))
    assert lines[0].startswith("broken      Source") and "lines.txt: missing" in lines[1]
    assert any("remove" in line and "to rebuild it" in line for line in lines)


class _ConfiguredConsumer(StageTask):
    """Takes its upstream's ``scale`` from the command line / configuration, not a parameter."""

    stage_name = "test_configured_consumer"
    path = luigi.Parameter(description="input text file")

    def requires(self):
        return {"source": Source(path=self.path)}

    def build(self, out):
        out.rows["chars"] = len((self.upstream_dir("source") / "lines.txt").read_text())


def test_task_from_argv_resolves_upstream_values_of_each_command_line(tmp_path):
    # Two command lines that differ only upstream name tasks with equal own parameters. Luigi
    # caches task instances by their own parameters, so without a fresh cache the second line
    # got the first line's task, fingerprint and output directory (scripts/cache_quality.py
    # compared a run with itself).
    from tasks.cli import task_from_argv

    text = tmp_path / "in.txt"
    text.write_text("a\n")
    dirs = []
    for scale in ("1", "2"):
        with task_from_argv(["_ConfiguredConsumer", "--path", str(text), "--Source-scale", scale]) as task:
            dirs.append((task.output_dir(), task.requires()["source"].scale))
    assert [scale for _, scale in dirs] == [1, 2]
    assert dirs[0][0] != dirs[1][0]


class Reporter(StageTask):
    """A stage that writes a report, as Ablations and GLUE do."""

    stage_name = "test_reporter"
    report_files = ("report.md", "summary.json")
    path = luigi.Parameter(description="input text file")

    def requires(self):
        return {"source": Source(path=self.path)}

    def build(self, out):
        (out.path / "report.md").write_text("# a report\n")
        (out.path / "summary.json").write_text("{}\n")


def test_a_run_that_writes_a_report_prints_its_paths_last(tmp_path, capsys):
    text = tmp_path / "in.txt"
    text.write_text("a\n")
    assert main(["run", "Reporter", "--path", str(text), "--module", "tests.test_cli", "--no-lock"]) == 0
    out = capsys.readouterr().out.rstrip().splitlines()
    _clear()
    where = Reporter(path=str(text)).output_dir()
    assert out[-3:] == ["Report files:", f"  {where / 'report.md'}", f"  {where / 'summary.json'}"]
    assert out[-5:-3] == ["===== Luigi Execution Summary =====", ""], out[-8:]
