"""The distillation stages through Luigi: the two stages on a real (tiny) DAG, and that a
trainer parameter reruns only the trainer stage."""
from __future__ import annotations

import json

import luigi
import pytest
import torch

from tests.tiny_dag import tiny_stages, tiny_task


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine the threads'
    barriers stall each other; one thread keeps these tests fast and steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def configured(tmp_path, monkeypatch, minilm_dir):
    """A luigi.cfg for a tiny SST-2-like task: files -> tiny teacher -> cache -> two stages."""
    from luigi.configuration import LuigiConfigParser

    config = tmp_path / "luigi.cfg"
    config.write_text(tiny_task(tmp_path, minilm_dir, train_rows=32, dev_rows=12) + tiny_stages(
        DistillIntermediate={"checkpoint_every": 2}, DistillPrediction={"epochs": 2}))
    monkeypatch.setattr(LuigiConfigParser, "_config_paths", [str(config)])
    monkeypatch.setattr(LuigiConfigParser, "_instance", None)
    return tmp_path


def build(*tasks):
    return luigi.build(list(tasks), local_scheduler=True, detailed_summary=True, log_level="WARNING")


@pytest.mark.slow
def test_two_stage_dag_and_trainer_parameters_rerun_only_the_trainer(configured, isolated_workdir):
    from transformers import pipeline

    import tasks.distill as distill_tasks
    from tasks.teacher import TeacherCache

    stage2 = distill_tasks.DistillPrediction()
    result = build(stage2)
    # SUCCESS_WITH_RETRY: TeacherCache lists its shards only once its source exists, so a
    # cold DAG walk has Luigi retry it once (tasks/teacher.py, not the distillation stages).
    assert result.status.name in ("SUCCESS", "SUCCESS_WITH_RETRY"), result.summary_text
    out = stage2.output_dir()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["info"]["stage"] == "prediction" and manifest["rows"]["steps"] == 8
    assert manifest["info"]["dev_metrics"]["examples"] == 12
    evals = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert evals == [3, 6, 8]
    stage1 = distill_tasks.DistillIntermediate().output_dir()
    assert json.loads((stage1 / "metrics.json").read_text())["steps"] == 4
    assert not (stage1 / "checkpoints").exists()
    assert pipeline("text-classification", model=str(out / "student"), device="cpu")("good film")

    # a stage-2 trainer parameter: a new stage-2 output, nothing upstream rebuilt
    luigi.task_register.Register.clear_instance_cache()
    cache_dirs = set((isolated_workdir / "teacher_cache").iterdir())
    stage1_dirs = set((isolated_workdir / "distill_stage1").iterdir())
    changed = distill_tasks.DistillPrediction(learning_rate=1e-4)
    assert changed.output_dir() != out and not changed.complete()
    assert changed.requires()["stage1"].complete() and TeacherCache().complete()
    assert build(changed).status.name == "SUCCESS"
    assert set((isolated_workdir / "teacher_cache").iterdir()) == cache_dirs
    assert set((isolated_workdir / "distill_stage1").iterdir()) == stage1_dirs

    # a flipped byte in stage 1's student: the next stage 2 refuses it, naming the file
    from pipeline.errors import InputError

    weights = stage1 / "student" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    luigi.task_register.Register.clear_instance_cache()
    third = distill_tasks.DistillPrediction(learning_rate=2e-4)
    with pytest.raises(InputError, match=rf"{weights}: upstream output is damaged"):
        third.run()
    assert not third.output_dir().exists()
