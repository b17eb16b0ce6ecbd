"""`explain` compares a stale stage with the closest earlier output of the same task (issue 15,
item 3), not with the newest output of the stage from any task."""
from __future__ import annotations

import time

import luigi

from tasks.cli import explain_lines
from tasks.prepare import PrepareData


def write_glue(root):
    """Two tiny GLUE tasks in their real layouts: CoLA (headerless) and RTE (with a header)."""
    (root / "CoLA").mkdir(parents=True)
    for split, n in (("train", 6), ("dev", 3)):
        (root / "CoLA" / f"{split}.tsv").write_text(
            "".join(f"src\t{i % 2}\t\tsentence {split} {i} .\n" for i in range(n)))
    (root / "RTE").mkdir()
    for split, n in (("train", 6), ("dev", 3)):
        (root / "RTE" / f"{split}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "".join(
            f"{i}\tpremise {i}\thypothesis {i}\t{'entailment' if i % 2 else 'not_entailment'}\n"
            for i in range(n)))


def _prepare(glue, **params) -> PrepareData:
    luigi.task_register.Register.clear_instance_cache()
    return PrepareData(source="glue", glue_dir=str(glue), **params)


def _build(task) -> None:
    assert luigi.build([task], local_scheduler=True, log_level="ERROR")
    time.sleep(0.01)   # distinct manifest mtimes: "newest" is well defined


def test_a_new_task_is_not_compared_with_another_tasks_output(tmp_path):
    glue = tmp_path / "glue"
    write_glue(glue)
    _build(_prepare(glue, task="CoLA"))
    status = _prepare(glue, task="RTE").explain()
    assert not status.up_to_date
    assert status.reasons == ["no earlier output of this stage for task RTE (earlier outputs: 1 of "
                              "task(s) CoLA)"]
    assert "CoLA/dev.tsv" not in "\n".join(explain_lines(_prepare(glue, task="RTE")))


def test_the_closest_output_of_the_same_task_is_named_and_compared(tmp_path):
    glue = tmp_path / "glue"
    write_glue(glue)
    first = _prepare(glue, task="RTE", max_train_examples=2)
    _build(first)
    other_seed = _prepare(glue, task="RTE", max_train_examples=4, subset_seed=7)
    _build(other_seed)
    _build(_prepare(glue, task="CoLA", max_train_examples=3))     # the newest output: another task

    status = _prepare(glue, task="RTE", max_train_examples=3).explain()
    # closest: the RTE output differing in one parameter (not the newer one differing in two,
    # nor the newest, CoLA's)
    assert status.reasons[0].startswith(f"compared with {first.fingerprint()}, the closest earlier "
                                        "output (same task RTE; ")
    assert [r.strip() for r in status.reasons[1:]] == ["parameter max_train_examples: 2 -> 3"]

    # an edit of RTE's dev file is reported against RTE's own file
    (glue / "RTE" / "dev.tsv").write_text((glue / "RTE" / "dev.tsv").read_text() + "9\tp\th\tentailment\n")
    status = _prepare(glue, task="RTE", max_train_examples=2).explain()
    assert status.reasons[0].startswith(f"compared with {first.fingerprint()}")
    assert [r.strip() for r in status.reasons[1:]] == [
        f"input file dev ({(glue / 'RTE' / 'dev.tsv').resolve()}) content changed"]
