"""Tiny GLUE directories in each task's real layout: columns, header (CoLA's train and dev have
none, its test file has one), byte-order mark (MRPC), literal quotes in the text (no CSV
quoting), MNLI's matched/mismatched dev and test files and the AX diagnostic set."""
from __future__ import annotations

import random
from pathlib import Path

WORDS = ('good bad movie plot "actor" great boring fun story scene long short film music '
         "what why who").split()


def _sentence(rng) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))


#: task -> (train/dev header or None, a function(rng, i, label) -> row fields, labels, test header)
def _layouts():
    return {
        "CoLA": (None, lambda r, i, y: ["gj04", str(y), "" if y else "*", _sentence(r)], ["0", "1"],
                 ["index", "sentence"]),
        "SST-2": (["sentence", "label"], lambda r, i, y: [_sentence(r), str(y)], ["0", "1"],
                  ["index", "sentence"]),
        "MRPC": (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                 lambda r, i, y: [str(y), str(1000 + i), str(2000 + i), _sentence(r), _sentence(r)], ["0", "1"],
                 ["index", "#1 ID", "#2 ID", "#1 String", "#2 String"]),
        "STS-B": (["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                   "sentence2", "score"],
                  lambda r, i, y: [str(i), "main-news", "f", "2012", str(i), "none", "none", _sentence(r),
                                   _sentence(r), f"{r.uniform(0, 5):.3f}"], None,
                  ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]),
        "QQP": (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                lambda r, i, y: [str(i), str(2 * i), str(2 * i + 1), _sentence(r) + "?", _sentence(r) + "?", str(y)],
                ["0", "1"], ["id", "question1", "question2"]),
        "MNLI": (["index", "promptID", "pairID", "genre", "sentence1", "sentence2", "label1", "gold_label"],
                 lambda r, i, y: [str(i), str(i), f"{i}e", "fiction", _sentence(r), _sentence(r), y, y],
                 ["contradiction", "entailment", "neutral"],
                 ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                  "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]),
        "QNLI": (["index", "question", "sentence", "label"],
                 lambda r, i, y: [str(i), _sentence(r) + "?", _sentence(r), y], ["entailment", "not_entailment"],
                 ["index", "question", "sentence"]),
        "RTE": (["index", "sentence1", "sentence2", "label"], lambda r, i, y: [str(i), _sentence(r), _sentence(r), y],
                ["entailment", "not_entailment"], ["index", "sentence1", "sentence2"]),
        "WNLI": (["index", "sentence1", "sentence2", "label"], lambda r, i, y: [str(i), _sentence(r), _sentence(r), str(y)],
                 ["0", "1"], ["index", "sentence1", "sentence2"]),
    }


def _test_row(rng, header, i):
    values = {"index": str(i), "id": str(i), "#1 ID": str(i), "#2 ID": str(i + 1), "genre": "fiction"}
    return [values.get(column, _sentence(rng)) for column in header]


def write_glue_task(root: Path, task: str, train: int = 40, dev: int = 16, test: int = 10, seed: int = 0) -> Path:
    """``root/<task>/`` (and ``root/diagnostic/`` for MNLI) in the task's real GLUE layout."""
    header, make, labels, test_header = _layouts()[task]
    rng = random.Random(f"{task}:{seed}")
    directory = root / task
    directory.mkdir(parents=True, exist_ok=True)

    def write(name, rows, head, bom=False):
        lines = (["\t".join(head)] if head else []) + ["\t".join(row) for row in rows]
        (directory / name).write_bytes((b"\xef\xbb\xbf" if bom else b"") + ("\n".join(lines) + "\n").encode())

    def labelled(n):
        return [make(rng, i, labels[i % len(labels)] if labels else None) for i in range(n)]

    dev_files = ["dev_matched.tsv", "dev_mismatched.tsv"] if task == "MNLI" else ["dev.tsv"]
    write("train.tsv", labelled(train), header, bom=task == "MRPC")
    for name in dev_files:
        write(name, labelled(dev), header, bom=task == "MRPC")
    for name in (["test_matched.tsv", "test_mismatched.tsv"] if task == "MNLI" else ["test.tsv"]):
        write(name, [_test_row(rng, test_header, i) for i in range(test)], test_header)
    if task == "MNLI":
        (root / "diagnostic").mkdir(exist_ok=True)
        (root / "diagnostic" / "diagnostic.tsv").write_text(
            "index\tsentence1\tsentence2\n" + "".join(f"{i}\t{_sentence(rng)}\t{_sentence(rng)}\n" for i in range(test)))
    return directory


def glue_test_rows(root: Path, name: str) -> list[list[str]]:
    """The data rows of a written test file by its submission name (MNLI-m, AX, ...)."""
    files = {"MNLI-m": "MNLI/test_matched.tsv", "MNLI-mm": "MNLI/test_mismatched.tsv",
             "AX": "diagnostic/diagnostic.tsv"}
    path = root / files.get(name, f"{name}/test.tsv")
    return [line.split("\t") for line in path.read_text().splitlines()[1:]]
