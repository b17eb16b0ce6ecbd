"""One distillation stage from a teacher cache: the plain function behind the Luigi tasks.

``distill_from_cache`` opens the cache, checks that it fits the student (layers the layer map
needs, heads, tokenizer, task), builds or loads the student, trains it with
:class:`distill.trainer.Trainer` and writes the stage output:

* ``student/``: the student (``save_pretrained``) with the teacher's tokenizer, so
  ``transformers.pipeline("text-classification", model=...)`` loads it; for stage 2 the
  checkpoint with the best dev metric (exported there whenever the metric improves, so the
  stage's one rename publishes it), for stage 1 the last one. ``tinykd_distill.json``
  beside it records the task and cache it was distilled for (stage 2 checks it) and the
  student's shape (layers, width, FFN width, heads) as built.
* ``dev_predictions_best.parquet``, ``dev_predictions_last.parquet`` (prediction stage with a
  dev split): the per-example dev logits of the best evaluation (the exported student's) and
  of the last one (:mod:`distill.predictions`), so that statistics over dev examples are
  recomputed without retraining.
* with ``selection = holdout`` (the prepared data holds ``holdout.parquet``): every evaluation
  scores the held-out train rows, which pick the kept student, and dev; the best and last
  files hold *dev* predictions of the kept and the last student, and
  ``dev_predictions_best_on_dev.parquet`` those of the evaluation that scored best on dev
  (what the reference's rule would have reported), so both scores come from one run.
* ``projections.pt`` (intermediate stage): the learned hidden-state projections.
* ``metrics.jsonl`` (per logged step: each loss, lr, gradient norm, data wait; per evaluation:
  the dev metrics) and ``metrics.json`` (summary: best, final, throughput, data-wait share).

Checkpoints live in ``<out>/checkpoints`` while training (the stage is resumable, so the
partial directory survives a crash) and are removed once the output is complete.

The teacher is read from the cache only, unless ``online=True``: then the cache supplies just
the token ids (same batches, same order) and the teacher named in the cache's manifest runs
live -- the parity check of the cache.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from distill.predictions import (BEST_ON_DEV_PREDICTIONS, BEST_PREDICTIONS, LAST_PREDICTIONS,
                                 read_predictions, write_predictions)
from distill.student import (StudentSpec, build_student, export_student, read_distill_info,
                             student_shape, vocab_sha256)
from distill.trainer import (CachedTeacher, OnlineTeacher, Trainer, TrainConfig, _atomic_torch_save,
                             resolve_device)
from pipeline.common.encoders import family_of, use_eager_attention
from pipeline.common.loading import load_pretrained
from pipeline.errors import InputError
from pipeline.cache.layer_map import cached_layers, layer_map
from pipeline.store import LocalObjectCache, is_url, redact


def _load_teacher_side(info: dict, cache_dir: Path | str, teacher_path: str | None = None):
    """The teacher's config and tokenizer, from the path the cache manifest names (or
    ``teacher_path``: where this machine has that teacher, with a URL workdir)."""
    from transformers import AutoConfig, AutoTokenizer

    teacher_path = teacher_path or (info.get("teacher") or {}).get("path")
    if not teacher_path:
        raise InputError("cache manifest names no teacher path", f"{redact(str(cache_dir))}/manifest.json")
    try:
        config = AutoConfig.from_pretrained(teacher_path)
        tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the cache's teacher config/tokenizer ({exc})", teacher_path) from None
    family_of(config, teacher_path)
    if vocab_sha256(tokenizer) != info.get("tokenizer_vocab_sha256"):
        raise InputError("the teacher's tokenizer no longer matches the one the cache was built with "
                         "(vocabulary sha256 differs)", teacher_path)
    return teacher_path, config, tokenizer


def check_student_tokenizer(student_dir: Path, info: dict) -> None:
    """A checkpoint student that ships a tokenizer must share the cache's vocabulary."""
    from transformers import AutoTokenizer

    if not any((student_dir / name).exists() for name in ("tokenizer.json", "vocab.txt",
                                                            "tokenizer_config.json")):
        return
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    if vocab_sha256(tokenizer) != info.get("tokenizer_vocab_sha256"):
        raise InputError("the student's tokenizer differs from the one the teacher cache was built "
                         "with; a student must read the teacher's token ids", student_dir)


def check_stage1_output(stage1_dir: Path, info: dict) -> Path:
    """Stage 2 starts from a stage-1 student distilled for the same task and teacher."""
    student_dir = Path(stage1_dir) / "student"
    recorded = read_distill_info(student_dir)
    if recorded is None:
        raise InputError("not a distillation output (no student/tinykd_distill.json)", stage1_dir)
    for key in ("task", "task_type", "label_names", "tokenizer_vocab_sha256"):
        if recorded.get(key) != info.get(key):
            raise InputError(f"stage-1 student was distilled for {key}={recorded.get(key)!r} but "
                             f"this cache has {key}={info.get(key)!r}: a stage-1 output of another "
                             "task or teacher", student_dir / "tinykd_distill.json")
    return student_dir


def _export_atomic(student, tokenizer, directory: Path, distill_info: dict) -> None:
    """Export to a per-process temporary directory, then swap it in for ``directory``.

    Between the two renames a kill leaves ``directory`` absent, never half-written; the
    resumed run exports again (the stage's final rename publishes whatever is there).
    """
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_student(student, tokenizer, tmp, distill_info)
    if directory.exists():
        old = directory.with_name(f".{directory.name}.{os.getpid()}.old.tmp")
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)


def _save_predictions(evaluator, path: Path, step: int, metrics: dict) -> None:
    """Save the evaluation ``evaluator`` just ran (its per-example logits) as ``path``."""
    logits, labels = evaluator.last
    write_predictions(path, evaluator.ids, labels, logits, step, metrics)


class HeldOutSelection:
    """The evaluation of ``selection = holdout``: the held-out train rows decide (``primary``),
    dev is scored beside them (``metrics["dev"]``) and never picks anything.

    It also keeps the dev predictions of the evaluation that scored best on dev
    (:data:`~distill.predictions.BEST_ON_DEV_PREDICTIONS`): the score the reference's rule
    would report, measured in the same run. A resumed run reads the best so far back from
    that file (evaluations are replayed exactly, so it is rewritten only by a better one).
    """

    def __init__(self, selector, dev, best_on_dev_path: Path):
        self.selector, self.dev, self.path = selector, dev, best_on_dev_path
        self.best_on_dev = read_predictions(best_on_dev_path) if best_on_dev_path.is_file() else None
        # the trainer (for the step being evaluated), held weakly: the trainer holds this object
        # as its evaluate function, and a cycle would keep the student, its optimizer state and
        # the cache reader alive after the stage until a full garbage collection
        self.trainer = lambda: None

    @property
    def best_on_dev_record(self) -> dict | None:
        if self.best_on_dev is None:
            return None
        return {"step": self.best_on_dev.step, "metrics": self.best_on_dev.metrics}

    def __call__(self, student) -> dict:
        metrics = self.selector(student)
        dev = self.dev(student)
        if self.best_on_dev is None or dev["primary"] > self.best_on_dev.metrics["primary"]:
            step = getattr(self.trainer(), "evaluating_step", 0)
            _save_predictions(self.dev, self.path, step, dev)
            self.best_on_dev = read_predictions(self.path)
        return {**metrics, "selection": "holdout", "dev": dev}


def distill_from_cache(cache_dir: Path | str, out_dir: Path | str, config: TrainConfig,
                       student_spec: StudentSpec | None = None, *, stage1_dir: Path | str | None = None,
                       prepared_dir: Path | str | None = None, layer_strategy: str = "uniform",
                       explicit_layers: Sequence[int] = (), online: bool = False,
                       originals_only: bool = False, dev_limit: int = 0,
                       eval_batch_size: int = 128, teacher_path: str | None = None,
                       local_cache: LocalObjectCache | None = None) -> dict:
    """Train one stage into ``out_dir``; return the summary also written to metrics.json.

    ``originals_only`` trains on the cache's original (not augmented) examples only: the
    "without augmentation" setting, read from the same shards. ``cache_dir`` may be a store
    URL (read through pyarrow's filesystem; ``local_cache`` keeps its shards once read), and
    ``teacher_path`` then names this machine's copy of the cache's teacher (the manifest's path
    is the writing machine's).
    """
    import torch

    from distill.distributed import current_world
    from distill.evaluate import Evaluator, load_dev
    from pipeline.cache.reader import load_cache_info, open_cache

    world = current_world()   # several ranks: each trains on its part, rank 0 writes the output

    cache_dir = str(cache_dir) if is_url(cache_dir) else Path(cache_dir)
    out_dir = Path(out_dir)
    started = time.perf_counter()
    info = load_cache_info(cache_dir)
    where = redact(cache_dir) if isinstance(cache_dir, str) else cache_dir   # named in errors
    teacher_path, teacher_config, tokenizer = _load_teacher_side(info, cache_dir, teacher_path)
    task, task_type = info.get("task"), info.get("task_type") or "classification"
    label_names = info.get("label_names")
    if config.uses_prediction and not info.get("with_logits", True):
        raise InputError("the prediction loss needs teacher logits, but this cache was built from a "
                         "bare encoder (general distillation)", where)
    num_labels = int(info.get("num_labels") or (len(label_names) if label_names else 2))

    if stage1_dir is not None:
        student_spec = StudentSpec(init="checkpoint", checkpoint=str(check_stage1_output(stage1_dir, info)),
                                   seed=config.seed)
    student_spec = student_spec or StudentSpec(seed=config.seed)
    if student_spec.init == "checkpoint":
        check_student_tokenizer(Path(student_spec.checkpoint), info)
    if student_spec.init == "teacher_layers" and not student_spec.checkpoint:
        student_spec.checkpoint = teacher_path
    student = build_student(student_spec, teacher_config, num_labels, task_type, label_names)

    teacher_layers = int((info.get("teacher") or {}).get("num_layers") or teacher_config.num_hidden_layers)
    mapped = layer_map(teacher_layers, student.config.num_hidden_layers, layer_strategy,
                       list(explicit_layers) or None)
    hidden_needed, attention_needed = cached_layers(mapped) if config.uses_intermediate else ([], [])
    if not config.attention_weight > 0:
        attention_needed = []
    if attention_needed:
        cached_target = info.get("attention_target", "scores")
        if not online and cached_target != config.attention_target:
            raise InputError(f"cache holds attention {cached_target} ([TeacherCache] attention_target"
                             f" = {cached_target}), the trainer asked for {config.attention_target}; "
                             "set the same attention_target on the cache and the trainer", where)
        family_of(teacher_config, teacher_path).check_target(config.attention_target, teacher_path)
        family_of(student).check_target(config.attention_target, student_spec.checkpoint or None)
        if int(info.get("num_heads", 0)) != student.config.num_attention_heads:
            raise InputError(f"cache holds {info.get('num_heads')}-head attention {cached_target}, "
                             f"the student has {student.config.num_attention_heads} heads: the "
                             "attention loss compares them head by head", where)
        if not family_of(student).exposes_scores:
            use_eager_attention(student)   # its log_probs come from output_attentions
    try:
        reader = open_cache(cache_dir, hidden_needed, attention_needed, with_teacher=not online,
                            with_logits=config.uses_prediction, originals_only=originals_only,
                            attention_target=config.attention_target, local_cache=local_cache)
    except InputError as exc:   # name the map that asked for the missing layers
        raise InputError(f"{exc.problem} (student layer map {layer_strategy!r}: student layers "
                         f"1..{len(mapped)} -> teacher layers {mapped})", exc.path, exc.line) from None
    if online:
        from transformers import AutoModel, AutoModelForSequenceClassification
        cls = AutoModelForSequenceClassification if config.uses_prediction else AutoModel
        teacher_model = load_pretrained(cls, teacher_path, partial=not config.uses_prediction)[0]
        teacher_model = teacher_model.to(resolve_device(config.device))
        if attention_needed and not family_of(teacher_model).exposes_scores:
            use_eager_attention(teacher_model)
        provider = OnlineTeacher(teacher_model, hidden_needed, attention_needed,
                                 with_logits=config.uses_prediction,
                                 attention_target=config.attention_target)
    else:
        provider = CachedTeacher(reader.parts(resolve_device(config.device)))

    distill_info = {"task": task, "task_type": task_type, "label_names": label_names,
                    "tokenizer_vocab_sha256": info.get("tokenizer_vocab_sha256"),
                    "teacher": info.get("teacher"), "layer_map": mapped,
                    "attention_target": config.attention_target,
                    "stage": "prediction" if config.uses_prediction else "intermediate",
                    # the built student's own shape: a checkpoint student's spec holds only defaults
                    "student": student_shape(student.config),
                    "student_init": {**student_spec.as_dict(), **student_shape(student.config)}}
    evaluator = selection = None
    if prepared_dir is not None and config.uses_prediction:
        dev = load_dev(prepared_dir, tokenizer, int(info.get("max_seq_length", 128)), task_type, dev_limit)
        evaluator = Evaluator(dev, task, task_type, eval_batch_size, resolve_device(config.device),
                              metric=info.get("metric"))
        if (Path(prepared_dir) / "holdout.parquet").is_file():   # selection = holdout
            held_out = load_dev(prepared_dir, tokenizer, int(info.get("max_seq_length", 128)), task_type,
                                split="holdout")
            selection = HeldOutSelection(
                Evaluator(held_out, task, task_type, eval_batch_size, resolve_device(config.device),
                          metric=info.get("metric")), evaluator, out_dir / BEST_ON_DEV_PREDICTIONS)
    final_dir = out_dir / "student"
    if world.main:
        shutil.rmtree(out_dir / "best_student", ignore_errors=True)   # layout before format 2

    def keep_best(model, best):
        # The best student goes straight to its published place: the stage's single rename
        # publishes it. (Moving it there after training left a window in which a kill made
        # the resumed run publish the last step's weights under metrics naming the best.)
        _export_atomic(model, tokenizer, final_dir, {**distill_info, "best": best})
        # with held-out selection the dev evaluation of this same call is the kept student's
        _save_predictions(evaluator, out_dir / BEST_PREDICTIONS, best["step"],
                          best["metrics"]["dev"] if selection is not None else best["metrics"])

    trainer = Trainer(config, student, reader, provider, out_dir, list(zip(range(1, len(mapped) + 1), mapped)),
                      int(info.get("hidden_size", teacher_config.hidden_size)), task_type,
                      evaluate=selection or evaluator, on_best=keep_best, world=world)
    if selection is not None:
        selection.trainer = weakref.ref(trainer)
    result = trainer.train()
    if not world.main:
        return {}

    if result.best is None:   # no evaluation: the last step's student
        _export_atomic(trainer.student, tokenizer, final_dir, distill_info)
    elif read_distill_info(final_dir) is None \
            or read_distill_info(final_dir).get("best", {}).get("step") != result.best["step"]:
        raise RuntimeError(f"{final_dir} does not hold the best student (step "
                           f"{result.best['step']}); remove {out_dir} to retrain")
    if evaluator is not None:
        # The final step always evaluates in this process (checkpoints are written before
        # it), so ``evaluator.last`` is the last evaluation's, also after a resume.
        _save_predictions(evaluator, out_dir / LAST_PREDICTIONS, result.steps,
                          result.final_eval["dev"] if selection is not None else result.final_eval)
        if read_predictions(out_dir / BEST_PREDICTIONS).step != result.best["step"]:
            raise RuntimeError(f"{out_dir / BEST_PREDICTIONS} does not hold the best evaluation's "
                               f"predictions (step {result.best['step']}); remove {out_dir} to retrain")
    if trainer.projections is not None:
        _atomic_torch_save(trainer.projections.state_dict(), out_dir / "projections.pt")
    trainer.cleanup_checkpoints()
    summary = {
        "stage": distill_info["stage"], "task": task, "steps": result.steps,
        "epochs": config.epochs, "examples": reader.num_examples, "online_teacher": online,
        "originals_only": originals_only,
        "best": result.best, "final_eval": result.final_eval,
        **({"selection": "holdout", "best_on_dev": selection.best_on_dev_record}
           if selection is not None else {}),
        "final_losses": result.step_losses[-1] if result.step_losses else None,
        "resumed_from": result.resumed_from, "train_seconds": round(result.seconds, 3),
        "data_wait_share": round(result.data_wait_share, 5),
        "startup_wait_share": round(result.startup_wait_share, 5),
        "torch_threads": result.threads, "nproc": world.size,
        "examples_per_s": round(result.steps * config.batch_size / result.seconds, 3)
        if result.seconds > 0 else None,
        "layer_map": mapped, "config": asdict(config),
        "student_parameters": sum(p.numel() for p in trainer.student.parameters()),
        "seconds": round(time.perf_counter() - started, 3),
    }
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    return summary
