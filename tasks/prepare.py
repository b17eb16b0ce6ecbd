"""Luigi wiring of the prepare-data stage (``<workdir>/prepare_data/<fingerprint>/``).

The stage reads a task's raw train and dev data (a GLUE directory, a Hugging Face dataset, or
CSV/TSV/JSONL/Parquet files), validates every row and writes ``train.parquet`` and
``dev.parquet`` in the normalised layout of :mod:`pipeline.prepare.splits`.

Identity: local paths (``glue_dir``, ``hf_dir``, ``train_file``, ``dev_file``) are *not*
significant parameters; the files they point to are declared in :meth:`stage_inputs` and
hashed into the fingerprint instead, so moving the data keeps the output while editing a
single byte of it builds a new one. What the data *means* (task, column mapping, label names,
subsetting, bad-row policy, hub name and revision) is significant.

Values can come from the command line or from the ``[PrepareData]`` section of luigi.cfg.
Relative paths are resolved against the current directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import luigi

from pipeline.errors import InputError
from pipeline.stage import StageBuild
from tasks.base import StageTask


class LabelNamesParameter(luigi.ListParameter):
    """A list of label names, or the word ``infer`` (take the distinct train labels).

    ``infer`` is kept as the string "infer"; a list is a tuple, exactly as Luigi's own
    ListParameter stores it, so fingerprints of stages declaring names are unchanged.
    """

    def parse(self, x):
        if isinstance(x, str) and x.strip().lower() == "infer":
            return "infer"
        return super().parse(x)

    def normalize(self, x):
        if isinstance(x, str):
            if x.strip().lower() != "infer":
                raise ValueError(f"label_names: a JSON list of names or 'infer', got {x!r}")
            return "infer"
        return super().normalize(x)

    def serialize(self, x):
        return "infer" if x == "infer" else super().serialize(x)


class PrepareData(StageTask):
    """Validate and normalise a task's train/dev data into Parquet."""

    stage_name = "prepare_data"
    stage_version = "2"   # 2: Parquet page CRCs

    source = luigi.ChoiceParameter(
        default="glue", choices=["glue", "hf", "files"], significant=True,
        description="Where the data comes from: 'glue' (a GLUE directory), 'hf' (a Hugging Face "
                    "dataset by hub name or a save_to_disk directory) or 'files' (CSV/TSV/JSONL/"
                    "Parquet train and dev files with a column mapping).")
    task = luigi.Parameter(
        default="", significant=True,
        description="Task name, required. A GLUE name (SST-2, MRPC, CoLA, RTE, STS-B, QNLI, QQP, "
                    "MNLI, WNLI) picks GLUE's dev metric, labels and task type (source=glue: also "
                    "the directory and columns; source=hf: default columns and splits); any other "
                    "name is yours, with accuracy as the metric (corr for regression).")
    glue_dir = luigi.Parameter(
        default="", significant=False,
        description="source=glue: the GLUE root holding <TASK>/train.tsv and <TASK>/dev.tsv "
                    "(MNLI: dev_matched.tsv). Empty: $GLUE_DIR. Not significant: the two files' "
                    "contents are hashed into the fingerprint.")
    hf_name = luigi.Parameter(
        default="", significant=True,
        description="source=hf: what datasets.load_dataset reads: a hub dataset name (e.g. "
                    "nyu-mll/glue; needs network access; identified by name, config and revision) "
                    "or a local directory such as a downloaded hub repository of Parquet/CSV/TSV/"
                    "JSON files (identified by its hashed content, not its path).")
    hf_config = luigi.Parameter(
        default="", significant=True,
        description="source=hf: dataset configuration name (e.g. sst2); empty: the default (or, "
                    "with a GLUE task, that task's configuration).")
    hf_revision = luigi.Parameter(
        default="", significant=True,
        description="source=hf: hub revision (tag or commit) to pin; empty: the latest.")
    hf_cache_dir = luigi.Parameter(
        default="", significant=False,
        description="source=hf with hf_name: the datasets cache directory; empty: the datasets "
                    "default ($HF_DATASETS_CACHE). Where the download is kept, not what it holds.")
    hf_dir = luigi.Parameter(
        default="", significant=False,
        description="source=hf: a Dataset.save_to_disk / DatasetDict.save_to_disk directory, used "
                    "instead of hf_name. Not significant: its contents are hashed.")
    hf_splits = luigi.DictParameter(
        default={}, significant=True,
        description="source=hf: map of our split names to the dataset's, e.g. "
                    "{\"train\": \"train\", \"dev\": \"validation\"} (the default; MNLI: "
                    "validation_matched).")
    train_file = luigi.Parameter(
        default="", significant=False,
        description="source=files: the train file (.csv, .tsv, .jsonl, .parquet). Not "
                    "significant: its contents are hashed.")
    dev_file = luigi.Parameter(
        default="", significant=False,
        description="source=files: the dev file. Not significant: its contents are hashed.")
    file_format = luigi.Parameter(
        default="", significant=True,
        description="source=files: csv, tsv, jsonl or parquet; empty: from the file extension. "
                    "TSV is read without quoting (like GLUE), CSV with standard double quotes.")
    columns = luigi.DictParameter(
        default={}, significant=True,
        description="Column mapping {\"text_a\": ..., \"text_b\": ..., \"label\": ...} from our "
                    "fields to the source's columns; text_b absent = single-sentence task. "
                    "Required for source=files; for source=hf it overrides the GLUE defaults.")
    label_names = LabelNamesParameter(
        default=[], significant=True,
        description="Classification label values in class-index order (as written in the data); "
                    "integer labels (Parquet ints or digits in a text file) are class indices into "
                    "it when no name is an integer. Empty: the task's own (a GLUE task name, a "
                    "Hugging Face ClassLabel), else an error; 'infer': the distinct train labels, "
                    "sorted (printed with their counts and kept in the manifest).")
    task_type = luigi.ChoiceParameter(
        default="", choices=["", "classification", "regression"], significant=True,
        description="classification (int labels) or regression (float labels); empty: the GLUE "
                    "task's type, else classification.")
    metric = luigi.ChoiceParameter(
        default="", choices=["", "accuracy", "f1", "mcc", "corr", "pearson", "spearman"],
        significant=True,
        description="The dev metric that picks the best teacher and student checkpoints. Empty: "
                    "the task's (a GLUE name: GLUE's; any other: accuracy, or corr for "
                    "regression). A files or HF source needs a task name or this.")
    skip_bad_rows = luigi.BoolParameter(
        default=False, significant=True,
        description="Drop bad rows (wrong column count, missing field, empty text, invalid UTF-8, "
                    "label outside the label set) and list them in the manifest, instead of "
                    "failing on the first one.")
    max_train_examples = luigi.IntParameter(
        default=0, significant=True,
        description="Keep a seeded uniform random sample of this many train rows (kept in source "
                    "order, ids unchanged); 0 keeps all.")
    max_dev_examples = luigi.IntParameter(
        default=0, significant=True,
        description="Same for the dev split; 0 keeps all (use only for quick runs: metrics on a "
                    "dev sample are not comparable with published ones).")
    subset_seed = luigi.IntParameter(
        default=0, significant=True,
        description="Seed of the train/dev sampling (max_*_examples) and of the held-out split.")
    selection = luigi.ChoiceParameter(
        default="dev", choices=["dev", "holdout"], significant=True,
        description="What picks the best teacher and student checkpoints: 'dev' (the reference's "
                    "rule: the best of many dev evaluations, then reported on that same dev set, "
                    "which flatters it) or 'holdout' (holdout_fraction of the train rows, "
                    "stratified, removed from train before augmentation: dev is only reported). "
                    "The shipped profiles use holdout.")
    holdout_fraction = luigi.FloatParameter(
        default=0.05, significant=True,
        description="selection=holdout: the share of train rows held out, in (0, 0.5]; stratified "
                    "by label (regression: by 5 equal-count score bins), seeded by subset_seed.")
    submission = luigi.BoolParameter(
        default=False, significant=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="source=glue: also prepare what a GLUE submission and the GLUE table need: "
                    "the task's unlabelled test files that are present (test/<name>.parquet; "
                    "MNLI: matched, mismatched and AX) and its further dev sets (MNLI's "
                    "mismatched dev: extra_dev/MNLI-mm.parquet). Off: neither is read.")

    def source_spec(self) -> dict[str, Any]:
        """The parameters as the source mapping :func:`pipeline.prepare.splits.prepare` takes."""
        if self.source == "glue":
            import os

            glue_dir = self.glue_dir or os.environ.get("GLUE_DIR", "")
            if not glue_dir:
                raise InputError("source=glue needs PrepareData's glue_dir (or $GLUE_DIR)")
            if not self.task:
                raise InputError("source=glue needs PrepareData's task (e.g. SST-2, MRPC)")
            return {"kind": "glue", "glue_dir": _resolved(glue_dir), "task": self.task,
                    "metric": self.metric, "submission": self.submission}
        label_names = self.label_names if isinstance(self.label_names, str) else list(self.label_names)
        common = {"columns": dict(self.columns), "label_names": label_names,
                  "task_type": self.task_type, "task": self.task, "metric": self.metric}
        if self.source == "hf":
            return {"kind": "hf", "name": self.hf_name, "config": self.hf_config,
                    "revision": self.hf_revision, "cache_dir": _resolved(self.hf_cache_dir),
                    "dir": _resolved(self.hf_dir),
                    "splits": dict(self.hf_splits), **common}
        return {"kind": "files", "train": _resolved(self.train_file), "dev": _resolved(self.dev_file),
                "format": self.file_format, **common}

    def stage_params(self) -> dict[str, Any]:
        params = super().stage_params()
        if not self.metric:
            params.pop("metric")   # the default: fingerprints from before the parameter stay valid
        # Likewise for the defaults of the selection parameters: selection = dev and no
        # submission files write exactly what the stage wrote before they existed.
        if self.selection == "dev":
            params.pop("selection")
            params.pop("holdout_fraction")
        else:
            from pipeline.prepare.splits import check_holdout_fraction

            check_holdout_fraction(self.holdout_fraction)   # at scheduling: before anything runs
        if not self.submission:
            params.pop("submission")
        if self.source == "hf" and _is_local(self.hf_name):
            params["hf_name"] = "<local, hashed>"   # its content is in stage_inputs
        return params

    def stage_inputs(self) -> dict[str, str | Path]:
        from pipeline.prepare.splits import source_inputs

        return source_inputs(self.source_spec())

    def build(self, out: StageBuild) -> None:
        from pipeline.prepare.splits import prepare

        with out.timed("prepare"):
            result = prepare(self.source_spec(), out.path, skip_bad_rows=self.skip_bad_rows,
                             max_train_examples=self.max_train_examples,
                             max_dev_examples=self.max_dev_examples, subset_seed=self.subset_seed,
                             selection=self.selection, holdout_fraction=self.holdout_fraction)
        out.rows.update(result["rows"])
        out.info.update(result["info"])


def _is_local(name: str) -> bool:
    return bool(name) and Path(name).expanduser().exists()


def _resolved(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if path else ""
