"""TinyBERT's distillation losses, each a plain function of student and teacher tensors.

Two families (docs/ALGORITHM.md §2):

* **Intermediate** (stage 1 and general distillation): the embedding output and the hidden
  states of mapped layers, compared after a learned projection of the student to the
  teacher's width (:class:`HiddenProjections`), and the *pre-softmax* attention scores of
  mapped layers, compared head by head.
* **Prediction** (stage 2): soft cross-entropy against the teacher's logits at a temperature,
  Hinton's KD (soft KL with the t² factor plus hard-label cross-entropy), or, for regression
  tasks, the MSE to the teacher's prediction (the reference compares with the labels, a
  confirmed bug).

Padding. Every tensor arrives padded to the batch's longest example, with the teacher's
padding positions already zero (that is how the cache reader pads ragged rows, and how
:func:`pipeline.common.encoder_outputs.zero_padding` treats live outputs). The attention loss has two
modes: ``reference`` reproduces the reference implementation's averaging -- scores at padded
query/key positions (and any score <= -100, the reference's test for its additive mask) are
zeroed in both student and teacher, then the squared error is averaged over *every* element
B × heads × T × T, padding included, so the loss shrinks as padding grows; ``masked``
averages over the real query/key pairs only. Hidden-state and embedding MSEs are averaged
over real tokens (× width) only.

The attention tensors are whatever the cache's ``attention_target`` says: pre-softmax scores
(TinyBERT) or attention log-probabilities (:mod:`pipeline.common.encoder_outputs`); the same MSE
and the same modes apply to both. In ``reference`` mode a log-probability at or below -100 (a
probability under 1e-43) is zeroed like such a score.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

ATTENTION_MODES = ("reference", "masked")
PROJECTION_MODES = ("shared", "per_layer")
#: The reference zeroes attention scores at or below this value (its additive mask is -10000).
REFERENCE_MASK_THRESHOLD = -100.0


def attention_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor,
                   attention_mask: torch.Tensor, mode: str = "reference") -> torch.Tensor:
    """MSE between [B, heads, T, T] pre-softmax scores of one mapped layer pair."""
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(f"attention scores differ in shape: student {tuple(student_scores.shape)}, "
                         f"teacher {tuple(teacher_scores.shape)} (heads must match)")
    token_mask = attention_mask.to(torch.bool)
    pair_mask = token_mask[:, None, :, None] & token_mask[:, None, None, :]   # [B, 1, T, T]
    student = student_scores.float()
    teacher = teacher_scores.float()
    if mode == "reference":
        student = torch.where(pair_mask & (student > REFERENCE_MASK_THRESHOLD), student, 0.0)
        teacher = torch.where(pair_mask & (teacher > REFERENCE_MASK_THRESHOLD), teacher, 0.0)
        return F.mse_loss(student, teacher)
    if mode == "masked":
        squared = (student - teacher).pow(2) * pair_mask
        real_pairs = pair_mask.sum() * student.shape[1]
        return squared.sum() / real_pairs.clamp_min(1)
    raise ValueError(f"unknown attention loss mode {mode!r}; choose one of {ATTENTION_MODES}")


def hidden_loss(projected_student: torch.Tensor, teacher_hidden: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
    """MSE over real tokens between a projected student state and the teacher's [B, T, H]."""
    if projected_student.shape != teacher_hidden.shape:
        raise ValueError(f"hidden states differ in shape: projected student "
                         f"{tuple(projected_student.shape)}, teacher {tuple(teacher_hidden.shape)}")
    token_mask = attention_mask.to(projected_student.dtype)[:, :, None]
    squared = (projected_student.float() - teacher_hidden.float()).pow(2) * token_mask
    return squared.sum() / (token_mask.sum() * projected_student.shape[-1]).clamp_min(1)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """−Σ softmax(z_T/t)·log_softmax(z_S/t), summed over classes and averaged over the batch."""
    targets = F.softmax(teacher_logits.float() / temperature, dim=-1)
    log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(targets * log_probs).sum(dim=-1).mean()


def hinton_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float, alpha: float) -> torch.Tensor:
    """α·t²·KL(p_T^t ‖ p_S^t) + (1 − α)·CE(z_S, labels) (Hinton et al. 2015)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    soft = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    hard = F.cross_entropy(student_logits.float(), labels)
    return alpha * temperature ** 2 * soft + (1.0 - alpha) * hard


def regression_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """MSE between the student's and the teacher's predicted values (one output each)."""
    return F.mse_loss(student_logits.float().view(-1), teacher_logits.float().view(-1))


class HiddenProjections(torch.nn.Module):
    """Learned linear maps from the student's width to the teacher's (W_e, W_h in the paper).

    ``shared``: one map for the embeddings and every layer, as the reference code does.
    ``per_layer``: one map per student layer (0 = embeddings), the paper's separate matrices.
    Kept outside the student so the exported model is a plain model of its family.

    When the widths are equal the maps start as the identity (the reference always starts from
    a random map). A student initialised from teacher layers already lives in the teacher's
    space; a random map would make the hidden-state losses pull its states into a rotated
    space that its later layers, pooler and head were never trained on. Measured on SST-2
    (4,000-sentence subset augmented to 64k, MiniLM-L6 teacher at 85.2 % dev accuracy, 4-layer
    student from its layers, 500 stage-1 + 500 stage-2 steps): 84.3 % dev accuracy with the
    identity start, 83.9 % with a random one -- within noise at that length; the start matters
    for what it avoids, not for a measured gain.
    """

    def __init__(self, student_width: int, teacher_width: int, layers: Sequence[int],
                 mode: str = "shared"):
        super().__init__()
        if mode not in PROJECTION_MODES:
            raise ValueError(f"unknown projection mode {mode!r}; choose one of {PROJECTION_MODES}")
        self.mode = mode
        self.layers = [int(l) for l in layers]
        if mode == "shared":
            self.maps = torch.nn.ModuleDict({"shared": torch.nn.Linear(student_width, teacher_width)})
        else:
            self.maps = torch.nn.ModuleDict(
                {str(l): torch.nn.Linear(student_width, teacher_width) for l in self.layers})
        if student_width == teacher_width:
            with torch.no_grad():
                for linear in self.maps.values():
                    torch.nn.init.eye_(linear.weight)
                    linear.bias.zero_()

    def forward(self, student_layer: int, hidden: torch.Tensor) -> torch.Tensor:
        key = "shared" if self.mode == "shared" else str(student_layer)
        return self.maps[key](hidden)


def intermediate_losses(student_hidden: Mapping[int, torch.Tensor],
                        student_scores: Mapping[int, torch.Tensor],
                        teacher_hidden: Mapping[int, torch.Tensor],
                        teacher_scores: Mapping[int, torch.Tensor],
                        layer_pairs: Sequence[tuple[int, int]], attention_mask: torch.Tensor,
                        projections: HiddenProjections, attention_mode: str,
                        with_attention: bool = True) -> dict[str, torch.Tensor]:
    """Embedding, hidden and attention losses summed over the mapped layer pairs.

    ``layer_pairs`` lists (student layer, teacher layer) for layers 1..M; the embedding pair
    (0, 0) is implied. Returns ``{"embedding", "hidden", "attention"}`` (unweighted;
    ``attention`` only when ``with_attention``).
    """
    embedding = hidden_loss(projections(0, student_hidden[0]), teacher_hidden[0], attention_mask)
    hidden = student_hidden[0].new_zeros((), dtype=torch.float32)
    attention = hidden.clone()
    for student_layer, teacher_layer in layer_pairs:
        hidden = hidden + hidden_loss(projections(student_layer, student_hidden[student_layer]),
                                      teacher_hidden[teacher_layer], attention_mask)
        if with_attention:
            attention = attention + attention_loss(student_scores[student_layer],
                                                   teacher_scores[teacher_layer], attention_mask,
                                                   attention_mode)
    losses = {"embedding": embedding, "hidden": hidden}
    if with_attention:
        losses["attention"] = attention
    return losses
