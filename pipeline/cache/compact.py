"""The compact cache (format 2): store nothing that can be recomputed, quantise what is stored.

A format-1 cache stores, per example, every mapped hidden layer (``L·H`` values each) and every
mapped layer's pre-softmax scores (``heads·L²`` values each) in half precision. Three facts
make most of that redundant:

* **Layer 0 is a function of the token ids.** The embedding output is ``LayerNorm(word[id] +
  position[p] + type[t])``: keep the teacher's embedding module once per cache
  (:data:`PARTS_FILE`, safetensors) and recompute it in the trainer, exactly (in fp32, the same
  module and the same ops as the teacher's own forward: bitwise equal).
* **Layer l's scores are a function of layer l's input.** ``S = (x W_qᵀ + b_q)(x W_kᵀ + b_k)ᵀ /
  sqrt(d_head)`` with ``x`` the output of layer ``l-1``. Storing ``x`` costs ``L·H`` values,
  the scores ``heads·L²``: the input is the smaller one once ``L > H / heads = d_head`` (64
  tokens for BERT-base, 32 for MiniLM-L6). The cache keeps the teacher's query/key weights
  of those layers in the same parts file and decides *per row, by length*, which of the two
  to store. When ``x`` is stored anyway (a hidden layer the map also needs, as with adjacent
  mapped layers or an all-layers cache) or is layer 0 (recomputed), the scores cost nothing.
* **Activations survive 8 bits.** ``storage = int8`` stores symmetric int8 values with one
  float32 scale per token for hidden states and one per (head, query row) for scores
  (``value = int8 · scale``, ``scale = max|row| / 127``), dequantised on the training device
  in the same kernel that pads the batch (:func:`pipeline.cache.packed.expand`).

``layout = full`` keeps format 1's columns (every mapped layer stored as it is) for exact
comparisons. Either way the trainer receives the Batch of docs/DESIGN.md: the reader gathers
the stored bytes, :func:`pipeline.cache.packed.expand` dequantises and pads them on the device,
and :class:`TeacherParts` (called by the trainer's :class:`distill.trainer.CachedTeacher` on
the training device, and by the online teacher for layer 0, so both modes compute it the same
way) fills in layer 0 and the derived scores.

Column names (format 2): ``hidden_<j>`` and ``attn_<l>`` as in format 1 (``attn_<l>`` is null
in rows whose scores are derived), ``attn_input_<l>`` (layer ``l``'s input, null in rows that
store the scores) and ``<column>_scale`` next to every int8 column.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.errors import InputError

#: The cache format this code writes, and the ones its reader understands.
FORMAT_VERSION = 2
KNOWN_FORMATS = (1, 2)
#: Storage of hidden states and scores: the three float types of format 1, and int8.
STORAGES = ("float16", "bfloat16", "float32", "int8")
#: The ``[TeacherCache] storage`` names of those.
STORAGE_NAMES = {"fp16": "float16", "int8": "int8", "bf16": "bfloat16", "fp32": "float32"}
LAYOUTS = ("compact", "full")
#: The teacher modules a compact cache keeps (embeddings, query/key projections).
PARTS_FILE = "teacher_parts.safetensors"
INT8_MAX = 127


def hidden_column(layer: int) -> str:
    return f"hidden_{layer}"


def attention_column(layer: int) -> str:
    return f"attn_{layer}"


def input_column(layer: int) -> str:
    """The column holding attention layer ``layer``'s input in rows that derive its scores."""
    return f"attn_input_{layer}"


def scale_column(column: str) -> str:
    return f"{column}_scale"


def scores_are_smaller(length: int, hidden_size: int, num_heads: int) -> bool:
    """Whether a row of ``length`` tokens stores its scores (heads·L² values) rather than the
    layer input (L·H values); ties store the scores, which need no recomputation."""
    return num_heads * length <= hidden_size


@dataclass
class CompactPlan:
    """Which teacher tensors a format-2 cache stores, and how the rest is recomputed.

    ``score_sources[l]`` says where attention layer ``l``'s input comes from when its scores
    are derived: ``"embeddings"`` (l = 1: layer 0, recomputed), ``"hidden"`` (``hidden_<l-1>``
    is stored anyway: always derived) or ``"row"`` (decided per row by length:
    ``attn_<l>`` or ``attn_input_<l>``). Layers absent from it store their scores in every row.
    """

    layout: str
    hidden_layers: list[int]                 # what the trainer may ask for
    attention_layers: list[int]
    stored_hidden: list[int] = field(default_factory=list)
    derive_embeddings: bool = False
    score_sources: dict[int, str] = field(default_factory=dict)

    @classmethod
    def make(cls, layout: str, hidden_layers: Sequence[int], attention_layers: Sequence[int],
             can_derive: bool = True) -> "CompactPlan":
        """``can_derive``: whether :class:`TeacherParts` can recompute this teacher's layer 0
        and scores (plain query/key families, ``scores`` target); if not, everything listed is
        stored whatever the layout."""
        if layout not in LAYOUTS:
            raise InputError(f"unknown cache layout {layout!r}; choose one of {list(LAYOUTS)}")
        hidden, attention = sorted(set(hidden_layers)), sorted(set(attention_layers))
        if layout == "full" or not can_derive:
            return cls(layout, hidden, attention, stored_hidden=hidden)
        stored = [l for l in hidden if l != 0]
        sources = {layer: ("embeddings" if layer == 1 else "hidden" if layer - 1 in stored else "row")
                   for layer in attention}
        derive_embeddings = 0 in hidden or any(s == "embeddings" for s in sources.values())
        return cls(layout, hidden, attention, stored, derive_embeddings, sources)

    @classmethod
    def from_info(cls, info: dict) -> "CompactPlan":
        """The plan a cache manifest records (format 1: everything stored)."""
        hidden = [int(x) for x in info["hidden_layers"]]
        attention = [int(x) for x in info["attention_layers"]]
        compact = info.get("compact")
        if not compact:
            return cls("full", hidden, attention, stored_hidden=hidden)
        return cls(compact["layout"], hidden, attention,
                   stored_hidden=[int(x) for x in compact["stored_hidden"]],
                   derive_embeddings=bool(compact["derive_embeddings"]),
                   score_sources={int(k): v for k, v in compact["score_sources"].items()})

    def describe(self) -> dict:
        return {"layout": self.layout, "stored_hidden": self.stored_hidden,
                "derive_embeddings": self.derive_embeddings,
                "score_sources": {str(k): v for k, v in sorted(self.score_sources.items())}}

    @property
    def needs_parts(self) -> bool:
        return self.derive_embeddings or bool(self.score_sources)

    def row_stores_scores(self, layer: int, length: int, hidden_size: int, num_heads: int) -> bool:
        source = self.score_sources.get(layer)
        if source is None:
            return True
        if source in ("embeddings", "hidden"):
            return False
        return scores_are_smaller(length, hidden_size, num_heads)

    def input_of(self, layer: int) -> str:
        """The column (or ``"embeddings"``) that holds attention layer ``layer``'s input."""
        source = self.score_sources[layer]
        if source == "embeddings":
            return "embeddings"
        if source == "hidden":
            return hidden_column(layer - 1)
        return input_column(layer)


def check_format(info: dict, where: Path | str) -> int:
    """The cache's format version, or one clear error for a format this code cannot read."""
    version = int(info.get("format_version", 1))
    if version not in KNOWN_FORMATS:
        raise InputError(f"teacher-cache format {version} is unknown to this version of tinykd "
                         f"(it reads formats {list(KNOWN_FORMATS)}); upgrade tinykd or rebuild the "
                         "cache", where)
    storage = info.get("dtype")
    if storage not in STORAGES:
        raise InputError(f"unknown cache storage {storage!r} (known: {list(STORAGES)})", where)
    return version


# --- int8 quantisation (in the writer; pipeline.cache.packed dequantises) --------------------

def quantise_rows(values, axis_size: int):
    """Symmetric int8 with one scale per row of ``axis_size`` trailing values (torch tensors).

    ``values``: ``[..., axis_size]`` float tensor. Returns ``(int8 tensor, float32 scales [...])``;
    an all-zero row gets scale 0 (and zeros), so dequantisation never divides.
    """
    import torch

    values = values.float()
    scale = values.abs().amax(dim=-1) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantised = torch.round(values / safe[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return quantised, scale


def relative_errors(reference: dict, other: dict) -> dict[str, dict[str, float]]:
    """Per column, the mean and max over examples of ``‖x̂ − x‖₂ / ‖x‖₂``.

    ``reference`` / ``other``: ``example id -> (hidden {layer: tensor}, scores {layer: tensor})``
    (real tokens only). The norm ratio is used because an element-wise ratio is meaningless
    for values near zero, which activations are full of.
    """
    per_column: dict[str, list[float]] = {}
    for example_id, (hidden, scores) in reference.items():
        for prefix, ref_layers, other_layers in (("hidden", hidden, other[example_id][0]),
                                                 ("attn", scores, other[example_id][1])):
            for layer, value in ref_layers.items():
                norm = float(value.float().norm())
                error = float((other_layers[layer].float() - value.float()).norm())
                per_column.setdefault(f"{prefix}_{layer}", []).append(error / norm if norm else error)
    return {column: {"mean": float(np.mean(v)), "max": float(np.max(v))}
            for column, v in sorted(per_column.items())}


# --- the teacher parts ------------------------------------------------------------------------

def _import_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class TeacherParts:
    """The teacher modules that recompute what a compact cache leaves out.

    ``embeddings``: the teacher's embedding module (layer 0); ``query_key[l]``: the query and
    key projections of attention layer ``l``. Both run in fp32, in eval mode, without grad.
    """

    def __init__(self, embeddings, query_key: dict, num_heads: int, uses_token_types: bool = True,
                 project=None):
        self.embeddings = embeddings.eval() if embeddings is not None else None
        self.project = project.eval() if project is not None else None   # ELECTRA's embeddings_project
        self.query_key = query_key
        self.num_heads = num_heads
        self.uses_token_types = uses_token_types

    @staticmethod
    def supports(model) -> bool:
        """Plain query/key families (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT): their layer 0 is
        the embedding module's output and their scores a product of two linear maps."""
        from pipeline.common.encoders import family_of

        return family_of(model).capture == "query_key"

    # writing
    @classmethod
    def from_model(cls, model, score_layers: Sequence[int]) -> "TeacherParts":
        from pipeline.common.encoders import family_of, query_key_modules

        family = family_of(model)
        base = getattr(model, "base_model", model)
        return cls(base.embeddings, {l: query_key_modules(model, l) for l in score_layers},
                   model.config.num_attention_heads, family.token_types,
                   getattr(base, "embeddings_project", None))

    def save(self, out_file: Path, config) -> dict:
        """Write the modules' weights to ``out_file``; return what the manifest records."""
        from safetensors.torch import save_file

        tensors = {f"embeddings.{k}": v.detach().cpu().contiguous()
                   for k, v in self.embeddings.state_dict().items()}
        if self.project is not None:
            tensors.update({f"embeddings_project.{k}": v.detach().cpu().contiguous()
                            for k, v in self.project.state_dict().items()})
        for layer, (query, key) in self.query_key.items():
            for name, module in (("query", query), ("key", key)):
                for k, v in module.state_dict().items():
                    tensors[f"layer.{layer}.{name}.{k}"] = v.detach().cpu().contiguous()
        save_file(tensors, str(out_file))
        embeddings_class = type(self.embeddings)
        return {"file": out_file.name,
                "embeddings_class": f"{embeddings_class.__module__}.{embeddings_class.__qualname__}",
                "uses_token_types": self.uses_token_types, "projected": self.project is not None,
                "score_layers": sorted(self.query_key), "config": config.to_dict()}

    # reading
    @classmethod
    def load(cls, cache_dir: Path | str, info: dict, device=None) -> "TeacherParts":
        """The parts a compact cache recorded, on ``device``; one clear error if missing or bad."""
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from transformers import AutoConfig

        parts = info["compact"]["parts"]
        path = Path(cache_dir) / parts["file"]
        if not path.is_file():
            raise InputError("the compact cache's teacher parts (embeddings, query/key weights) "
                             "are missing; rebuild the cache", path)
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"unreadable teacher parts ({exc})", path) from None
        config_dict = dict(parts["config"])
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        # Building modules draws their random initial weights from the global generator: keep
        # it untouched, or opening a cache would shift the trainer's dropout and data order.
        with torch.random.fork_rng(devices=[]):
            return cls._build(path, tensors, config, parts, info, device)

    @classmethod
    def _build(cls, path: Path, tensors: dict, config, parts: dict, info: dict, device) -> "TeacherParts":
        try:
            embeddings = _import_class(parts["embeddings_class"])(config)
            embeddings.load_state_dict({k[len("embeddings."):]: v for k, v in tensors.items()
                                        if k.startswith("embeddings.")})
            query_key = {int(layer): (cls._linear(tensors, f"layer.{layer}.query."),
                                      cls._linear(tensors, f"layer.{layer}.key."))
                         for layer in parts["score_layers"]}
            project = cls._linear(tensors, "embeddings_project.") if parts.get("projected") else None
        except (KeyError, RuntimeError, AttributeError, ImportError) as exc:
            raise InputError(f"teacher parts do not match the manifest ({exc})", path) from None
        loaded = cls(embeddings, query_key, int(info["num_heads"]), bool(parts.get("uses_token_types", True)),
                     project)
        return loaded.to(device) if device is not None else loaded

    @staticmethod
    def _linear(tensors: dict, prefix: str):
        import torch

        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        linear = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        linear.load_state_dict(state)
        return linear.eval()

    def to(self, device) -> "TeacherParts":
        if self.project is not None:
            self.project.to(device)
        if self.embeddings is not None:
            self.embeddings.to(device)
        for query, key in self.query_key.values():
            query.to(device)
            key.to(device)
        return self

    def embed(self, input_ids, token_type_ids):
        """Layer 0 (the embedding output) in fp32, as the teacher's forward computes it."""
        import torch

        inputs = {"input_ids": input_ids}
        if self.uses_token_types:
            inputs["token_type_ids"] = token_type_ids
        with torch.no_grad():
            embedded = self.embeddings(**inputs)
            if self.project is not None:
                embedded = self.project(embedded)
            return embedded.float()

    def scores(self, layer: int, layer_input):
        """Attention layer ``layer``'s pre-softmax scores [B, heads, T, T] from its input [B, T, H]."""
        import torch

        from pipeline.common.encoders import scores_from_query_key

        query, key = self.query_key[layer]
        with torch.no_grad():
            return scores_from_query_key(query(layer_input), key(layer_input), self.num_heads)


#: The batch key under which the reader hands over what the trainer must recompute.
DERIVE_KEY = "teacher_derive"


def complete_batch(batch: dict, parts: TeacherParts | None) -> dict:
    """Fill in layer 0 and the derived scores of a batch read from a compact cache.

    The reader leaves out what the cache does not store and says so under :data:`DERIVE_KEY`:
    ``layer0`` (the trainer wants hidden layer 0), ``inputs[l]`` (attention layer ``l``'s input,
    a [B, T, H] tensor, or the string ``"embeddings"`` for layer 0), ``rows[l]`` (a [B] bool:
    the rows whose scores are recomputed; the others carry their stored scores) and
    optionally ``index[l]`` (those rows' positions, so that finding them needs no sync). Padding is
    zeroed exactly as :func:`pipeline.common.encoder_outputs.zero_padding` does for a live
    teacher, so the result is the Batch of docs/DESIGN.md.
    """
    from pipeline.common.encoder_outputs import zero_padding

    derive = batch.pop(DERIVE_KEY, None)
    if not derive:
        return batch
    if parts is None:
        raise InputError("this batch comes from a compact cache, but the trainer was not given "
                         "the cache's teacher parts")
    wants_embeddings = derive["layer0"] or any(isinstance(v, str) for v in derive["inputs"].values())
    embedded = parts.embed(batch["input_ids"], batch["token_type_ids"]) if wants_embeddings else None
    new_hidden, new_scores = {}, {}
    if derive["layer0"]:
        new_hidden[0] = embedded
    for layer, layer_input in derive["inputs"].items():
        layer_input = embedded if isinstance(layer_input, str) else layer_input
        rows = derive["rows"].get(layer)
        if rows is None:                                  # every row derives these scores
            new_scores[layer] = parts.scores(layer, layer_input)
            continue
        # Only the rows that stored their input instead of the scores: recompute just those.
        # The reader gives their index (planned on the host: no device sync to find them).
        index = derive.get("index", {}).get(layer)
        index = (rows.to(layer_input.device).nonzero().squeeze(1) if index is None
                 else index.to(layer_input.device))
        merged = batch["teacher_scores"][layer].clone()
        merged[index] = parts.scores(layer, layer_input[index])
        new_scores[layer] = merged
    zero_padding(new_hidden, new_scores, batch["attention_mask"])
    batch["teacher_hidden"] = {**batch["teacher_hidden"], **new_hidden}
    batch["teacher_scores"] = {**batch["teacher_scores"], **new_scores}
    return batch


def row_group_problems(file, table, index: int, plan: CompactPlan, attention_layers: Sequence[int],
                       hidden_size: int, num_heads: int, dtype: str) -> list[str]:
    """What is wrong with one row group of a cache shard (``tinykd inspect --verify``): every
    stored list must hold the values its row's length implies, and a null may stand only where
    the compact plan allows one (a row stores either a layer's scores or its input)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lengths = table.column("length").to_numpy().astype(np.int64)
    hidden, heads = hidden_size, num_heads
    expected = {"input_ids": lengths, "token_type_ids": lengths}
    per_token = lengths * hidden
    per_query = heads * lengths
    for layer in plan.stored_hidden:
        expected[hidden_column(layer)] = per_token
    for layer in attention_layers:
        source = plan.score_sources.get(layer)
        if source in (None, "row"):
            expected[attention_column(layer)] = heads * lengths * lengths
        if source == "row":
            expected[input_column(layer)] = per_token
    if dtype == "int8":
        for column in list(expected):
            if column.startswith(("hidden_", "attn_")):
                expected[scale_column(column)] = (per_query if column.startswith("attn_")
                                                  and not column.startswith("attn_input_") else lengths)
    problems = []
    for column, sizes in expected.items():
        if column not in table.column_names:
            problems.append(f"{file}: row group {index} has no column {column}")
            continue
        array = table.column(column).combine_chunks()
        actual = (pc.binary_length(array) if pa.types.is_binary(array.type)
                  else array.value_lengths()).to_numpy(zero_copy_only=False)
        present = ~np.isnan(actual) if actual.dtype.kind == "f" else np.ones(len(actual), bool)
        bad = np.nonzero(present & (np.nan_to_num(actual) != sizes))[0]
        if len(bad):
            problems.append(f"{file}: row group {index} column {column}: {len(bad)} row(s) with "
                            f"the wrong number of values (first: row {int(bad[0])})")
    for layer, source in plan.score_sources.items():
        if source != "row":
            continue
        stored = table.column(attention_column(layer)).is_valid().to_numpy(zero_copy_only=False)
        given = table.column(input_column(layer)).is_valid().to_numpy(zero_copy_only=False)
        bad = np.nonzero(stored == given)[0]
        if len(bad):
            problems.append(f"{file}: row group {index} layer {layer}: {len(bad)} row(s) hold both "
                            f"or neither of the scores and the layer input (first: row {int(bad[0])})")
    return problems

