"""The student model: its family, where its weights come from, and how it is saved.

A student is a ``<Family>ForSequenceClassification`` of the teacher's encoder family
(``family = auto``; :mod:`pipeline.common.encoders` has one adapter per family) or a BERT
(``family = bert``, possible for any teacher: a BERT embeds any tokenizer's ids and feeds a
family without token types zeros), so the exported directory works with
``transformers.pipeline``. It is built with the teacher's vocabulary and exported with the
teacher's tokenizer, one of three ways:

* ``config``: a fresh model of a given shape. The default is TinyBERT4 (4 layers, hidden 312,
  FFN 1200, 12 heads); everything else comes from the teacher's configuration (its
  vocabulary, positions, type vocabulary, activation...), because the student reads the
  teacher's token ids. A BERT student is a default ``BertConfig`` of that shape with the
  teacher's vocabulary, positions, types and padding id.
* ``checkpoint``: an existing model directory, typically a general-distilled student or the
  stage-1 output. A bare encoder or a head of another size gets a freshly initialised head.
* ``teacher_layers``: the teacher's embeddings, a subset of its layers and whatever else its
  base model holds outside the layers (pooler, relative-position embeddings, final norm),
  for every family (TinyBERT6 style); the student is of the teacher's family.

The student's heads must equal the teacher's: the attention loss compares scores head by head.
A family that cannot expose its pre-softmax scores (DeBERTa v1) is trained on attention
log-probabilities from ``output_attentions``, which transformers returns after the attention
dropout; its students are therefore built without attention-probability dropout.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from pipeline.common.encoders import AUTO_FAMILY, StudentShape, family_named, family_of
from pipeline.errors import InputError
from pipeline.common.loading import load_pretrained
from pipeline.teacher.finetune import head_description, load_bare_encoder

LOG = logging.getLogger("tinykd.distill")
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
    family: str = AUTO_FAMILY

    def as_dict(self) -> dict:
        return asdict(self)


def _label_kwargs(num_labels: int, task_type: str, label_names: Sequence[str] | None) -> dict:
    kwargs = {"num_labels": num_labels,
              "problem_type": "regression" if task_type == "regression" else "single_label_classification"}
    if label_names and task_type != "regression":
        kwargs["id2label"] = {i: str(name) for i, name in enumerate(label_names)}
        kwargs["label2id"] = {str(name): i for i, name in enumerate(label_names)}
    return kwargs


def student_family(spec: StudentSpec, teacher_config):
    """The student's family: the teacher's (``auto`` or its name) or ``bert``; others refused.

    Another family would need its own tokenizer (vocabulary, special tokens, pair template),
    while the student must read the teacher's token ids."""
    teacher_family = family_of(teacher_config, spec.checkpoint or None)
    if spec.family in (AUTO_FAMILY, teacher_family.name):
        return teacher_family
    wanted = family_named(spec.family)
    if wanted.name != "bert":
        raise InputError(f"student family {wanted.name} does not match the teacher's tokenizer "
                         f"({teacher_family.name}); a student reads the teacher's token ids, so its "
                         f"family is the teacher's ({AUTO_FAMILY}) or bert")
    if spec.init == "teacher_layers":
        raise InputError(f"teacher_layers copies {teacher_family.name} layers: the student is of the "
                         f"teacher's family (student_family = {AUTO_FAMILY}), not bert")
    return wanted


def classifier_class(config):
    """The ``...ForSequenceClassification`` class of a config's family."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification._model_mapping[type(config)]


def build_student(spec: StudentSpec, teacher_config, num_labels: int, task_type: str = "classification",
                  label_names: Sequence[str] | None = None):
    """Return a ``<Family>ForSequenceClassification`` student according to ``spec``."""
    from transformers import AutoModelForSequenceClassification

    labels = _label_kwargs(num_labels, task_type, label_names)
    family = student_family(spec, teacher_config)
    torch.manual_seed(spec.seed)   # head / fresh weights are reproducible
    if spec.init == "config":
        shape = StudentShape(spec.num_layers, spec.hidden_size, spec.intermediate_size, spec.num_heads)
        config = family.student_config(teacher_config, shape, labels)
        if not family.exposes_scores:
            config.attention_probs_dropout_prob = 0.0
        student = classifier_class(config)(config)
    elif spec.init == "checkpoint":
        path = Path(spec.checkpoint)
        if not (path / "config.json").exists():
            raise InputError("student checkpoint has no config.json (expected a save_pretrained "
                             "directory)", path)
        student, report = load_pretrained(AutoModelForSequenceClassification, path, new_head=True,
                                          ignore_mismatched_sizes=True, **labels)
        family_of(student, path)
        if report.head_is_new:
            LOG.info("%s: student encoder loaded; new %s, trained by the prediction stage", path,
                     head_description(student.config.num_labels, task_type))
    elif spec.init == "teacher_layers":
        student = _from_teacher_layers(spec, family, labels)
        LOG.info("student: layers %s of %s; new %s, trained by the prediction stage",
                 list(spec.teacher_layers), spec.checkpoint,
                 head_description(student.config.num_labels, task_type))
    else:
        raise ValueError(f"unknown student init {spec.init!r}; choose one of {STUDENT_INITS}")
    check_compatible(student.config, teacher_config, where=spec.checkpoint or None)
    return student


def _from_teacher_layers(spec: StudentSpec, family, labels: dict):
    """Copy the teacher's base model, keeping only the chosen layers (1-based)."""
    if not spec.checkpoint:
        raise ValueError("teacher_layers init needs the teacher directory as `checkpoint`")
    teacher = load_bare_encoder(spec.checkpoint)
    chosen = list(spec.teacher_layers)
    if not chosen or any(not 1 <= l <= teacher.config.num_hidden_layers for l in chosen):
        raise ValueError(f"teacher_layers {chosen} must be non-empty and within "
                         f"1..{teacher.config.num_hidden_layers}")
    config = family.subset_config(teacher.config, chosen, labels)
    if not family.exposes_scores:
        config.attention_probs_dropout_prob = 0.0
    student = classifier_class(config)(config)
    base = student.base_model
    base.load_state_dict(family.subset_state_dict(teacher.state_dict(), base.state_dict().keys(), chosen))
    if family.head_modules and any(a.endswith("ForSequenceClassification")
                                   for a in teacher.config.architectures or []):
        # DeBERTa's pooler lives in the classifier, outside the base model; the fresh head's
        # random draws must not move the student's seeded initialisation
        from transformers import AutoModelForSequenceClassification

        with torch.random.fork_rng():
            classifier, _ = load_pretrained(AutoModelForSequenceClassification, spec.checkpoint)
        for name in family.head_modules:
            getattr(student, name).load_state_dict(getattr(classifier, name).state_dict())
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
    a checkpoint or teacher-layer student has the shape it was saved with). Read through the
    family's own config keys (DistilBERT: n_layers, dim, hidden_dim, n_heads)."""
    layers, hidden, ffn, heads = family_of(config).size_keys
    return {"num_layers": getattr(config, layers), "hidden_size": getattr(config, hidden),
            "intermediate_size": getattr(config, ffn), "num_heads": getattr(config, heads)}


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
