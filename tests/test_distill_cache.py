"""Distillation from a real Parquet teacher cache: parity with the live teacher, the two
stages, export, and the bad-input checks (layers, tokenizer, task)."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import numpy as np
import pytest
import torch

from distill.run import distill_from_cache
from distill.student import StudentSpec
from distill.trainer import recipe
from pipeline.errors import InputError
from pipeline.cache.layer_map import cached_layers, layer_map
from pipeline.cache.writer import CacheSpec
from pipeline.cache.assemble import build_cache

WORDS = "good bad movie plot actor great boring fun story scene long short film music".split()
SCHEMA = pa.schema([("id", pa.string()), ("text_a", pa.string()), ("text_b", pa.string()),
                    ("label", pa.int64())])
SST2 = {"task": "SST-2", "task_type": "classification", "label_names": ["negative", "positive"],
        "num_labels": 2}
STUDENT = dict(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine the threads'
    barriers stall each other; one thread keeps these tests fast and steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_examples(path: Path, n: int, split: str, seed: int) -> None:
    rng = random.Random(seed)
    rows = [{"id": f"{split}-{i}", "text_a": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))),
             "text_b": None, "label": i % 2} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, minilm_dir):
    """A tiny 4-layer teacher (real vocabulary), train/dev data, fp32 and fp16 caches."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("distill-cache")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=4,
                        num_attention_heads=4, intermediate_size=96, max_position_embeddings=64,
                        num_labels=2, id2label={0: "negative", 1: "positive"},
                        label2id={"negative": 0, "positive": 1})
    BertForSequenceClassification(config).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    write_examples(root / "train.parquet", 40, "train", 0)
    (root / "prepared").mkdir()
    write_examples(root / "prepared" / "dev.parquet", 16, "dev", 1)
    hidden, attention = cached_layers(layer_map(4, 2))
    caches = {}
    for dtype in ("float32", "float16"):
        caches[dtype] = root / f"cache-{dtype}"
        build_cache(root / "train.parquet", root / "teacher", caches[dtype],
                    CacheSpec(hidden, attention, dtype, max_seq_length=32), shard_size=16, task_info=SST2)
    return {"root": root, "caches": caches, "tokenizer": tokenizer}


def losses(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()
            if "eval" not in json.loads(line)]


def max_relative_difference(a: list[dict], b: list[dict], names) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        assert x["step"] == y["step"]
        for name in names:
            worst = max(worst, abs(x[name] - y[name]) / max(abs(y[name]), 1e-12))
    return worst


@pytest.mark.parametrize("stage", ["intermediate", "prediction"])
def test_fp32_cache_equals_online_teacher_and_fp16_is_reported(tmp_path, assets, stage):
    names = ("embedding", "hidden", "attention", "total") if stage == "intermediate" else ("prediction", "total")
    # 40 examples, batch 8: 5 steps in epoch 0, then 1 into the reshuffled epoch 1
    config = recipe(stage, batch_size=8, epochs=2, max_steps=6, log_every=1, device="cpu", eval_every=0)
    runs = {}
    for name, cache, online in (("fp32", "float32", False), ("online", "float32", True),
                                ("fp16", "float16", False)):
        distill_from_cache(assets["caches"][cache], tmp_path / name, config, StudentSpec(**STUDENT),
                           online=online)
        runs[name] = losses(tmp_path / name)
    assert len(runs["online"]) == 6
    assert max_relative_difference(runs["fp32"], runs["online"], names) <= 1e-6
    fp16 = max_relative_difference(runs["fp16"], runs["online"], names)
    print(f"\n{stage}: max relative per-step loss difference fp16 cache vs online = {fp16:.3e}")
    if stage == "intermediate":
        assert 0 < fp16 < 1e-2   # half precision is visible, but small
    else:
        assert fp16 == 0         # logits are cached in fp32 whatever the cache dtype


def test_dataloader_workers_give_the_same_batches_and_losses(tmp_path, assets):
    """The GPU path (worker processes reading the cache) trains exactly as the reader thread."""
    config = dict(batch_size=8, epochs=2, max_steps=7, log_every=1, device="cpu")
    for name, workers in (("thread", 0), ("workers", 2)):
        distill_from_cache(assets["caches"]["float16"], tmp_path / name,
                           recipe("intermediate", num_workers=workers, **config), StudentSpec(**STUDENT))
    keep = ("step", "embedding", "hidden", "attention", "total")
    strip = lambda rows: [{k: r[k] for k in keep} for r in rows]
    assert strip(losses(tmp_path / "workers")) == strip(losses(tmp_path / "thread"))


def test_two_stages_evaluate_export_and_run_in_a_pipeline(tmp_path, assets):
    from transformers import pipeline

    cache = assets["caches"]["float16"]
    stage1 = distill_from_cache(cache, tmp_path / "s1", recipe("intermediate", batch_size=8, epochs=1,
                                                                device="cpu", log_every=1),
                                StudentSpec(**STUDENT))
    assert stage1["steps"] == 5 and (tmp_path / "s1" / "projections.pt").exists()
    assert not (tmp_path / "s1" / "checkpoints").exists()
    stage2 = distill_from_cache(cache, tmp_path / "s2",
                                recipe("prediction", batch_size=8, epochs=2, eval_every=4,
                                       device="cpu", log_every=1, learning_rate=1e-3),
                                stage1_dir=tmp_path / "s1", prepared_dir=assets["root"] / "prepared")
    summary = json.loads((tmp_path / "s2" / "metrics.json").read_text())
    assert summary["best"]["metrics"]["examples"] == 16
    assert summary["best"]["step"] in (4, 8, 10)
    recorded = json.loads((tmp_path / "s2" / "student" / "tinykd_distill.json").read_text())
    assert recorded["best"]["step"] == summary["best"]["step"] and recorded["task"] == "SST-2"
    # the exported student's real shape (issue 15 item 10: stage 2 recorded the default 312/1200)
    for stage_dir in ("s1", "s2"):
        info = json.loads((tmp_path / stage_dir / "student" / "tinykd_distill.json").read_text())
        assert info["student"] == STUDENT, stage_dir
        assert {k: info["student_init"][k] for k in STUDENT} == STUDENT, stage_dir
    assert stage2["best"]["metrics"]["primary_metric"] == "accuracy"

    classify = pipeline("text-classification", model=str(tmp_path / "s2" / "student"), device="cpu")
    predictions = classify(["good movie", "boring plot"])
    assert {p["label"] for p in predictions} <= {"negative", "positive"}
    # stage 1's encoder was the starting point of stage 2: its weights moved from there
    s1 = torch.load(tmp_path / "s1" / "projections.pt", weights_only=True)
    assert set(s1) == {"maps.shared.weight", "maps.shared.bias"}


def test_cache_without_the_students_layers_is_refused(tmp_path, assets):
    config = recipe("intermediate", batch_size=8, epochs=1, device="cpu")
    spec = StudentSpec(**{**STUDENT, "num_layers": 4})   # needs teacher layers 1..4, cache has 2, 4
    with pytest.raises(InputError, match=r"needs hidden layer\(s\) \[1, 3\].*holds \[0, 2, 4\]"):
        distill_from_cache(assets["caches"]["float16"], tmp_path / "x", config, spec)
    with pytest.raises(InputError, match=r"needs hidden layer\(s\) \[1\].*'bottom'.*teacher layers \[1, 2\]"):
        distill_from_cache(assets["caches"]["float16"], tmp_path / "y", config, StudentSpec(**STUDENT),
                           layer_strategy="bottom")


def test_student_with_another_tokenizer_is_refused(tmp_path, assets):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    student_dir = tmp_path / "other-student"
    from distill.student import build_student
    from transformers import AutoConfig
    student = build_student(StudentSpec(**STUDENT), AutoConfig.from_pretrained(assets["root"] / "teacher"), 2)
    student.save_pretrained(student_dir)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(student_dir)
    with pytest.raises(InputError, match="student's tokenizer differs"):
        distill_from_cache(assets["caches"]["float16"], tmp_path / "x",
                           recipe("intermediate", batch_size=8, epochs=1, device="cpu"),
                           StudentSpec(init="checkpoint", checkpoint=str(student_dir)))


def test_stage2_refuses_a_stage1_output_of_another_task(tmp_path, assets):
    root = assets["root"]
    mrpc_cache = tmp_path / "mrpc-cache"
    hidden, attention = cached_layers(layer_map(4, 2))
    write_examples(tmp_path / "mrpc.parquet", 8, "train", 3)
    build_cache(tmp_path / "mrpc.parquet", root / "teacher", mrpc_cache,
                CacheSpec(hidden, attention, "float16", max_seq_length=32), shard_size=8,
                task_info={"task": "MRPC", "task_type": "classification",
                           "label_names": ["not_equivalent", "equivalent"], "num_labels": 2})
    distill_from_cache(mrpc_cache, tmp_path / "mrpc-s1", recipe("intermediate", batch_size=8, epochs=1,
                                                                device="cpu"), StudentSpec(**STUDENT))
    with pytest.raises(InputError, match="distilled for task='MRPC' but this cache has task='SST-2'"):
        distill_from_cache(assets["caches"]["float16"], tmp_path / "s2",
                           recipe("prediction", batch_size=8, epochs=1, device="cpu"),
                           stage1_dir=tmp_path / "mrpc-s1", prepared_dir=root / "prepared")


def _last_bar(err: str, desc: str) -> str:
    bars = [line for line in err.replace("\r", "\n").splitlines() if line.startswith(desc)]
    assert bars, err
    return bars[-1]


def test_distillation_shows_a_progress_bar_with_steps_loss_and_eta(tmp_path, assets, capsys):
    """Issue 15 item 12: the distillation stages, most of the demo's time, showed no progress."""
    cache = assets["caches"]["float16"]
    distill_from_cache(cache, tmp_path / "s1", recipe("intermediate", batch_size=8, epochs=1, device="cpu",
                                                      progress=True), StudentSpec(**STUDENT))
    final = _last_bar(capsys.readouterr().err, "distill (intermediate)")
    assert final.startswith("distill (intermediate): 100%") and "5/5" in final, final
    assert "loss=" in final and ("step/s" in final or "s/step" in final)
    assert "<00:00" in final          # tqdm's elapsed<remaining (ETA)
    distill_from_cache(cache, tmp_path / "s2", recipe("prediction", batch_size=8, epochs=1, eval_every=2,
                                                      device="cpu", progress=True),
                       stage1_dir=tmp_path / "s1", prepared_dir=assets["root"] / "prepared")
    final = _last_bar(capsys.readouterr().err, "distill (prediction)")
    assert final.startswith("distill (prediction): 100%") and "best dev accuracy=" in final, final
    # selection = holdout: the bar names the rows the kept student is chosen on, not dev
    held = tmp_path / "prepared-holdout"
    shutil.copytree(assets["root"] / "prepared", held)
    shutil.copy(held / "dev.parquet", held / "holdout.parquet")
    distill_from_cache(cache, tmp_path / "s2-holdout", recipe("prediction", batch_size=8, epochs=1, eval_every=2,
                                                              device="cpu", progress=True),
                       stage1_dir=tmp_path / "s1", prepared_dir=held)
    final = _last_bar(capsys.readouterr().err, "distill (prediction)")
    assert "best held-out accuracy=" in final and "best dev" not in final, final


def test_a_kill_after_training_still_publishes_the_best_student(tmp_path, assets, monkeypatch):
    """The best student used to be moved into place after training, then the checkpoints
    deleted: a kill in between made the resumed stage publish the last step's weights while
    metrics.json named the best step."""
    from distill.trainer import Trainer

    cache = assets["caches"]["float16"]
    distill_from_cache(cache, tmp_path / "s1", recipe("intermediate", batch_size=8, epochs=1,
                                                       device="cpu"), StudentSpec(**STUDENT))
    stage2 = recipe("prediction", batch_size=8, epochs=2, eval_every=2, checkpoint_every=1,
                    device="cpu", log_every=1, learning_rate=1e-3)

    def run(name):
        return distill_from_cache(cache, tmp_path / name, stage2, stage1_dir=tmp_path / "s1",
                                  prepared_dir=assets["root"] / "prepared")

    fresh = run("fresh")
    assert fresh["best"]["step"] < fresh["steps"], "the test needs a best step before the last"
    cleanup = Trainer.cleanup_checkpoints

    def killed(self):
        raise KeyboardInterrupt("SIGKILL after the student was published in the partial")

    monkeypatch.setattr(Trainer, "cleanup_checkpoints", killed)
    with pytest.raises(KeyboardInterrupt):
        run("killed")
    monkeypatch.setattr(Trainer, "cleanup_checkpoints", cleanup)
    resumed = run("killed")
    assert resumed["resumed_from"] is not None and resumed["best"] == fresh["best"]
    for name in ("model.safetensors", "tinykd_distill.json"):
        assert (tmp_path / "killed" / "student" / name).read_bytes() == \
            (tmp_path / "fresh" / "student" / name).read_bytes(), name
    # the dev predictions behind the best and the last score survive the resume too
    from distill.predictions import BEST_PREDICTIONS, LAST_PREDICTIONS, read_predictions

    for name, step in ((BEST_PREDICTIONS, fresh["best"]["step"]), (LAST_PREDICTIONS, fresh["steps"])):
        ours, theirs = (read_predictions(tmp_path / run_name / name) for run_name in ("killed", "fresh"))
        assert ours.step == theirs.step == step and ours.ids == theirs.ids
        assert np.array_equal(ours.logits, theirs.logits) and np.array_equal(ours.labels, theirs.labels)
    assert read_predictions(tmp_path / "fresh" / BEST_PREDICTIONS).metrics == fresh["best"]["metrics"]
    assert read_predictions(tmp_path / "fresh" / LAST_PREDICTIONS).metrics == fresh["final_eval"]
