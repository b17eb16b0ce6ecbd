"""One adapter per encoder family: what distillation needs to know about an architecture.

TinyBERT's losses are architecture-independent; the places where an architecture shows are
few, and each adapter below answers them for one family (chosen by ``config.model_type``):

* **where the transformer layers are** (``layer_path`` under the base model), so layer
  numbers 1..N, state-dict keys and the teacher-layer initialisation of a student work alike;
* **how to capture a layer's pre-softmax attention scores** during an ordinary forward (no
  patched transformers, no forced eager attention), with the same scaling the model applies:

  - BERT, RoBERTa, XLM-R, ELECTRA: forward hooks on the ``query``/``key`` projections,
    ``q·kᵀ/√d``; DistilBERT: the same on ``q_lin``/``k_lin``;
  - ModernBERT: the fused ``Wqkv`` projection, split, with the layer's rotary embedding
    applied (the cos/sin the layer receives), ``q·kᵀ/√d``; a sliding-window layer never
    attends to pairs further apart than ``config.sliding_window``, so those pairs are zeroed
    like padding (:func:`window_of`);
  - DeBERTa-v2/v3: the disentangled scores, content·content plus the content→position and
    position→content terms, each scaled by ``√(d·scale_factor)`` (scale_factor = 1 + one per
    position term), recomputed from the layer's own inputs with its own
    ``disentangled_attention_bias`` (the relative-embedding dropout output is captured, so a
    training student gets the very tensor its forward used);
  - DeBERTa (v1): no capture (its fused, legacy attention cannot be reproduced exactly from
    hooks), so only ``attention_target = log_probs``;

* **whether token type ids exist** (BERT, ELECTRA, DeBERTa; RoBERTa/XLM-R have a single type,
  DistilBERT and ModernBERT none: they are not passed to the model);
* **how to build a smaller student of the same family** (:meth:`EncoderFamily.student_config`)
  and a student from a subset of the teacher's layers (:meth:`EncoderFamily.subset_config`,
  state-dict keys renumbered by :meth:`EncoderFamily.subset_state_dict`).

An unknown family is refused by :func:`family_of` with one error naming the model type and
the supported ones, before anything runs. Layers are numbered as in ``output_hidden_states``:
0 is the embedding output (the input of the first layer), 1..N the transformer layers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from pipeline.errors import InputError

ATTENTION_TARGETS = ("scores", "log_probs")
#: ``student_family`` values besides a family name: the teacher's own family.
AUTO_FAMILY = "auto"


@dataclass(frozen=True)
class StudentShape:
    """The size of a fresh student (the rest of its configuration comes from the teacher)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int


@dataclass(frozen=True)
class EncoderFamily:
    """What the pipeline needs to know about one encoder family (see the module docstring).

    ``size_keys`` name the config fields for (layers, width, FFN width, heads); ``extra_width_keys``
    are config fields that must follow the width (DeBERTa's pooler).
    """

    name: str
    model_types: tuple[str, ...]
    layer_path: str
    token_types: bool
    capture: str | None                    # "query_key", "modernbert", "deberta_v2" or None
    query_key: tuple[str, str, str] = ("attention.self", "query", "key")
    size_keys: tuple[str, str, str, str] = ("num_hidden_layers", "hidden_size", "intermediate_size",
                                            "num_attention_heads")
    extra_width_keys: tuple[str, ...] = ()
    notes: str = ""
    #: modules of the classifier outside the base model that teacher_layers copies (DeBERTa's pooler)
    head_modules: tuple[str, ...] = ()
    dropped_keys: tuple[str, ...] = field(default=("attention_head_size",))

    # --- reading a model -------------------------------------------------------------------
    @property
    def exposes_scores(self) -> bool:
        return self.capture is not None

    def layers(self, model) -> Sequence:
        """The transformer layers of ``model`` (bare encoder or with a task head)."""
        module = getattr(model, "base_model", model)
        for part in self.layer_path.split("."):
            module = getattr(module, part)
        return module

    def model_inputs(self, input_ids, token_type_ids, attention_mask) -> dict[str, Any]:
        """Keyword arguments of a forward: token type ids only where the family embeds them."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.token_types and token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        return inputs

    def check_target(self, attention_target: str, where=None) -> None:
        """Refuse an attention target the family cannot provide (before any forward)."""
        if attention_target not in ATTENTION_TARGETS:
            raise InputError(f"attention_target must be one of {ATTENTION_TARGETS}, got "
                             f"{attention_target!r}", where)
        if attention_target == "scores" and not self.exposes_scores:
            raise InputError(f"model type {self.model_types[0]!r} ({self.name}) cannot expose its "
                             "pre-softmax attention scores exactly; use attention_target = log_probs "
                             f"(families with scores: {', '.join(f.name for f in FAMILIES if f.exposes_scores)})",
                             where)

    # --- building students -----------------------------------------------------------------
    def _config_class(self, teacher_config):
        return type(teacher_config)

    def student_config(self, teacher_config, shape: StudentShape, labels: dict):
        """A fresh student config of this family: the teacher's, resized to ``shape``."""
        layers_key, width_key, ffn_key, heads_key = self.size_keys
        values = {k: v for k, v in teacher_config.to_dict().items() if k not in self.dropped_keys}
        values.update({layers_key: shape.num_layers, width_key: shape.hidden_size,
                       ffn_key: shape.intermediate_size, heads_key: shape.num_heads})
        values.update({key: shape.hidden_size for key in self.extra_width_keys})
        values.pop("architectures", None)
        values.update(self.layer_type_overrides(teacher_config, None, shape.num_layers))
        values.update(labels)
        return self._config_class(teacher_config).from_dict(values)

    def subset_config(self, teacher_config, chosen: Sequence[int], labels: dict):
        """The config of a student made of the teacher's layers ``chosen`` (1-based)."""
        values = {**teacher_config.to_dict(), self.size_keys[0]: len(chosen)}
        values.update(self.layer_type_overrides(teacher_config, chosen, len(chosen)))
        values.update(labels)
        return self._config_class(teacher_config).from_dict(values)

    def layer_type_overrides(self, teacher_config, chosen, num_layers) -> dict:
        """Per-layer settings that must follow the new depth (ModernBERT's layer types)."""
        return {}

    def subset_state_dict(self, teacher_base_state: dict, student_base_keys, chosen: Sequence[int]) -> dict:
        """The student base model's state dict: the teacher's, with layer i taken from chosen[i]."""
        prefix = self.layer_path + "."
        state = {}
        for key in student_base_keys:
            source = key
            if key.startswith(prefix):
                index, rest = key[len(prefix):].split(".", 1)
                source = f"{prefix}{chosen[int(index)] - 1}.{rest}"
            state[key] = teacher_base_state[source]
        return state


class _BertFamily(EncoderFamily):
    """BERT keeps its historical fresh student: a default ``BertConfig`` of the given shape with
    the teacher's vocabulary, positions, type vocabulary and padding id (so the packaged
    MiniLM results are unchanged); also the student of any teacher with ``student_family=bert``."""

    def student_config(self, teacher_config, shape: StudentShape, labels: dict):
        from transformers import BertConfig

        type_vocab = getattr(teacher_config, "type_vocab_size", None)
        return BertConfig(
            vocab_size=teacher_config.vocab_size,
            max_position_embeddings=teacher_config.max_position_embeddings,
            # a family without token types feeds zeros (one type); two keep a pair template's
            type_vocab_size=type_vocab if type_vocab else 2,
            pad_token_id=teacher_config.pad_token_id,
            hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
            intermediate_size=shape.intermediate_size, num_attention_heads=shape.num_heads,
            **labels)


class _ElectraFamily(EncoderFamily):
    """ELECTRA's embeddings may be narrower than its layers (a projection joins them); a fresh
    student keeps the teacher's embedding width unless that is wider than the student."""

    def student_config(self, teacher_config, shape: StudentShape, labels: dict):
        config = super().student_config(teacher_config, shape, labels)
        config.embedding_size = min(teacher_config.embedding_size, shape.hidden_size)
        return config


class _ModernBertFamily(EncoderFamily):
    def layer_type_overrides(self, teacher_config, chosen, num_layers) -> dict:
        types = list(teacher_config.layer_types)
        if chosen is not None:      # copied layers keep their kind of attention
            return {"layer_types": [types[c - 1] for c in chosen]}
        # a fresh student repeats the teacher's pattern: a global layer every n layers
        every = next((i for i, kind in enumerate(types) if i and kind == "full_attention"), len(types))
        return {"layer_types": ["sliding_attention" if i % every else "full_attention"
                                for i in range(num_layers)]}


FAMILIES: tuple[EncoderFamily, ...] = (
    _BertFamily("bert", ("bert",), "encoder.layer", token_types=True, capture="query_key"),
    EncoderFamily("roberta", ("roberta",), "encoder.layer", token_types=True, capture="query_key",
                  notes="one token type; pair template <s> A </s></s> B </s>"),
    EncoderFamily("xlm-roberta", ("xlm-roberta",), "encoder.layer", token_types=True,
                  capture="query_key", notes="as RoBERTa, SentencePiece vocabulary"),
    _ElectraFamily("electra", ("electra",), "encoder.layer", token_types=True, capture="query_key",
                  notes="layer 0 is the projected embedding output"),
    EncoderFamily("distilbert", ("distilbert",), "transformer.layer", token_types=False,
                  capture="query_key", query_key=("attention", "q_lin", "k_lin"),
                  size_keys=("n_layers", "dim", "hidden_dim", "n_heads")),
    EncoderFamily("deberta-v2", ("deberta-v2",), "encoder.layer", token_types=True,
                  capture="deberta_v2", extra_width_keys=("pooler_hidden_size",), head_modules=("pooler",),
                  notes="DeBERTa-v2 and v3; disentangled scores with position terms"),
    EncoderFamily("deberta", ("deberta",), "encoder.layer", token_types=True, capture=None,
                  extra_width_keys=("pooler_hidden_size",), head_modules=("pooler",),
                  notes="log_probs only; its student trains without attention-probability dropout"),
    _ModernBertFamily("modernbert", ("modernbert",), "layers", token_types=False,
                      capture="modernbert", notes="rotary positions; sliding-window layers"),
)
_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def family_of(config_or_model, where=None) -> EncoderFamily:
    """The adapter for a config (or a model's config); one clear error for an unknown family."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        raise InputError(f"no encoder adapter for model type {model_type!r}; supported model types: "
                         f"{', '.join(supported_model_types())}", where)
    return _BY_MODEL_TYPE[model_type]


def family_named(name: str, where=None) -> EncoderFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise InputError(f"unknown encoder family {name!r}; choose one of "
                     f"{', '.join(f.name for f in FAMILIES)} or {AUTO_FAMILY}", where)


def model_inputs(model, input_ids, token_type_ids, attention_mask) -> dict[str, Any]:
    """Forward keyword arguments for ``model`` (token types only where its family has them)."""
    return family_of(model).model_inputs(input_ids, token_type_ids, attention_mask)


def window_of(model, layer: int) -> int | None:
    """Largest |query - key| distance layer ``layer`` (1-based) attends to; None: unlimited."""
    family = family_of(model)
    if family.name != "modernbert":
        return None
    if model.config.layer_types[layer - 1] == "sliding_attention":
        return int(model.config.sliding_window)
    return None


def use_eager_attention(model) -> None:
    """``output_attentions`` needs the eager attention (fused kernels never form the probabilities)."""
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        model.set_attn_implementation("eager")


# --------------------------------------------------------------------------------------------
# Score capture
# --------------------------------------------------------------------------------------------

def _submodule(module, path: str):
    for part in path.split(".") if path else ():
        module = getattr(module, part)
    return module


@contextlib.contextmanager
def capture_scores(model, layers: Sequence[int]) -> Iterator[dict[int, Any]]:
    """Record the pre-softmax attention scores ``[B, heads, T, T]`` of the 1-based ``layers``
    during one forward of ``model``; the dict is filled when the forward returns.

    The scores are unmasked (padding is the caller's: :func:`zero_padding` in the cache)."""
    family = family_of(model)
    if layers:
        family.check_target("scores")
    blocks = family.layers(model)
    for layer in layers:
        if not 1 <= layer <= len(blocks):
            raise ValueError(f"attention layer {layer} outside the model's 1..{len(blocks)}")
    scores: dict[int, Any] = {}
    if not layers:
        yield scores
        return
    handles: list = []
    install = {"query_key": _hook_query_key, "modernbert": _hook_modernbert,
               "deberta_v2": _hook_deberta_v2}[family.capture]
    try:
        for layer in layers:
            handles += install(family, model, blocks[layer - 1], layer, scores)
        yield scores
    finally:
        for handle in handles:
            handle.remove()


def scores_from_query_key(query, key, num_heads: int):
    """[B, T, heads*d] query/key projections -> [B, heads, T, T] scaled dot products."""
    import torch

    batch, length, width = query.shape
    head_dim = width // num_heads
    q = query.view(batch, length, num_heads, head_dim).transpose(1, 2)
    k = key.view(batch, length, num_heads, head_dim).transpose(1, 2)
    return torch.matmul(q, k.transpose(-1, -2)) * head_dim ** -0.5


def _hook_query_key(family, model, block, layer, scores):
    path, query_name, key_name = family.query_key
    attention = _submodule(block, path)
    num_heads = model.config.num_attention_heads
    seen: dict[str, Any] = {}

    def on_query(_module, _inputs, output):
        seen["query"] = output

    def on_key(_module, _inputs, output):
        # The key projection runs after the query's in every family here.
        scores[layer] = scores_from_query_key(seen.pop("query"), output, num_heads)

    return [getattr(attention, query_name).register_forward_hook(on_query),
            getattr(attention, key_name).register_forward_hook(on_key)]


def _hook_modernbert(family, model, block, layer, scores):
    import torch
    from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb

    attention = block.attn
    seen: dict[str, Any] = {}

    def on_qkv(_module, _inputs, output):
        seen["qkv"] = output

    def on_attention(_module, _args, kwargs, _output):
        qkv = seen.pop("qkv")
        batch, length = qkv.shape[:2]
        qkv = qkv.view(batch, length, 3, -1, attention.head_dim)
        query, key, _ = qkv.unbind(dim=-3)
        cos, sin = kwargs["position_embeddings"]
        query, key = apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), cos, sin,
                                          unsqueeze_dim=1)
        scores[layer] = torch.matmul(query, key.transpose(2, 3)) * attention.head_dim ** -0.5

    return [attention.Wqkv.register_forward_hook(on_qkv),
            attention.register_forward_hook(on_attention, with_kwargs=True)]


def _hook_deberta_v2(family, model, block, layer, scores):
    import torch
    from transformers.models.deberta_v2.modeling_deberta_v2 import scaled_size_sqrt

    attention = block.attention.self
    seen: dict[str, Any] = {}
    handles = []

    def first(name):
        # With share_att_key the projections run again on the relative embeddings inside the
        # same forward; the first call is the content projection.
        def hook(_module, _inputs, output):
            seen.setdefault(name, output)
        return hook

    def on_attention(module, _args, kwargs, _output):
        heads = module.num_attention_heads
        query = module.transpose_for_scores(seen["query"], heads)      # [B*heads, T, d]
        key = module.transpose_for_scores(seen["key"], heads)
        scale_factor = 1 + ("c2p" in module.pos_att_type) + ("p2c" in module.pos_att_type)
        scale = scaled_size_sqrt(query, scale_factor)
        value = torch.bmm(query, key.transpose(-1, -2) / scale.to(dtype=query.dtype))
        if module.relative_attention:
            value = value + module.disentangled_attention_bias(
                query, key, kwargs.get("relative_pos"), seen["relative"], scale_factor)
        seen.clear()   # also what the recomputation above recorded
        scores[layer] = value.view(-1, heads, value.size(-2), value.size(-1))

    handles.append(attention.query_proj.register_forward_hook(first("query")))
    handles.append(attention.key_proj.register_forward_hook(first("key")))
    if attention.relative_attention:
        handles.append(attention.pos_dropout.register_forward_hook(first("relative")))
    handles.append(attention.register_forward_hook(on_attention, with_kwargs=True))
    return handles
