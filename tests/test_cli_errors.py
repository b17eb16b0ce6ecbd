"""What `tinykd run` tells the user (issue 15, items 8 and 12): after Luigi's summary, one line
per failed task with its InputError message and no traceback (the traceback goes to the run's
log, or to the console with --verbose); Luigi's per-task lines name a task by family and
fingerprint instead of by every parameter."""
from __future__ import annotations

import luigi

from pipeline.errors import InputError
from tasks.base import StageTask
from tasks.cli import main
from tests.test_stage import Consumer


class BadRows(StageTask):
    """Fails in run(), as PrepareData does on a bad row."""

    stage_name = "test_bad_rows"
    path = luigi.Parameter(description="a data file")

    def stage_inputs(self):
        return {"data": self.path}

    def build(self, out):
        raise InputError("label '2' is not in the task's label set ['0', '1']", self.path, 4)


class BadInputs(StageTask):
    """Fails while Luigi checks completeness (its key needs a file that is missing)."""

    stage_name = "test_bad_inputs"

    def stage_inputs(self):
        raise InputError("source=glue needs PrepareData's glue_dir (or $GLUE_DIR)")


def _run(*argv):
    luigi.task_register.Register.clear_instance_cache()
    return main(["run", *argv, "--module", "tests.test_cli_errors", "--no-lock"])


def test_a_failed_task_ends_in_one_line_and_the_traceback_is_in_the_log(tmp_path, capsys, isolated_workdir):
    data = tmp_path / "train.tsv"
    data.write_text("text\tlabel\n")
    assert _run("BadRows", "--path", str(data)) == 1
    captured = capsys.readouterr()
    summary_end = captured.out.rindex("===== Luigi Execution Summary =====\n")
    after = [line for line in captured.out[summary_end:].splitlines()[1:] if line]
    luigi.task_register.Register.clear_instance_cache()
    fingerprint = BadRows(path=str(data)).fingerprint()
    assert after[0] == (f"FAILED BadRows[{fingerprint}]: {data}:4: label '2' is not in the task's "
                        "label set ['0', '1']")
    assert after[1].startswith("(tracebacks in ") and len(after) == 2
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    logs = list((isolated_workdir / "logs").glob("run-*.log"))
    assert len(logs) == 1 and "Traceback (most recent call last)" in logs[0].read_text()
    assert str(logs[0]) in after[1]


def test_an_error_while_checking_completeness_is_one_line_too(capsys):
    assert _run("BadInputs") == 1
    captured = capsys.readouterr()
    assert captured.out.rstrip().splitlines()[-2] == (
        "FAILED BadInputs: source=glue needs PrepareData's glue_dir (or $GLUE_DIR)")
    assert "Traceback" not in captured.err


def test_verbose_shows_the_traceback(tmp_path, capsys):
    data = tmp_path / "train.tsv"
    data.write_text("x\n")
    assert _run("BadRows", "--path", str(data), "--verbose") == 1
    captured = capsys.readouterr()
    assert "Traceback (most recent call last)" in captured.err
    assert "FAILED BadRows[" in captured.out


def test_luigis_per_task_lines_are_short_unless_verbose(tmp_path, capsys):
    text = tmp_path / "in.txt"
    text.write_text("a\n")
    luigi.task_register.Register.clear_instance_cache()
    consumer = Consumer(path=str(text))
    assert main(["run", "Consumer", "--path", str(text), "--module", "tests.test_stage", "--no-lock"]) == 0
    err = capsys.readouterr().err
    assert f"running   Consumer[{consumer.fingerprint()}]" in err
    assert f"done      Source[{consumer.upstream_tasks()['source'].fingerprint()}]" in err
    assert "Consumer(path=" not in err and "Worker(salt=" not in err
    luigi.task_register.Register.clear_instance_cache()
    assert main(["run", "Consumer", "--path", str(text), "--scale", "2", "--module", "tests.test_stage",
                 "--no-lock", "--verbose"]) == 0
    assert "Consumer(path=" in capsys.readouterr().err


def test_an_unparsable_configuration_value_is_one_line(tmp_path, capsys, monkeypatch):
    """A ';' comment after a JSON value is part of the value for Luigi: say which value fails."""
    from luigi.configuration import LuigiConfigParser

    config = tmp_path / "rte.cfg"
    config.write_text('[PrepareData]\nsource = files\nlabel_names = ["entailment", "not_entailment"]   ; 0, 1\n')
    monkeypatch.setattr(LuigiConfigParser, "_config_paths", [str(config)])
    monkeypatch.setattr(LuigiConfigParser, "_instance", None)
    luigi.task_register.Register.clear_instance_cache()
    assert main(["explain", "PrepareData"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Error when parsing the default value of 'label_names'" in err[0], err


def test_a_stage_without_profile_reprs_as_luigi_would_without_the_field(tmp_path):
    """The harness's ``profile`` is shown only when one is set: an empty ``profile=`` led every
    task line in the log (issue 22's parameter), which is noise for the common run."""
    from tests.test_stage import Consumer

    text = tmp_path / "in.txt"
    text.write_text("x")
    assert repr(Consumer(path=str(text))).startswith("Consumer(path=")
    profile = tmp_path / "p.cfg"
    profile.write_text("[Consumer]\nscale = 3\n")
    shown = repr(Consumer(path=str(text), profile=str(profile)))
    assert shown.startswith(f"Consumer(profile={profile}") and "scale=3" in shown


def test_a_task_that_fails_before_running_is_not_counted_up_to_date(capsys):
    """Its complete() raised: Luigi informs the scheduler of status UNKNOWN, which the console
    line once counted among the tasks up to date."""
    assert _run("BadInputs") == 1
    err = capsys.readouterr().err
    assert "INFO: scheduled 1 task: 0 to run, 0 up to date, 1 failed before running" in err
    assert "1 up to date" not in err


def test_the_scheduling_line_says_dynamic_dependencies_come_on_top():
    """The teacher cache yields its shards when its examples do not exist at scheduling: they
    are not among the tasks counted then (Luigi's summary counts them once they ran)."""
    from tasks.cli import scheduling_digest
    import tasks  # noqa: F401  (registers TeacherCache)

    cold = {"PrepareData_x_1": "PENDING", "TeacherCache_augmented_2": "PENDING", "WordVectors_y_3": "DONE"}
    assert scheduling_digest(cold) == ("scheduled 3 tasks + the dynamic dependencies of 1 TeacherCache "
                                       "(TeacherCacheShard) as they appear: 2 to run, 1 up to date")
    demo = {**cold, "Demo__99914b932b": "PENDING"}
    assert scheduling_digest(demo).startswith("scheduled 4 tasks + the dynamic dependencies of 1 Demo "
                                              "(ExportStudent) and 1 TeacherCache (TeacherCacheShard) as they appear")
    listed = {**cold, "TeacherCacheShard_augmented_4": "PENDING"}
    assert scheduling_digest(listed) == "scheduled 4 tasks: 3 to run, 1 up to date"


class LoudWarning(StageTask):
    """Warns as the teacher stage does on a degenerate teacher: a banner in the log and the same
    text as a Python warning (pipeline.teacher.finetune.check_against_baseline)."""

    stage_name = "test_loud_warning"

    def build(self, out):
        from pipeline.teacher.finetune import check_against_baseline

        out.info["check"] = check_against_baseline({"primary_metric": "accuracy", "primary": 0.5},
                                                   {"accuracy": 0.5, "primary": 0.5, "predicts": 0},
                                                   "teacher-dir", ["no", "yes"])


def test_a_warning_reaches_the_console_once_as_its_text(capsys, isolated_workdir):
    assert _run("LoudWarning") == 0
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if "TEACHER NO BETTER THAN THE MAJORITY CLASS" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("WARNING: TEACHER NO BETTER THAN THE MAJORITY CLASS: teacher-dir scores dev "
                               "accuracy 0.5000, the constant prediction 'no' scores 0.5000.")
    assert "traceback" not in lines[0] and "WARNING:  (" not in "\n".join(err)
    assert not [line for line in err if "UserWarning" in line]
    log = next((isolated_workdir / "logs").glob("run-*.log")).read_text()   # the banner and the warning
    assert "!" * 80 in log and "UserWarning: TEACHER NO BETTER THAN THE MAJORITY CLASS" in log
