"""The console of a checkpoint load: our line for a head that is new on purpose, a warning
naming the checkpoint for anything else, never transformers' raw load table."""
from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common.loading import load_pretrained
from pipeline.teacher.finetune import load_bare_encoder, load_sequence_classifier, prepare_teacher
from tests.test_cache import make_teacher

LIBRARY_TABLE_MARKS = ("LOAD REPORT", "MISSING", "UNEXPECTED", "Consider training", "Loading weights", "\x1b[")


def _assert_no_library_table(text: str) -> None:
    found = [mark for mark in LIBRARY_TABLE_MARKS if mark in text]
    assert not found, f"the console shows transformers' load table ({found}):\n{text}"


def _split(path, rows):
    words = ["great", "superb", "awful", "dreadful"]
    texts = [f"the film was {words[i % 4]} number {i}" for i in range(rows)]
    pq.write_table(pa.table({"id": [f"x-{i}" for i in range(rows)], "text_a": texts,
                             "text_b": pa.nulls(rows, pa.string()),
                             "label": pa.array([int(i % 4 < 2) for i in range(rows)], pa.int64())}), path)
    return path


def test_the_demo_teacher_load_prints_our_line_instead_of_the_library_table(minilm_dir, tmp_path, capfd, caplog):
    """The packaged MiniLM as FineTuneTeacher loads it in the demo (finetune = auto, new head)."""
    caplog.set_level(logging.INFO, logger="tinykd")
    info = prepare_teacher(minilm_dir, _split(tmp_path / "train.parquet", 16), _split(tmp_path / "dev.parquet", 8),
                           tmp_path / "teacher", {"task": "SST-2", "task_type": "classification",
                                                  "label_names": ["negative", "positive"], "num_labels": 2},
                           epochs=1, batch_size=16, eval_every=1, seed=0)
    assert info["head_trained_before"] is False and info["skipped_finetune"] is False
    captured = capfd.readouterr()
    _assert_no_library_table(captured.out + captured.err)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("tinykd")]
    assert f"{minilm_dir}: new classification head: 2 labels, trained by this stage" in ours
    # (a 1-step teacher may be warned about as no better than the majority class: not a load matter)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                and (r.name == "tinykd.loading" or r.name.startswith("transformers"))]


def test_a_fine_tuned_teacher_loads_as_a_bare_encoder_quietly(minilm_dir, tmp_path, capfd, caplog):
    """A student built from teacher layers reads the teacher as a bare encoder: the classifier
    is left out on purpose, so nothing is reported."""
    teacher = make_teacher(tmp_path / "clf", minilm_dir)
    capfd.readouterr()
    encoder = load_bare_encoder(teacher)
    assert type(encoder).__name__ == "BertModel"
    captured = capfd.readouterr()
    _assert_no_library_table(captured.out + captured.err)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_missing_encoder_weight_still_reaches_the_user_naming_the_checkpoint(minilm_dir, tmp_path, caplog):
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(minilm_dir)
    weights = {k: v for k, v in encoder.state_dict().items() if k != "encoder.layer.2.attention.self.query.weight"}
    broken = tmp_path / "broken-encoder"
    encoder.save_pretrained(broken, state_dict=weights)
    model, trained, _ = load_sequence_classifier(broken, 2, ["negative", "positive"])
    assert trained is False
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    assert str(broken) in warned[0] and "bert.encoder.layer.2.attention.self.query.weight" in warned[0]
    assert "newly initialised (random)" in warned[0]
    assert "classifier" not in warned[0]   # the new head is expected, not reported


def test_unused_checkpoint_weights_are_reported_unless_declared(minilm_dir, tmp_path, caplog):
    from transformers import AutoModel

    teacher = make_teacher(tmp_path / "clf", minilm_dir)
    _, report = load_pretrained(AutoModel, teacher)   # an exact load was expected
    assert report.unused_keys == ["classifier.bias", "classifier.weight"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and str(teacher) in warned[0] and "does not use: classifier.bias" in warned[0]
    caplog.clear()
    _, report = load_pretrained(AutoModel, teacher, partial=True)
    assert report.unused_keys and not report.problems
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
