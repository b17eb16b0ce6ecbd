"""Memory stays flat over trainer stages run in one process (issue 29, item 5).

Luigi's local worker runs every stage of a DAG in one process: ``tinykd demo`` 19 trainer
stages, a nine-task GLUE run with three seeds about 54. Whatever a stage leaves behind (a
reference cycle holding its student, optimizer and reader; freed memory glibc keeps in its
arenas), every later stage carries. These tests run trainer stages back to back in this
process, as ``tinykd run`` does, and measure the resident set size after each."""
from __future__ import annotations

import json

import luigi
import numpy as np
import pytest

from pipeline.stage.memory import rss_bytes
from tests.test_distill_tasks import one_torch_thread  # noqa: F401  (autouse fixture)
from tests.tiny_dag import tiny_stages, tiny_task

#: RSS growth per trainer stage allowed (the issue's goal over the demo grid: < 5 MB).
SLOPE_BOUND_MB = 5.0
MB = 1e6


@pytest.fixture
def configured(tmp_path, monkeypatch, minilm_dir):
    """The tiny DAG under held-out selection (the demo's), with a student wide enough (256, a
    31 MB embedding, three times that with AdamW's state) that one stage's leftovers show."""
    from luigi.configuration import LuigiConfigParser

    task = tiny_task(tmp_path, minilm_dir, train_rows=40, dev_rows=12).replace(
        "[FineTuneTeacher]", "selection = holdout\nholdout_fraction = 0.2\n[FineTuneTeacher]")
    wide = {"student_hidden_size": 256, "student_intermediate_size": 512, "epochs": None,
            "max_steps": 4}
    config = tmp_path / "luigi.cfg"
    config.write_text(task + tiny_stages(DistillIntermediate=wide,
                                         DistillPrediction={"epochs": None, "max_steps": 4, "eval_every": 2}))
    monkeypatch.setattr(LuigiConfigParser, "_config_paths", [str(config)])
    monkeypatch.setattr(LuigiConfigParser, "_instance", None)
    luigi.task_register.Register.clear_instance_cache()


def slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against 0, 1, 2, ..."""
    return float(np.polyfit(np.arange(len(values)), values, 1)[0])


@pytest.mark.slow
def test_rss_after_each_trainer_stage_does_not_grow(configured, isolated_workdir):
    """Seven stage-1 + stage-2 pairs (new seeds: new stages), each a Luigi run in this process.
    The first pair builds the DAG's upstream stages and warms the allocator and the imports; the
    RSS after each later pair must not grow by more than SLOPE_BOUND_MB per trainer stage.
    Before the fix (a trainer <-> held-out-selection cycle kept every stage-2 student, its
    AdamW state and the cache reader alive; freed pages stayed in malloc's arenas) it grew by
    about 50 MB per trainer stage here."""
    from tasks.distill import DistillPrediction

    after, outputs = [], []
    for seed in range(1, 8):
        luigi.task_register.Register.clear_instance_cache()
        stage2 = DistillPrediction(seed=seed, stage1={"seed": seed})
        assert luigi.build([stage2], local_scheduler=True, log_level="WARNING")
        after.append(rss_bytes() / MB)
        outputs += [stage2.requires()["stage1"].output_dir(), stage2.output_dir()]
    per_stage = slope(after[1:]) / 2   # two trainer stages per run
    assert per_stage < SLOPE_BOUND_MB, (
        f"RSS after each pair of trainer stages {[round(a) for a in after]} MB: "
        f"{per_stage:+.1f} MB per trainer stage")
    for output in outputs:   # every stage records its memory in the run history
        memory = json.loads((output / "manifest.json").read_text())["info"]["memory"]
        assert 0 < memory["start_rss_mb"] <= memory["peak_rss_mb"] and 0 < memory["end_rss_mb"]
        assert memory["end_rss_mb"] <= memory["peak_rss_mb"] and memory["peak_from"] == "VmHWM"


def _alive(kinds: dict[str, type]) -> dict[str, int]:
    """How many objects of each kind the interpreter still holds (cycles included: gc is off)."""
    import gc
    import weakref

    counts = {name: 0 for name in kinds}
    for obj in gc.get_objects():
        if type(obj) in (weakref.ProxyType, weakref.CallableProxyType):   # isinstance() of a dead one raises
            continue
        for name, kind in kinds.items():
            counts[name] += isinstance(obj, kind)
    return counts


@pytest.mark.slow
def test_nothing_of_a_trainer_stage_outlives_it(configured, isolated_workdir):
    """After a stage-1 + stage-2 run, with the cyclic garbage collector off (so that a
    reference cycle shows as survival, not as memory that a later collection might free), no
    student, optimizer, trainer, cache reader, evaluator, prefetch thread, TensorBoard writer
    or progress bar of the stages is alive, and no Arrow buffer of its reader: only reference
    counting freed them."""
    import gc

    import pyarrow
    from torch.optim import Optimizer
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm
    from transformers import PreTrainedModel

    from distill.data import Prefetcher
    from distill.evaluate import Evaluator
    from distill.trainer import Trainer
    from pipeline.cache.reader import CacheReader
    from tasks.distill import DistillPrediction

    kinds = {"model": PreTrainedModel, "optimizer": Optimizer, "trainer": Trainer, "reader": CacheReader,
             "evaluator": Evaluator, "prefetcher": Prefetcher, "tensorboard": SummaryWriter, "bar": tqdm}
    assert luigi.build([DistillPrediction(seed=1, stage1={"seed": 1})], local_scheduler=True,
                       log_level="WARNING")   # the upstream stages, and every import, first
    gc.collect()
    before, arrow_before = _alive(kinds), pyarrow.total_allocated_bytes()
    gc.disable()
    try:
        luigi.task_register.Register.clear_instance_cache()
        assert luigi.build([DistillPrediction(seed=2, stage1={"seed": 2})], local_scheduler=True,
                           log_level="WARNING")
        after, arrow_after = _alive(kinds), pyarrow.total_allocated_bytes()
    finally:
        gc.enable()
    assert after == before, f"alive after the stages: {after}, before them: {before}"
    # the cache reader's Arrow buffers (pyarrow's memory pool) went with it
    assert arrow_after <= arrow_before + MB, (arrow_before, arrow_after)


def test_a_stage_records_its_peak_and_ends_with_its_freed_memory_given_back():
    """measured(): the peak of the block (the kernel's high-water mark, reset at its start), and
    after it, with the block's memory freed and trimmed, an RSS back near the start."""
    from pipeline.stage.memory import measured

    record: dict = {}
    with measured(record):
        block = bytearray(300 * 10**6)   # touched: resident
        for offset in range(0, len(block), 4096):
            block[offset] = 1
        del block
    assert record["peak_from"] == "VmHWM"
    assert record["peak_rss_mb"] >= record["start_rss_mb"] + 290
    assert record["end_rss_mb"] < record["start_rss_mb"] + 50
    failed: dict = {}
    with pytest.raises(RuntimeError), measured(failed):
        raise RuntimeError("a failed build records nothing (its memory is still given back)")
    assert failed == {}


def test_under_cuda_the_peak_of_each_device_is_recorded_and_its_cache_emptied(monkeypatch):
    """The CUDA bookkeeping (no GPU here: torch.cuda's functions replaced by a recorder of the
    calls and of an allocator peak)."""
    import torch

    from pipeline.stage.memory import measured

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", d)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: (d + 1) * 512 * 10**6)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty_cache",)))
    record: dict = {}
    with measured(record):
        pass
    assert record["cuda_peak_mb"] == {"cuda:0": 512.0, "cuda:1": 1024.0}
    assert calls == [("reset", 0), ("reset", 1), ("empty_cache",)]
