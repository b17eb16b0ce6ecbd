"""Read an encoder's logits, hidden states and attention targets, unmodified.

TinyBERT's attention loss uses the attention *scores* before the softmax. Hugging Face
models only return the probabilities (``output_attentions``), and their fused attention
kernels never materialise the scores at all. But the scores of a layer are a function of that
layer's own projections (and, for some families, its position terms), so forward hooks
capture what is needed without patching transformers or forcing the slow eager attention;
:mod:`pipeline.common.encoders` has one capture per encoder family. The same function serves
the cache writer (teacher, no grad) and the trainer (student, with grad, and the
online-teacher mode), which is what makes cache-vs-online parity a matter of floating point
only.

**Attention targets** (``attention_target``, recorded by the cache, checked by the trainer):

* ``scores``: the pre-softmax scores, as TinyBERT (families whose adapter captures them);
* ``log_probs``: the attention log-probabilities ``log softmax(scores + mask)``, i.e. the scores
  with each query row's shift removed -- the one thing softmax ignores -- so the MSE on them
  is TinyBERT's score MSE made shift-invariant. Where the adapter captures scores they are
  computed from them (before attention dropout, so a training student gets the
  probabilities its layer actually formed); otherwise from ``output_attentions`` with the
  eager attention, available on any transformers encoder. We keep the MSE rather than a KL
  divergence: it is the same loss function (and the same ``reference``/``masked`` averaging)
  for both targets, it weighs every real query/key pair as the score MSE does, and a cached
  teacher tensor is all it needs.

Both are returned *without* the padding mask; callers zero padded positions with
:func:`zero_padding` so cached and live tensors are treated identically. Pairs a
sliding-window layer never attends to (ModernBERT) are zeroed here, like padding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from pipeline.common.encoders import (ATTENTION_TARGETS, capture_scores, family_of, window_of)


@dataclass
class Internals:
    """Outputs of one forward pass; dict keys are layer numbers (0 = embeddings)."""

    logits: torch.Tensor | None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)   # [B, T, H]
    scores: dict[int, torch.Tensor] = field(default_factory=dict)   # [B, heads, T, T]: the target


def _outside_window(length: int, window: int, device) -> torch.Tensor:
    positions = torch.arange(length, device=device)
    return (positions[:, None] - positions[None, :]).abs() > window


def log_probs_from_scores(scores: torch.Tensor, attention_mask: torch.Tensor,
                          window: int | None = None) -> torch.Tensor:
    """``log softmax`` over the keys the layer attends to (real tokens, within its window)."""
    excluded = ~attention_mask.to(torch.bool)[:, None, None, :]
    if window is not None:
        excluded = excluded | _outside_window(scores.shape[-1], window, scores.device)
    return torch.log_softmax(scores.masked_fill(excluded, torch.finfo(scores.dtype).min), dim=-1)


def forward_internals(model: torch.nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                      attention_mask: torch.Tensor, hidden_layers: Sequence[int] = (),
                      attention_layers: Sequence[int] = (), with_logits: bool = True,
                      attention_target: str = "scores", captured: dict | None = None) -> Internals:
    """Run ``model`` once and return logits, the requested hidden states and attention targets.

    ``hidden_layers`` use ``output_hidden_states`` numbering (0 = embeddings).
    ``with_logits`` False allows a bare encoder (``AutoModel``) without a task head.
    ``captured``: the dict of a :func:`~pipeline.common.encoders.capture_scores` the caller
    holds open over many forwards (the trainer: its hooks are installed once, so a compiled
    step sees the same module every time); None installs the hooks for this forward only.
    """
    if attention_target not in ATTENTION_TARGETS:
        raise ValueError(f"attention_target {attention_target!r} not in {ATTENTION_TARGETS}")
    family = family_of(model)
    num_layers = model.config.num_hidden_layers
    bad = [l for l in hidden_layers if not 0 <= l <= num_layers]
    if bad:
        raise ValueError(f"hidden layer(s) {bad} outside the model's 0..{num_layers}")
    inputs = family.model_inputs(input_ids, token_type_ids, attention_mask)
    from_probabilities = bool(attention_layers) and not family.exposes_scores
    if from_probabilities:
        family.check_target(attention_target)
        if getattr(model.config, "_attn_implementation", "eager") != "eager":
            raise ValueError("attention_target=log_probs from output_attentions needs the eager "
                             "attention (pipeline.common.encoders.use_eager_attention)")
        out = model(**inputs, output_hidden_states=bool(hidden_layers),
                    output_attentions=True, return_dict=True)
        captured = {}
    elif captured is not None:
        out = model(**inputs, output_hidden_states=bool(hidden_layers), return_dict=True)
    else:
        with capture_scores(model, attention_layers) as captured:
            out = model(**inputs, output_hidden_states=bool(hidden_layers), return_dict=True)
    result = Internals(logits=out.logits if with_logits else None)
    for layer in hidden_layers:
        result.hidden[layer] = out.hidden_states[layer]
    for layer in attention_layers:
        window = window_of(model, layer)
        if from_probabilities:
            probs = out.attentions[layer - 1]
            value = torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
        elif attention_target == "log_probs":
            value = log_probs_from_scores(captured[layer], attention_mask, window)
        else:
            value = captured[layer]
        if window is not None:
            value = value.masked_fill(_outside_window(value.shape[-1], window, value.device), 0.0)
        result.scores[layer] = value
    return result


def zero_padding(hidden: dict[int, torch.Tensor], scores: dict[int, torch.Tensor],
                 attention_mask: torch.Tensor) -> None:
    """In place: zero hidden states of padding tokens and scores whose query or key is padding.

    This is exactly what the cache reader produces when it pads ragged cached rows, so live
    and cached teacher tensors enter the losses identically.
    """
    token_mask = attention_mask.to(dtype=torch.bool)
    for layer, value in hidden.items():
        hidden[layer] = value.masked_fill(~token_mask[:, :, None], 0.0)
    pair_mask = token_mask[:, None, :, None] & token_mask[:, None, None, :]
    for layer, value in scores.items():
        scores[layer] = value.masked_fill(~pair_mask, 0.0)
