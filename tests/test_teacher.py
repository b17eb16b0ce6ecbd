"""Teacher stage: untrained-head detection, label checks, fine-tuning that keeps the best."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.teacher.finetune import (check_label_mapping, load_sequence_classifier, prepare_teacher, warn_if_untrained_head)
from tests.test_cache import make_teacher

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_label_mapping_checks():
    assert check_label_mapping({0: "negative", 1: "positive"}, ["negative", "positive"], "t") == "names agree"
    assert check_label_mapping({0: "LABEL_0", 1: "LABEL_1"}, ["negative", "positive"], "t").startswith("not checked")
    assert check_label_mapping({0: "negative", 1: "positive"}, ["0", "1"], "t").startswith("not checked")
    with pytest.raises(InputError, match="label order"):
        check_label_mapping({0: "positive", 1: "negative"}, ["negative", "positive"], "t")
    with pytest.raises(InputError, match="not the task's"):
        check_label_mapping({0: "contradiction", 1: "entailment"}, ["negative", "positive"], "t")


def test_untrained_head_is_detected_and_warned_about(minilm_dir, tmp_path):
    model, trained, _ = load_sequence_classifier(minilm_dir, 2, ["negative", "positive"])
    assert trained is False and model.config.num_labels == 2  # bare encoder: fresh head
    with pytest.warns(UserWarning, match="TEACHER HEAD NOT TRAINED"):
        warn_if_untrained_head(minilm_dir, trained)
    classifier = make_teacher(tmp_path / "clf", minilm_dir)
    _, trained, _ = load_sequence_classifier(classifier, 2)
    assert trained is True
    with pytest.raises(InputError, match="task has 3 classes but the teacher's head has 2"):
        load_sequence_classifier(classifier, 3)


def _split(path: Path, rows: int, offset: int = 0) -> Path:
    words = ["great", "wonderful", "superb", "terrible", "awful", "dreadful"]
    texts, labels = [], []
    for i in range(offset, offset + rows):
        word = words[i % len(words)]
        texts.append(f"the film was {word} from start to finish number {i % 7}")
        labels.append(0 if word in ("terrible", "awful", "dreadful") else 1)
    pq.write_table(pa.table({"id": [f"x-{i}" for i in range(rows)], "text_a": texts,
                             "text_b": pa.nulls(rows, pa.string()),
                             "label": pa.array(labels, pa.int64())}), path)
    return path


def test_finetune_learns_the_task_and_keeps_the_best(minilm_dir, tmp_path):
    """The packaged MiniLM encoder (fresh head) on a toy sentiment task, as the offline default."""
    train, dev = _split(tmp_path / "train.parquet", 64), _split(tmp_path / "dev.parquet", 24, offset=3)
    info = prepare_teacher(minilm_dir, train, dev, tmp_path / "model", {"task": "SST-2", "task_type": "classification",
                           "label_names": ["negative", "positive"], "num_labels": 2},
                           epochs=2, learning_rate=1e-4, batch_size=16, eval_every=4, seed=0,
                           tb_dir=tmp_path / "tb")
    assert info["skipped_finetune"] is False and info["head_trained_before"] is False
    # its TensorBoard run: every step's loss, every evaluation's dev metrics
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={SCALARS: 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total")] == list(range(1, info["steps"] + 1))
    assert {"train/lr", "train/grad_norm", "train/examples_per_s", "train/loader_wait_share"} <= \
        set(events.Tags()["scalars"])
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("dev/accuracy")] == \
        [(h["step"], round(h["accuracy"], 6)) for h in info["history"]]
    accuracies = [h["accuracy"] for h in info["history"]]
    assert info["dev"]["accuracy"] == max(accuracies) >= 0.9, accuracies
    assert info["dev"]["step"] in [h["step"] for h in info["history"]]
    # a teacher that learned the task beats the majority class, and the manifest says so
    assert info["degenerate"] is False and info["majority_baseline"]["accuracy"] < info["dev"]["accuracy"]
    # The saved teacher is the best checkpoint, and its head counts as trained now.
    model, trained, check = load_sequence_classifier(tmp_path / "model", 2, ["negative", "positive"])
    assert trained is True and check == "names agree"
    again = prepare_teacher(tmp_path / "model", train, dev, tmp_path / "kept", {
        "task": "SST-2", "task_type": "classification", "label_names": ["negative", "positive"],
        "num_labels": 2}, batch_size=16)
    assert again["skipped_finetune"] is True
    assert again["dev"]["accuracy"] == pytest.approx(info["dev"]["accuracy"])


def test_the_progress_bar_names_the_rows_the_teacher_is_chosen_on(minilm_dir, tmp_path, capsys):
    """With selection = holdout the fine-tune keeps the best checkpoint on the held-out train
    rows; its bar said "best dev accuracy" all the same (the demo's first screen)."""
    untrained = make_teacher(tmp_path / "clf", minilm_dir, layers=1, bare=True)
    train, dev = _split(tmp_path / "train.parquet", 16), _split(tmp_path / "dev.parquet", 8, offset=3)
    held_out = _split(tmp_path / "holdout.parquet", 8, offset=5)
    task = {"task": "SST-2", "task_type": "classification", "label_names": ["0", "1"], "num_labels": 2}
    prepare_teacher(untrained, train, dev, tmp_path / "model", task, epochs=1, batch_size=8,
                    eval_every=1, progress=True, select_path=held_out)
    err = capsys.readouterr().err.replace("\r", "\n")
    bars = [line for line in err.splitlines() if line.startswith("fine-tune teacher: 100%")]
    assert bars and "best held-out accuracy=" in bars[-1] and "best dev" not in err, err[-2000:]


def test_a_teacher_no_better_than_the_majority_class_is_flagged(minilm_dir, tmp_path):
    """Issue 15 item 9: CoLA/RTE teachers that predict one class (Matthews 0.0) were distilled
    from without a word. Here dev holds one class only, so no teacher can beat the constant
    majority prediction on Matthews correlation (0 when a marginal is constant)."""
    train = _split(tmp_path / "train.parquet", 14)
    pq.write_table(pa.table({"id": [f"d-{i}" for i in range(6)], "text_a": [f"a dull film {i}" for i in range(6)],
                             "text_b": pa.nulls(6, pa.string()), "label": pa.array([1] * 6, pa.int64())}),
                   tmp_path / "dev.parquet")
    classifier = make_teacher(tmp_path / "clf", minilm_dir, layers=1)   # a head counted as trained
    with pytest.warns(UserWarning, match="TEACHER NO BETTER THAN THE MAJORITY CLASS"):
        info = prepare_teacher(classifier, train, tmp_path / "dev.parquet", tmp_path / "model",
                               {"task": "CoLA", "task_type": "classification", "label_names": ["0", "1"],
                                "num_labels": 2}, batch_size=8)
    assert info["skipped_finetune"] is True and info["degenerate"] is True
    check = info["baseline_check"]
    assert check["metric"] == "mcc" and check["baseline"] == 0.0 and check["teacher"] <= 0.0
    assert check["predicts"] == "1"     # the majority train label (8 of the 14 rows), by name
    assert info["majority_baseline"]["accuracy"] == 1.0


def test_the_baseline_check_compares_on_the_primary_metric():
    from pipeline.teacher.finetune import check_against_baseline

    better = check_against_baseline({"primary_metric": "f1", "primary": 0.85, "f1": 0.85},
                                    {"primary_metric": "f1", "primary": 0.81, "f1": 0.81, "predicts": 1},
                                    "t", ["0", "1"])
    assert better["degenerate"] is False and better["predicts"] == "1"
    with pytest.warns(UserWarning, match="scores dev accuracy 0.5000, the constant prediction 'no' scores 0.5000"):
        tie = check_against_baseline({"primary_metric": "accuracy", "primary": 0.5},
                                     {"primary_metric": "accuracy", "primary": 0.5, "accuracy": 0.5,
                                      "predicts": 0}, "t", ["no", "yes"])
    assert tie["degenerate"] is True


def test_never_finetune_saves_the_head_as_untrained(minilm_dir, tmp_path):
    train, dev = _split(tmp_path / "train.parquet", 8), _split(tmp_path / "dev.parquet", 8)
    base = make_teacher(tmp_path / "base", minilm_dir, bare=True, layers=1)
    with pytest.warns(UserWarning, match="TEACHER HEAD NOT TRAINED"):
        info = prepare_teacher(base, train, dev, tmp_path / "model", {"task_type": "classification",
                               "label_names": ["negative", "positive"], "num_labels": 2}, mode="never")
    assert info["skipped_finetune"] is True and info["head_trained"] is False
    # Saved random head weights must not pass for trained ones later.
    _, trained, _ = load_sequence_classifier(tmp_path / "model", 2)
    assert trained is False


def test_corpus_mode_caches_a_bare_encoder_without_logits(minilm_dir, tmp_path, isolated_workdir):
    import luigi

    from pipeline.cache.reader import open_cache
    from tasks.teacher import TeacherCache

    encoder = make_teacher(tmp_path / "encoder", minilm_dir, bare=True, layers=4)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"plain text line number {i} for general distillation" for i in range(10)))
    task = TeacherCache(examples="corpus", corpus=str(corpus), teacher=str(encoder), shard_size=4,
                        student_layers=2, max_seq_length=32)
    assert luigi.build([task], local_scheduler=True, log_level="ERROR")
    reader = open_cache(task.output_dir())
    assert reader.info["with_logits"] is False and reader.num_examples == 10
    assert reader.info["hidden_layers"] == [0, 2, 4]
    batch = next(iter(reader.batches(4)))
    assert batch["teacher_logits"] is None and batch["labels"] is None
    assert set(batch["teacher_scores"]) == {2, 4}
    with pytest.raises(InputError, match="no logits"):
        open_cache(task.output_dir(), with_logits=True)


def test_layer_index_outside_the_teacher_is_refused_by_the_stage(minilm_dir, tmp_path):
    import luigi

    from tasks.teacher import TeacherCacheShard

    encoder = make_teacher(tmp_path / "encoder", minilm_dir, bare=True, layers=2)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one line\nanother line\n")
    task = TeacherCacheShard(examples="corpus", corpus=str(corpus), teacher=str(encoder), shard_index=0,
                             layer_map="explicit", student_layers=2, explicit_layers="1,5")
    with pytest.raises(InputError, match=r"teacher layer\(s\) \[5\] outside the teacher's 1..2"):
        task.cache_spec()
    assert not luigi.build([task], local_scheduler=True, log_level="CRITICAL")
    assert not (task.output_dir().parent).exists() or not any(p for p in task.output_dir().parent.iterdir() if p.suffix != ".lock")


def test_task_modules_import_no_torch_and_a_noop_check_is_cheap():
    code = ("import sys, tasks.teacher; "
            "bad = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_fresh_finetunes_give_byte_identical_teachers(minilm_dir, tmp_path):
    """The fresh head is initialised under the fine-tune's seed (it was drawn before it)."""
    import torch

    train, dev = _split(tmp_path / "train.parquet", 16), _split(tmp_path / "dev.parquet", 8, offset=3)
    info = {"task": "SST-2", "task_type": "classification", "label_names": ["negative", "positive"],
            "num_labels": 2}
    outputs = []
    for run in ("a", "b"):
        torch.rand(7)          # whatever ran before in the process must not matter
        prepare_teacher(minilm_dir, train, dev, tmp_path / run, info, epochs=1, batch_size=16,
                        seed=3, device="cpu")
        outputs.append((tmp_path / run / "model.safetensors").read_bytes())
    assert outputs[0] == outputs[1]
