"""Every compute stage has the same ``num_threads`` parameter (issue 15, item 11): under CPU
contention torch's default thread count thrashes, and FineTuneTeacher had no way to lower it."""
from __future__ import annotations

import luigi
import pytest
import torch

from pipeline.stage import load_manifest
from tasks.augment import Augment, Candidates
from tasks.base import NUM_THREADS_DESCRIPTION, StageTask, num_threads_parameter
from tasks.distill import DistillGeneral, DistillIntermediate, DistillPrediction
from tasks.teacher import FineTuneTeacher, TeacherCache, TeacherCacheShard

COMPUTE_STAGES = (FineTuneTeacher, Candidates, Augment, TeacherCacheShard, TeacherCache,
                  DistillGeneral, DistillIntermediate, DistillPrediction)


@pytest.mark.parametrize("stage", COMPUTE_STAGES, ids=lambda s: s.__name__)
def test_every_compute_stage_has_the_same_num_threads_parameter(stage):
    params = dict(stage.get_params())
    assert "num_threads" in params
    parameter = params["num_threads"]
    assert parameter.significant is False and parameter._default == 0
    assert parameter.description == NUM_THREADS_DESCRIPTION


class Threaded(StageTask):
    stage_name = "test_threaded"
    num_threads = num_threads_parameter()

    def build(self, out):
        out.info["seen_threads"] = torch.get_num_threads()


def test_num_threads_holds_while_the_stage_builds_and_is_restored(isolated_workdir):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        luigi.task_register.Register.clear_instance_cache()
        task = Threaded(num_threads=1)
        assert Threaded(num_threads=3).fingerprint() == task.fingerprint()   # not significant
        assert luigi.build([task], local_scheduler=True, log_level="ERROR")
        info = load_manifest(task.output_dir())["info"]
        assert info["seen_threads"] == 1 and info["torch_threads"] == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
