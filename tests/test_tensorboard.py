"""TensorBoard event files of a training run, read back with tensorboard's own event reader:
every metrics.jsonl value (loss terms and total, lr, gradient norm, examples/s, loader-wait
share, each dev evaluation) is there at its step, also after a crash and a resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.data import TokenizedExamples
from distill.trainer import OnlineTeacher, Trainer, recipe, tensorboard_scalars
from pipeline.cache.layer_map import cached_layers, layer_map
from tests.test_distill_trainer import (FailingTeacher, Interrupt, examples, make_student, run,  # noqa: F401
                                        one_torch_thread, teacher, tokenizer)


def read_events(directory: Path) -> dict[str, dict[int, float]]:
    """``tag -> {step: value}`` of every scalar in the event files of ``directory``."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(directory), size_guidance={SCALARS: 0})
    accumulator.Reload()
    scalars = {}
    for tag in accumulator.Tags()["scalars"]:
        events = accumulator.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice {steps}"
        scalars[tag] = {e.step: e.value for e in events}
    return scalars


def expected_scalars(metrics: Path) -> dict[str, dict[int, float]]:
    expected: dict[str, dict[int, float]] = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        for tag, value in tensorboard_scalars(record).items():
            expected.setdefault(tag, {})[record["step"]] = value
    return expected


def assert_events_equal_metrics(out: Path) -> dict:
    events, expected = read_events(out / "tb"), expected_scalars(out / "metrics.jsonl")
    assert set(events) == set(expected)
    for tag, values in expected.items():
        assert set(events[tag]) == set(values), tag
        for step, value in values.items():   # event files store float32
            assert events[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-12, nan_ok=True), (tag, step)
    return events


def test_event_files_hold_the_metrics_of_every_logged_step_and_evaluation(tmp_path, teacher, examples):
    from distill.evaluate import Evaluator

    hidden, attention = cached_layers(layer_map(4, 2))
    dev = TokenizedExamples(examples[:16], "classification")
    evaluator = Evaluator(dev, task="SST-2", task_type="classification", batch_size=8, device=torch.device("cpu"))
    config = recipe("prediction", batch_size=8, epochs=1, log_every=2, eval_every=3, device="cpu")
    run(tmp_path, "stage2", teacher, TokenizedExamples(examples, "classification"),
        OnlineTeacher(teacher, hidden, attention), config, evaluate=evaluator)
    events = assert_events_equal_metrics(tmp_path / "stage2")
    assert {"loss/prediction", "loss/total", "train/lr", "train/grad_norm", "train/examples_per_s",
            "train/loader_wait_share", "dev/accuracy", "dev/primary"} <= set(events)
    assert sorted(events["dev/accuracy"]) == [3, 6]
    assert sorted(events["loss/total"]) == [2, 4, 6]


def test_a_resumed_run_reads_back_as_one_run(tmp_path, teacher, examples):
    """A crash after the checkpoint at step 4 logged steps 5-6; the resumed run logs them
    again: the reader sees each step once, with the final run's values."""
    hidden, attention = cached_layers(layer_map(4, 2))
    source = TokenizedExamples(examples, "classification")
    config = recipe("intermediate", batch_size=10, epochs=2, log_every=1, checkpoint_every=4,
                    device="cpu", learning_rate=1e-3)
    out = tmp_path / "resumed"
    mapped = list(zip((1, 2), layer_map(4, 2)))
    crashing = Trainer(config, make_student(teacher), source,
                       FailingTeacher(teacher, hidden, attention, fail_at=7), out, mapped, 48)
    with pytest.raises(Interrupt):
        crashing.train()
    assert sorted(read_events(out / "tb")["loss/total"]) == [1, 2, 3, 4, 5, 6]
    Trainer(config, make_student(teacher), source, OnlineTeacher(teacher, hidden, attention),
            out, mapped, 48).train()
    events = assert_events_equal_metrics(out)
    assert sorted(events["loss/total"]) == list(range(1, 11))
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 2
