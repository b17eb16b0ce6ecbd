"""Luigi wiring of the deployable student (``<workdir>/export_student/<fingerprint>/``).

``ExportStudent`` takes a ``DistillPrediction`` output's ``student/`` and writes what people
deploy a small encoder with (plain code: :func:`pipeline.deploy.onnx_export.export_student`):
``model.onnx`` (dynamic batch and sequence axes) checked by onnxruntime against PyTorch on the
dev set, with ``quantize = dynamic`` also ``model.int8.onnx`` and its dev metric against fp32
with a paired-bootstrap interval, and the tokenizer and config beside them. The manifest's
``info`` holds the parity check, the int8 comparison (``int8.dev.flagged`` when it loses more
than ``int8_tolerance`` points) and, under ``speed`` (run history), onnxruntime's batch-1
latency and batch-32 throughput beside PyTorch's.

``Demo`` is what ``tinykd demo`` runs: the ablation grid, then the export of its headline
student (the configured ``DistillPrediction``, the grid's ``full`` run), so that a demo run
leaves the deployable artifacts as well as the report.
"""
from __future__ import annotations

import logging
from typing import Any

import luigi

from pipeline.stage import StageBuild
from tasks.ablations import Ablations
from tasks.base import StageTask, num_threads_parameter
from tasks.distill import DistillPrediction
from tasks.prepare import PrepareData


class ExportStudent(StageTask):
    """The stage-2 student as ONNX (checked by onnxruntime) and, optionally, dynamic int8."""

    stage_name = "export_student"
    stage_version = "1"

    student = luigi.DictParameter(
        default={}, significant=True,
        description="Parameters of the DistillPrediction run whose student is exported, over its "
                    "config section, e.g. {\"seed\": 43}; empty: the configured run. Identity "
                    "only: that output's fingerprint, not this dict, enters this stage's key.")
    quantize = luigi.ChoiceParameter(
        default="none", choices=["none", "dynamic"], significant=True,
        description="dynamic: also write model.int8.onnx (onnxruntime's dynamic quantisation: int8 "
                    "weights, activations quantised per call) and compare its dev metric with the "
                    "fp32 model's (paired bootstrap); none: model.onnx only.")
    int8_tolerance = luigi.FloatParameter(
        default=1.0, significant=True,
        description="Dev-metric points (metric x 100) the int8 variant may lose against fp32 before "
                    "the manifest flags it (int8.dev.flagged, and a warning): it is still written.")
    parity_tolerance = luigi.FloatParameter(
        default=1e-4, significant=True,
        description="Largest |logit difference| between onnxruntime and PyTorch on dev; beyond it, "
                    "or with any prediction changed, the stage fails and publishes nothing.")
    speed_runs = luigi.IntParameter(
        default=3, significant=False,
        description="Timed calls per dev sentence (after warm-up) of the PyTorch / onnxruntime / "
                    "int8 speed comparison. Run history, like timings: not significant.")
    speed_sentences = luigi.IntParameter(
        default=32, significant=False,
        description="Dev sentences the speed comparison runs on, evenly spaced (0: all).")
    num_threads = num_threads_parameter()

    def requires(self):
        return {"student": self.upstream(DistillPrediction, **dict(self.student)),
                "data": self.upstream(PrepareData)}

    def stage_params(self) -> dict[str, Any]:
        # the DistillPrediction output's fingerprint says which student; the dict is identity only
        params = super().stage_params()
        params.pop("student")
        return params

    def build(self, out: StageBuild) -> None:
        from distill.speed import SpeedSettings
        from pipeline.deploy.onnx_export import describe_export, export_student
        from pipeline.prepare.splits import task_info

        data = self.upstream_dir("data")
        distillation = self.requires()["student"]
        settings = SpeedSettings(runs=max(self.speed_runs, 1), max_sentences=self.speed_sentences,
                                 accelerator="none")   # onnxruntime from PyPI: the CPU build
        with out.timed("export"):
            record = export_student(self.upstream_dir("student") / "student", data, out.path, task_info(data),
                                    distillation.cache_task().max_seq_length, quantize=self.quantize,
                                    parity_tolerance=self.parity_tolerance,
                                    int8_tolerance=self.int8_tolerance, settings=settings,
                                    measure_speed=self.speed_runs > 0)
        out.rows["dev_examples"] = record["onnx"]["parity"]["examples"]
        out.info.update(record)
        for line in describe_export(record):
            logging.getLogger("tinykd.deploy").info("%s", line)


class Demo(luigi.Task):
    """``tinykd demo``: the ablation grid, then the deployable export of its headline student.

    The export is a dynamic dependency, yielded once the grid is complete: the exporter's
    libraries (torch.export, onnxscript, onnxruntime) stay loaded for the rest of the process,
    about 200 MB that every trainer stage after it would carry (a static requirement let Luigi
    run it as soon as the full run existed, in the middle of the grid; docs/BENCHMARKS.md,
    "Memory over the demo's trainer stages")."""

    #: the scheduling line of tinykd's console says it comes on top (tasks.cli.scheduling_digest)
    dynamic_requirements = "ExportStudent"

    def export(self) -> ExportStudent:
        return ExportStudent()

    def requires(self):
        return {"ablations": Ablations()}

    def run(self):
        yield self.export()

    def complete(self) -> bool:
        return self.requires()["ablations"].complete() and self.export().complete()
