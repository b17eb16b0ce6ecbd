"""The GLUE task registry: each task's files, columns, quoting, label names, metric and type.

PrepareData reads a GLUE directory by task name; everything it must know about a task's
layout lives here, one :class:`GlueTask` per task (and the Hugging Face hub names of the same
tasks), so a new task is one entry and the readers in :mod:`pipeline.prepare.splits` stay
generic.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InputError

CLASSIFICATION = "classification"
REGRESSION = "regression"


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is laid out on disk (and on the Hugging Face hub).

    For files with a header, ``text_a``/``text_b``/``label`` are header column names, looked
    up in each file's own header (MNLI's train and dev files have different column counts).
    For header-less files (CoLA) they are 0-based column indices and ``num_columns`` is fixed.
    """

    name: str
    text_a: str | int
    text_b: str | int | None
    label: str | int
    #: Label strings as written in the files, in class-index order; ``None`` for regression.
    label_names: tuple[str, ...] | None
    has_header: bool = True
    num_columns: int | None = None
    dev_file: str = "dev.tsv"
    #: Inclusive range of a regression score.
    label_range: tuple[float, float] | None = None
    #: The matching configuration of the ``nyu-mll/glue`` hub dataset and its columns.
    hf_config: str = ""
    hf_columns: tuple[tuple[str, str], ...] = ()
    hf_dev_split: str = "validation"
    #: The unlabelled test files of the GLUE download: ``(submission name, file under the task's
    #: directory)``; the submission name is the file the GLUE server takes (``SST-2.tsv``).
    #: Optional ones (AX, the diagnostic set, beside the tasks) are read when present.
    test_files: tuple[tuple[str, str], ...] = ()
    optional_test_files: tuple[tuple[str, str], ...] = ()
    #: Columns of the test files (each has a header; CoLA's test file has one, its train file not).
    test_index: str = "index"
    test_text_a: str = "sentence"
    test_text_b: str | None = None
    #: Further labelled dev sets, evaluated and reported beside the main one: ``(name, file)``.
    extra_dev_files: tuple[tuple[str, str], ...] = ()

    @property
    def is_pair(self) -> bool:
        return self.text_b is not None

    @property
    def task_type(self) -> str:
        return REGRESSION if self.label_names is None else CLASSIFICATION

    def split_file(self, glue_dir: Path | str, split: str) -> Path:
        name = "train.tsv" if split == "train" else self.dev_file
        return Path(glue_dir) / self.name / name


def _hf_cols(a: str, b: str | None) -> tuple[tuple[str, str], ...]:
    cols = [("text_a", a), ("label", "label")]
    if b is not None:
        cols.append(("text_b", b))
    return tuple(cols)


_BINARY = ("0", "1")
_ENTAILMENT = ("entailment", "not_entailment")

#: The GLUE tasks, keyed by their directory name in the GLUE download.
GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in (
    # CoLA has no header: source code, label, original annotation ("*" or empty), sentence.
    # Its test file has one: index, sentence.
    GlueTask("CoLA", text_a=3, text_b=None, label=1, label_names=_BINARY, has_header=False,
             num_columns=4, hf_config="cola", hf_columns=_hf_cols("sentence", None),
             test_files=(("CoLA", "test.tsv"),)),
    GlueTask("SST-2", "sentence", None, "label", _BINARY,
             hf_config="sst2", hf_columns=_hf_cols("sentence", None),
             test_files=(("SST-2", "test.tsv"),)),
    # MRPC starts with a UTF-8 byte-order mark and has literal '"' inside its strings; its test
    # file: index, #1 ID, #2 ID, #1 String, #2 String.
    GlueTask("MRPC", "#1 String", "#2 String", "Quality", _BINARY,
             hf_config="mrpc", hf_columns=_hf_cols("sentence1", "sentence2"),
             test_files=(("MRPC", "test.tsv"),), test_text_a="#1 String", test_text_b="#2 String"),
    # STS-B test: index, genre, filename, year, old_index, source1, source2, sentence1, sentence2.
    GlueTask("STS-B", "sentence1", "sentence2", "score", None, label_range=(0.0, 5.0),
             hf_config="stsb", hf_columns=_hf_cols("sentence1", "sentence2"),
             test_files=(("STS-B", "test.tsv"),), test_text_a="sentence1", test_text_b="sentence2"),
    # QQP test: id, question1, question2.
    GlueTask("QQP", "question1", "question2", "is_duplicate", _BINARY,
             hf_config="qqp", hf_columns=_hf_cols("question1", "question2"),
             test_files=(("QQP", "test.tsv"),), test_index="id", test_text_a="question1",
             test_text_b="question2"),
    # MNLI: matched and mismatched dev and test sets; AX (the diagnostic set, predicted by the
    # MNLI model) is <glue_dir>/diagnostic/diagnostic.tsv: index, sentence1, sentence2.
    GlueTask("MNLI", "sentence1", "sentence2", "gold_label",
             ("contradiction", "entailment", "neutral"), dev_file="dev_matched.tsv",
             hf_config="mnli", hf_columns=_hf_cols("premise", "hypothesis"),
             hf_dev_split="validation_matched",
             test_files=(("MNLI-m", "test_matched.tsv"), ("MNLI-mm", "test_mismatched.tsv")),
             optional_test_files=(("AX", "../diagnostic/diagnostic.tsv"),),
             test_text_a="sentence1", test_text_b="sentence2",
             extra_dev_files=(("MNLI-mm", "dev_mismatched.tsv"),)),
    GlueTask("QNLI", "question", "sentence", "label", _ENTAILMENT,
             hf_config="qnli", hf_columns=_hf_cols("question", "sentence"),
             test_files=(("QNLI", "test.tsv"),), test_text_a="question", test_text_b="sentence"),
    GlueTask("RTE", "sentence1", "sentence2", "label", _ENTAILMENT,
             hf_config="rte", hf_columns=_hf_cols("sentence1", "sentence2"),
             test_files=(("RTE", "test.tsv"),), test_text_a="sentence1", test_text_b="sentence2"),
    GlueTask("WNLI", "sentence1", "sentence2", "label", _BINARY,
             hf_config="wnli", hf_columns=_hf_cols("sentence1", "sentence2"),
             test_files=(("WNLI", "test.tsv"),), test_text_a="sentence1", test_text_b="sentence2"),
)}
#: Hub names of the GLUE benchmark dataset (their configurations are GlueTask.hf_config).
GLUE_HUB_NAMES = ("nyu-mll/glue", "glue")
_GLUE_ALIASES = {k.lower().replace("-", ""): k for k in GLUE_TASKS}


def find_glue_task(name: str) -> GlueTask | None:
    """The GLUE task called ``name`` (case and '-' insensitive: 'sst2' works), or None."""
    key = _GLUE_ALIASES.get(str(name).lower().replace("-", "").replace("_", ""))
    return GLUE_TASKS[key] if key else None


def glue_task(name: str) -> GlueTask:
    """Like :func:`find_glue_task`, but an unknown name is an error."""
    task = find_glue_task(name)
    if task is None:
        raise InputError(f"unknown GLUE task {name!r}; known: {', '.join(GLUE_TASKS)}")
    return task
