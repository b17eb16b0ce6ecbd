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
    assert {p.parent.name for p in garbage} == {"test_source", "test_consumer"} and len(garbage) == 2
    assert keep.output_dir() not in garbage
    _clear()
    assert main(["gc", "Consumer", "--path", str(text), "--scale", "2"]) == 0
    assert "2 unreferenced output(s)" in capsys.readouterr().out
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
    out = capsys.readouterr().out.rstrip()
    assert out.endswith("===== Luigi Execution Summary =====") and "2 ran successfully" in out
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
