"""The student as users deploy it (issue 28): its size and speed against the teacher
(distill.speed, ``tinykd speed``, DistillPrediction's ``info.deployment``), the ONNX export
checked by onnxruntime and its int8 variant (pipeline.deploy, ``ExportStudent``), and bad
input. Timings are asserted for structure and ordering, never for absolute values."""
from __future__ import annotations

import json
import random
import shutil

import luigi
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.errors import InputError
from tests.test_cache import make_teacher
# autouse: one intra-op thread outside the timings, as the other model tests (the timer sets its own)
from tests.test_distill_tasks import one_torch_thread  # noqa: F401
from tests.tiny_dag import WORDS, tiny_stages, tiny_task

TASK = {"task": "SST-2", "task_type": "classification"}


@pytest.fixture(scope="module")
def models(tmp_path_factory, minilm_dir):
    """A tiny student (2 x 32) and a larger teacher (6 x 128), both with the real vocabulary,
    and a prepared-data-like directory holding 40 dev sentences."""
    root = tmp_path_factory.mktemp("deploy")
    make_teacher(root / "student", minilm_dir, layers=2, hidden_size=32)
    make_teacher(root / "teacher", minilm_dir, layers=6, hidden_size=128)
    rng = random.Random(3)
    count = 40
    (root / "prepared").mkdir()
    pq.write_table(pa.table({
        "id": [f"dev-{i}" for i in range(count)],
        "text_a": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(count)],
        "text_b": pa.nulls(count, pa.string()),
        "label": pa.array([i % 2 for i in range(count)], pa.int64())}), root / "prepared" / "dev.parquet")
    return root


@pytest.fixture(scope="module")
def deployment(models):
    """One measurement of the student against its teacher on the dev sentences (CPU stands in
    for the GPU figure: same code, device = cpu)."""
    from distill.speed import SpeedSettings, measure_deployment, sentences_from_path

    settings = SpeedSettings(runs=2, max_sentences=12, accelerator="cpu", gpu_batch_size=16)
    return measure_deployment(models / "student", models / "teacher",
                              lambda m: sentences_from_path(models / "prepared", m.tokenizer, 32, 12), settings)


def test_speed_figures_are_present_positive_and_ordered(deployment):
    student, teacher = deployment["student"], deployment["teacher"]
    for model in (student, teacher):
        assert 0 < model["parameters_without_embeddings"] < model["parameters"]
        assert model["safetensors_bytes"] > 4 * model["parameters"] * 0.99   # fp32 weights
        speed = model["speed"]
        for label in ("1", "all"):
            latency = speed["cpu_latency_ms"][label]
            assert 0 < latency["p50"] <= latency["p95"]
        assert speed["cpu_latency_ms"]["1"]["threads"] == 1
        assert speed["cpu_throughput"]["examples_per_s"] > 0 and speed["cpu_throughput"]["batch_size"] == 32
        gpu = speed["accelerator_bf16_throughput"]
        assert gpu["examples_per_s"] > 0 and gpu["dtype"] == "bfloat16" and gpu["batch_size"] == 16
    # the teacher is larger and slower: every ratio teacher / student above 1
    assert deployment["size_ratio"] > 1 and deployment["size_ratio_without_embeddings"] > 1
    assert deployment["bytes_ratio"] > 1
    assert deployment["speed"]["speedup"]["latency_p50_1_thread"] > 1
    assert deployment["speed"]["inputs"].startswith("12 sentences of dev.parquet at real lengths")
    assert deployment["size_ratio"] == pytest.approx(teacher["parameters"] / student["parameters"], rel=1e-3)


def test_report_values_turn_a_record_into_the_papers_columns(deployment):
    from distill.speed import describe_deployment, report_values

    values = report_values(deployment)
    assert values["student_params"] == f"{deployment['student']['parameters'] / 1e6:.1f}M"
    assert values["size_ratio"] == f"{deployment['size_ratio']:.1f}x"
    assert values["speedup_value"] == deployment["speed"]["speedup"]["latency_p50_1_thread"]
    assert values["measured"].startswith("measured on ") and "1 thread, batch 1" in values["measured"]
    assert "batch 32" in report_values(deployment, "throughput")["measured"]
    assert report_values(None) is None   # an output measured before the figures existed
    with pytest.raises(ValueError, match="threads"):
        report_values(deployment, "8")
    lines = describe_deployment(deployment)
    assert lines[1].startswith("student") and lines[3].startswith("teacher / student")


def test_run_history_hides_the_timings_and_keeps_the_sizes(deployment):
    from pipeline.stage import without_run_history

    content = without_run_history(deployment)
    assert "speed" not in content and "speed" not in content["student"]
    assert content["student"]["parameters"] == deployment["student"]["parameters"]
    assert content["size_ratio"] == deployment["size_ratio"]


def test_tinykd_speed_on_a_directory_that_is_not_a_model(tmp_path, capsys):
    from tasks.cli import main

    (tmp_path / "notes.txt").write_text("not a model\n")
    assert main(["speed", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tinykd speed: {tmp_path}: not an exported model: no config.json (give a "
                   "save_pretrained directory, e.g. a distill_stage2 output's student/)"]


def test_tinykd_speed_names_a_truncated_weights_file(models, tmp_path, capsys):
    from tasks.cli import main

    broken = tmp_path / "student"
    shutil.copytree(models / "student", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert main(["speed", str(broken), "--runs", "1", "--sentences", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tinykd speed: {weights}: truncated or damaged weights")


def test_tinykd_speed_prints_the_table_and_a_json_line(models, capsys):
    from tasks.cli import main

    assert main(["speed", str(models / "student"), "--against", str(models / "teacher"), "--length", "16",
                 "--sentences", "3", "--runs", "1", "--device", "none", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    record = json.loads(out[-1])
    assert record["speed"]["inputs"].startswith("3 random sequences of length 16")
    assert record["student"]["speed"]["accelerator_bf16_throughput"] is None
    assert out[0].split()[:2] == ["params", "w/o"] and out[3].startswith("teacher / student")


# --- ONNX ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    from distill.speed import SpeedSettings
    from pipeline.deploy.onnx_export import export_student

    out = tmp_path_factory.mktemp("export")
    record = export_student(models / "student", models / "prepared", out, TASK, 32, quantize="dynamic",
                            settings=SpeedSettings(runs=1, max_sentences=8))
    return out, record


def test_onnx_matches_pytorch_on_dev_and_int8_is_small(exported, models):
    out, record = exported
    parity = record["onnx"]["parity"]
    assert parity["examples"] == 40 and parity["predictions_equal"]
    assert parity["max_abs_logit_difference"] <= 1e-4
    metric = record["onnx"]["dev_metric"]
    assert metric["onnxruntime"] == metric["pytorch"]
    assert record["onnx"]["bytes"] == (out / "model.onnx").stat().st_size
    int8 = record["int8"]
    assert int8["bytes"] == (out / "model.int8.onnx").stat().st_size
    assert int8["bytes"] < 0.5 * record["onnx"]["bytes"]
    dev = int8["dev"]
    difference = dev["difference"]
    assert difference["low"] <= difference["delta"] <= difference["high"]
    assert difference["delta"] == pytest.approx(dev["int8"] - dev["fp32"])
    assert dev["flagged"] == (dev["loss_points"] > dev["tolerance_points"])
    speed = record["speed"]
    assert set(speed["runtimes"]) == {"pytorch", "onnxruntime", "onnxruntime_int8"}
    assert speed["versus_pytorch"]["onnxruntime"]["latency_p50_1_thread"] > 0


def test_the_exported_files_load_and_predict_as_the_readme_says(exported, models):
    """model.onnx and model.int8.onnx with the tokenizer saved beside them: any batch, any length."""
    import onnxruntime as ort
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, _ = exported
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = ["a good film", "boring plot and a long scene with music and actors", "fun"]
    inputs = dict(tokenizer(texts, padding=True, return_tensors="np"))
    student = AutoModelForSequenceClassification.from_pretrained(models / "student").eval()
    with torch.no_grad():
        expected = student(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    fp32 = ort.InferenceSession(str(out / "model.onnx")).run(None, inputs)[0]
    assert fp32.shape == (3, 2) and np.abs(fp32 - expected).max() <= 1e-4
    int8 = ort.InferenceSession(str(out / "model.int8.onnx")).run(None, inputs)[0]
    assert int8.shape == (3, 2) and np.isfinite(int8).all()
    single = dict(tokenizer(["good"], return_tensors="np"))
    assert ort.InferenceSession(str(out / "model.onnx")).run(None, single)[0].shape == (1, 2)


def test_export_of_a_truncated_checkpoint_names_the_file_and_writes_no_model(models, tmp_path):
    from pipeline.deploy.onnx_export import export_student

    broken = tmp_path / "student"
    shutil.copytree(models / "student", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match=rf"^{weights}: truncated or damaged weights"):
        export_student(broken, models / "prepared", out, TASK, 32)
    assert list(out.iterdir()) == []


def test_a_parity_failure_stops_the_export_naming_the_file(models, tmp_path):
    """An impossible tolerance: onnxruntime and PyTorch differ by float rounding, so the check
    must fail, naming model.onnx and the worst example (the check is not a formality)."""
    from pipeline.deploy.onnx_export import ExportMismatch, export_student

    with pytest.raises(ExportMismatch, match=r"model\.onnx: onnxruntime's logits differ .* worst: dev example"):
        export_student(models / "student", models / "prepared", tmp_path, TASK, 32, parity_tolerance=0.0,
                       measure_speed=False)


# --- the stages ------------------------------------------------------------------------------

@pytest.fixture
def configured(tmp_path, monkeypatch, minilm_dir):
    from luigi.configuration import LuigiConfigParser

    config = tmp_path / "luigi.cfg"
    config.write_text(tiny_task(tmp_path, minilm_dir, train_rows=32, dev_rows=12) + tiny_stages(
        DistillPrediction={"speed_runs": 1, "speed_sentences": 6})
        + "[ExportStudent]\nquantize = dynamic\nspeed_runs = 1\nspeed_sentences = 6\n")
    monkeypatch.setattr(LuigiConfigParser, "_config_paths", [str(config)])
    monkeypatch.setattr(LuigiConfigParser, "_instance", None)
    return tmp_path


@pytest.mark.slow
def test_distill_prediction_records_deployment_and_export_student_checks_it(configured, isolated_workdir):
    from pipeline.stage import PARTIAL_SUFFIX, load_manifest
    from tasks.deploy import ExportStudent
    from tasks.distill import DistillPrediction

    export = ExportStudent()
    result = luigi.build([export], local_scheduler=True, detailed_summary=True, log_level="WARNING")
    assert result.status.name in ("SUCCESS", "SUCCESS_WITH_RETRY"), result.summary_text

    stage2 = DistillPrediction()
    info = load_manifest(stage2.output_dir())["info"]
    deployment = info["deployment"]   # the student (2 x 32) against the tiny teacher (4 x 48)
    assert deployment["size_ratio"] > 1 and deployment["bytes_ratio"] > 1
    assert deployment["student"]["speed"]["cpu_latency_ms"]["1"]["p50"] > 0
    assert deployment["speed"]["inputs"].startswith("6 sentences of dev.parquet at real lengths")
    assert load_manifest(stage2.output_dir())["timings"]["speed"] > 0

    manifest = load_manifest(export.output_dir())
    onnx = manifest["info"]["onnx"]
    assert onnx["parity"]["max_abs_logit_difference"] <= 1e-4 and onnx["parity"]["predictions_equal"]
    # the same dev metric as the PyTorch student had when stage 2 evaluated it
    assert onnx["dev_metric"]["onnxruntime"] == pytest.approx(info["dev_metrics"]["primary"])
    assert manifest["info"]["int8"]["bytes"] < 0.5 * onnx["bytes"]
    assert {"model.onnx", "model.int8.onnx", "config.json"} <= set(manifest["files"])

    # a truncated student checkpoint: one error naming the file, no model.onnx published
    weights = stage2.output_dir() / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    luigi.task_register.Register.clear_instance_cache()
    other = ExportStudent(quantize="none")
    with pytest.raises(InputError, match=rf"^{weights}: upstream output is damaged"):
        other.run()
    assert not other.output_dir().exists()
    assert not (other.output_dir().parent / f".{other.output_dir().name}{PARTIAL_SUFFIX}").exists()
