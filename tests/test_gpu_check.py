"""scripts/gpu_check.py: without CUDA it stops in one line; its --cpu-dry-run runs every
measurement of the GPU check on a tiny DAG on the CPU and prints the JSON line it promises.
The paper profile's parts run here too: the seeded teacher (scripts/paper_teacher.py), the GPU
kit and its offline wheel install (scripts/gpu_kit.py), and the whole profile, bounds and
ratios included, at a toy shape (``--shape tiny``: no 110M-parameter model on the CPU)."""
from __future__ import annotations

import base64
import configparser
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.tiny_dag import tiny_stages, tiny_task

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def run_script(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_stops_with_one_line(tmp_path):
    done = run_script(["--workdir", str(tmp_path / "work")], tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no CUDA device is visible" in done.stderr
    assert "--cpu-dry-run" in done.stderr and not (tmp_path / "work").exists()


@pytest.mark.slow
def test_cpu_dry_run_measures_everything_on_a_tiny_dag(tmp_path, minilm_dir):
    config = tmp_path / "tiny.cfg"
    quiet = {"num_threads": 1, "progress": "false"}
    config.write_text(tiny_task(tmp_path, minilm_dir, train_rows=32, dev_rows=12) + tiny_stages(
        DistillIntermediate=quiet, DistillPrediction={**quiet, "eval_every": 2}))
    done = run_script(["--cpu-dry-run", "--config", str(config), "--workdir", str(tmp_path / "work"),
                       "--steps", "4", "--cpu-reference", "0.5"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    report = json.loads(next(l for l in lines if l.startswith('{"gpu_check"')))["gpu_check"]
    stages = {s["stage"]: s for s in report["stages"]}
    assert {"PrepareData", "FineTuneTeacher", "TeacherCache", "DistillIntermediate",
            "DistillPrediction"} <= set(stages)
    assert stages["DistillIntermediate"]["examples_per_s"] > 0
    assert all(s["peak_gpu_mib"] is None for s in stages.values())   # no GPU figures on the CPU
    epoch = report["cache_vs_online"]
    assert epoch["cache_epoch_s"] > 0 and epoch["online_epoch_s"] > 0
    assert 1.0 < epoch["flop_bound"] < 10   # a 4-layer width-48 teacher over a 2-layer width-32 student
    loader = report["loader"]
    assert [r["workers"] for r in loader["from_cache"]] == [0, 1, 2, 4]
    assert loader["reader_host_batches_per_s"] > 0 and loader["on_device_steps_per_s"] > 0
    launcher = report["launcher"]
    assert launcher["nproc"] == 2 and launcher["max_relative_loss_difference"] < 0.5
    assert report["dev"]["cpu"] == 0.5 and report["dev"]["gpu"] is not None
    assert any(l.startswith("stage-1 epoch: cache") for l in lines)
    assert any("launcher: 2 ranks on cpu,cpu" in l for l in lines)


# --- the paper profile -----------------------------------------------------------------------

def test_paper_teacher_is_seeded_of_its_shape_and_a_masked_lm_augmentation_accepts(tmp_path, minilm_dir):
    from pipeline.augment.mlm_candidates import load_masked_lm
    from scripts.paper_teacher import SHAPES, build_paper_teacher, built_shape

    first = build_paper_teacher(tmp_path / "a", "tiny", minilm_dir)
    second = build_paper_teacher(tmp_path / "b", "tiny", minilm_dir)
    assert built_shape(first) == SHAPES["tiny"].teacher
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "vocab.txt").read_bytes() == (minilm_dir / "vocab.txt").read_bytes()
    model, tokenizer = load_masked_lm(str(first), device="cpu")   # refuses a checkpoint without an MLM head
    assert model.config.vocab_size == len(tokenizer)
    assert not (tmp_path / "a.partial").exists()
    written = (first / "model.safetensors").stat().st_mtime_ns
    build_paper_teacher(first, "tiny", minilm_dir)                  # complete and of this shape: kept
    assert (first / "model.safetensors").stat().st_mtime_ns == written


def test_kit_carries_glove_text_tokenizer_and_task_and_a_failed_build_leaves_nothing(tmp_path, minilm_dir):
    import numpy as np

    from pipeline.augment.word_vectors import convert_source, read_packaged
    from pipeline.prepare.demo_task import write_demo_task
    from scripts.gpu_kit import GLOVE_TEXT, KitError, build_kit, folder_bytes

    write_demo_task(tmp_path / "glue", 20, 8)
    kit = tmp_path / "kit"
    manifest = build_kit(kit, glue_dir=tmp_path / "glue", glove_words=300, wheels=False)
    assert json.loads((kit / "kit.json").read_text()) == manifest
    assert manifest["bytes"]["total"] == folder_bytes(kit) - (kit / "kit.json").stat().st_size
    assert (kit / "glue" / "SST-2" / "train.tsv").read_bytes() == (tmp_path / "glue" / "SST-2" / "train.tsv").read_bytes()
    assert (kit / "tok" / "vocab.txt").read_bytes() == (minilm_dir / "vocab.txt").read_bytes()
    # the GloVe text reads back, through the project's glove_text conversion, as the packaged rows
    (tmp_path / "vectors").mkdir()
    convert_source("glove_text", tmp_path / "vectors", path=kit / GLOVE_TEXT)
    words, matrix = next(read_packaged(max_words=300))
    assert (tmp_path / "vectors" / "vocab.txt").read_text().split("\n")[:-1] == words
    expected = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    assert np.abs(np.load(tmp_path / "vectors" / "vectors.npy") - expected).max() < 1e-4

    with pytest.raises(KitError, match="no train.tsv, dev.tsv"):
        build_kit(tmp_path / "bad", glue_dir=tmp_path / "nowhere", glove_words=10, wheels=False)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_kit_wheels_are_luigis_closure_at_this_virtualenvs_versions():
    import importlib.metadata

    from scripts.gpu_kit import wheel_requirements

    pinned = dict(r.split("==") for r in wheel_requirements("3.12"))
    assert {"luigi", "tornado", "tenacity", "python-daemon", "lockfile"} <= set(pinned)
    assert all(importlib.metadata.version(name) == version for name, version in pinned.items())
    assert not {"jsonschema", "prometheus-client", "toml"} & set(pinned)   # luigi's extras stay out


def make_wheel(directory: Path, name: str, version: str = "1.0") -> Path:
    """A minimal pure-Python wheel holding module ``name`` (VALUE = 42)."""
    info = f"{name}-{version}.dist-info"
    files = {f"{name}.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}

    def digest(text):
        return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()

    record = "".join(f"{path},sha256={digest(text)},{len(text.encode())}\n" for path, text in files.items())
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in {**files, f"{info}/RECORD": record + f"{info}/RECORD,,\n"}.items():
            archive.writestr(path, text)
    return wheel


def test_kit_wheels_install_offline_only_when_missing_and_only_what_is_missing(tmp_path):
    kit = tmp_path / "kit"
    (kit / "whl").mkdir(parents=True)
    make_wheel(kit / "whl", "tinykd_kit_probe")
    make_wheel(kit / "whl", "six", "0.1")   # installed here already: must not shadow the real one
    code = ("import os, sys\nfrom scripts.gpu_kit import ensure_importable\n"
            "print(ensure_importable(sys.argv[1], modules=('tinykd_kit_probe',)))\n"
            "import tinykd_kit_probe, six\n"
            "print(tinykd_kit_probe.VALUE, six.__version__ != '0.1', os.environ['PYTHONPATH'].split(os.pathsep)[0])")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIP_NO_INDEX": "1"}
    # named relative to the working directory; the path children get is absolute all the same
    runs = [subprocess.run([sys.executable, "-c", code, "kit"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    site = kit / f"site-py{sys.version_info.major}.{sys.version_info.minor}"
    assert runs[0].stdout.splitlines() == ["['tinykd_kit_probe-1.0-py3-none-any.whl']", f"42 True {site}"]
    assert runs[1].stdout.splitlines() == ["[]", f"42 True {site}"]   # the second run reuses the folder
    assert not (site / "six.py").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run([sys.executable, "-c", code, str(empty)], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "scripts/gpu_kit.py" in done.stderr and str(empty / "whl") in done.stderr


def test_paper_profile_without_a_kit_stops_in_one_line_and_writes_nothing(tmp_path):
    done = run_script(["--profile", "paper", "--cpu-dry-run", "--kit", str(tmp_path / "no-kit"),
                       "--workdir", str(tmp_path / "work")], tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "scripts/gpu_kit.py" in done.stderr
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_cpu_dry_run_of_the_paper_profile_on_a_tiny_shape(tmp_path, minilm_dir):
    from pipeline.prepare.demo_task import write_demo_task
    from scripts.gpu_kit import GLOVE_TEXT, build_kit
    from scripts.paper_teacher import SHAPES, built_shape

    kit = tmp_path / "kit"
    build_kit(kit, glove_words=2000, wheels=False)
    write_demo_task(tmp_path / "glue", 48, 16)
    work = tmp_path / "work"
    done = run_script(["--profile", "paper", "--shape", "tiny", "--cpu-dry-run", "--kit", str(kit),
                       "--glue-dir", str(tmp_path / "glue"), "--train", "40", "--aug", "2", "--batch-size", "8",
                       "--forward-batch-size", "16", "--steps", "4", "--workdir", str(work)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    report = json.loads(next(l for l in lines if l.startswith('{"gpu_check"')))["gpu_check"]

    # the profile: the seeded teacher of the toy shape, and the DAG config written from it
    tiny = SHAPES["tiny"]
    teacher = work / "paper-teacher-tiny"
    assert built_shape(teacher) == tiny.teacher and not (work / "paper-teacher-base").exists()
    assert report["profile"]["teacher"] == tiny.teacher.describe() and report["profile"]["wheels_installed"] == []
    config = configparser.ConfigParser()
    config.read(work / "paper.cfg")   # the profile as written, batch sizes included
    assert config["Augment"]["mode"] == "tinybert" and Path(config["Augment"]["mlm_model"]) == teacher
    assert Path(config["FineTuneTeacher"]["teacher"]) == teacher
    assert Path(config["WordVectors"]["vectors_path"]) == kit / GLOVE_TEXT
    assert Path(config["PrepareData"]["glue_dir"]) == tmp_path / "glue"
    student = config["DistillIntermediate"]
    assert (int(student["student_hidden_size"]), int(student["student_intermediate_size"]),
            int(student["student_heads"]), int(config["TeacherCache"]["student_layers"])) == \
        (tiny.student.hidden, tiny.student.intermediate, tiny.student.heads, tiny.student.layers)
    assert (config["DistillIntermediate"]["batch_size"], config["DistillPrediction"]["batch_size"],
            config["TeacherCache"]["forward_batch_size"]) == ("8", "8", "16")
    assert report["batch_size"] == 8 and report["forward_batch_size"] == 16
    stages = {s["stage"]: s for s in report["stages"]}
    assert {"Candidates", "Augment", "TeacherCacheShard", "DistillIntermediate"} <= set(stages)
    candidates = next(work.glob("candidates/*/manifest.json"))
    assert json.loads(candidates.read_text())["info"]["counts"]["positions_mlm"] > 0   # the seeded MLM ran

    # the bounds, measured on the same batches, and every figure over its bound
    bounds = report["bounds"]
    assert bounds["arithmetic"] == "fp32" and (bounds["batch_size"], bounds["forward_batch_size"]) == (8, 16)
    assert min(bounds[k] for k in ("teacher_forward_examples_per_s", "student_step_examples_per_s",
                                   "online_step_examples_per_s")) > 0
    ratios, loader = report["ratios"], report["loader"]
    shards = [s for s in report["stages"] if s["stage"] == "TeacherCacheShard"]
    assert report["writer_examples_per_s"] == pytest.approx(
        sum(s["examples"] for s in shards) / sum(s["seconds"] for s in shards), rel=1e-3)
    for name, value, bound in (
            ("writer", report["writer_examples_per_s"], bounds["teacher_forward_examples_per_s"]),
            ("reader", loader["reader_host_examples_per_s"], bounds["student_step_examples_per_s"]),
            ("trainer", loader["on_device_examples_per_s"], bounds["student_step_examples_per_s"]),
            ("epoch", report["cache_vs_online"]["online_over_cache"], bounds["online_over_cache"])):
        assert ratios[name]["value"] == value and ratios[name]["bound"] == bound
        assert ratios[name]["ratio"] == pytest.approx(value / bound, abs=1e-3)
        assert ratios[name]["met"] is None   # goals are judged on a GPU only
    assert ratios["from_cache"]["ratios"] == {str(r["workers"]): r["of_on_device"] for r in loader["from_cache"]}
    assert loader["on_device_examples_per_s"] == pytest.approx(loader["on_device_steps_per_s"] * 8, rel=0.01)
    for start in ("plain PyTorch (fp32, the cache's first 4 batches", "stage-1 epoch: cache",
                  "writer: TeacherCacheShard", "reader (host side: packed batches)",
                  "trainer on batches on the device", "launcher: 2 ranks on cpu,cpu"):
        assert any(l.startswith(start) for l in lines), start
    assert "x of the bare forward; goal on a GPU >= 0.5x" in done.stdout
    assert "x of the plain loop; goal on a GPU >= 0.9x" in done.stdout
