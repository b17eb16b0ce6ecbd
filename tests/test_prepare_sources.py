"""Prepare-data trust fixes found on held-out data (issue 15): local Hugging Face directories are
hashed, labels are never guessed silently, integer labels in text files are class indices, a
files/HF source names its task, and headerless files are mapped by column index."""
from __future__ import annotations

import logging

import luigi
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.prepare.splits import prepare, read_split
from tasks.prepare import PrepareData

RTE_NAMES = ["entailment", "not_entailment"]


def rows_of(out, split):
    table = read_split(out, split)
    return list(zip(table["text_a"].to_pylist(), table["text_b"].to_pylist(), table["label"].to_pylist()))


def write_rte_export(root, dev_rows: int):
    """RTE as the Hugging Face hub exports it: Parquet shards, integer labels, an ``idx`` column."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 6), ("validation", dev_rows)):
        pq.write_table(pa.table({"sentence1": [f"premise {i}" for i in range(n)],
                                 "sentence2": [f"hypothesis {i}" for i in range(n)],
                                 "label": [i % 2 for i in range(n)], "idx": list(range(n))}),
                       root / "data" / f"{split}-00000-of-00001.parquet")


def _fresh_prepare(**kwargs) -> PrepareData:
    luigi.task_register.Register.clear_instance_cache()
    return PrepareData(**kwargs)


def test_a_local_hf_name_directory_is_hashed_so_cutting_dev_rows_is_stale(tmp_path, isolated_workdir):
    """Item 1: hf_name = a local directory; its files enter the fingerprint."""
    pytest.importorskip("datasets")
    repo = tmp_path / "rte-export"
    write_rte_export(repo, dev_rows=5)
    params = dict(source="hf", hf_name=str(repo), task="RTE", hf_cache_dir=str(tmp_path / "hf-cache"))
    task = _fresh_prepare(**params)
    assert luigi.build([task], local_scheduler=True, log_level="ERROR")
    manifest_inputs = __import__("json").loads((task.output_dir() / "manifest.json").read_text())["inputs"]
    assert list(manifest_inputs) == ["hf_name"]
    assert rows_of(task.output_dir(), "dev")[:2] == [("premise 0", "hypothesis 0", 0),
                                                     ("premise 1", "hypothesis 1", 1)]
    assert _fresh_prepare(**params).explain().up_to_date

    write_rte_export(repo, dev_rows=3)          # the dev file loses rows
    changed = _fresh_prepare(**params)
    status = changed.explain()
    assert not status.up_to_date and changed.fingerprint() != task.fingerprint()
    assert any("input file hf_name" in reason for reason in status.reasons), status.reasons
    # the path is not identity: the same bytes elsewhere are the same output
    moved = tmp_path / "elsewhere"
    write_rte_export(moved, dev_rows=3)
    assert _fresh_prepare(**{**params, "hf_name": str(moved)}).fingerprint() == changed.fingerprint()


def _files(tmp_path, train: str, dev: str, suffix=".tsv"):
    (tmp_path / f"train{suffix}").write_text(train)
    (tmp_path / f"dev{suffix}").write_text(dev)
    return {"kind": "files", "train": tmp_path / f"train{suffix}", "dev": tmp_path / f"dev{suffix}"}


def test_a_stray_label_is_an_error_not_a_new_class(tmp_path):
    """Item 4: no label_names and no task labels -> an error naming what to declare."""
    source = _files(tmp_path, "text\tlabel\ngood\t1\nbad\t0\nodd\t2\n", "text\tlabel\nfine\t1\n")
    source.update(columns={"text_a": "text", "label": "label"}, task="reviews")
    with pytest.raises(InputError, match=r"needs its label set: label_names = \[") as caught:
        prepare(source, tmp_path / "out")
    assert caught.value.path.endswith("train.tsv")
    assert not (tmp_path / "out").exists()
    # declared names: the stray label fails naming its row
    with pytest.raises(InputError, match=r"train.tsv:4: label '2' is not in the task's label set"):
        prepare({**source, "label_names": ["neg", "pos"]}, tmp_path / "out")
    # a GLUE task name declares the labels too
    with pytest.raises(InputError, match=r"train.tsv:4: label '2'"):
        prepare({**source, "task": "SST-2"}, tmp_path / "out")


def test_infer_is_asked_for_and_reports_the_set_and_counts(tmp_path, caplog):
    source = _files(tmp_path, "text\tlabel\ngood\t1\nbad\t0\nodd\t2\nnice\t1\n", "text\tlabel\nfine\t1\n")
    source.update(columns={"text_a": "text", "label": "label"}, task="reviews", label_names="infer")
    with caplog.at_level(logging.WARNING, logger="tinykd.prepare"):
        result = prepare(source, tmp_path / "out")
    assert result["info"]["label_names"] == ["0", "1", "2"]
    assert result["info"]["label_names_inferred"] == {"0": 1, "1": 2, "2": 1}
    assert "3 label(s)" in caplog.text and "'1' x2" in caplog.text and "'2' x1" in caplog.text


def test_integer_labels_in_a_tsv_map_to_names_by_index_like_parquet(tmp_path):
    """Item 5: the Hugging Face TSV export of RTE has 0/1 labels; names are in index order."""
    source = _files(tmp_path, "sentence1\tsentence2\tlabel\tidx\nA\tB\t0\t0\nC\tD\t1\t1\n",
                    "sentence1\tsentence2\tlabel\tidx\nE\tF\t1\t0\n")
    source.update(columns={"text_a": "sentence1", "text_b": "sentence2", "label": "label"},
                  label_names=RTE_NAMES, task="RTE")
    result = prepare(source, tmp_path / "tsv")
    assert rows_of(tmp_path / "tsv", "train") == [("A", "B", 0), ("C", "D", 1)]
    assert result["info"]["label_names"] == RTE_NAMES
    # the same data as Parquet gives the same table
    for split, rows in (("train", [("A", "B", 0), ("C", "D", 1)]), ("dev", [("E", "F", 1)])):
        pq.write_table(pa.table({"sentence1": [r[0] for r in rows], "sentence2": [r[1] for r in rows],
                                 "label": [r[2] for r in rows]}), tmp_path / f"{split}.parquet")
    parquet = {**source, "train": tmp_path / "train.parquet", "dev": tmp_path / "dev.parquet"}
    prepare(parquet, tmp_path / "pq")
    assert rows_of(tmp_path / "pq", "train") == rows_of(tmp_path / "tsv", "train")
    assert rows_of(tmp_path / "pq", "dev") == rows_of(tmp_path / "tsv", "dev")
    # the task name alone (RTE) supplies the names
    no_names = {k: v for k, v in source.items() if k != "label_names"}
    assert prepare(no_names, tmp_path / "named")["info"]["label_names"] == RTE_NAMES


def test_a_files_or_hf_source_needs_a_task_name(tmp_path):
    """Item 6: no task -> an error (no silent SST-2 and its metric)."""
    source = _files(tmp_path, "text\tlabel\ngood\tpos\n", "text\tlabel\nfine\tpos\n")
    source.update(columns={"text_a": "text", "label": "label"}, label_names=["neg", "pos"])
    with pytest.raises(InputError, match="source kind 'files' needs a task name"):
        prepare(source, tmp_path / "out")
    with pytest.raises(InputError, match="source kind 'hf' needs a task name"):
        prepare({"kind": "hf", "dir": tmp_path, "columns": source["columns"]}, tmp_path / "out")


def test_the_project_luigi_cfg_gives_no_default_task():
    """Item 6: luigi.cfg's [PrepareData] task was inherited by every files/HF source."""
    import configparser
    from pathlib import Path

    config = configparser.ConfigParser(inline_comment_prefixes=(";", "#"))
    config.read(Path(__file__).resolve().parents[1] / "luigi.cfg")
    assert not config.has_option("PrepareData", "task")


def test_headerless_files_map_columns_by_index(tmp_path):
    """Item 7: CoLA as a lower-cased two-column copy (label, sentence), no header."""
    source = _files(tmp_path, "1\tthe cat sat .\n0\tcat the sat .\n1\ta dog ran .\n",
                    "0\tran dog a .\n")
    source.update(columns={"text_a": 1, "label": 0}, task="CoLA")
    result = prepare(source, tmp_path / "out")
    assert rows_of(tmp_path / "out", "train") == [("the cat sat .", None, 1), ("cat the sat .", None, 0),
                                                  ("a dog ran .", None, 1)]
    assert result["rows"] == {"train": 3, "dev": 1} and result["info"]["source"]["header"] is False
    csv_source = _files(tmp_path, '"a, b",1\nc,0\n', "d,1\n", suffix=".csv")
    csv_source.update(columns={"text_a": 0, "label": 1}, task="toy", label_names=["no", "yes"])
    prepare(csv_source, tmp_path / "csv")
    assert rows_of(tmp_path / "csv", "train") == [("a, b", None, 1), ("c", None, 0)]

    # a row with another column count, an index beyond the row, a mixed mapping: one clear error
    (tmp_path / "dev.tsv").write_text("0\tfine .\n1\tthree\tcolumns\n")
    with pytest.raises(InputError, match=r"dev.tsv:2: expected 2 tab-separated columns, found 3"):
        prepare(source, tmp_path / "out2")
    with pytest.raises(InputError, match=r"train.tsv:1: the column mapping asks for column\(s\) \{'text_a': 5\}"):
        prepare({**source, "columns": {"text_a": 5, "label": 0}}, tmp_path / "out3")
    with pytest.raises(InputError, match="mixes names and indices"):
        prepare({**source, "columns": {"text_a": 1, "label": "label"}}, tmp_path / "out4")


def test_label_names_parameter_accepts_infer_and_lists():
    luigi.task_register.Register.clear_instance_cache()
    assert PrepareData(label_names="infer").label_names == "infer"
    parameter = PrepareData.label_names
    assert parameter.parse("infer") == "infer" and list(parameter.parse('["a", "b"]')) == ["a", "b"]
    assert parameter.serialize("infer") == "infer"
    # a declared list keeps its fingerprint-relevant form (a tuple, as Luigi's ListParameter)
    assert PrepareData(label_names=["a", "b"]).label_names == ("a", "b")


def test_an_explicit_metric_is_recorded_and_used_downstream(tmp_path):
    """Item 6: "an explicit task name or an explicit metric"; the metric travels to evaluation."""
    import numpy as np

    from pipeline.common.metrics import task_metrics

    source = _files(tmp_path, "text\tlabel\ngood\tpos\nbad\tneg\n", "text\tlabel\nfine\tpos\n")
    source.update(columns={"text_a": "text", "label": "label"}, label_names=["neg", "pos"])
    info = prepare({**source, "metric": "f1"}, tmp_path / "out")["info"]
    assert info["task"] == "custom" and info["metric"] == "f1"
    assert prepare({**source, "task": "CoLA"}, tmp_path / "cola")["info"]["metric"] == "mcc"
    assert prepare({**source, "task": "reviews"}, tmp_path / "own")["info"]["metric"] == "accuracy"
    with pytest.raises(InputError, match="metric 'corr' is not one for classification"):
        prepare({**source, "metric": "corr"}, tmp_path / "bad")
    logits, labels = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]), np.array([1, 0, 0])
    scored = task_metrics(info["task"], "classification", logits, labels, info["metric"])
    assert scored["primary_metric"] == "f1" and scored["primary"] == pytest.approx(2 / 3)
    assert scored["accuracy"] == pytest.approx(2 / 3)
