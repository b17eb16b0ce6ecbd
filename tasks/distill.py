"""Luigi wiring of the distillation stages (plain code: :func:`distill.run.distill_from_cache`).

* ``DistillIntermediate`` (stage ``distill_stage1``): intermediate-layer losses (embedding,
  attention, hidden states) on the teacher cache -- by default the augmented data.
* ``DistillPrediction`` (stage ``distill_stage2``): the prediction loss, starting from stage 1's
  student, evaluated on the prepared dev split every ``eval_every`` steps; the best is kept, and
  the per-example dev predictions of the best and of the last evaluation are saved beside it.
  Its manifest's ``info.deployment`` holds the exported student's and its teacher's size and
  speed, measured in the same run (:mod:`distill.speed`; the timings are run history).
* ``DistillGeneral`` (stage ``distill_general``): general distillation -- the intermediate losses
  from a pre-trained (not fine-tuned) encoder on a plain-text corpus, cached by the same cache
  stage (``GeneralTeacherCache``, configured in its own ``[GeneralTeacherCache]`` section with
  ``examples=corpus``). Stage 1 can start from its student (``student_init=general``).

Only trainer parameters are declared here, so changing one reruns only the distillation
stages, never augmentation or the cache. The student's depth is a cache parameter (the cache
holds the teacher layers its layer map picks) and is read from the cache task. The trainer's
layer map defaults to the cache's; another strategy (``layer_map=top``) reads the same cache
when the cache also holds those layers (``TeacherCache.extra_layer_maps``), and is refused
with a clear error otherwise. ``originals_only`` trains on the cache's original examples
(the "without augmentation" setting) without another teacher run.

``DistillPrediction.stage1`` names the stage-1 run it starts from (parameters over the
``[DistillIntermediate]`` section): that is how one ablation variant changes a stage-1 loss
weight while sharing everything upstream.

All three stages are resumable: checkpoints live in the partial output directory, and a
rerun after a crash continues from the last one with the same result.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import luigi

from distill.recipes import RECIPES
from pipeline.common.encoders import AUTO_FAMILY, FAMILIES
from pipeline.stage import StageBuild
from tasks.base import StageTask, num_threads_parameter, pipeline, workdir, workdir_store
from tasks.prepare import PrepareData
from tasks.teacher import TeacherCache


class GeneralTeacherCache(TeacherCache):
    """The teacher cache of general distillation (own config section; set examples=corpus)."""


def _trainer_parameters(stage: str):
    """A parameter mixin for one stage, with that stage's recipe (docs/ALGORITHM.md §2.8) as defaults."""
    from dataclasses import fields

    from distill.recipes import RECIPES

    defaults = RECIPES[stage]

    class TrainerParameters:
        embedding_weight = luigi.FloatParameter(
            default=defaults["embedding_weight"], significant=True,
            description="Weight of the embedding-layer MSE (0: not computed).")
        attention_weight = luigi.FloatParameter(
            default=defaults["attention_weight"], significant=True,
            description="Weight of the attention-score MSE summed over mapped layers (0: off).")
        hidden_weight = luigi.FloatParameter(
            default=defaults["hidden_weight"], significant=True,
            description="Weight of the hidden-state MSE summed over mapped layers (0: off).")
        prediction_weight = luigi.FloatParameter(
            default=defaults["prediction_weight"], significant=True,
            description="Weight of the prediction loss (0: off).")
        attention_mode = luigi.ChoiceParameter(
            default="reference", choices=["reference", "masked"], significant=True,
            description="reference: zero padded (and <= -100) scores, average over every element "
                        "as the reference code; masked: average over real query/key pairs only.")
        attention_target = luigi.ChoiceParameter(
            default="scores", choices=["scores", "log_probs"], significant=True,
            description="What the attention loss compares: 'scores' (pre-softmax, TinyBERT) or "
                        "'log_probs' (attention log-probabilities, MSE); must be what the cache "
                        "holds ([TeacherCache] attention_target).")
        projection_mode = luigi.ChoiceParameter(
            default="shared", choices=["shared", "per_layer"], significant=True,
            description="Student-to-teacher width projection: one shared matrix (reference code) "
                        "or one per layer (paper's W_e, W_h).")
        prediction_loss = luigi.ChoiceParameter(
            default="soft_ce", choices=["soft_ce", "kd"], significant=True,
            description="soft_ce: soft cross-entropy to the teacher (TinyBERT); kd: Hinton KD, "
                        "alpha*t^2*KL + (1-alpha)*CE(labels). Regression tasks always use MSE to "
                        "the teacher's prediction.")
        temperature = luigi.FloatParameter(default=1.0, significant=True,
                                           description="Softmax temperature of the prediction loss.")
        kd_alpha = luigi.FloatParameter(default=0.5, significant=True,
                                        description="prediction_loss=kd: weight of the soft term.")
        learning_rate = luigi.FloatParameter(default=defaults["learning_rate"], significant=True,
                                             description="AdamW peak learning rate.")
        epochs = luigi.IntParameter(default=defaults["epochs"], significant=True,
                                    description="Epochs over the cached examples.")
        max_steps = luigi.IntParameter(default=0, significant=True,
                                       description="Stop after this many steps (0: all epochs).")
        batch_size = luigi.IntParameter(default=defaults["batch_size"], significant=True,
                                        description="Training batch size.")
        schedule = luigi.ChoiceParameter(
            default=defaults["schedule"], choices=["constant", "linear"], significant=True,
            description="Learning-rate schedule after warm-up: constant, or linear decay to 0.")
        warmup_proportion = luigi.FloatParameter(
            default=defaults["warmup_proportion"], significant=True,
            description="Share of the steps with linear warm-up.")
        weight_decay = luigi.FloatParameter(default=0.01, significant=True,
                                            description="AdamW weight decay (not on biases/LayerNorm).")
        max_grad_norm = luigi.FloatParameter(default=1.0, significant=True,
                                             description="Gradient clipping norm (0: off).")
        seed = luigi.IntParameter(default=42, significant=True,
                                  description="Seed of the student's initialisation, data order and dropout.")
        amp = luigi.BoolParameter(default=False, significant=True,
                                  description="CUDA only: bf16 autocast for the student (changes results).")
        online_teacher = luigi.BoolParameter(
            default=False, significant=True,
            description="Run the teacher live instead of reading its outputs from the cache (the "
                        "parity check; same batches, same order).")
        originals_only = luigi.BoolParameter(
            default=False, significant=True,
            description="Train on the cache's original examples only (aug_index 0): the 'without "
                        "augmentation' setting, read from the same teacher shards.")
        checkpoint_every = luigi.IntParameter(default=500, significant=False,
                                              description="Steps between resumable checkpoints.")
        log_every = luigi.IntParameter(default=50, significant=False,
                                       description="Steps between metrics.jsonl loss lines.")
        device = luigi.Parameter(default="auto", significant=False,
                                 description="auto (the device(s) leased from [pipeline] devices; "
                                             "CUDA when available, else CPU), cpu, cuda, ...")
        nproc = luigi.Parameter(
            default="1", significant=False,
            description="Data-parallel ranks (torch.distributed, launched by torch's elastic "
                        "launcher): 1 = one process; auto = one per device leased from [pipeline] "
                        "devices. Each rank trains on its part of every global batch (batch_size "
                        "stays the global size and must split evenly), so the result does not "
                        "depend on it beyond floating-point reduction order (and dropout masks).")
        dist_backend = luigi.ChoiceParameter(
            default="auto", choices=["auto", "gloo", "nccl"], significant=False,
            description="nproc > 1: the process-group backend; auto = NCCL on CUDA, gloo on CPU.")
        rdzv_port = luigi.IntParameter(
            default=0, significant=False,
            description="nproc > 1: the rendezvous port on 127.0.0.1 (0: a free one, chosen at launch).")
        dist_timeout_s = luigi.IntParameter(
            default=1800, significant=False,
            description="nproc > 1: seconds a rank waits in a collective (rank 0's dev evaluation "
                        "included) before it fails, so a dead peer fails the stage instead of "
                        "hanging it.")
        num_workers = luigi.IntParameter(
            default=0, significant=False,
            description="DataLoader worker processes reading the cache (order-preserving); 0: a "
                        "background thread reads ahead (the faster: workers hand every batch over "
                        "through shared memory, 3-4x slower on 2 cores, scripts/bench_loader.py; "
                        "on a CPU with 2 cores the step gets both and reads in between).")
        num_threads = num_threads_parameter()
        compile = luigi.BoolParameter(
            default=False, significant=False, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
            description="torch.compile the student's forward and the losses (dynamic shapes): "
                        "faster steps for long runs on a GPU, a compile of about 20 s per shape "
                        "family first; the losses agree with the plain step up to floating-point "
                        "noise.")
        progress = luigi.BoolParameter(
            default=True, significant=False, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
            description="Show a tqdm bar on the console (steps, loss, best dev metric, ETA); "
                        "--progress false hides it.")

        def train_config(self):
            from distill.trainer import TrainConfig

            names = {f.name for f in fields(TrainConfig)}
            values = {name: getattr(self, name) for name in names
                      if hasattr(self, name) and name != "eval_every"}
            values["eval_every"] = getattr(self, "eval_every", 0)
            values["device"] = self.build_device()
            config = TrainConfig(**values)
            config.validate()
            return config

    return TrainerParameters


class StudentParameters:
    """How stage 1 (or general distillation) obtains its student."""

    student_init = luigi.ChoiceParameter(
        default="config", choices=["config", "general", "checkpoint", "teacher_layers"], significant=True,
        description="config: a fresh student (of student_family) of the shape below; general: "
                    "DistillGeneral's student; checkpoint: student_checkpoint; teacher_layers: copy "
                    "the teacher's embeddings and the layer-mapped teacher layers (its width and "
                    "family).")
    student_family = luigi.ChoiceParameter(
        default=AUTO_FAMILY, choices=[AUTO_FAMILY] + [family.name for family in FAMILIES],
        significant=True,
        description="Encoder family of a fresh student: auto (the teacher's) or bert (any teacher: "
                    "a BERT reads any tokenizer's ids); another family is refused (it would need "
                    "its own tokenizer).")
    student_hidden_size = luigi.IntParameter(default=312, significant=True,
                                             description="Student width (TinyBERT4: 312).")
    student_intermediate_size = luigi.IntParameter(default=1200, significant=True,
                                                   description="Student FFN width (TinyBERT4: 1200).")
    student_heads = luigi.IntParameter(
        default=12, significant=True,
        description="Student attention heads; must equal the teacher's (attention loss per head).")
    student_checkpoint = luigi.Parameter(
        default="", significant=False,
        description="student_init=checkpoint: a save_pretrained directory (content-hashed, path "
                    "not significant).")
    layer_map = luigi.ChoiceParameter(
        default="", choices=["", "uniform", "top", "bottom", "explicit"], significant=True,
        description="Which teacher layer each student layer learns from (pipeline.cache.layer_map); "
                    "empty: the cache's own map. Another map needs its layers in the cache "
                    "(TeacherCache.extra_layer_maps).")
    explicit_layers = luigi.Parameter(
        default="", significant=True,
        description="layer_map=explicit: the teacher layer of each student layer, e.g. '2,4,5,6'.")

    def trainer_layer_map(self, cache_task: "TeacherCache") -> tuple[str, list[int], int]:
        """(strategy, explicit layers, student depth): this stage's map, else the cache's."""
        from pipeline.cache.layer_map import parse_layer_list

        if not self.layer_map:
            return _layer_map_of(cache_task)
        return self.layer_map, parse_layer_list(self.explicit_layers), cache_task.student_layers

    def student_spec(self, num_layers: int, teacher_layers: list[int]):
        from distill.student import StudentSpec

        init = "checkpoint" if self.student_init == "general" else self.student_init
        checkpoint = self.student_checkpoint
        if self.student_init == "general":
            checkpoint = str(self.upstream_dir("general") / "student")
        if self.student_init == "checkpoint" and not checkpoint:
            from pipeline.errors import InputError
            raise InputError("student_init=checkpoint needs student_checkpoint")
        return StudentSpec(init=init, num_layers=num_layers, hidden_size=self.student_hidden_size,
                           intermediate_size=self.student_intermediate_size, num_heads=self.student_heads,
                           checkpoint=str(Path(checkpoint).expanduser().resolve()) if checkpoint else "",
                           teacher_layers=teacher_layers, seed=self.seed, family=self.student_family)

    def student_inputs(self) -> dict[str, str | Path]:
        if self.student_init == "checkpoint" and self.student_checkpoint:
            return {"student_checkpoint": str(Path(self.student_checkpoint).expanduser().resolve())}
        return {}


def _layer_map_of(cache_task: TeacherCache) -> tuple[str, list[int], int]:
    from pipeline.cache.layer_map import parse_layer_list

    return (cache_task.layer_map, parse_layer_list(cache_task.explicit_layers), cache_task.student_layers)


def _mapped_layers(cache_task: TeacherCache, strategy: str, explicit: list[int], depth: int) -> list[int]:
    """Teacher layer of each student layer 1..depth (teacher depth from its config.json)."""
    from pipeline.cache.layer_map import layer_map

    return layer_map(cache_task.teacher_num_layers(), depth, strategy, explicit or None)


class AugmentationSettings:
    """Which augmentation the task's teacher cache holds (ablation variants change it)."""

    augment = luigi.DictParameter(
        default={}, significant=True,
        description="Sampling settings over [Augment] for this run's teacher cache, e.g. "
                    "{\"num_aug\": 10} (keys num_aug, aug_p, aug_seed): another augmentation is "
                    "another cache. Identity only: the cache's fingerprint enters the key.")

    def stage_params(self) -> dict[str, Any]:
        params = super().stage_params()
        params.pop("augment")
        return params

    def teacher_cache(self) -> TeacherCache:
        return self.upstream(TeacherCache, augment=self.augment) if self.augment else self.upstream(TeacherCache)


class _DistillStage(StageTask):
    resumable = True
    leases_devices = True

    def devices_wanted(self, pool: list[str]) -> int:
        from pipeline.common.devices import devices_needed

        return devices_needed(self.nproc, pool)

    def rank_devices(self) -> list[str]:
        """One device per rank: the leased devices, else ``nproc`` times the configured
        device (the unleased CPU)."""
        if self.leased_devices:
            return list(self.leased_devices)
        count = 1 if str(self.nproc) == "auto" else int(self.nproc)
        device = self.device if self.device not in ("", "auto") else "cpu"
        return [device] * count

    def preflight(self) -> None:
        """nproc against the pool, the batch against the ranks, the backend against the devices,
        the rendezvous port: one InputError before anything is built."""
        from distill.launch import check_port, check_ranks, choose_backend
        from pipeline.common.devices import devices_needed
        from pipeline.errors import InputError

        pool = self.device_pool()
        leased = self.leases() and bool(pool)
        count = devices_needed(self.nproc, pool if leased else [])
        if count > 1 and not leased and self.device not in ("", "auto", "cpu"):
            raise InputError(f"nproc = {self.nproc} with device = {self.device}: several ranks run "
                             "on leased devices (device = auto and [pipeline] devices) or on the CPU")
        check_ranks(count, self.batch_size)
        if count > 1:
            choose_backend(self.dist_backend, pool[:count] if leased else ["cpu"] * count)
            if self.rdzv_port:
                check_port(self.rdzv_port)

    def train(self, out: StageBuild, cache_dir, config, student_spec=None, **kwargs) -> dict:
        """``distill_from_cache`` in this process (one rank), or on every rank under torch's
        elastic launcher (:mod:`distill.launch`); the summary either way."""
        import json

        from distill.run import distill_from_cache

        devices = self.rank_devices()
        out.info["nproc"] = len(devices)
        if len(devices) == 1:
            return distill_from_cache(cache_dir, out.path, config, student_spec, **kwargs)
        import os

        from distill.launch import JOB_NAME, choose_backend, run_ranks, write_job

        threads = self.num_threads or max(1, (os.cpu_count() or 1) // len(devices))
        job = write_job(out.path / JOB_NAME, cache_dir, out.path, config, student_spec, devices=devices,
                        backend=choose_backend(self.dist_backend, devices),
                        timeout_s=self.dist_timeout_s, num_threads=threads, **kwargs)
        try:
            run_ranks(job, len(devices), self.rdzv_port)
        finally:
            job.unlink(missing_ok=True)
        return json.loads((out.path / "metrics.json").read_text())

    def cache_task(self) -> TeacherCache:
        return self.requires()["cache"]

    def store_reading(self) -> dict[str, Any]:
        """With a URL workdir: how this machine reads the cache (the reader's local disk cache)
        and where it has the cache's fine-tuned teacher (fetched once into scratch; the cache
        manifest names the path on the machine that wrote it). Nothing with a local workdir."""
        store = workdir_store()
        if store is None:
            return {}
        from pipeline.store import LocalObjectCache

        reading: dict[str, Any] = {}
        gigabytes = pipeline().local_cache_gb
        if gigabytes > 0:
            reading["local_cache"] = LocalObjectCache(workdir() / ".local-cache", int(gigabytes * 2**30))
        teacher = self.cache_task().upstream_tasks().get("teacher")
        if teacher is not None and hasattr(teacher, "model_dir"):
            reading["teacher_path"] = str(teacher.model_dir())
        return reading

    def uses_intermediate_losses(self) -> bool:
        """Whether any layer-to-layer loss is on (then the layer map decides cached columns)."""
        return any(w > 0 for w in (self.embedding_weight, self.attention_weight, self.hidden_weight))

    def record(self, out: StageBuild, summary: dict) -> None:
        out.rows["steps"] = summary["steps"]
        out.rows["examples"] = summary["examples"]
        out.info.update({k: summary[k] for k in ("stage", "task", "best", "final_losses", "layer_map",
                                                 "data_wait_share", "train_seconds", "student_parameters",
                                                 "resumed_from", "examples_per_s") if k in summary})


class _IntermediateStage(StudentParameters, _DistillStage):
    """The intermediate-loss stages (general distillation, task stage 1): build a student, train."""

    def stage_inputs(self):
        return self.student_inputs()

    def build(self, out: StageBuild) -> None:
        strategy, explicit, depth = self.trainer_layer_map(self.cache_task())
        spec = self.student_spec(depth, _mapped_layers(self.cache_task(), strategy, explicit, depth))
        with out.timed("distill"):
            summary = self.train(out, self.upstream_dir("cache"), self.train_config(), spec,
                                 layer_strategy=strategy, explicit_layers=explicit,
                                 online=self.online_teacher, originals_only=self.originals_only,
                                 **self.store_reading())
        self.record(out, summary)


class DistillGeneral(_trainer_parameters("intermediate"), _IntermediateStage):
    """General distillation: intermediate losses from a pre-trained encoder on plain text."""

    stage_name = "distill_general"
    stage_version = "2"   # 2: equal-width projections start as the identity

    def requires(self):
        required = {"cache": self.upstream(GeneralTeacherCache)}
        if self.student_init == "general":
            from pipeline.errors import InputError
            raise InputError("DistillGeneral cannot start from itself (student_init=general)")
        return required


class DistillIntermediate(AugmentationSettings, _trainer_parameters("intermediate"), _IntermediateStage):
    """Stage 1 of task distillation: embedding, attention and hidden-state losses."""

    stage_name = "distill_stage1"
    stage_version = "2"   # 2: equal-width projections start as the identity

    def requires(self):
        required: dict[str, luigi.Task] = {"cache": self.teacher_cache()}
        if self.student_init == "general":
            required["general"] = self.upstream(DistillGeneral)
        return required


class DistillPrediction(AugmentationSettings, _trainer_parameters("prediction"), _DistillStage):
    """Stage 2: prediction loss from stage 1's student; dev evaluation keeps the best."""

    stage_name = "distill_stage2"
    stage_version = "2"   # 2: dev predictions of the best and the last evaluation; last_dev_metrics

    eval_every = luigi.IntParameter(
        default=RECIPES["prediction"]["eval_every"], significant=True,
        description="Evaluate the student on dev every N steps (and at the end); the best is kept.")
    eval_batch_size = luigi.IntParameter(default=128, significant=False,
                                         description="Batch size of dev evaluation.")
    speed_runs = luigi.IntParameter(
        default=2, significant=False,
        description="After training, the student's and its teacher's deployment figures are "
                    "measured in this process (distill.speed: parameters, bytes, batch-1 latency "
                    "over dev sentences at their real lengths with 1 thread and every core, "
                    "batch-32 throughput, bf16 GPU throughput on CUDA, and the ratios): timed "
                    "calls per sentence after a warm-up pass (1.5-1.8 s per stage in the demo, on "
                    "two cores). 0: not measured. Run history, like timings: not "
                    "significant.")
    speed_sentences = luigi.IntParameter(
        default=16, significant=False,
        description="Dev sentences those timings run on, evenly spaced over dev.parquet (0: all).")
    stage1 = luigi.DictParameter(
        default={}, significant=True,
        description="Parameters of the stage-1 run (DistillIntermediate) this stage starts from, "
                    "over its own luigi.cfg section, e.g. {\"attention_weight\": 0}. Identity only: "
                    "the stage-1 output's fingerprint, not this dict, enters this stage's key.")

    def requires(self):
        stage1 = dict(self.stage1)
        if dict(stage1.get("augment", self.augment)) != dict(self.augment):
            from pipeline.errors import InputError
            raise InputError(f"stage 1 would train on augmentation {dict(stage1['augment'])}, "
                             f"stage 2 on {dict(self.augment)}: set augment once, on stage 2")
        if self.augment:
            stage1["augment"] = self.augment
        return {"cache": self.teacher_cache(), "data": self.upstream(PrepareData),
                "stage1": self.upstream(DistillIntermediate, **stage1)}

    def stage_params(self) -> dict[str, Any]:
        # The upstream stage-1 fingerprint already says which student this stage starts from;
        # {"epochs": 10} spelled out or inherited from luigi.cfg must reach the same output.
        params = super().stage_params()
        params.pop("stage1")
        return params

    def build(self, out: StageBuild) -> None:
        strategy, explicit, _ = self.requires()["stage1"].trainer_layer_map(self.cache_task())
        with out.timed("distill"):
            summary = self.train(out, self.upstream_dir("cache"), self.train_config(),
                                 stage1_dir=self.upstream_dir("stage1"),
                                 prepared_dir=self.upstream_dir("data"), layer_strategy=strategy,
                                 explicit_layers=explicit, online=self.online_teacher,
                                 originals_only=self.originals_only,
                                 eval_batch_size=self.eval_batch_size, **self.store_reading())
        self.record(out, summary)
        if self.speed_runs > 0:
            with out.timed("speed"):
                out.info["deployment"] = self.deployment(out)
        if summary["best"] and summary.get("selection") == "holdout":
            # held-out train rows picked the student; dev was only scored (its dev metrics are
            # the kept student's); best_on_dev: what selecting on dev would have reported
            held_out = {k: v for k, v in summary["best"]["metrics"].items() if k not in ("dev", "selection")}
            out.info.update(selection="holdout", holdout_metrics=held_out,
                            dev_metrics=summary["best"]["metrics"]["dev"],
                            dev_best_step=summary["best"]["step"],
                            last_dev_metrics=summary["final_eval"]["dev"],
                            best_on_dev=summary["best_on_dev"])
        elif summary["best"]:
            out.info["dev_metrics"] = summary["best"]["metrics"]
            out.info["dev_best_step"] = summary["best"]["step"]
            # the end of training's evaluation: beside the best one, it shows what picking the
            # best of several evaluations on dev adds (the selection effect)
            out.info["last_dev_metrics"] = summary["final_eval"]

    def deployment(self, out: StageBuild) -> dict:
        """The exported student's and its teacher's size and speed, measured here in one run on
        the same dev sentences (:func:`distill.speed.measure_deployment`)."""
        from distill.speed import SpeedSettings, measure_deployment, sentences_from_path

        dev = self.upstream_dir("data") / "dev.parquet"
        max_seq_length = self.cache_task().max_seq_length
        teacher = self.cache_task().upstream_tasks().get("teacher")
        device = self.build_device()
        settings = SpeedSettings(runs=self.speed_runs, max_sentences=self.speed_sentences,
                                 accelerator=device if device.startswith("cuda") else "none")
        return measure_deployment(
            out.path / "student", teacher.model_dir() if teacher is not None else None,
            lambda model: sentences_from_path(dev, model.tokenizer, max_seq_length, self.speed_sentences),
            settings)
