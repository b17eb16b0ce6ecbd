"""Prepare data: turn a task's raw train/dev data into one normalised table per split.

Every later stage (augmentation, teacher fine-tuning, the teacher cache, distillation) reads
the same four columns, whatever the data came from:

* ``id``     string, stable ``"<split>-<n>"`` where *n* is the 0-based index of the example
  among the data rows of its source split (skipped or subsampled rows leave gaps, so an id
  always points back to the same source row);
* ``text_a`` string, never empty (blank-only is rejected too); kept verbatim, e.g. with the
  trailing space of SST-2's sentences, since tokenisers ignore it and ids map back to bytes;
* ``text_b`` string for sentence-pair tasks, null for single-sentence tasks;
* ``label``  int64 index into ``label_names`` (classification) or float64 (regression).

Three kinds of source are understood:

``glue``
    A directory in the original GLUE layout, ``<glue_dir>/<TASK>/{train,dev}.tsv``. Each task
    has its own columns, header (CoLA has none), label set and dev file (MNLI: the matched dev
    set); :data:`GLUE_TASKS` records them. The files are tab-separated with *no* quoting: a
    ``"`` inside MRPC or SST-2 text is a literal character, so reading them with the csv
    module's default quoting silently merges or mangles rows. We split lines on tabs ourselves.
``hf``
    A Hugging Face dataset, by hub name (``datasets.load_dataset``) or a ``save_to_disk``
    directory (``datasets.load_from_disk``), with a split mapping and a column mapping.
``files``
    CSV, TSV, JSON Lines or Parquet train/dev files with a column mapping.

Every row is validated (column count, missing fields, empty text, invalid UTF-8, a label
outside the task's label set, a non-numeric or out-of-range regression score). By default the
first bad row raises one :class:`~pipeline.errors.InputError` naming file, line and problem,
and nothing is written; with ``skip_bad_rows`` the bad rows are dropped instead and counted
(per split, with the first :data:`MAX_REPORTED_PROBLEMS` locations) in the returned info.
Line numbers are 1-based physical lines for text files (the header is line 1); for Parquet
and Hugging Face sources the number is the 1-based row number.

Nothing here imports luigi; pyarrow and datasets are imported where they are used, so that
the Luigi wiring can import the task registry cheaply.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from pipeline.errors import InputError, InputErrors, check_plain_name, raise_problems
from pipeline.prepare.glue_tasks import (CLASSIFICATION, REGRESSION, GLUE_HUB_NAMES, GLUE_TASKS, GlueTask, find_glue_task,  # noqa: F401
                                         glue_task)
from pipeline.prepare.readers import (FILE_FORMATS, MAX_REPORTED_PROBLEMS, SPLITS, RawRow,  # noqa: F401
                                      RowProblems, file_format, read_delimited, read_jsonl, read_parquet)

LOG = logging.getLogger("tinykd.prepare")
#: ``label_names = infer``: take the distinct train labels as the label set (asked for, never assumed).
INFER_LABELS = "infer"
PARQUET_COMPRESSION = "zstd"


# --------------------------------------------------------------------------------------------
# Rows, problems and the label/text checks shared by every source
# --------------------------------------------------------------------------------------------


@dataclass
class TaskSpec:
    """What the normalised table means: the label set and whether examples are pairs."""

    name: str
    task_type: str
    is_pair: bool
    label_names: tuple[str, ...] | None = None
    label_range: tuple[float, float] | None = None

    def __post_init__(self):
        if self.task_type not in (CLASSIFICATION, REGRESSION):
            raise InputError(f"task_type must be {CLASSIFICATION!r} or {REGRESSION!r}, "
                             f"got {self.task_type!r}")
        if self.task_type == CLASSIFICATION and self.label_names is not None:
            names = tuple(str(n) for n in self.label_names)
            if len(set(names)) != len(names) or not names:
                raise InputError(f"label names must be distinct and non-empty: {list(names)}")
            self.label_names = names
        self._index = {n: i for i, n in enumerate(self.label_names or ())}
        # Integers are taken as class indices only when no label name looks like an integer,
        # so that "1" and 1 can never mean two different classes.
        self._ints_are_indices = not any(_is_int_string(n) for n in self._index)

    def label_value(self, value: Any) -> tuple[Any, str | None]:
        """``(normalised label, None)`` or ``(None, problem)``."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None, "missing field 'label'"
        if self.task_type == REGRESSION:
            return self._score(value)
        if isinstance(value, bool):  # JSON/Parquet booleans match names True/False or true/false
            for form in (str(value), str(value).lower()):
                if form in self._index:
                    return self._index[form], None
            return None, f"label {value!r} is not in the task's label set {list(self._index)}"
        given = value   # named as written in the problem
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str) and value in self._index:
            return self._index[value], None
        if isinstance(value, str) and self._ints_are_indices and _is_int_string(value):
            # Text files (TSV, CSV, JSON strings) spell integer-coded labels as digits: the
            # same class indices a Parquet or Hugging Face integer column holds.
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if self._ints_are_indices:
                if 0 <= value < len(self._index):
                    return value, None
            elif str(value) in self._index:
                return self._index[str(value)], None
        return None, f"label {given!r} is not in the task's label set {list(self._index)}"

    def _score(self, value: Any) -> tuple[float | None, str | None]:
        if isinstance(value, bool):
            return None, f"regression label {value!r} is not a number"
        try:
            score = float(value)
        except (TypeError, ValueError):
            return None, f"regression label {value!r} is not a number"
        if not math.isfinite(score):
            return None, f"regression label {value!r} is not finite"
        if self.label_range and not self.label_range[0] <= score <= self.label_range[1]:
            return None, (f"regression label {score} is outside the task's range "
                          f"[{self.label_range[0]}, {self.label_range[1]}]")
        return score, None


_INT_STRING = re.compile(r"-?[0-9]+")


def _is_int_string(text: str) -> bool:
    """Exactly an integer written in digits (no spaces, no '+', no '_' separators)."""
    return bool(_INT_STRING.fullmatch(text))


def _text_value(value: Any, field: str) -> tuple[str | None, str | None]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, f"missing field {field!r}"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, f"{field} is not valid UTF-8 (byte {exc.start})"
    if not isinstance(value, str):
        return None, f"{field} must be text, got {type(value).__name__} {value!r}"
    if not value.strip():
        return None, f"empty {field}"
    return value, None


def _row_texts(row: RawRow, is_pair: bool) -> tuple[str | None, str | None, str | None]:
    """``row``'s text_a and (for a pair task) text_b, validated: (text_a, text_b, problem)."""
    text_a, problem = _text_value(row.text_a, "text_a")
    text_b = None
    if problem is None and is_pair:
        text_b, problem = _text_value(row.text_b, "text_b")
    return text_a, text_b, problem


@dataclass
class SplitTable:
    """Validated rows of one split, column by column."""

    ids: list[str]
    text_a: list[str]
    text_b: list[str | None]
    labels: list

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, positions: Sequence[int]) -> "SplitTable":
        return SplitTable([self.ids[i] for i in positions], [self.text_a[i] for i in positions],
                          [self.text_b[i] for i in positions], [self.labels[i] for i in positions])


def normalise(split: str, rows: Iterable[RawRow], spec: TaskSpec, problems: RowProblems) -> SplitTable:
    """Validate texts and labels of ``rows`` and convert them to the normalised columns."""
    table = SplitTable([], [], [], [])
    for row in rows:
        text_a, text_b, problem = _row_texts(row, spec.is_pair)
        label = None
        if problem is None:
            label, problem = spec.label_value(row.label)
        if problem is not None:
            problems.report(split, row.path, row.line, problem)
            continue
        table.ids.append(f"{split}-{row.index}")
        table.text_a.append(text_a)
        table.text_b.append(text_b)
        table.labels.append(label)
    return table




def source_inputs(source: Mapping[str, Any]) -> dict[str, Path]:
    """The local files/directories a source reads (hashed into the stage fingerprint).

    Raises :class:`InputError` when one is missing, so that the error names the expected
    layout before anything runs.
    """
    kind = source.get("kind")
    if kind == "glue":
        task = glue_task(source["task"])
        glue_dir = _required_path(source, "glue_dir")
        inputs = {split: task.split_file(glue_dir, split) for split in SPLITS}
        raise_problems([InputError(f"GLUE {task.name} {split} file not found (expected "
                                   f"<glue_dir>/{task.name}/{path.name})", path)
                        for split, path in inputs.items() if not path.is_file()])
        if source.get("submission"):
            # Only files that exist: a download without test files keeps its fingerprint.
            inputs.update({label: path for label, path in submission_files(task, glue_dir).items()
                           if path.is_file()})
        return inputs
    if kind == "hf":
        inputs = {}
        if source.get("dir"):
            inputs["hf_dir"] = _required_path(source, "dir")
        local = local_dataset_path(source.get("name") or "")
        if local is not None:
            # load_dataset reads a local directory (or script) like a hub repository; its
            # files, not its name, say what the data is.
            inputs["hf_name"] = local
    elif kind == "files":
        inputs = {split: _required_path(source, split) for split in SPLITS}
    else:
        raise InputError(f"unknown source kind {kind!r}; use 'glue', 'hf' or 'files'")
    for path in inputs.values():
        if not path.exists():
            raise InputError("not found", path)
    return inputs


def local_dataset_path(name: str) -> Path | None:
    """``name`` as a local file or directory that ``datasets.load_dataset`` would read, else None."""
    if not name:
        return None
    path = Path(name).expanduser()
    return path.resolve() if path.exists() else None


def _required_path(source: Mapping[str, Any], key: str) -> Path:
    value = source.get(key)
    if not value:
        raise InputError(f"source kind {source.get('kind')!r} needs {key!r}")
    return Path(value).expanduser().resolve()


def _load_glue(source: Mapping[str, Any], problems: RowProblems):
    task = glue_task(source["task"])
    spec = TaskSpec(task.name, task.task_type, task.is_pair, task.label_names, task.label_range)
    columns = {"text_a": task.text_a, "label": task.label}
    if task.text_b is not None:
        columns["text_b"] = task.text_b
    raw = {}
    inputs = source_inputs(source)
    for split in SPLITS:
        raw[split] = read_delimited(inputs[split], split, columns, problems, has_header=task.has_header,
                                    num_columns=task.num_columns)
    return spec, raw, {"kind": "glue", "task": task.name}


def _declared_label_names(source: Mapping[str, Any]) -> tuple[str, ...] | str | None:
    """``label_names`` as given: a tuple of names, :data:`INFER_LABELS`, or None (not given)."""
    declared = source.get("label_names")
    if isinstance(declared, str):
        if declared.strip().lower() != INFER_LABELS:
            raise InputError(f"label_names must be a list of names in class-index order or "
                             f"{INFER_LABELS!r}, got {declared!r}")
        return INFER_LABELS
    return tuple(declared) if declared else None


def _mapping_and_spec(source: Mapping[str, Any], default_columns: Mapping[str, str] = (),
                      default_task: GlueTask | None = None):
    """Column mapping and :class:`TaskSpec` from a source's explicit settings and defaults.

    A files or Hugging Face source must name its task: the name picks the dev metric (a GLUE
    name: GLUE's metric, labels and task type; any other name: accuracy, or Pearson/Spearman
    for regression), and a missing one must not silently inherit another task's.
    """
    _require_task_name(source)
    columns = dict(default_columns)
    columns.update({k: v for k, v in dict(source.get("columns") or {}).items()
                    if v is not None and v != ""})
    unknown = set(columns) - {"text_a", "text_b", "label"}
    if unknown:
        raise InputError(f"column mapping keys must be text_a, text_b, label; got {sorted(unknown)}")
    for field in ("text_a", "label"):
        if field not in columns:
            raise InputError(f"the column mapping needs {field!r} (e.g. {{'{field}': 'sentence'}})")
    task_type = source.get("task_type") or (default_task.task_type if default_task else CLASSIFICATION)
    declared = _declared_label_names(source)
    label_names = declared if isinstance(declared, tuple) else (
        default_task.label_names if default_task and task_type == CLASSIFICATION else None)
    if task_type == REGRESSION:
        label_names = None
    name = str(source.get("task") or CUSTOM_TASK)
    check_plain_name(name, "task name")   # it names report files (reports/<task>.md)
    spec = TaskSpec(name, task_type, "text_b" in columns, label_names,
                    default_task.label_range if default_task and task_type == REGRESSION else None)
    return columns, spec


#: The task name recorded when a files/HF source gives only an explicit metric.
CUSTOM_TASK = "custom"


def _require_task_name(source: Mapping[str, Any]) -> None:
    if not source.get("task") and not source.get("metric"):
        raise InputError(
            f"source kind {source.get('kind')!r} needs a task name or a metric (PrepareData's task, "
            f"metric): a GLUE task ({', '.join(GLUE_TASKS)}) brings its metric, labels and task "
            "type; any other name (or none, with metric = accuracy, f1, mcc or corr) is yours")


def _index_mapping(columns: Mapping[str, Any], path: Path, fmt: str) -> bool:
    """Whether ``columns`` maps to 0-based column indices (a headerless file) or to names."""
    kinds = {isinstance(v, int) and not isinstance(v, bool) for v in columns.values()}
    if kinds == {True}:
        if fmt not in ("csv", "tsv"):
            raise InputError(f"a column mapping by index ({dict(columns)}) is for headerless CSV/TSV "
                             f"files; {fmt} files name their columns", path)
        if any(v < 0 for v in columns.values()):
            raise InputError(f"column indices are 0-based and non-negative: {dict(columns)}", path)
        return True
    if len(kinds) > 1:
        raise InputError(f"the column mapping mixes names and indices: {dict(columns)}; use names "
                         "for a file with a header line, indices for a headerless one", path)
    return False


def _load_files(source: Mapping[str, Any], problems: RowProblems):
    columns, spec = _mapping_and_spec(source, default_task=find_glue_task(source.get("task") or ""))
    raw = {}
    headerless = False
    for split in SPLITS:
        path = _required_path(source, split)
        fmt = file_format(path, source.get("format") or "")
        headerless = _index_mapping(columns, path, fmt)
        if fmt in ("tsv", "csv"):
            # Headerless: the first row fixes the column count, as a header would.
            raw[split] = read_delimited(path, split, columns, problems,
                                        delimiter="\t" if fmt == "tsv" else ",", quoting=fmt == "csv",
                                        has_header=not headerless)
        elif fmt == "jsonl":
            raw[split] = read_jsonl(path, split, columns, problems)
        else:
            raw[split] = read_parquet(path, split, columns)
    return spec, raw, {"kind": "files", "header": not headerless,
                       "format": {s: file_format(source[s], source.get("format") or "") for s in SPLITS}}


def _load_hf(source: Mapping[str, Any], problems: RowProblems):
    import datasets

    # A GLUE task name supplies default columns, splits and labels; any other name is a label.
    default_task = find_glue_task(source.get("task") or "")
    splits = {"train": "train", "dev": default_task.hf_dev_split if default_task else "validation"}
    splits.update(dict(source.get("splits") or {}))
    if source.get("dir"):
        where = str(_required_path(source, "dir"))
        try:
            loaded = datasets.load_from_disk(where)
        except FileNotFoundError as exc:
            raise InputError(f"not a save_to_disk directory ({exc})", where) from None
        if not isinstance(loaded, datasets.DatasetDict):
            raise InputError("save_to_disk directory holds a single Dataset; a DatasetDict with "
                             f"splits {sorted(set(splits.values()))} is needed", where)
    elif source.get("name"):
        config = source.get("config") or ""
        if not config and default_task and source["name"] in GLUE_HUB_NAMES:
            config = default_task.hf_config
        local = local_dataset_path(source["name"])
        name = str(local) if local is not None else source["name"]
        where = name + (f"/{config}" if config else "")
        loaded = datasets.load_dataset(name, config or None,
                                       revision=source.get("revision") or None,
                                       cache_dir=source.get("cache_dir") or None)
    else:
        raise InputError("source kind 'hf' needs a dataset name or a save_to_disk dir")
    columns, spec = _mapping_and_spec(
        source, dict(default_task.hf_columns) if default_task else {}, default_task)
    raw = {}
    for split, hf_split in splits.items():
        if hf_split not in loaded:
            raise InputError(f"no split {hf_split!r} (for {split}); splits: {list(loaded)}", where)
        dataset = loaded[hf_split]
        missing = [c for c in columns.values() if c not in dataset.column_names]
        if missing:
            raise InputError(f"split {hf_split!r} has no column {missing}; columns: "
                             f"{dataset.column_names}", where)
        label_feature = dataset.features[columns["label"]]
        if isinstance(label_feature, datasets.ClassLabel) and spec.task_type == CLASSIFICATION:
            if not isinstance(_declared_label_names(source), tuple):
                # Class indices and their names come from the dataset itself.
                spec = TaskSpec(spec.name, spec.task_type, spec.is_pair, tuple(label_feature.names))
        values = dataset.select_columns(list(dict.fromkeys(columns.values()))).to_dict()
        path = f"{where}[{hf_split}]"
        raw[split] = [RawRow(i, path, i + 1, *(values[columns[f]][i] if f in columns else None
                                                for f in ("text_a", "text_b", "label")))
                      for i in range(dataset.num_rows)]
    described = {"kind": "hf", "splits": splits}
    if source.get("name"):
        described.update(name=source["name"], config=config)
    return spec, raw, described


def _resolve_label_names(spec: TaskSpec, raw_train: Sequence[RawRow],
                         source: Mapping[str, Any]) -> tuple[TaskSpec, dict | None]:
    """The label set of a classification task: declared, or inferred only when asked.

    A label set guessed from the data would turn a stray label (a ``2`` in a binary task) into
    a class of its own without a word; so without declared names (``label_names``, a Hugging
    Face ``ClassLabel``, a GLUE task's own) the stage stops, unless ``label_names = infer``
    asks for the distinct train labels. Returns the spec and, when inferred, ``{name: count}``.
    """
    if spec.task_type != CLASSIFICATION or spec.label_names is not None:
        return spec, None
    if _declared_label_names(source) != INFER_LABELS:
        where = raw_train[0].path if raw_train else None
        raise InputError(
            "a classification task needs its label set: label_names = [...] (the label values in "
            "class-index order; integer labels are indices into it), or label_names = infer to take "
            "the distinct train labels", where)
    counts: dict[str, int] = {}
    for row in raw_train:
        if row.label is not None and row.label != "":
            counts[str(row.label)] = counts.get(str(row.label), 0) + 1
    if not counts:
        raise InputError("no labels found in the train split to infer label names from",
                         raw_train[0].path if raw_train else None)
    if all(_is_int_string(v) for v in counts):
        names = tuple(sorted(counts, key=int))
    else:
        names = tuple(sorted(counts))
    inferred = {name: counts[name] for name in names}
    LOG.warning("label_names = infer: %d label(s) in the train split (%s): %s", len(names),
                raw_train[0].path if raw_train else "train",
                ", ".join(f"{name!r} x{count}" for name, count in inferred.items()))
    return TaskSpec(spec.name, spec.task_type, spec.is_pair, names, spec.label_range), inferred


# --------------------------------------------------------------------------------------------
# Extra files for the GLUE harness: further dev sets, unlabelled test sets
# --------------------------------------------------------------------------------------------

#: ``[PrepareData] submission = true`` also writes these (``<name>`` is the GLUE server's file name).
EXTRA_DEV_DIR = "extra_dev"   # extra_dev/<name>.parquet: the dev.parquet layout
TEST_DIR = "test"             # test/<name>.parquet: index (as written), text_a, text_b


def submission_files(task: GlueTask, glue_dir: Path | str) -> dict[str, Path]:
    """Input label -> path of every extra dev and test file a GLUE task may have."""
    base = Path(glue_dir) / task.name
    files = {f"extra_dev:{name}": base / file for name, file in task.extra_dev_files}
    files.update({f"test:{name}": base / file for name, file in task.test_files + task.optional_test_files})
    return {label: Path(os.path.normpath(path)) for label, path in files.items()}


def _test_columns(task: GlueTask) -> dict[str, str]:
    # the index travels in the ``label`` slot of a RawRow: test rows have no label
    columns = {"text_a": task.test_text_a, "label": task.test_index}
    if task.test_text_b is not None:
        columns["text_b"] = task.test_text_b
    return columns


def read_test_file(task: GlueTask, path: Path) -> SplitTable:
    """One unlabelled GLUE test file as a table of ``index`` (in ``ids``), texts; every row must
    be usable (a submission needs a prediction for each), so the first bad row raises."""
    problems = RowProblems(skip=False)
    rows = read_delimited(path, "dev", _test_columns(task), problems, has_header=True)
    table = SplitTable([], [], [], [])
    for row in rows:
        text_a, text_b, problem = _row_texts(row, task.is_pair)
        index = str(row.label or "").strip()
        if problem is None and not index:
            problem = f"empty {task.test_index!r} column"
        if problem is not None:
            raise InputError(f"GLUE {task.name} test file: {problem}", path, row.line)
        table.ids.append(index)
        table.text_a.append(text_a)
        table.text_b.append(text_b)
    if len(set(table.ids)) != len(table.ids):
        raise InputError(f"GLUE {task.name} test file: repeated {task.test_index!r} values", path)
    if not len(table):
        raise InputError(f"GLUE {task.name} test file has no rows", path)
    return table


def check_glue_layout(glue_dir: Path | str, name: str, submission: bool = True) -> dict[str, Path]:
    """Check, without reading whole files, that ``glue_dir`` holds task ``name``: its train and
    dev files (and, with ``submission``, each present test file's header has the task's test
    columns). Every problem found, each naming the task and its file (one :class:`InputError`,
    or :class:`InputErrors` for several); the files found otherwise."""
    task = find_glue_task(name)
    if task is None or task.name != name:
        raise InputError(f"unknown GLUE task {name!r}; known: {', '.join(GLUE_TASKS)}")
    source = {"kind": "glue", "glue_dir": str(glue_dir), "task": name, "submission": submission}
    problems: list[InputError] = []
    try:
        files = source_inputs(source)
    except InputError as missing:   # a split file: the test files are still checked
        problems += missing.problems if isinstance(missing, InputErrors) else [missing]
        files = ({label: path for label, path in submission_files(task, Path(glue_dir)).items()
                  if path.is_file()} if submission else {})
    for label, path in files.items():
        if not label.startswith("test:"):
            continue
        with open(path, "rb") as handle:
            header = handle.readline().decode("utf-8", "replace").removeprefix("\ufeff")
        header = [column.strip() for column in header.rstrip("\r\n").split("\t")]
        missing = [column for column in _test_columns(task).values() if column not in header]
        if missing:
            problems.append(InputError(f"GLUE {name} test file has no column(s) {missing} (a {name} test "
                                       f"file has {list(_test_columns(task).values())}); columns: {header}",
                                       path, 1))
    raise_problems(problems, f"in GLUE {name}'s files")
    return files


def write_test(path: Path, table: SplitTable) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.table({"index": pa.array(table.ids, pa.string()), "text_a": pa.array(table.text_a, pa.string()),
                      "text_b": pa.array(table.text_b, pa.string())})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(arrow, path, compression=PARQUET_COMPRESSION, write_page_checksum=True)


# --------------------------------------------------------------------------------------------
# Held-out train rows: model selection that never looks at dev
# --------------------------------------------------------------------------------------------

#: ``selection`` values: pick checkpoints on dev (the reference's rule) or on held-out train rows.
SELECTIONS = ("dev", "holdout")
HOLDOUT_SPLIT = "holdout"
#: Regression targets are stratified by this many equal-count score bins.
REGRESSION_BINS = 5


def check_holdout_fraction(fraction: float) -> None:
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 0.5):
        raise InputError(f"[PrepareData] holdout_fraction must be in (0, 0.5], got {fraction!r}")


def holdout_split(table: SplitTable, fraction: float, seed: int, spec: TaskSpec,
                  where: str | Path | None = None) -> tuple[SplitTable, SplitTable, dict]:
    """Split ``table`` (train) into (train, held-out): ``fraction`` of each stratum, drawn with
    a generator seeded by ``seed``, both kept in source order, ids unchanged.

    Strata: the class of a classification task; for regression, :data:`REGRESSION_BINS`
    equal-count bins of the sorted scores (ties broken by row order). Every stratum of at
    least two rows gives at least one row and keeps at least one; a class with fewer than two
    train rows cannot be both trained on and held out, which is an error naming the class.
    """
    check_holdout_fraction(fraction)
    n = len(table)
    if spec.task_type == CLASSIFICATION:
        strata: dict[Any, list[int]] = {}
        for i, label in enumerate(table.labels):
            strata.setdefault(int(label), []).append(i)
        names = spec.label_names or ()
        for label, rows in sorted(strata.items()):
            if len(rows) < 2:
                raise InputError(f"held-out split: class {names[label] if label < len(names) else label!r} "
                                 f"has {len(rows)} train row(s); holding rows out would leave it "
                                 "missing from the held-out set or from train (more data, or "
                                 "selection = dev)", where)
        stratified_by = "label"
    else:
        order = sorted(range(n), key=lambda i: (table.labels[i], i))
        bins = min(REGRESSION_BINS, max(1, n // 2))
        strata = {b: sorted(order[b * n // bins:(b + 1) * n // bins]) for b in range(bins)}
        stratified_by = f"{bins} equal-count score bins"
    rng = random.Random(f"holdout:{seed}")
    held: list[int] = []
    for _, rows in sorted(strata.items()):
        if len(rows) < 2:
            continue
        k = min(max(1, round(fraction * len(rows))), len(rows) - 1)
        held.extend(rng.sample(rows, k))
    held_set = set(held)
    kept = [i for i in range(n) if i not in held_set]
    info = {"fraction": fraction, "seed": seed, "rows": len(held_set), "stratified_by": stratified_by}
    return table.take(kept), table.take(sorted(held_set)), info


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------

LOADERS = {"glue": _load_glue, "hf": _load_hf, "files": _load_files}


def subsample(table: SplitTable, limit: int, seed: int) -> SplitTable:
    """A seeded uniform sample of ``limit`` rows, kept in source order (all rows if fewer)."""
    if not limit or limit >= len(table):
        return table
    chosen = sorted(random.Random(seed).sample(range(len(table)), limit))
    return table.take(chosen)


def prepare(source: Mapping[str, Any], out_dir: Path | str, *, skip_bad_rows: bool = False,
            max_train_examples: int = 0, max_dev_examples: int = 0, subset_seed: int = 0,
            selection: str = "dev", holdout_fraction: float = 0.05) -> dict:
    """Validate a source's train and dev splits and write ``{train,dev}.parquet`` to ``out_dir``.

    ``source`` is a mapping with ``kind`` = ``"glue"`` (``glue_dir``, ``task``), ``"hf"``
    (``name`` [+ ``config``, ``revision``, ``cache_dir``] or ``dir``; optional ``task`` for GLUE defaults,
    ``splits`` {train, dev -> dataset split}, ``columns``, ``label_names``, ``task_type``) or
    ``"files"`` (``train``, ``dev`` paths, optional ``format``, ``columns``, ``label_names``,
    ``task_type``, ``task``). ``max_*_examples`` > 0 keep a seeded random sample of that many
    rows (in source order). ``selection = "holdout"`` then moves ``holdout_fraction`` of the
    train rows (stratified, seeded by ``subset_seed``: :func:`holdout_split`) into
    ``holdout.parquet``, before any later stage sees train. A GLUE source with ``submission``
    also writes its extra dev sets (``extra_dev/<name>.parquet``) and its present test files
    (``test/<name>.parquet``). Nothing is written unless every split validates.

    Returns ``{"rows": {split: n}, "info": {...}}`` for the stage manifest.
    """
    kind = source.get("kind")
    if kind not in LOADERS:
        raise InputError(f"unknown source kind {kind!r}; use one of {sorted(LOADERS)}")
    if kind != "glue":
        _require_task_name(source)   # before anything is loaded (a hub download, say)
        if source.get("submission"):
            raise InputError("[PrepareData] submission = true reads a GLUE directory's test files: "
                             "it needs source = glue")
    if selection not in SELECTIONS:
        raise InputError(f"[PrepareData] selection must be one of {SELECTIONS}, got {selection!r}")
    if selection == "holdout":
        check_holdout_fraction(holdout_fraction)
    problems = RowProblems(skip_bad_rows)
    spec, raw, described = LOADERS[kind](source, problems)
    spec, inferred = _resolve_label_names(spec, raw["train"], source)
    tables = {split: normalise(split, raw[split], spec, problems) for split in SPLITS}
    for split, table in tables.items():
        if not len(table):
            where = raw[split][0].path if raw[split] else source_inputs(source).get(split, split)
            raise InputError(f"the {split} split has no usable rows", where)
    before = {split: len(table) for split, table in tables.items()}
    tables["train"] = subsample(tables["train"], max_train_examples, subset_seed)
    tables["dev"] = subsample(tables["dev"], max_dev_examples, subset_seed)
    holdout_info = None
    if selection == "holdout":
        tables["train"], tables[HOLDOUT_SPLIT], holdout_info = holdout_split(
            tables["train"], holdout_fraction, subset_seed, spec, source_inputs(source).get("train"))
    extra_dev: dict[str, SplitTable] = {}
    tests: dict[str, SplitTable] = {}
    if source.get("submission"):
        task = glue_task(source["task"])
        files = source_inputs(source)
        for name, _ in task.extra_dev_files:
            path = files.get(f"extra_dev:{name}")
            if path is None:
                raise InputError(f"GLUE {task.name} {name} dev file not found", submission_files(
                    task, source["glue_dir"])[f"extra_dev:{name}"])
            columns = {"text_a": task.text_a, "text_b": task.text_b, "label": task.label}
            rows = read_delimited(path, "dev", {k: v for k, v in columns.items() if v is not None}, problems,
                                  has_header=task.has_header, num_columns=task.num_columns)
            extra_dev[name] = normalise("dev", rows, spec, problems)
        for name, _ in task.test_files + task.optional_test_files:
            if f"test:{name}" in files:
                tests[name] = read_test_file(task, files[f"test:{name}"])

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, table in tables.items():
        write_split(out_dir / f"{split}.parquet", table, spec)
    for name, table in extra_dev.items():
        (out_dir / EXTRA_DEV_DIR).mkdir(exist_ok=True)
        write_split(out_dir / EXTRA_DEV_DIR / f"{name}.parquet", table, spec)
    for name, table in tests.items():
        write_test(out_dir / TEST_DIR / f"{name}.parquet", table)

    from pipeline.common.metrics import metric_names   # scipy: not on the no-op rerun's path

    try:
        metric = metric_names(spec.name, spec.task_type, source.get("metric") or None)[0]
    except ValueError as exc:
        raise InputError(str(exc)) from None
    info = {
        "task": spec.name,
        "metric": metric,
        "task_type": spec.task_type,
        "label_names": list(spec.label_names or []),
        "num_labels": len(spec.label_names) if spec.task_type == CLASSIFICATION else 1,
        "is_pair": spec.is_pair,
        "source": described,
        "skipped": problems.summary(),
        **({"label_names_inferred": inferred} if inferred else {}),
        "subsampled": {split: {"from": before[split], "kept": len(tables[split]), "seed": subset_seed}
                       for split in SPLITS if len(tables[split]) < before[split]},
    }
    if spec.task_type == CLASSIFICATION:
        info["label_counts"] = {split: [t.labels.count(i) for i in range(len(spec.label_names))]
                                for split, t in tables.items()}
    if holdout_info is not None:   # absent with selection = dev: those manifests stay as they were
        info["selection"] = selection
        info["holdout"] = holdout_info
    if source.get("submission"):
        info["extra_dev"] = {name: len(t) for name, t in extra_dev.items()}
        info["test"] = {name: len(t) for name, t in tests.items()}
    rows = {split: len(t) for split, t in tables.items()}
    rows.update({f"extra_dev:{name}": len(t) for name, t in extra_dev.items()})
    rows.update({f"test:{name}": len(t) for name, t in tests.items()})
    return {"rows": rows, "info": info}


def write_split(path: Path, table: SplitTable, spec: TaskSpec) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    label_type = pa.float64() if spec.task_type == REGRESSION else pa.int64()
    schema = pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("text_a", pa.string(), nullable=False),
        pa.field("text_b", pa.string()),
        pa.field("label", label_type, nullable=False),
    ], metadata={"tinykd.task": spec.name, "tinykd.task_type": spec.task_type,
                 "tinykd.label_names": json.dumps(list(spec.label_names or []))})
    arrow = pa.table({"id": table.ids, "text_a": table.text_a, "text_b": table.text_b,
                      "label": table.labels}, schema=schema)
    # Page CRCs: a flipped byte fails the read instead of decoding into another row.
    pq.write_table(arrow, path, compression=PARQUET_COMPRESSION, write_page_checksum=True)


# --------------------------------------------------------------------------------------------
# Readers for downstream stages
# --------------------------------------------------------------------------------------------

def read_split(stage_dir: Path | str, split: str):
    """The normalised ``split`` (``"train"``, ``"dev"``, ``"holdout"`` or ``"extra_dev/<name>"``)
    of a prepare_data output, as a pyarrow Table."""
    import pyarrow.parquet as pq

    import pyarrow as pa

    if split not in SPLITS + (HOLDOUT_SPLIT,) and not split.startswith(f"{EXTRA_DEV_DIR}/"):
        raise ValueError(f"split must be one of {SPLITS + (HOLDOUT_SPLIT,)} or extra_dev/<name>, got {split!r}")
    path = Path(stage_dir) / f"{split}.parquet"
    try:
        return pq.read_table(path, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"corrupt prepared split: {exc}", path) from None


def task_info(stage_dir: Path | str) -> dict:
    """The ``info`` a prepare_data output recorded: task, task_type, label_names, num_labels, ..."""
    from pipeline.stage import load_manifest

    return load_manifest(stage_dir)["info"]
