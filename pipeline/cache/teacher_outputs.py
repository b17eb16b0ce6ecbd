"""Read a BERT's logits, hidden states and pre-softmax attention scores, unmodified.

TinyBERT's attention loss uses the attention *scores* before the softmax. Hugging Face
models only return the probabilities (``output_attentions``), and their fused attention
kernels never materialise the scores at all. But the scores of layer l are a function of
that layer's query and key projections alone:

    scores = (W_q h + b_q)(W_k h + b_k)^T / sqrt(d_head)      (per head, before the mask)

so forward hooks on the ``query`` and ``key`` linear layers capture what is needed without
patching transformers or forcing the slow eager attention; the product is formed once per
mapped layer. The same function serves the cache writer (teacher, no grad) and the trainer
(student, with grad, and the online-teacher mode), which is what makes cache-vs-online
parity a matter of floating point only.

Scores are returned *without* the additive padding mask; callers zero padded positions with
:func:`zero_padding` so cached and live tensors are treated identically.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch


@dataclass
class Internals:
    """Outputs of one forward pass; dict keys are layer numbers (0 = embeddings)."""

    logits: torch.Tensor | None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)   # [B, T, H]
    scores: dict[int, torch.Tensor] = field(default_factory=dict)   # [B, heads, T, T]


def encoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """The transformer layers of a BERT-like model (bare encoder or with a task head)."""
    base = getattr(model, "base_model", model)
    encoder = getattr(base, "encoder", None)
    if encoder is None or not hasattr(encoder, "layer"):
        raise TypeError(f"{type(model).__name__} is not a BERT-style encoder (no encoder.layer)")
    return encoder.layer


def query_key_projections(model: torch.nn.Module, layer: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The query and key projections of 1-based attention layer ``layer``."""
    blocks = encoder_layers(model)
    if not 1 <= layer <= len(blocks):
        raise ValueError(f"attention layer {layer} outside the model's 1..{len(blocks)}")
    self_attn = blocks[layer - 1].attention.self
    return self_attn.query, self_attn.key


@contextlib.contextmanager
def capture_query_key(model: torch.nn.Module, layers: Sequence[int]) -> Iterator[dict]:
    """Record the query/key projection outputs of the given 1-based layers during a forward."""
    captured: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for layer in layers:
        for name, projection in zip(("query", "key"), query_key_projections(model, layer)):
            def hook(_module, _inputs, output, layer=layer, name=name):
                captured.setdefault(layer, {})[name] = output
            handles.append(projection.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def scores_from_query_key(query: torch.Tensor, key: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, heads*d] query/key projections -> [B, heads, T, T] scaled dot products."""
    batch, length, width = query.shape
    head_dim = width // num_heads
    q = query.view(batch, length, num_heads, head_dim).transpose(1, 2)
    k = key.view(batch, length, num_heads, head_dim).transpose(1, 2)
    return torch.matmul(q, k.transpose(-1, -2)) * head_dim ** -0.5


def forward_internals(model: torch.nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                      attention_mask: torch.Tensor, hidden_layers: Sequence[int] = (),
                      attention_layers: Sequence[int] = (), with_logits: bool = True) -> Internals:
    """Run ``model`` once and return logits, the requested hidden states and raw scores.

    ``hidden_layers`` use ``output_hidden_states`` numbering (0 = embeddings).
    ``with_logits`` False allows a bare encoder (``AutoModel``) without a task head.
    """
    num_heads = model.config.num_attention_heads
    num_layers = model.config.num_hidden_layers
    bad = [l for l in hidden_layers if not 0 <= l <= num_layers]
    if bad:
        raise ValueError(f"hidden layer(s) {bad} outside the model's 0..{num_layers}")
    with capture_query_key(model, attention_layers) as captured:
        out = model(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                    output_hidden_states=bool(hidden_layers), return_dict=True)
    result = Internals(logits=out.logits if with_logits else None)
    for layer in hidden_layers:
        result.hidden[layer] = out.hidden_states[layer]
    for layer in attention_layers:
        qk = captured[layer]
        result.scores[layer] = scores_from_query_key(qk["query"], qk["key"], num_heads)
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
