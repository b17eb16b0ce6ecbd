"""GLUE server submission files: ``<NAME>.tsv`` with ``index<TAB>prediction`` per test row.

The server takes one file per test set, named as it expects (``CoLA.tsv``, ``SST-2.tsv``,
``MRPC.tsv``, ``STS-B.tsv``, ``QQP.tsv``, ``MNLI-m.tsv``, ``MNLI-mm.tsv``, ``QNLI.tsv``,
``RTE.tsv``, ``WNLI.tsv``, ``AX.tsv``), with a header line ``index	prediction``, the test
file's own index values in its row order, and the prediction in the task's label vocabulary:
``0``/``1`` for CoLA, SST-2, MRPC, QQP and WNLI; ``entailment``/``neutral``/``contradiction``
for MNLI and AX (predicted by the MNLI model); ``entailment``/``not_entailment`` for QNLI and
RTE; a score in [0, 5] for STS-B. Our label names are exactly those strings (the prepared
data's ``label_names`` are the GLUE files' own label values), so a prediction is the name of
the arg-max class, or the clipped regression output.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.errors import InputError

HEADER = "index\tprediction"
#: Submission name -> the label vocabulary the server accepts (None: a score in [0, 5]).
VOCABULARY: dict[str, tuple[str, ...] | None] = {
    "CoLA": ("0", "1"), "SST-2": ("0", "1"), "MRPC": ("0", "1"), "QQP": ("0", "1"),
    "WNLI": ("0", "1"), "STS-B": None,
    "MNLI-m": ("contradiction", "entailment", "neutral"),
    "MNLI-mm": ("contradiction", "entailment", "neutral"),
    "AX": ("contradiction", "entailment", "neutral"),
    "QNLI": ("entailment", "not_entailment"), "RTE": ("entailment", "not_entailment"),
}


def predictions_as_labels(logits: np.ndarray, label_names: Sequence[str] | None) -> list[str]:
    """The server's values: the arg-max class's name, or the regression score clipped to [0, 5]."""
    logits = np.asarray(logits).reshape(len(logits), -1)
    if not label_names:
        return [f"{min(5.0, max(0.0, float(v))):.3f}" for v in logits[:, 0]]
    return [str(label_names[i]) for i in logits.argmax(axis=1)]


def write_submission(path: Path, index: Sequence[str], predictions: Sequence[str]) -> None:
    if len(index) != len(predictions):
        raise ValueError(f"{len(index)} test rows, {len(predictions)} predictions")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + "\n" + "".join(f"{i}\t{p}\n" for i, p in zip(index, predictions)))


def check_submission(path: Path, name: str, expected_rows: int) -> None:
    """Check a written file against the server's conventions (header, rows, vocabulary)."""
    lines = Path(path).read_text().splitlines()
    if not lines or lines[0] != HEADER:
        raise InputError(f"submission {name}: header must be {HEADER!r}", path, 1)
    if len(lines) - 1 != expected_rows:
        raise InputError(f"submission {name}: {len(lines) - 1} rows, the test file has {expected_rows}", path)
    vocabulary = VOCABULARY[name]
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 2:
            raise InputError(f"submission {name}: expected 2 columns", path, number)
        value = fields[1]
        if vocabulary is None:
            score = float(value)
            if not (math.isfinite(score) and 0.0 <= score <= 5.0):
                raise InputError(f"submission {name}: score {value!r} outside [0, 5]", path, number)
        elif value not in vocabulary:
            raise InputError(f"submission {name}: {value!r} is not one of {list(vocabulary)}", path, number)
