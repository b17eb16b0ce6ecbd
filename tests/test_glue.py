"""`tinykd run GLUE` end to end on tiny generated GLUE directories (every task in its real
layout, a tiny teacher), and the harness's refusals of bad input before anything trains."""
from __future__ import annotations

import csv
import json
import re

import luigi
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.glue.submission import VOCABULARY
from tests.glue_layouts import glue_test_rows, write_glue_task
from tests.test_distill_tasks import one_torch_thread  # noqa: F401  (autouse fixture)

ALL = ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI"]


def _profile(task: str, teacher, augmented: bool) -> str:
    return f"""
[PrepareData]
source = glue
task = {task}
selection = holdout
holdout_fraction = 0.1
submission = true
[Augment]
mode = glove
num_aug = 2
aug_progress = false
[FineTuneTeacher]
teacher = {teacher}
epochs = 1
batch_size = 8
eval_every = 2
max_seq_length = 32
device = cpu
progress = false
[TeacherCache]
examples = {'augmented' if augmented else 'train'}
student_layers = 2
extra_layer_maps =
max_seq_length = 32
progress = false
[DistillIntermediate]
student_hidden_size = 32
student_intermediate_size = 64
student_heads = 4
max_steps = 3
batch_size = 8
device = cpu
progress = false
[DistillPrediction]
max_steps = 4
batch_size = 8
eval_every = 1
device = cpu
progress = false
"""


@pytest.fixture
def glue_setup(tmp_path, monkeypatch, minilm_dir):
    from luigi.configuration import LuigiConfigParser

    from tests.test_cache import make_teacher

    teacher = make_teacher(tmp_path / "teacher", minilm_dir, bare=True)
    glue = tmp_path / "glue"
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    for task in ALL:
        write_glue_task(glue, task)
        (profiles / f"{task}.cfg").write_text(_profile(task, teacher, augmented=task == "SST-2"))
    config = tmp_path / "luigi.cfg"
    config.write_text(f"""
[PrepareData]
glue_dir = {glue}
[GLUE]
profile_dir = {profiles}
bootstrap_resamples = 200
device = cpu
""")
    monkeypatch.setattr(LuigiConfigParser, "_config_paths", [str(config)])
    monkeypatch.setattr(LuigiConfigParser, "_instance", None)
    luigi.task_register.Register.clear_instance_cache()
    return glue, profiles


def build(*tasks):
    return luigi.build(list(tasks), local_scheduler=True, detailed_summary=True, log_level="WARNING")


@pytest.mark.slow
def test_glue_table_intervals_and_submission_files_for_every_task(glue_setup, isolated_workdir):
    from tasks.glue import GLUE
    from tests.test_ablations import ran_tasks

    glue, profiles = glue_setup
    harness = GLUE(tasks=ALL, seeds="2")
    result = build(harness)
    assert result.status.name in ("SUCCESS", "SUCCESS_WITH_RETRY"), result.summary_text
    out = harness.output_dir()
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    columns = ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI-m", "MNLI-mm", "QNLI", "RTE", "WNLI"]
    assert [r["column"] for r in rows if r["headline"]] == columns
    # STS-B selects by corr, the mean of the two correlations it reports
    assert {r["column"] for r in rows if r["selection_metric"]} == set(columns) - {"STS-B"}
    assert {(r["column"], r["metric"]) for r in rows} >= {("MRPC", "accuracy"), ("QQP", "accuracy"),
                                                          ("STS-B", "pearson"), ("STS-B", "spearman")}
    headline = {r["column"]: r["metric"] for r in rows if r["headline"]}
    assert headline["CoLA"] == "mcc" and headline["MRPC"] == "f1" and headline["STS-B"] == "spearman"
    for r in rows:
        assert r["seeds"] == 2 and r["student_std"] is not None and len(r["student_runs"]) == 2
        assert r["teacher_low"] <= r["teacher"] + 1e-9 and r["teacher"] <= r["teacher_high"] + 1e-9
        assert r["student_low"] <= r["student_high"]
        assert r["student"] == pytest.approx(np.mean(r["student_runs"]))
        if r["column"] == "MNLI-mm":
            assert r["best_on_dev"] is None   # evaluated once per student, after training
        else:
            assert r["flattery_low"] <= r["flattery_high"]
            if r["selection_metric"]:
                # in the metric evaluations are compared by, the best of the run's dev
                # evaluations is at least the kept student's
                assert r["flattery"] >= -1e-9
        assert r["selection"] == "holdout"
    paper = {r["column"]: r["paper_tinybert4"] for r in rows if r["headline"]}
    assert paper["SST-2"] == 92.6 and paper["WNLI"] is None
    averages = summary["averages"]
    assert averages["paper_style"]["paper_tinybert4"] == 77.0 and len(averages["glue_score_tasks"]) == 9
    # the GLUE score: MRPC's F1 and accuracy averaged, MNLI's two columns averaged
    per_task = {}
    for r in rows:
        per_task.setdefault(r["task"], {}).setdefault(r["column"], []).append(r["teacher"])
    expected = np.mean([np.mean([np.mean(v) for v in cols.values()]) for cols in per_task.values()])
    assert averages["glue_score"]["teacher"] == pytest.approx(expected)
    md = (out / "glue.md").read_text()
    assert "Pre-flight checks" in md.split("|")[0] and "held-out train rows" in md
    # the tiny random teachers are no better than the majority class: flagged, never "passed"
    assert "**FAIL SST-2: teacher better than the majority class**" in md
    passed = next(line for line in md.splitlines() if line.startswith("- passed or not applicable"))
    listed = re.search(r"teacher better than the majority class( \(([^)]*)\))?", passed)
    assert listed is None or (listed.group(2) is not None and "SST-2" not in listed.group(2)), passed
    assert "| MNLI-mm | accuracy |" in md and "average (GLUE score" in md and "## Compute" in md
    # paper figures not checked against the paper carry a dagger, the checked ones none
    qqp, sst2 = (next(line for line in md.splitlines() if line.startswith(f"| {c} | {m} |"))
                 for c, m in (("QQP", "f1"), ("SST-2", "accuracy")))
    assert qqp.endswith("| 71.2† | 71.3† |") and sst2.endswith("| 93.4 | 92.6 |")
    assert "† a paper figure entered from memory" in md
    assert (out / "glue.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list(csv.DictReader((out / "glue.csv").open()))) == len(rows)
    for task in ALL:
        compute = summary["tasks"][task]["compute"]
        # the cache's shards count although this cold run scheduled them dynamically (a resumed
        # run finds them statically): both give the same table
        assert {"teacher", "teacher_cache_shard", "teacher_cache", "distill_stage1",
                "distill_stage2"} <= set(compute["stages"])
        assert compute["stages"]["distill_stage2"]["outputs"] == 2 and compute["cache_bytes"] > 0
        assert compute["stages"]["teacher"]["devices"] == ["cpu"] and compute["cpu_seconds"] > 0
    # submission files: the server's names, header, every test row in order, its vocabulary
    names = ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI-m", "MNLI-mm", "AX", "QNLI", "RTE", "WNLI"]
    assert sorted(p.stem for p in (out / "submission").iterdir()) == sorted(names)
    for name in names:
        lines = (out / "submission" / f"{name}.tsv").read_text().splitlines()
        assert lines[0] == "index\tprediction"
        expected_rows = glue_test_rows(glue, name)
        assert [line.split("\t")[0] for line in lines[1:]] == [row[0] for row in expected_rows]
        values = [line.split("\t")[1] for line in lines[1:]]
        if name == "STS-B":
            assert all(0.0 <= float(v) <= 5.0 for v in values)
        else:
            assert set(values) <= set(VOCABULARY[name])
    # no held-out row reached the augmented data or the cache
    from tasks.augment import Augment
    from tasks.prepare import PrepareData
    from tasks.teacher import TeacherCache

    sst2 = str(profiles / "SST-2.cfg")
    held = set(pq.read_table(PrepareData(profile=sst2).output_dir() / "holdout.parquet").column("id").to_pylist())
    assert held
    augmented = set()
    for shard in (Augment(profile=sst2).output_dir() / "shards").glob("*.parquet"):
        augmented |= set(pq.read_table(shard, columns=["orig_id"]).column("orig_id").to_pylist())
    cached = set()
    for shard in (TeacherCache(profile=sst2).output_dir() / "shards").glob("*.parquet"):
        cached |= set(pq.read_table(shard, columns=["orig_id"]).column("orig_id").to_pylist())
    assert augmented and cached and not held & augmented and not held & cached
    # a subset with the same seeds reuses every stage: only the new table is built
    luigi.task_register.Register.clear_instance_cache()
    again = build(GLUE(tasks=["SST-2", "MRPC"], seeds="2"))
    assert ran_tasks(again.summary_text) == {"GLUE": 1}


def test_a_profile_gives_the_fingerprints_of_the_same_file_as_a_config(glue_setup):
    """A task's stages under profile P are the stages of `tinykd --config P run ...`."""
    from tasks.cli import configuration
    from tasks.distill import DistillPrediction

    _, profiles = glue_setup
    profile = str(profiles / "MRPC.cfg")
    with_profile = DistillPrediction(profile=profile)
    mine = (with_profile.fingerprint(), with_profile.requires()["data"].fingerprint())
    with configuration(profile):
        plain = DistillPrediction()
        assert (plain.fingerprint(), plain.requires()["data"].fingerprint()) == mine
        assert plain.requires()["data"].task == "MRPC"
    assert DistillPrediction(profile=str(profiles / "RTE.cfg")).fingerprint() != mine[0]


def test_unknown_task_missing_files_and_bad_test_columns_fail_before_anything_runs(glue_setup, isolated_workdir):
    from tasks.glue import GLUE

    glue, profiles = glue_setup
    with pytest.raises(InputError, match=r"unknown task\(s\) \['SST-3'\]"):
        GLUE(tasks=["SST-2", "SST-3"]).requires()
    (glue / "RTE" / "dev.tsv").unlink()
    with pytest.raises(InputError, match=r"GLUE RTE dev file not found") as missing:
        GLUE(tasks=["SST-2", "RTE"]).requires()
    assert str(glue / "RTE" / "dev.tsv") in str(missing.value)
    (glue / "QNLI" / "test.tsv").write_text("index\tquestion\ttext\n0\ta?\tb\n")
    with pytest.raises(InputError, match=r"GLUE QNLI test file has no column\(s\) \['sentence'\]") as columns:
        GLUE(tasks=["QNLI"]).fingerprint()
    assert str(glue / "QNLI" / "test.tsv") in str(columns.value)
    (profiles / "CoLA.cfg").write_text((profiles / "CoLA.cfg").read_text().replace(
        "holdout_fraction = 0.1", "holdout_fraction = 0.6"))
    with pytest.raises(InputError, match=r"holdout_fraction must be in \(0, 0.5\]"):
        GLUE(tasks=["SST-2", "CoLA"]).requires()
    with pytest.raises(InputError, match="no profile WNLI.cfg"):
        (profiles / "WNLI.cfg").unlink()
        GLUE(tasks=["WNLI"]).requires()
    # a failed run through the command line: one line naming the task and file, nothing built
    result = build(GLUE(tasks=["SST-2", "QNLI"]))
    assert result.status.name == "SCHEDULING_FAILED"
    assert not isolated_workdir.exists() or not [p for p in isolated_workdir.iterdir() if p.name != ".hash-cache.json"]


def test_a_paper_row_that_does_not_average_to_its_average_has_unchecked_figures():
    """The paper's average row is checked; a row of PAPER_TABLE1 whose figures do not average to
    it holds a wrong figure, which must be among the ones marked unchecked (in glue.md)."""
    from pipeline.glue.paper import PAPER_AVERAGE, PAPER_TABLE1, UNCHECKED_FIGURES

    for index, model in ((1, "bert_base"), (2, "tinybert4")):
        mean = np.mean([figures[index] for figures in PAPER_TABLE1.values()])
        if round(mean, 1) != PAPER_AVERAGE[model]:
            assert any(m == model for _, m in UNCHECKED_FIGURES), (model, mean)
    assert {column for column, _ in UNCHECKED_FIGURES} <= set(PAPER_TABLE1)


def test_preflight_lists_every_broken_task_with_its_file_and_writes_nothing(glue_setup, isolated_workdir, capsys):
    """RTE without its dev file, CoLA without its train file: one failure naming both files
    (the harness used to stop at RTE's), on the console, in errors.jsonl and in the run log."""
    from pipeline.errors import InputErrors
    from tasks.cli import main
    from tasks.glue import GLUE

    glue, profiles = glue_setup
    (glue / "RTE" / "dev.tsv").unlink()
    (glue / "CoLA" / "train.tsv").unlink()
    (profiles / "SST-2.cfg").write_text((profiles / "SST-2.cfg").read_text().replace(
        "holdout_fraction = 0.1", "holdout_fraction = 0.7"))
    with pytest.raises(InputErrors) as failed:
        GLUE(tasks=["RTE", "CoLA", "SST-2", "MRPC"]).requires()
    problems = {str(p) for p in failed.value.problems}
    assert problems == {f"{glue / 'RTE' / 'dev.tsv'}: GLUE RTE dev file not found (expected <glue_dir>/RTE/dev.tsv)",
                        f"{glue / 'CoLA' / 'train.tsv'}: GLUE CoLA train file not found (expected "
                        "<glue_dir>/CoLA/train.tsv)",
                        f"{profiles / 'SST-2.cfg'}: [GLUE] task SST-2: [PrepareData] holdout_fraction must be in "
                        "(0, 0.5], got 0.7"}
    luigi.task_register.Register.clear_instance_cache()
    assert main(["run", "GLUE", "--GLUE-tasks", '["RTE", "CoLA"]', "--no-lock"]) == 1
    captured = capsys.readouterr()
    after = captured.out[captured.out.rindex("===== Luigi Execution Summary =====\n"):].splitlines()[1:]
    failed_lines = [line for line in after if line]
    assert failed_lines[0].startswith("FAILED GLUE: 2 problems in the pre-flight of 2 GLUE task(s); nothing was run:")
    assert failed_lines[1] == f"- {glue / 'RTE' / 'dev.tsv'}: GLUE RTE dev file not found (expected <glue_dir>/RTE/dev.tsv)"
    assert failed_lines[2].startswith(f"- {glue / 'CoLA' / 'train.tsv'}: GLUE CoLA train file not found")
    assert "scheduled 1 task: 0 to run, 0 up to date, 1 failed before running" in captured.err
    errors = next((isolated_workdir / "logs").glob("run-*.errors.jsonl")).read_text()
    assert str(glue / "RTE" / "dev.tsv") in errors and str(glue / "CoLA" / "train.tsv") in errors
    log = next((isolated_workdir / "logs").glob("run-*[0-9].log")).read_text()
    assert "GLUE CoLA train file not found" in log and "GLUE RTE dev file not found" in log
    written = [p for p in isolated_workdir.rglob("*") if p.is_file() and p.parent.name != "logs"
               and not re.match(r"\.hash-cache\.json", p.name)]
    assert not written, written
