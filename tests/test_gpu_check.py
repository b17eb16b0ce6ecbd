"""scripts/gpu_check.py: without CUDA it stops in one line; its --cpu-dry-run runs every
measurement of the GPU check on a tiny DAG on the CPU and prints the JSON line it promises."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_dag import tiny_stages, tiny_task

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


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
    assert loader["reader_batches_per_s"] > 0 and loader["on_device_steps_per_s"] > 0
    launcher = report["launcher"]
    assert launcher["nproc"] == 2 and launcher["max_relative_loss_difference"] < 0.5
    assert report["dev"]["cpu"] == 0.5 and report["dev"]["gpu"] is not None
    assert any(l.startswith("stage-1 epoch: cache") for l in lines)
    assert any("launcher: 2 ranks on cpu,cpu" in l for l in lines)
