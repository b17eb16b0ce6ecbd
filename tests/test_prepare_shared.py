"""End to end on the real GLUE files in ../shared/data/glue (skipped when they are absent).

Prepares SST-2 and MRPC through Luigi, checks the exact row counts and the content against an
independent read of the raw files (csv module, quoting disabled), then runs the same DAG again
and shows that the second run executes nothing.
"""
from __future__ import annotations

import csv
import json

import luigi
import pytest
from luigi.task_register import Register

from pipeline.prepare.splits import read_split, task_info
from tasks.prepare import PrepareData

pytestmark = [pytest.mark.slow, pytest.mark.shared]

EXPECTED_ROWS = {"SST-2": {"train": 67349, "dev": 872}, "MRPC": {"train": 3668, "dev": 408}}


def raw_rows(path):
    """The raw file as lists of fields, read independently of pipeline.prepare.splits."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        return list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]


def dag(glue_dir):
    return [PrepareData(source="glue", glue_dir=str(glue_dir), task=task) for task in EXPECTED_ROWS]


def test_prepare_sst2_and_mrpc_then_rerun_is_a_no_op(shared_glue, isolated_workdir):
    first = luigi.build(dag(shared_glue), local_scheduler=True, detailed_summary=True, log_level="WARNING")
    assert first.scheduling_succeeded and first.status.name == "SUCCESS"
    assert "Did not run any tasks" not in first.summary_text

    outputs = {task.task: task.output_dir() for task in dag(shared_glue)}
    for name, out in outputs.items():
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["rows"] == EXPECTED_ROWS[name]
        info = task_info(out)
        assert info["label_names"] == ["0", "1"] and info["num_labels"] == 2
        assert info["skipped"]["count"] == 0
        for split, count in EXPECTED_ROWS[name].items():
            table = read_split(out, split)
            assert table.num_rows == count
            assert table["id"].to_pylist() == [f"{split}-{i}" for i in range(count)]
            labels = table["label"].to_pylist()
            assert set(labels) == {0, 1}
            texts_a = table["text_a"].to_pylist()
            assert all(t.strip() for t in texts_a)
            raw = raw_rows(shared_glue / name / f"{split}.tsv")
            assert len(raw) == count
            if name == "SST-2":
                assert table["text_b"].null_count == count and info["is_pair"] is False
                assert texts_a == [r[0] for r in raw]
                assert labels == [int(r[1]) for r in raw]
            else:
                texts_b = table["text_b"].to_pylist()
                assert info["is_pair"] is True and all(t and t.strip() for t in texts_b)
                assert (texts_a, texts_b, labels) == ([r[3] for r in raw], [r[4] for r in raw],
                                                      [int(r[0]) for r in raw])
                # literal quotes survive (csv's default quoting would strip or merge them)
                assert sum('"' in a or '"' in b for a, b in zip(texts_a, texts_b)) > 50
                assert not any(t.startswith("\ufeff") for t in texts_a)
        if name == "MRPC":
            assert read_split(out, "train")["text_a"][0].as_py() == (
                'Amrozi accused his brother, whom he called "the witness", of deliberately '
                "distorting his evidence.")

    stage_dir = isolated_workdir / "prepare_data"
    before = {p.name: (p / "manifest.json").stat().st_mtime_ns for p in stage_dir.glob("[!.]*")}
    assert len(before) == 2

    Register.clear_instance_cache()  # fresh task objects, as in a new process
    second = luigi.build(dag(shared_glue), local_scheduler=True, detailed_summary=True, log_level="WARNING")
    assert second.scheduling_succeeded and second.status.name == "SUCCESS"
    assert "Did not run any tasks" in second.summary_text
    assert "2 complete ones were encountered" in second.summary_text
    after = {p.name: (p / "manifest.json").stat().st_mtime_ns for p in stage_dir.glob("[!.]*")}
    assert after == before
