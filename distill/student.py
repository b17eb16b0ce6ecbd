"""The student model: where its weights come from, and how it is saved.

A student is a plain ``BertForSequenceClassification`` (so the exported directory works with
``transformers.pipeline``), built one of three ways:

* ``config``: a fresh model of a given shape. The default is TinyBERT4 (4 layers, hidden 312,
  FFN 1200, 12 heads); the vocabulary, position and type-vocabulary sizes come from the
  teacher, because the student reads the teacher's token ids (it shares its tokenizer).
* ``checkpoint``: an existing model directory, typically a general-distilled student or the
  stage-1 output. A bare encoder or a head of another size gets a freshly initialised head.
* ``teacher_layers``: the teacher's embeddings and a subset of its layers (TinyBERT6 style);
  only possible when the widths match.

The student's heads must equal the teacher's: the attention loss compares scores head by head.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from pipeline.errors import InputError

STUDENT_INITS = ("config", "checkpoint", "teacher_layers")
#: Written next to the exported student: what it was distilled for (checked by stage 2).
DISTILL_INFO_NAME = "tinykd_distill.json"


@dataclass
class StudentSpec:
    """How to obtain the student (see the module docstring)."""

    init: str = "config"
    num_layers: int = 4
    hidden_size: int = 312
    intermediate_size: int = 1200
    num_heads: int = 12
    checkpoint: str = ""
    teacher_layers: list[int] = field(default_factory=list)
    seed: int = 42

    def as_dict(self) -> dict:
        return asdict(self)


def _label_kwargs(num_labels: int, task_type: str, label_names: Sequence[str] | None) -> dict:
    kwargs = {"num_labels": num_labels,
              "problem_type": "regression" if task_type == "regression" else "single_label_classification"}
    if label_names and task_type != "regression":
        kwargs["id2label"] = {i: str(name) for i, name in enumerate(label_names)}
        kwargs["label2id"] = {str(name): i for i, name in enumerate(label_names)}
    return kwargs


def build_student(spec: StudentSpec, teacher_config, num_labels: int, task_type: str = "classification",
                  label_names: Sequence[str] | None = None):
    """Return a ``BertForSequenceClassification`` student according to ``spec``."""
    from transformers import BertConfig, BertForSequenceClassification

    labels = _label_kwargs(num_labels, task_type, label_names)
    torch.manual_seed(spec.seed)   # head / fresh weights are reproducible
    if spec.init == "config":
        config = BertConfig(
            vocab_size=teacher_config.vocab_size,
            max_position_embeddings=teacher_config.max_position_embeddings,
            type_vocab_size=teacher_config.type_vocab_size,
            pad_token_id=teacher_config.pad_token_id,
            hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
            intermediate_size=spec.intermediate_size, num_attention_heads=spec.num_heads,
            **labels)
        student = BertForSequenceClassification(config)
    elif spec.init == "checkpoint":
        path = Path(spec.checkpoint)
        if not (path / "config.json").exists():
            raise InputError("student checkpoint has no config.json (expected a save_pretrained "
                             "directory)", path)
        student = BertForSequenceClassification.from_pretrained(
            path, ignore_mismatched_sizes=True, **labels)
    elif spec.init == "teacher_layers":
        student = _from_teacher_layers(spec, teacher_config, labels)
    else:
        raise ValueError(f"unknown student init {spec.init!r}; choose one of {STUDENT_INITS}")
    check_compatible(student.config, teacher_config, where=spec.checkpoint or None)
    return student


def _from_teacher_layers(spec: StudentSpec, teacher_config, labels: dict):
    """Copy the teacher's embeddings, the chosen layers (1-based) and its pooler."""
    from transformers import BertForSequenceClassification, BertModel

    if not spec.checkpoint:
        raise ValueError("teacher_layers init needs the teacher directory as `checkpoint`")
    from transformers.utils import logging as hf_logging

    # A fine-tuned teacher's classifier is "unexpected" in a bare BertModel: expected here,
    # so keep transformers' load report (a warning) out of the run's log.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        teacher = BertModel.from_pretrained(spec.checkpoint)
    finally:
        hf_logging.set_verbosity(verbosity)
    chosen = list(spec.teacher_layers)
    if not chosen or any(not 1 <= l <= teacher.config.num_hidden_layers for l in chosen):
        raise ValueError(f"teacher_layers {chosen} must be non-empty and within "
                         f"1..{teacher.config.num_hidden_layers}")
    config = teacher.config.__class__.from_dict({**teacher.config.to_dict(),
                                                 "num_hidden_layers": len(chosen), **labels})
    student = BertForSequenceClassification(config)
    base = student.bert
    base.embeddings.load_state_dict(teacher.embeddings.state_dict())
    for target, source in zip(base.encoder.layer, chosen):
        target.load_state_dict(teacher.encoder.layer[source - 1].state_dict())
    if teacher.pooler is not None and base.pooler is not None:
        base.pooler.load_state_dict(teacher.pooler.state_dict())
    return student


def check_compatible(student_config, teacher_config, where=None) -> None:
    """The student must read the teacher's token ids and have as many heads (attention loss)."""
    if student_config.vocab_size < teacher_config.vocab_size:
        raise InputError(f"student vocabulary ({student_config.vocab_size}) is smaller than the "
                         f"teacher's ({teacher_config.vocab_size}); they must share a tokenizer", where)
    if student_config.num_attention_heads != teacher_config.num_attention_heads:
        raise InputError(f"student has {student_config.num_attention_heads} attention heads, the "
                         f"teacher {teacher_config.num_attention_heads}: the attention loss compares "
                         "scores head by head, so they must be equal", where)


def student_shape(config) -> dict:
    """The shape of a built student, from its own config (not from the spec that asked for it:
    a checkpoint or teacher-layer student has the shape it was saved with)."""
    return {"num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size, "num_heads": config.num_attention_heads}


def vocab_sha256(tokenizer) -> str:
    """Fingerprint of a tokenizer's vocabulary: the cache writer's own definition, so a
    student's tokenizer and a cache's ``tokenizer_vocab_sha256`` compare like for like."""
    from pipeline.common.tokenize import tokenizer_vocab_sha256

    return tokenizer_vocab_sha256(tokenizer)


def export_student(student, tokenizer, directory: Path, distill_info: dict) -> None:
    """``save_pretrained`` model and tokenizer plus a small JSON of what it was distilled for."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / DISTILL_INFO_NAME).write_text(json.dumps(distill_info, indent=2, sort_keys=True) + "\n")


def read_distill_info(directory: Path) -> dict | None:
    path = Path(directory) / DISTILL_INFO_NAME
    return json.loads(path.read_text()) if path.exists() else None
