"""Prepare-data stage: every loader on small fixtures, every bad-input case, and the Luigi stage.

Fixtures are written by the tests into tmp dirs, in the exact layouts of the GLUE download
(headers, column counts, CoLA without a header, MRPC with a byte-order mark and literal
quotes, MNLI's dev_matched.tsv with more columns than its train.tsv).
"""
from __future__ import annotations

import json
from pathlib import Path

import luigi
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.prepare.splits import GLUE_TASKS, prepare, read_split, source_inputs, task_info
from tasks.prepare import PrepareData


# --- GLUE fixtures, one per task: (train.tsv text, dev text, expected train rows) -------------
MNLI_TRAIN_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                     "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")
MNLI_DEV_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                   "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\t"
                   "label4\tlabel5\tgold_label\n")
GLUE_FIXTURES = {
    "SST-2": (
        "sentence\tlabel\nit 's a \"charming\" and often affecting journey . \t1\n"
        "unflinchingly bleak and desperate \t0\n",
        "sentence\tlabel\na gorgeous film \t1\n",
        [("it 's a \"charming\" and often affecting journey . ", None, 1),
         ("unflinchingly bleak and desperate ", None, 0)],
    ),
    "CoLA": (  # no header: source, label, original annotation, sentence
        "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
        "gj04\t0\t*\tThey drank the pub.\n",
        "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n",
        [("Our friends won't buy this analysis, let alone the next one we propose.", None, 1),
         ("They drank the pub.", None, 0)],
    ),
    "MRPC": (  # byte-order mark, and an unbalanced literal quote that csv quoting would eat
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        "1\t702876\t702977\tAmrozi accused his brother, whom he called \"the witness\", of lying.\t"
        "Referring to him as only \"the witness\", Amrozi accused his brother.\n"
        "0\t1355540\t1355592\tHe said the pie business doesn't fit.\t\"The pie business does not fit.\n",
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA cat sat.\tA cat was sitting.\n",
        [("Amrozi accused his brother, whom he called \"the witness\", of lying.",
          "Referring to him as only \"the witness\", Amrozi accused his brother.", 1),
         ("He said the pie business doesn't fit.", "\"The pie business does not fit.", 0)],
    ),
    "STS-B": (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\t"
        "An air plane is taking off.\t5.000\n"
        "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man is playing a flute.\t"
        "A man is eating.\t0.750\n",
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hat.\tA man.\t2.5\n",
        [("A plane is taking off.", "An air plane is taking off.", 5.0),
         ("A man is playing a flute.", "A man is eating.", 0.75)],
    ),
    "QQP": (
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
        "133273\t213221\t213222\tHow is the life of a math student?\tWhich is the best book?\t0\n"
        "402555\t536040\t536041\tHow do I control my horny emotions?\tHow do you control emotions?\t1\n",
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t2\t3\tWhy?\tWhy not?\t0\n",
        [("How is the life of a math student?", "Which is the best book?", 0),
         ("How do I control my horny emotions?", "How do you control emotions?", 1)],
    ),
    "MNLI": (  # dev is dev_matched.tsv, with 16 columns instead of 12
        MNLI_TRAIN_HEADER
        + "0\t31193\t31193n\tgovernment\t( ( a ) )\t( b )\t(ROOT a)\t(ROOT b)\t"
          "Conceptually cream skimming has two basic dimensions.\tProduct and geography are what "
          "make cream skimming work.\tneutral\tneutral\n"
        + "1\t101457\t101457e\ttelephone\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tyou know during the "
          "season\tYou lose the things.\tentailment\tentailment\n",
        MNLI_DEV_HEADER
        + "0\t63735\t63735n\tslate\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tThe new rights are nice "
          "enough\tEveryone really likes the newest benefits\tneutral\tneutral\tentailment\t"
          "neutral\tneutral\tneutral\n",
        [("Conceptually cream skimming has two basic dimensions.",
          "Product and geography are what make cream skimming work.", 2),
         ("you know during the season", "You lose the things.", 1)],
    ),
    "QNLI": (
        "index\tquestion\tsentence\tlabel\n"
        "0\tWhen did the third Digimon series begin?\tUnlike the two seasons before it.\tnot_entailment\n"
        "1\tWhich missile batteries often have individual launchers?\tThe missile batteries "
        "often have launchers.\tentailment\n",
        "index\tquestion\tsentence\tlabel\n0\tWhat?\tThat.\tentailment\n",
        [("When did the third Digimon series begin?", "Unlike the two seasons before it.", 1),
         ("Which missile batteries often have individual launchers?",
          "The missile batteries often have launchers.", 0)],
    ),
    "RTE": (
        "index\tsentence1\tsentence2\tlabel\n"
        "0\tNo Weapons of Mass Destruction Found in Iraq Yet.\tWeapons of Mass Destruction Found "
        "in Iraq.\tnot_entailment\n"
        "1\tA place of sorrow, after Pope John Paul II died.\tPope Benedict XVI is the new "
        "leader.\tentailment\n",
        "index\tsentence1\tsentence2\tlabel\n0\tA dog barks.\tAn animal makes noise.\tentailment\n",
        [("No Weapons of Mass Destruction Found in Iraq Yet.",
          "Weapons of Mass Destruction Found in Iraq.", 1),
         ("A place of sorrow, after Pope John Paul II died.", "Pope Benedict XVI is the new leader.", 0)],
    ),
}


def write_glue(root: Path, task: str, train: str | bytes, dev: str | bytes | None = None) -> Path:
    """Write ``<root>/<task>/train.tsv`` and its dev file; return ``root``."""
    spec = GLUE_TASKS[task]
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    dev = GLUE_FIXTURES[task][1] if dev is None else dev
    for path, content in ((folder / "train.tsv", train), (spec.split_file(root, "dev"), dev)):
        if isinstance(content, str):
            path.write_bytes(content.encode("utf-8"))
        else:
            path.write_bytes(content)
    return root


def rows_of(out: Path, split: str) -> list[tuple]:
    table = read_split(out, split)
    return list(zip(table["text_a"].to_pylist(), table["text_b"].to_pylist(), table["label"].to_pylist()))


# --- GLUE: one loader per task ------------------------------------------------------------------

@pytest.mark.parametrize("task", sorted(GLUE_FIXTURES))
def test_glue_task_layouts(tmp_path, task):
    train, dev, expected = GLUE_FIXTURES[task]
    root = write_glue(tmp_path / "glue", task, train, dev)
    out = tmp_path / "out"
    result = prepare({"kind": "glue", "glue_dir": root, "task": task}, out)

    assert rows_of(out, "train") == expected
    assert result["rows"] == {"train": len(expected), "dev": 1}
    table = read_split(out, "train")
    assert table["id"].to_pylist() == ["train-0", "train-1"]
    assert read_split(out, "dev")["id"].to_pylist() == ["dev-0"]
    spec = GLUE_TASKS[task]
    info = result["info"]
    assert info["task"] == task and info["is_pair"] == spec.is_pair
    if task == "STS-B":
        assert table.schema.field("label").type == pa.float64()
        assert info["task_type"] == "regression" and info["num_labels"] == 1 and info["label_names"] == []
    else:
        assert table.schema.field("label").type == pa.int64()
        assert info["label_names"] == list(spec.label_names) and info["num_labels"] == len(spec.label_names)
    if not spec.is_pair:
        assert table["text_b"].null_count == table.num_rows
    assert pq.ParquetFile(out / "train.parquet").metadata.row_group(0).column(0).compression == "ZSTD"


def test_glue_task_lookup_and_inputs(tmp_path):
    root = write_glue(tmp_path, "MNLI", GLUE_FIXTURES["MNLI"][0])
    inputs = source_inputs({"kind": "glue", "glue_dir": root, "task": "mnli"})
    assert inputs == {"train": (root / "MNLI" / "train.tsv").resolve(),
                      "dev": (root / "MNLI" / "dev_matched.tsv").resolve()}
    with pytest.raises(InputError, match="unknown GLUE task 'SST-3'"):
        source_inputs({"kind": "glue", "glue_dir": root, "task": "SST-3"})


def test_glue_crlf_line_endings_and_trailing_blank_lines(tmp_path):
    root = write_glue(tmp_path, "SST-2", "sentence\tlabel\r\ngood fun\t1\r\nawful\t0\r\n\r\n")
    out = tmp_path / "out"
    prepare({"kind": "glue", "glue_dir": root, "task": "SST-2"}, out)
    assert rows_of(out, "train") == [("good fun", None, 1), ("awful", None, 0)]


# --- GLUE: bad input ----------------------------------------------------------------------------

BAD_GLUE_ROWS = [
    # (task, train.tsv bytes, line, message fragment)
    ("SST-2", b"sentence\tlabel\ngood\t1\nbad\textra\t0\n", 3, "expected 2 tab-separated columns, found 3"),
    ("SST-2", b"sentence\tlabel\ngood\t1\nno label at all\n", 3, "expected 2 tab-separated columns, found 1"),
    ("SST-2", b"sentence\tscore\ngood\t1\n", 1, "header has no column 'label'"),
    ("SST-2", b"sentence\tlabel\ngood\t1\nbad\t2\n", 3, "label '2' is not in the task's label set ['0', '1']"),
    ("SST-2", b"sentence\tlabel\ngood\t1\n   \t0\n", 3, "empty text_a"),
    ("SST-2", b"sentence\tlabel\ngood\t1\ncaf\xe9 cr\xe8me\t0\n", 3, "invalid UTF-8"),
    ("MRPC", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA cat.\t\n".encode(), 2, "empty text_b"),
    ("MNLI", (MNLI_TRAIN_HEADER + "0\t1\t1n\tg\ta\tb\tc\td\tA man.\tA person.\t-\t-\n").encode(), 2,
     "label '-' is not in the task's label set"),
    ("CoLA", b"gj04\t1\t\tFine.\ngj04\t0\t*\n", 2, "expected 4 tab-separated columns, found 3"),
    ("STS-B", ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
               "0\tg\tf\ty\to\ts\ts\tA.\tB.\t5.5\n").encode(), 2, "outside the task's range [0.0, 5.0]"),
    ("STS-B", ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
               "0\tg\tf\ty\to\ts\ts\tA.\tB.\thigh\n").encode(), 2, "regression label 'high' is not a number"),
]


@pytest.mark.parametrize("task,content,line,problem", BAD_GLUE_ROWS,
                         ids=[f"{t}-{p[:24]}" for t, _, _, p in BAD_GLUE_ROWS])
def test_glue_bad_input_names_file_line_and_problem(tmp_path, task, content, line, problem):
    root = write_glue(tmp_path / "glue", task, content)
    out = tmp_path / "out"
    with pytest.raises(InputError) as caught:
        prepare({"kind": "glue", "glue_dir": root, "task": task}, out)
    error = caught.value
    train_file = root.resolve() / task / "train.tsv"
    assert error.path == str(train_file) and error.line == line
    assert problem in error.problem
    assert str(error).startswith(f"{train_file}:{line}: ")
    assert not out.exists()


def test_glue_missing_file_is_an_input_error(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(InputError, match=r"SST-2 dev file not found .*SST-2/dev.tsv"):
        prepare({"kind": "glue", "glue_dir": tmp_path, "task": "SST-2"}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_skip_bad_rows_reports_how_many_and_which(tmp_path):
    train = (b"sentence\tlabel\ngood\t1\nbad\t7\nfine\t1\ncaf\xe9\t0\n  \t1\ntoo\tmany\t0\nawful\t0\n")
    root = write_glue(tmp_path, "SST-2", train, "sentence\tlabel\nok\t1\nbroken\n")
    out = tmp_path / "out"
    result = prepare({"kind": "glue", "glue_dir": root, "task": "SST-2"}, out, skip_bad_rows=True)

    assert result["rows"] == {"train": 3, "dev": 1}
    # ids keep the source row index, so a kept row still points at its line in the file
    assert read_split(out, "train")["id"].to_pylist() == ["train-0", "train-2", "train-6"]
    assert rows_of(out, "train") == [("good", None, 1), ("fine", None, 1), ("awful", None, 0)]
    skipped = result["info"]["skipped"]
    assert skipped["count"] == 5 and skipped["by_split"] == {"train": 4, "dev": 1}
    assert skipped["capped"] is False
    train_file = str((root / "SST-2" / "train.tsv").resolve())
    lines = [entry.split(": ", 1)[0] for entry in skipped["rows"]]
    assert lines[:4] == [f"{train_file}:{n}" for n in (3, 5, 6, 7)]
    assert lines[4].endswith("SST-2/dev.tsv:3")
    assert "label '7' is not in the task's label set" in skipped["rows"][0]


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    root = write_glue(tmp_path, "SST-2", "sentence\tlabel\nx\t5\n")
    with pytest.raises(InputError, match="the train split has no usable rows"):
        prepare({"kind": "glue", "glue_dir": root, "task": "SST-2"}, tmp_path / "out", skip_bad_rows=True)
    assert not (tmp_path / "out").exists()


def test_max_train_examples_is_a_seeded_sample_in_source_order(tmp_path):
    lines = "".join(f"sentence number {i}\t{i % 2}\n" for i in range(50))
    root = write_glue(tmp_path, "SST-2", "sentence\tlabel\n" + lines)
    ids = {}
    for seed in (0, 0, 1):
        out = tmp_path / f"out-{seed}-{len(ids)}"
        result = prepare({"kind": "glue", "glue_dir": root, "task": "SST-2"}, out,
                         max_train_examples=10, subset_seed=seed)
        table = read_split(out, "train")
        ids.setdefault(seed, []).append(table["id"].to_pylist())
        assert result["rows"]["train"] == 10
        assert result["info"]["subsampled"] == {"train": {"from": 50, "kept": 10, "seed": seed}}
        # each kept row is the source row its id names, and the order is the source order
        numbers = [int(i.split("-")[1]) for i in table["id"].to_pylist()]
        assert numbers == sorted(numbers)
        assert table["text_a"].to_pylist() == [f"sentence number {n}" for n in numbers]
    assert ids[0][0] == ids[0][1] and ids[0][0] != ids[1][0]


# --- files: CSV, TSV, JSONL, Parquet ------------------------------------------------------------

def test_csv_with_quoting_and_column_mapping(tmp_path):
    (tmp_path / "train.csv").write_text(
        'premise,hypothesis,verdict,extra\n'
        '"A man, a plan.","A ""canal"" plan.",yes,1\n'
        '"Two lines\nin one field","B",no,2\n'
        'C,D,yes,3\n')
    (tmp_path / "dev.csv").write_text("premise,hypothesis,verdict,extra\nE,F,no,4\n")
    out = tmp_path / "out"
    result = prepare({"kind": "files", "train": tmp_path / "train.csv", "dev": tmp_path / "dev.csv",
                      "columns": {"text_a": "premise", "text_b": "hypothesis", "label": "verdict"},
                      "label_names": ["no", "yes"], "task": "toy-nli"}, out)
    assert rows_of(out, "train") == [("A man, a plan.", 'A "canal" plan.', 1),
                                     ("Two lines\nin one field", "B", 0), ("C", "D", 1)]
    assert result["info"]["is_pair"] and result["info"]["label_names"] == ["no", "yes"]
    assert result["info"]["task"] == "toy-nli"


def test_csv_bad_row_is_reported_at_its_starting_line(tmp_path):
    (tmp_path / "train.csv").write_text('text,label\n"multi\nline",pos\nshort\n')
    (tmp_path / "dev.csv").write_text("text,label\nok,pos\n")
    with pytest.raises(InputError) as caught:
        prepare({"kind": "files", "train": tmp_path / "train.csv", "dev": tmp_path / "dev.csv",
                 "columns": {"text_a": "text", "label": "label"}, "label_names": ["neg", "pos"],
                 "task": "reviews"},
                tmp_path / "out")
    assert caught.value.line == 4 and "expected 2 ','-separated columns, found 1" in str(caught.value)


def test_tsv_files_are_read_without_quoting_and_labels_inferred(tmp_path):
    (tmp_path / "a.tsv").write_text('review\tstars\n"quoted" start\tgood\nplain\tbad\n')
    (tmp_path / "b.tsv").write_text("review\tstars\nmore\tgood\n")
    out = tmp_path / "out"
    result = prepare({"kind": "files", "train": tmp_path / "a.tsv", "dev": tmp_path / "b.tsv",
                      "columns": {"text_a": "review", "label": "stars"}, "label_names": "infer",
                      "task": "reviews"}, out)
    # label_names = infer: the distinct train labels, sorted
    assert result["info"]["label_names"] == ["bad", "good"]
    assert rows_of(out, "train") == [('"quoted" start', None, 1), ("plain", None, 0)]


def test_jsonl_int_labels_index_named_classes_and_missing_field(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "lovely", "y": 1}\n{"text": "grim", "y": 0}\n')
    dev = tmp_path / "dev.jsonl"
    dev.write_text('{"text": "fine", "y": "positive"}\n')
    source = {"kind": "files", "train": train, "dev": dev, "columns": {"text_a": "text", "label": "y"},
              "label_names": ["negative", "positive"], "task": "sentiment"}
    out = tmp_path / "out"
    prepare(source, out)
    assert rows_of(out, "train") == [("lovely", None, 1), ("grim", None, 0)]
    assert rows_of(out, "dev") == [("fine", None, 1)]

    dev.write_text('{"text": "fine", "y": 1}\n{"txt": "typo", "y": 0}\n')
    with pytest.raises(InputError) as caught:
        prepare(source, tmp_path / "out2")
    assert caught.value.path == str(dev.resolve()) and caught.value.line == 2
    assert "missing field text_a ('text')" in caught.value.problem
    dev.write_text('{"text": "fine", "y": 2}\n')
    with pytest.raises(InputError, match=r"dev.jsonl:1: label 2 is not in the task's label set"):
        prepare(source, tmp_path / "out3")
    dev.write_text('{"text": "fine", "y": 1}\n{"text": "cut off", "y"\n')
    with pytest.raises(InputError, match=r"dev.jsonl:2: invalid JSON"):
        prepare(source, tmp_path / "out4")
    assert not any((tmp_path / f"out{n}").exists() for n in (2, 3, 4))


def test_parquet_regression_and_null_field(tmp_path):
    schema = pa.schema([("s1", pa.string()), ("s2", pa.string()), ("sim", pa.float64())])
    train = pa.table({"s1": ["a b", "c d"], "s2": ["a c", "c e"], "sim": [4.5, 1]}, schema=schema)
    dev = pa.table({"s1": ["x"], "s2": ["y"], "sim": [0.0]}, schema=schema)
    pq.write_table(train, tmp_path / "train.parquet")
    pq.write_table(dev, tmp_path / "dev.parquet")
    source = {"kind": "files", "train": tmp_path / "train.parquet", "dev": tmp_path / "dev.parquet",
              "columns": {"text_a": "s1", "text_b": "s2", "label": "sim"}, "task_type": "regression",
              "task": "similarity"}
    out = tmp_path / "out"
    result = prepare(source, out)
    assert rows_of(out, "train") == [("a b", "a c", 4.5), ("c d", "c e", 1.0)]
    assert result["info"]["task_type"] == "regression" and result["info"]["num_labels"] == 1

    pq.write_table(pa.table({"s1": ["x", "z"], "s2": ["y", None], "sim": [0.0, 1.0]}, schema=schema),
                   tmp_path / "dev.parquet")
    with pytest.raises(InputError) as caught:
        prepare(source, tmp_path / "out2")
    assert caught.value.line == 2 and caught.value.problem == "missing field 'text_b'"


def test_files_need_a_usable_column_mapping(tmp_path):
    (tmp_path / "t.tsv").write_text("text\tlabel\na\t1\n")
    base = {"kind": "files", "train": tmp_path / "t.tsv", "dev": tmp_path / "t.tsv", "task": "toy"}
    with pytest.raises(InputError, match="column mapping needs 'text_a'"):
        prepare({**base, "columns": {"label": "label"}}, tmp_path / "out")
    with pytest.raises(InputError, match=r"t.tsv:1: header has no column 'sentence'"):
        prepare({**base, "columns": {"text_a": "sentence", "label": "label"}}, tmp_path / "out")
    with pytest.raises(InputError, match="cannot tell the format"):
        prepare({**base, "train": tmp_path / "t.txt", "columns": {"text_a": "text", "label": "label"}},
                tmp_path / "out")


# --- Hugging Face: save_to_disk directory -------------------------------------------------------

def test_hf_save_to_disk_with_glue_defaults_and_classlabel(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"sentence": datasets.Value("string"), "idx": datasets.Value("int32"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    data = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(
            {"sentence": ["a fine film", "a dull film", "lively"], "idx": [0, 1, 2], "label": [1, 0, 1]},
            features=features),
        "validation": datasets.Dataset.from_dict(
            {"sentence": ["grim"], "idx": [0], "label": [0]}, features=features),
        "test": datasets.Dataset.from_dict({"sentence": ["?"], "idx": [0], "label": [-1]}, features=features),
    })
    data.save_to_disk(str(tmp_path / "sst2"))
    out = tmp_path / "out"
    source = {"kind": "hf", "dir": tmp_path / "sst2", "task": "SST-2"}
    result = prepare(source, out)
    assert rows_of(out, "train") == [("a fine film", None, 1), ("a dull film", None, 0), ("lively", None, 1)]
    assert result["info"]["label_names"] == ["negative", "positive"]
    assert result["info"]["source"]["splits"] == {"train": "train", "dev": "validation"}
    assert source_inputs(source) == {"hf_dir": (tmp_path / "sst2").resolve()}

    # GLUE's unlabeled test split (label -1) used as dev: rejected with its row number
    with pytest.raises(InputError) as caught:
        prepare({**source, "splits": {"dev": "test"}}, tmp_path / "out2")
    assert caught.value.path.endswith("sst2[test]") and caught.value.line == 1
    assert "label -1 is not in the task's label set" in caught.value.problem
    with pytest.raises(InputError, match="no split 'dev_matched'"):
        prepare({**source, "splits": {"dev": "dev_matched"}}, tmp_path / "out3")
    with pytest.raises(InputError, match=r"has no column \['sentence2'\]"):
        prepare({**source, "columns": {"text_b": "sentence2"}}, tmp_path / "out4")


# --- the demo data set --------------------------------------------------------------------------

def test_demo_data_is_reproducible_and_prepares(tmp_path):
    from pipeline.prepare.demo_task import ensure_demo_task, write_demo_task

    first = write_demo_task(tmp_path / "a")
    second = ensure_demo_task(tmp_path / "b")   # missing: written
    for split in ("train", "dev"):
        assert (first / f"{split}.tsv").read_bytes() == (second / f"{split}.tsv").read_bytes()
    assert sorted(p.name for p in first.iterdir()) == ["dev.tsv", "train.tsv"]  # no temporary left
    out = tmp_path / "out"
    result = prepare({"kind": "glue", "glue_dir": tmp_path / "a", "task": "SST-2"}, out)
    assert result["rows"] == {"train": 600, "dev": 120}
    assert result["info"]["label_counts"] == {"train": [300, 300], "dev": [60, 60]}
    train = set(read_split(out, "train")["text_a"].to_pylist())
    assert not train & set(read_split(out, "dev")["text_a"].to_pylist())


def test_an_existing_demo_task_is_left_as_it_is(tmp_path):
    from pipeline.prepare.demo_task import ensure_demo_task

    task_dir = ensure_demo_task(tmp_path)
    (task_dir / "dev.tsv").write_text("sentence\tlabel\nedited by the user .\t1\n")
    ensure_demo_task(tmp_path)
    assert (task_dir / "dev.tsv").read_text().endswith("edited by the user .\t1\n")
    (task_dir / "train.tsv").unlink()
    ensure_demo_task(tmp_path)   # a split missing: both rewritten
    assert len((task_dir / "train.tsv").read_text().splitlines()) == 601
    assert len((task_dir / "dev.tsv").read_text().splitlines()) == 121


# --- the Luigi stage ----------------------------------------------------------------------------

def run_luigi(*tasks):
    return luigi.build(list(tasks), local_scheduler=True, detailed_summary=True, log_level="WARNING")


def test_stage_builds_manifest_and_readers(tmp_path, isolated_workdir):
    root = write_glue(tmp_path / "glue", "MRPC", GLUE_FIXTURES["MRPC"][0])
    task = PrepareData(source="glue", glue_dir=str(root), task="MRPC")
    result = run_luigi(task)
    assert result.scheduling_succeeded and result.status.name == "SUCCESS"
    out = task.output_dir()
    assert out.parent == isolated_workdir / "prepare_data"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == {"train": 2, "dev": 1}
    assert set(manifest["inputs"]) == {"train", "dev"}
    assert "glue_dir" not in manifest["params"] and manifest["params"]["task"] == "MRPC"
    info = task_info(out)
    assert info["task"] == "MRPC" and info["is_pair"] and info["skipped"]["count"] == 0
    assert read_split(out, "train")["text_b"].to_pylist()[1] == "\"The pie business does not fit."


def test_stage_failure_leaves_nothing_behind(tmp_path, isolated_workdir):
    root = write_glue(tmp_path / "glue", "SST-2", b"sentence\tlabel\ngood\t1\nbad\t9\n")
    task = PrepareData(source="glue", glue_dir=str(root), task="SST-2")
    result = run_luigi(task)
    assert result.status.name == "FAILED"
    stage_dir = isolated_workdir / "prepare_data"
    # (only the build's lock file, which names no holder now: pipeline/locks.py says why it stays)
    assert not stage_dir.exists() or [p for p in stage_dir.iterdir() if p.suffix != ".lock"] == []

    # the explicit option turns the same input into an output that lists the bad row
    skipping = PrepareData(source="glue", glue_dir=str(root), task="SST-2", skip_bad_rows=True)
    assert run_luigi(skipping).status.name == "SUCCESS"
    assert [p.name for p in stage_dir.iterdir() if p.suffix != ".lock"] == [skipping.fingerprint()]
    assert task_info(skipping.output_dir())["skipped"]["rows"][0].endswith(
        "train.tsv:3: label '9' is not in the task's label set ['0', '1']")


def test_fingerprint_follows_file_content_not_location(tmp_path):
    from luigi.task_register import Register

    first = write_glue(tmp_path / "one", "SST-2", GLUE_FIXTURES["SST-2"][0])
    second = write_glue(tmp_path / "two", "SST-2", GLUE_FIXTURES["SST-2"][0])

    def fingerprint(root: Path, **params) -> str:
        Register.clear_instance_cache()
        return PrepareData(source="glue", glue_dir=str(root), task="SST-2", **params).fingerprint()

    base = fingerprint(first)
    assert fingerprint(second) == base  # same bytes elsewhere: same output
    assert fingerprint(first, max_train_examples=1) != base
    assert fingerprint(first, skip_bad_rows=True) != base
    train = second / "SST-2" / "train.tsv"
    train.write_bytes(train.read_bytes().replace(b"bleak", b"bleaK"))
    assert fingerprint(second) != base  # one byte edited: a new output


def test_stage_files_source_from_parameters(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"q": "why", "a": "because", "ok": true}\n'
                                          '{"q": "how", "a": "somehow", "ok": false}\n')
    (tmp_path / "dev.jsonl").write_text('{"q": "who", "a": "me", "ok": true}\n')
    task = PrepareData(source="files", task="toy-qa", train_file=str(tmp_path / "train.jsonl"),
                       dev_file=str(tmp_path / "dev.jsonl"),
                       columns={"text_a": "q", "text_b": "a", "label": "ok"},
                       label_names=["False", "True"])
    assert run_luigi(task).status.name == "SUCCESS"
    assert rows_of(task.output_dir(), "train") == [("why", "because", 1), ("how", "somehow", 0)]
    assert task_info(task.output_dir())["label_names"] == ["False", "True"]


def test_stage_with_missing_data_fails_before_running(tmp_path, isolated_workdir, monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\nok\t1\n")
    missing_dev = PrepareData(source="glue", glue_dir=str(tmp_path), task="SST-2")
    with pytest.raises(InputError, match=r"GLUE SST-2 dev file not found \(expected <glue_dir>/SST-2/dev.tsv\)"):
        missing_dev.stage_inputs()
    no_dir = PrepareData(source="glue", task="SST-2")
    with pytest.raises(InputError, match=r"needs PrepareData's glue_dir \(or \$GLUE_DIR\)"):
        no_dir.source_spec()
    for task in (missing_dev, no_dir):
        result = run_luigi(task)
        assert not result.scheduling_succeeded and result.status.name == "SCHEDULING_FAILED"
    assert not (isolated_workdir / "prepare_data").exists()


def test_skipped_rows_list_is_capped_but_counted(tmp_path):
    from pipeline.prepare.splits import MAX_REPORTED_PROBLEMS

    bad = "".join(f"row {i}\t3\n" for i in range(MAX_REPORTED_PROBLEMS + 5))
    root = write_glue(tmp_path, "SST-2", "sentence\tlabel\nkeep me\t1\n" + bad)
    result = prepare({"kind": "glue", "glue_dir": root, "task": "SST-2"}, tmp_path / "out", skip_bad_rows=True)
    skipped = result["info"]["skipped"]
    assert skipped["count"] == MAX_REPORTED_PROBLEMS + 5 and skipped["capped"] is True
    assert len(skipped["rows"]) == MAX_REPORTED_PROBLEMS
    assert skipped["rows"][0].endswith("train.tsv:3: label '3' is not in the task's label set ['0', '1']")
    assert result["rows"]["train"] == 1


@pytest.mark.parametrize("names,value,expected", [
    (["0", "1"], "1", 1),
    (["0", "1"], 1, 1),            # numeric names: an int matches by its text
    (["1", "0"], 1, 0),            # ... never by position
    (["neg", "pos"], 1, 1),        # textual names: an int is a class index
    (["neg", "pos"], "pos", 1),
    (["neg", "pos"], 2, None),
    (["neg", "pos"], "1", 1),      # digits in a text file: a class index, as a Parquet int
    (["neg", "pos"], " 1", None),  # ... spelled exactly
    (["neg", "pos"], "-1", None),
    (["0", "1"], "1", 1),          # integer-looking names match by name
    (["False", "True"], True, 1),
    (["0", "1"], 1.0, 1),
    (["0", "1"], " 1", None),      # labels are exact
])
def test_label_matching_rules(names, value, expected):
    from pipeline.prepare.splits import TaskSpec

    label, problem = TaskSpec("t", "classification", False, tuple(names)).label_value(value)
    assert label == expected
    assert (problem is None) == (expected is not None)


def test_parameters_from_luigi_cfg_section(tmp_path, monkeypatch):
    from luigi.configuration import LuigiConfigParser

    (tmp_path / "train.csv").write_text("review,stars\ngreat fun,pos\ndull,neg\n")
    (tmp_path / "dev.csv").write_text("review,stars\nfine,pos\n")
    config = tmp_path / "luigi.cfg"
    config.write_text(
        "[PrepareData]\n"
        "source = files\n"
        "task = reviews\n"
        f"train_file = {tmp_path / 'train.csv'}\n"
        f"dev_file = {tmp_path / 'dev.csv'}\n"
        'columns = {"text_a": "review", "label": "stars"}\n'
        'label_names = ["neg", "pos"]\n'
        "max_train_examples = 1\n")
    # a private parser for this test; conftest's empty configuration is restored afterwards
    monkeypatch.setattr(LuigiConfigParser, "_config_paths", [str(config)])
    monkeypatch.setattr(LuigiConfigParser, "_instance", None)
    task = PrepareData()
    assert (task.source, task.task, dict(task.columns), list(task.label_names)) == (
        "files", "reviews", {"text_a": "review", "label": "stars"}, ["neg", "pos"])
    assert run_luigi(task).status.name == "SUCCESS"
    info = task_info(task.output_dir())
    assert info["task"] == "reviews" and info["subsampled"]["train"] == {"from": 2, "kept": 1, "seed": 0}


def test_hf_by_name_goes_through_load_dataset(tmp_path):
    """The hub code path, offline: datasets.load_dataset also accepts a local data directory."""
    pytest.importorskip("datasets")
    (tmp_path / "repo" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"question": ["why?", "how?"], "answer": ["so", "thus"], "label": [0, 1]}),
                   tmp_path / "repo" / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"question": ["who?"], "answer": ["me"], "label": [1]}),
                   tmp_path / "repo" / "data" / "validation-00000-of-00001.parquet")
    source = {"kind": "hf", "name": str(tmp_path / "repo"), "cache_dir": str(tmp_path / "cache"),
              "columns": {"text_a": "question", "text_b": "answer", "label": "label"}, "task": "qa",
              "label_names": ["no", "yes"]}
    out = tmp_path / "out"
    result = prepare(source, out)
    assert rows_of(out, "train") == [("why?", "so", 0), ("how?", "thus", 1)]
    assert result["info"]["label_names"] == ["no", "yes"] and result["info"]["task"] == "qa"
    # a local directory is read like a hub repository, and hashed like any local input
    assert source_inputs(source) == {"hf_name": (tmp_path / "repo").resolve()}
    assert source_inputs({**source, "name": "nyu-mll/glue"}) == {}  # the hub: name/config/revision


def test_a_train_file_with_a_header_and_no_rows_is_named(tmp_path):
    (tmp_path / "train.tsv").write_text("review\tstars\n")
    (tmp_path / "dev.tsv").write_text("review\tstars\nmore\tgood\n")
    with pytest.raises(InputError, match="the train split has no usable rows") as caught:
        prepare({"kind": "files", "train": tmp_path / "train.tsv", "dev": tmp_path / "dev.tsv",
                 "columns": {"text_a": "review", "label": "stars"}, "label_names": ["bad", "good"],
                 "metric": "accuracy"}, tmp_path / "out")
    assert caught.value.path == str(tmp_path / "train.tsv")
    assert not (tmp_path / "out" / "train.parquet").exists()


@pytest.mark.parametrize("name", ["../../../tmp/x", "a/b", "x|y", "two\nlines", ".hidden"])
def test_a_task_name_that_is_not_a_plain_name_is_refused(tmp_path, name):
    (tmp_path / "t.tsv").write_text("review\tstars\nfine\tgood\n")
    with pytest.raises(InputError, match="task name .* is not a plain name"):
        prepare({"kind": "files", "train": tmp_path / "t.tsv", "dev": tmp_path / "t.tsv", "task": name,
                 "columns": {"text_a": "review", "label": "stars"}}, tmp_path / "out")


def test_a_flipped_byte_in_a_prepared_split_fails_the_read_naming_it(tmp_path):
    (tmp_path / "t.tsv").write_text("review\tstars\n" + "".join(f"row {i}\tgood\n" for i in range(50)))
    prepare({"kind": "files", "train": tmp_path / "t.tsv", "dev": tmp_path / "t.tsv", "metric": "accuracy",
             "label_names": ["good"],
             "columns": {"text_a": "review", "label": "stars"}}, tmp_path / "out")
    path = tmp_path / "out" / "train.parquet"
    data = bytearray(path.read_bytes())
    data[8] ^= 0x20                       # the first data page starts after the 4-byte magic
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="corrupt prepared split") as caught:
        read_split(tmp_path / "out", "train")
    assert caught.value.path == str(path)
