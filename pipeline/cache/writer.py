"""The teacher-output cache: run the teacher once, store what distillation needs in Parquet.

Every distillation run and every ablation needs the same teacher outputs for the same
examples: logits, the hidden states of the mapped layers (0 = embedding output) and the
pre-softmax attention scores of the mapped layers. Recomputing them costs a teacher forward
per example per epoch; caching them costs disk. docs/ALGORITHM.md §3.1 does the arithmetic: per example of L
real tokens, a BERT-base teacher and a 4-layer student need 5·L·768 hidden values and
4·12·L² score values. Hence the layout, one row per example:

* **real tokens only** (ragged ``list<>`` columns, no padding: padding to 128 multiplies the
  score columns by (128/L)², ~40x at SST-2's typical L ≈ 20);
* **only the mapped layers** (``hidden_<j>``, ``attn_<j>``; the layer list is part of the
  cache's identity and is checked by the reader);
* **half precision** by default (``float16`` via Parquet's Float16 logical type; ``bfloat16``
  has no Parquet type, so its raw bits are stored as ``uint16`` and the manifest says so;
  ``float32`` for exactness), **zstd**-compressed (pyarrow defaults to snappy) after
  Parquet's BYTE_STREAM_SPLIT encoding, which groups the high and low bytes of the floats so
  zstd sees the repetitive exponent bytes together (scripts/bench_cache.py: 7% smaller than
  plain fp16+zstd on a BERT-base-shaped teacher's outputs, at no measurable write cost;
  zstd levels 1-9 differ by under 1%, so level 3);
* ``input_ids``/``token_type_ids``/``length``/``label``/``id`` travel with the outputs, so the
  trainer reads nothing else (and must tokenise with the same vocabulary: the manifest holds
  the tokenizer vocabulary's sha256).

**Row groups are cut by bytes, not rows.** A row group is what a reader decompresses at once,
and what must fit an Arrow array with 32-bit list offsets (2^31 values per column chunk). Score
columns are quadratic in length: one layer of one 128-token row is 12·128² ≈ 197k values, so a
fixed row count is either tiny for short sentences or hundreds of MB for long ones. We close a
row group once its uncompressed teacher values, counted as the full fp16 layout would store them
(:func:`nominal_row_bytes`), reach ``row_group_bytes`` (default 32 MiB): that
bounds reader memory (the reader's shuffle window holds a few row groups), keeps every column
chunk below ~16M values (far from 2^31, so plain ``list`` offsets are safe), leaves enough
values per chunk for zstd to find structure, and still gives the reader's shuffle hundreds of
row groups to permute in a cache of a few GB. Decisions are made per example in source order,
so the row-group layout depends neither on the forward batch size nor on the cache's layout and
storage: every format of the same examples trains on the same batches.

**Shards** are contiguous, fixed-size ranges of the source examples in source order (example i
goes to shard i // shard_size), so the assignment is deterministic and a shard is a unit of
work (one Luigi task), of resume (a killed run keeps finished shards) and of parallelism.
The shard size trades teacher-loading overhead (seconds per task) and the work lost when a run
is killed against parallelism: the default 20,000 examples is ~1 min of BERT-base on one GPU
(roughly 2-4 GB at SST-2 lengths in fp16), and an augmented SST-2 (1.3M examples) makes ~65
shards, plenty for any number of workers.

**Batching.** The forward pass groups examples of similar length (sorted within windows of
``sort_window`` examples) so little compute is spent on padding; outputs are written back in
source order. The teacher runs in eval mode under ``torch.inference_mode()``, optionally under
CUDA autocast. Padding changes nothing but floating-point noise: the padded keys are masked
in the softmax and the scores are read from the layers' projections by the encoder family's
adapter (:mod:`pipeline.common.encoder_outputs`, :mod:`pipeline.common.encoders`, no patched
transformers). ``attention_target`` (recorded in the manifest) says whether the attention
columns hold pre-softmax scores or attention log-probabilities.
"""
from __future__ import annotations

import contextlib
import errno
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common.device import resolve_device
from pipeline.common.loading import load_pretrained
from pipeline.common.examples import count_examples, read_example_range
from pipeline.common.tokenize import (check_tokenizer_matches_teacher, length_sorted_batches, pad_batch,
                                      tokenize_examples, tokenizer_vocab_sha256)
from pipeline.cache.compact import (FORMAT_VERSION, PARTS_FILE, CompactPlan, TeacherParts, attention_column,
                                    hidden_column, input_column, quantise_rows, scale_column)
from pipeline.errors import InputError

#: Storage dtypes: name -> (torch dtype name, Arrow value type). bfloat16 is stored as raw bits.
#: int8 rows are one ``binary`` value each (Parquet has no 1-byte integer: a list<int8> column
#: is stored as INT32 and compresses 40 % worse), with float32 scales (pipeline.cache.compact).
STORAGE_DTYPES = {
    "float16": ("float16", pa.float16()),
    "bfloat16": ("bfloat16", pa.uint16()),
    "float32": ("float32", pa.float32()),
    "int8": ("int8", pa.int8()),
}
DEFAULT_DTYPE = "float16"
DEFAULT_LAYOUT = "compact"
DEFAULT_SHARD_SIZE = 20_000
DEFAULT_ROW_GROUP_BYTES = 32 << 20
DEFAULT_SORT_WINDOW = 4096
SCHEMA_METADATA_KEY = b"tinykd.teacher_cache"
SHARD_NAME = "part-{:05d}.parquet"
EXAMPLE_COLUMNS = ("id", "orig_id", "aug_index", "text_a", "text_b", "label")


# --------------------------------------------------------------------------------------------
# The deterministic shard assignment (example sources: pipeline.common.examples)
# --------------------------------------------------------------------------------------------

def shard_ranges(num_examples: int, shard_size: int) -> list[tuple[int, int]]:
    """Example i goes to shard i // shard_size: contiguous ``[start, stop)`` ranges."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    return [(start, min(start + shard_size, num_examples))
            for start in range(0, num_examples, shard_size)]


# --------------------------------------------------------------------------------------------
# What a cache holds
# --------------------------------------------------------------------------------------------

@dataclass
class CacheSpec:
    """What a cache holds; recorded in the manifest and in each shard's schema metadata.

    ``hidden_layers`` / ``attention_layers`` are what trainers may ask for; ``layout`` says how
    much of it is stored (``compact``: only what cannot be recomputed, see
    :mod:`pipeline.cache.compact`; ``full``: every layer as it is, format 1's columns) and
    ``dtype`` in which storage (float16, bfloat16, float32 or int8 with scales).
    """

    hidden_layers: list[int]
    attention_layers: list[int]
    dtype: str = DEFAULT_DTYPE
    max_seq_length: int = 128
    with_logits: bool = True
    layout: str = DEFAULT_LAYOUT
    #: ``scores`` (pre-softmax, TinyBERT) or ``log_probs`` (pipeline.common.encoder_outputs)
    attention_target: str = "scores"

    def __post_init__(self):
        from pipeline.common.encoders import ATTENTION_TARGETS

        if self.dtype not in STORAGE_DTYPES:
            raise InputError(f"unknown cache storage {self.dtype!r}; choose one of {sorted(STORAGE_DTYPES)}")
        if self.attention_target not in ATTENTION_TARGETS:
            raise InputError(f"unknown attention_target {self.attention_target!r}; choose one of "
                             f"{ATTENTION_TARGETS}")
        self.hidden_layers = sorted({int(x) for x in self.hidden_layers})
        self.attention_layers = sorted({int(x) for x in self.attention_layers})
        self.plan(True)   # an unknown layout fails here

    def plan(self, can_derive: bool) -> CompactPlan:
        """What is stored and what is recomputed (only for teachers whose layer 0 and scores
        :class:`pipeline.cache.compact.TeacherParts` can recompute: :func:`can_derive_scores`)."""
        return CompactPlan.make(self.layout, self.hidden_layers, self.attention_layers, can_derive)


def check_layers(spec: CacheSpec, num_layers: int, teacher: str) -> None:
    bad_hidden = [l for l in spec.hidden_layers if not 0 <= l <= num_layers]
    bad_attn = [l for l in spec.attention_layers if not 1 <= l <= num_layers]
    if bad_hidden or bad_attn:
        problems = []
        if bad_hidden:
            problems.append(f"hidden layer(s) {bad_hidden} outside 0..{num_layers}")
        if bad_attn:
            problems.append(f"attention layer(s) {bad_attn} outside 1..{num_layers}")
        raise InputError(f"{'; '.join(problems)} (the teacher has {num_layers} layers)", teacher)


def stored_columns(spec: CacheSpec, plan: CompactPlan) -> dict[str, str]:
    """``column -> kind`` (``hidden``, ``scores``, ``input``) of the teacher values a shard stores,
    scale columns excluded."""
    columns = {hidden_column(l): "hidden" for l in plan.stored_hidden}
    for layer in spec.attention_layers:
        if plan.score_sources.get(layer) in (None, "row"):
            columns[attention_column(layer)] = "scores"
    for layer, source in sorted(plan.score_sources.items()):
        if source == "row":
            columns[input_column(layer)] = "input"
    return columns


def cache_schema(spec: CacheSpec, label_type: pa.DataType, metadata: dict | None = None,
                 plan: CompactPlan | None = None) -> pa.Schema:
    plan = plan or spec.plan(True)
    value_type = STORAGE_DTYPES[spec.dtype][1]
    fields = [pa.field("id", pa.string()), pa.field("orig_id", pa.string()),
              pa.field("aug_index", pa.int32()), pa.field("label", label_type),
              pa.field("length", pa.int32()),
              pa.field("input_ids", pa.list_(pa.int32())),
              pa.field("token_type_ids", pa.list_(pa.int8()))]
    if spec.with_logits:
        fields.append(pa.field("logits", pa.list_(pa.float32())))
    for column in stored_columns(spec, plan):
        fields.append(pa.field(column, pa.binary() if spec.dtype == "int8" else pa.list_(value_type)))
        if spec.dtype == "int8":
            fields.append(pa.field(scale_column(column), pa.list_(pa.float32())))
    schema = pa.schema(fields)
    if metadata is not None:
        schema = schema.with_metadata({SCHEMA_METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return schema


# --------------------------------------------------------------------------------------------
# The forward pass (tokenisation: pipeline.common.tokenize)
# --------------------------------------------------------------------------------------------

def _to_storage_numpy(tensor, dtype: str) -> np.ndarray:
    """A CPU tensor in the storage dtype -> the numpy array Arrow stores (bf16 as uint16 bits)."""
    import torch

    if dtype == "bfloat16":
        return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
    return tensor.contiguous().numpy()


class ForwardRunner:
    """Runs the teacher on padded batches and returns per-example ragged numpy outputs.

    What a row holds follows the cache's :class:`~pipeline.cache.compact.CompactPlan`: stored
    hidden layers, scores where the row stores them, layer inputs where it derives them (None
    in the other column), and a scale next to every value in int8 storage.
    """

    def __init__(self, model, spec: CacheSpec, device, autocast: str = "none",
                 plan: CompactPlan | None = None):
        import torch

        self.model = model.eval().to(device)
        self.spec = spec
        self.plan = plan or spec.plan(True)
        self.device = device
        self.torch_dtype = getattr(torch, STORAGE_DTYPES[spec.dtype][0])
        if autocast not in ("none", "bf16", "fp16"):
            raise InputError(f"autocast must be none, bf16 or fp16, got {autocast!r}")
        self.autocast = autocast
        self.hidden_size = model.config.hidden_size
        self.num_heads = model.config.num_attention_heads
        row_layers = [l for l, s in self.plan.score_sources.items() if s == "row"]
        # Layers the forward must return: stored ones, and the inputs of per-row derived scores.
        self.forward_hidden = sorted(set(self.plan.stored_hidden) | {l - 1 for l in row_layers})
        self.forward_attention = [l for l in spec.attention_layers
                                  if self.plan.score_sources.get(l) in (None, "row")]

    def _autocast(self):
        import torch

        if self.autocast == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.autocast == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _encode(self, value, width: int):
        """On the device: ``(values on the host, scales on the host or None)`` in storage form."""
        if self.spec.dtype == "int8":
            quantised, scale = quantise_rows(value, width)
            return quantised.cpu(), scale.cpu()
        return value.to(self.torch_dtype).cpu(), None

    def run(self, input_ids, token_type_ids, pad_token_id: int) -> list[dict[str, np.ndarray | None]]:
        import torch

        from pipeline.common.encoder_outputs import forward_internals

        ids, types, mask = pad_batch(input_ids, token_type_ids, pad_token_id)
        lengths = [len(x) for x in input_ids]
        with torch.inference_mode(), self._autocast():
            mask_device = mask.to(self.device)
            internals = forward_internals(
                self.model, ids.to(self.device), types.to(self.device), mask_device,
                hidden_layers=self.forward_hidden, attention_layers=self.forward_attention,
                with_logits=self.spec.with_logits, attention_target=self.spec.attention_target)
            # Convert on the device (halves the transfer), then one copy to the host per tensor.
            hidden = {l: self._encode(t, self.hidden_size) for l, t in internals.hidden.items()}
            if self.spec.dtype == "int8":
                # Padded keys hold unmasked scores: zero them so they do not set a row's scale.
                key_mask = mask_device.bool()[:, None, None, :]
                internals.scores = {l: t.masked_fill(~key_mask, 0.0) for l, t in internals.scores.items()}
            scores = {l: self._encode(t, t.shape[-1]) for l, t in internals.scores.items()}
            logits = internals.logits.float().cpu() if self.spec.with_logits else None
        rows = []
        for b, length in enumerate(lengths):
            row: dict[str, np.ndarray | None] = {}
            if logits is not None:
                row["logits"] = logits[b].numpy()
            for layer in self.plan.stored_hidden:
                self._put(row, hidden_column(layer), hidden[layer], b, length, "hidden")
            for layer in self.forward_attention:
                if self.plan.row_stores_scores(layer, length, self.hidden_size, self.num_heads):
                    self._put(row, attention_column(layer), scores[layer], b, length, "scores")
                    if self.plan.score_sources.get(layer) == "row":
                        self._put(row, input_column(layer), None, b, length, "hidden")
                else:
                    self._put(row, attention_column(layer), None, b, length, "scores")
                    self._put(row, input_column(layer), hidden[layer - 1], b, length, "hidden")
            rows.append(row)
        return rows

    def _put(self, row: dict, column: str, encoded, b: int, length: int, kind: str) -> None:
        int8 = self.spec.dtype == "int8"
        if encoded is None:
            row[column] = None
            if int8:
                row[scale_column(column)] = None
            return
        values, scale = encoded
        if kind == "hidden":
            row[column] = _to_storage_numpy(values[b, :length].reshape(-1), self.spec.dtype)
            if int8:
                row[scale_column(column)] = scale[b, :length].contiguous().numpy()
        else:
            row[column] = _to_storage_numpy(values[b, :, :length, :length].reshape(-1), self.spec.dtype)
            if int8:
                row[scale_column(column)] = scale[b, :, :length].reshape(-1).contiguous().numpy()


# --------------------------------------------------------------------------------------------
# Parquet writing
# --------------------------------------------------------------------------------------------

class RowGroupBuffer:
    """Accumulates rows in source order and closes a row group once it holds enough bytes.

    ``add(row, cost)`` counts ``cost`` bytes for the row (default: its arrays' bytes). The cache
    writer passes :func:`nominal_row_bytes`, so that every layout and storage cuts the same
    row groups (see there).
    """

    def __init__(self, writer: pq.ParquetWriter, schema: pa.Schema, row_group_bytes: int):
        self.writer = writer
        self.schema = schema
        self.row_group_bytes = row_group_bytes
        self.rows: list[dict[str, Any]] = []
        self.bytes = 0
        self.row_groups = 0

    def add(self, row: dict[str, Any], cost: int | None = None) -> None:
        self.rows.append(row)
        self.bytes += cost if cost is not None else sum(
            v.nbytes for v in row.values() if isinstance(v, np.ndarray))
        if self.bytes >= self.row_group_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        columns = []
        for field in self.schema:
            values = [row[field.name] for row in self.rows]
            if pa.types.is_list(field.type):
                columns.append(_ragged(values, field.type.value_type))
            elif pa.types.is_binary(field.type):   # int8 storage: a row's values as bytes
                columns.append(pa.array([None if v is None else v.tobytes() for v in values], pa.binary()))
            else:
                columns.append(pa.array(values, field.type))
        table = pa.Table.from_arrays(columns, schema=self.schema)
        self.writer.write_table(table, row_group_size=len(self.rows))
        self.row_groups += 1
        self.rows, self.bytes = [], 0


def _ragged(values: list[np.ndarray | None], value_type: pa.DataType) -> pa.ListArray:
    """One ``list<value_type>`` array from per-row numpy arrays (None: a null list), with one
    concatenation and no Python loop over values."""
    sizes = np.fromiter((0 if v is None else len(v) for v in values), dtype=np.int64, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(sizes, out=offsets[1:])
    present = [v for v in values if v is not None]
    flat = np.concatenate(present) if present else np.zeros(0)
    nulls = sizes.size and any(v is None for v in values)
    mask = pa.array([v is None for v in values]) if nulls else None
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, value_type), mask=mask)


def nominal_row_bytes(spec: CacheSpec, length: int, hidden_size: int, num_heads: int,
                      num_logits: int) -> int:
    """The bytes a row of ``length`` tokens takes in the *full fp16* layout (format 1's default).

    Row groups are the reader's shuffle unit, so their boundaries decide the training order.
    Cutting them by this nominal size, whatever the cache's layout and storage, gives every
    format of the same examples the same row groups, hence the same batches: a format change
    changes the values a student sees, never which examples it sees together. (A compact int8
    row group is therefore several times smaller on disk than ``row_group_bytes``.)
    """
    teacher_values = (len(spec.hidden_layers) * length * hidden_size
                      + len(spec.attention_layers) * num_heads * length * length)
    return 2 * teacher_values + 4 * length + length + (4 * num_logits if spec.with_logits else 0)


def can_derive_scores(model, attention_target: str = "scores") -> bool:
    """Whether a compact cache can leave layer 0 and attention scores to
    :class:`~pipeline.cache.compact.TeacherParts`: the pre-softmax scores of plain query/key
    families (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT). Other families (rotary or
    disentangled positions) and the ``log_probs`` target store every listed layer."""
    from pipeline.cache.compact import TeacherParts

    return attention_target == "scores" and TeacherParts.supports(model)


def write_cache_shard(examples: pa.Table, model, tokenizer, out_file: Path | str, spec: CacheSpec, *,
                      batch_size: int = 64, device: str = "auto", autocast: str = "none",
                      row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
                      sort_window: int = DEFAULT_SORT_WINDOW, compression_level: int = 3,
                      byte_stream_split: bool = True, metadata: dict | None = None,
                      source: str = "", progress: bool = False) -> dict:
    """Run the teacher over ``examples`` and write one cache shard to ``out_file``.

    Returns statistics (rows, row groups, real tokens, bytes). ``out_file`` should live inside
    a stage's partial directory: on any failure (including a full disk) the exception
    propagates with the file named, and the stage contract removes the partial output.
    """
    out_file = Path(out_file)
    device_ = resolve_device(device)
    plan = spec.plan(can_derive_scores(model, spec.attention_target))
    runner = ForwardRunner(model, spec, device_, autocast, plan)
    input_ids, token_type_ids = tokenize_examples(tokenizer, examples, spec.max_seq_length, source)
    lengths = [len(x) for x in input_ids]
    label_type = examples.schema.field("label").type
    schema = cache_schema(spec, label_type, metadata, plan)
    ids = examples.column("id").to_pylist()
    orig_ids = examples.column("orig_id").to_pylist()
    aug_indices = examples.column("aug_index").to_pylist()
    labels = examples.column("label").to_pylist()
    if spec.with_logits and model.config.num_labels:
        _check_labels(labels, label_type, model.config.num_labels, source)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    num_logits = model.config.num_labels if spec.with_logits else 0
    started = _time()
    try:
        writer = pq.ParquetWriter(
            out_file, schema, compression="zstd", compression_level=compression_level,
            use_dictionary=["id", "orig_id"], write_statistics=["length", "label"],
            # Page CRCs let the reader detect a corrupt data page when it decodes it.
            write_page_checksum=True,
            # Options on list columns name the leaf ("<column>.list.element"), not the column.
            use_byte_stream_split=[f"{f.name}.list.element" for f in schema
                                   if f.name.startswith(("hidden_", "attn_")) and pa.types.is_list(f.type)]
            if byte_stream_split else False)
        with writer:
            buffer = RowGroupBuffer(writer, schema, row_group_bytes)
            batches = length_sorted_batches(lengths, batch_size, sort_window)
            pending: dict[int, dict] = {}
            next_row = 0
            iterator = batches
            if progress:
                from tqdm import tqdm
                iterator = tqdm(batches, desc=out_file.name, unit="batch")
            for batch in iterator:
                outputs = runner.run([input_ids[i] for i in batch], [token_type_ids[i] for i in batch], pad_id)
                pending.update(zip(batch, outputs))
                # Batches are sorted within windows; rows are written back in source order.
                while next_row in pending:
                    row = pending.pop(next_row)
                    row.update(id=ids[next_row], orig_id=orig_ids[next_row],
                               aug_index=aug_indices[next_row], label=labels[next_row],
                               length=lengths[next_row],
                               input_ids=np.asarray(input_ids[next_row], dtype=np.int32),
                               token_type_ids=np.asarray(token_type_ids[next_row], dtype=np.int8))
                    buffer.add(row, nominal_row_bytes(spec, lengths[next_row], runner.hidden_size,
                                                      runner.num_heads, num_logits))
                    next_row += 1
            buffer.flush()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise OSError(exc.errno, f"writing teacher-cache shard {out_file} failed: "
                                     f"{exc.strerror or exc} (disk full?); nothing was published") from exc
        raise
    return {"rows": len(ids), "row_groups": buffer.row_groups, "tokens": int(sum(lengths)),
            "bytes": out_file.stat().st_size, "seconds": round(_time() - started, 3)}


def _time() -> float:
    import time

    return time.perf_counter()


def _check_labels(labels: list, label_type: pa.DataType, num_labels: int, source: str) -> None:
    if not pa.types.is_integer(label_type):
        return
    for row, label in enumerate(labels):
        if label is not None and not 0 <= label < num_labels:
            raise InputError(f"label {label} does not fit the teacher's {num_labels}-class head",
                             source or None, row)


def check_teacher_family(teacher: str | Path, attention_target: str = "scores") -> None:
    """Refuse, from its config alone, a teacher without an adapter or without the attention
    target asked for: before any weights are loaded, any forward or any file written."""
    from transformers import AutoConfig

    from pipeline.common.encoders import family_of

    try:
        config = AutoConfig.from_pretrained(str(teacher))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the teacher's config ({exc})", teacher) from None
    family_of(config, str(teacher)).check_target(attention_target, str(teacher))


def load_cache_teacher(teacher: str | Path, with_logits: bool, tokenizer: str | Path | None = None,
                       num_labels: int | None = None, attention_target: str = "scores"):
    """Load the teacher (classifier or bare encoder) and the tokenizer used for the data.

    The data is tokenised with the teacher's tokenizer (or ``tokenizer``, which must share its
    vocabulary): its special tokens and pair template, e.g. RoBERTa's ``<s> A </s></s> B </s>``.
    Returns ``(model, tokenizer, head_trained)`` (``head_trained`` None for a bare encoder).
    """
    from transformers import AutoModel, AutoTokenizer

    from pipeline.common.encoders import family_of, use_eager_attention
    from pipeline.teacher.finetune import load_sequence_classifier

    teacher = str(teacher)
    check_teacher_family(teacher, attention_target)
    tokenizer_source = str(tokenizer) if tokenizer else teacher
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_source)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load a tokenizer ({exc})", tokenizer_source) from None
    head_trained = None
    if with_logits:
        model, head_trained, _ = load_sequence_classifier(teacher, num_labels)
    else:
        try:
            # hidden states only: a fine-tuned teacher's classifier is left out on purpose
            model = load_pretrained(AutoModel, teacher, partial=True)[0]
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot load the teacher ({exc})", teacher) from None
    check_tokenizer_matches_teacher(tok, model, teacher, tokenizer_source)
    if not family_of(model).exposes_scores:
        use_eager_attention(model)   # its log_probs come from output_attentions
    if tokenizer and tokenizer_source != teacher:
        try:
            own = AutoTokenizer.from_pretrained(teacher)
        except (OSError, ValueError):
            own = None  # the teacher ships no tokenizer: the size check above is all we have
        if own is not None and tokenizer_vocab_sha256(own) != tokenizer_vocab_sha256(tok):
            raise InputError(f"the teacher's own tokenizer vocabulary differs from the data's "
                             f"tokenizer ({tokenizer_source})", teacher)
    return model, tok, head_trained


def shard_values_per_row(spec: CacheSpec, length: int, hidden_size: int, num_heads: int) -> int:
    """Teacher values stored for one example of ``length`` tokens (for size arithmetic)."""
    return (len(spec.hidden_layers) * length * hidden_size
            + len(spec.attention_layers) * num_heads * length * length)


def naive_bytes_per_example(spec: CacheSpec, max_length: int, hidden_size: int, num_heads: int,
                            num_labels: int) -> int:
    """The naive layout the issue compares with: fp32, padded to ``max_length``, the same
    mapped layers, int64 token and segment ids."""
    values = shard_values_per_row(spec, max_length, hidden_size, num_heads) + num_labels
    return 4 * values + 8 * 2 * max_length


# --------------------------------------------------------------------------------------------
# Stage-level functions (called by tasks/teacher.py)
# --------------------------------------------------------------------------------------------

def teacher_description(teacher: str | Path, model) -> dict:
    """Identity of the teacher for the manifest: path/name, content hash of a local directory."""
    from pipeline.stage import FileHasher

    teacher = str(teacher)
    from pipeline.common.encoders import family_of

    described = {"path": teacher, "architecture": type(model).__name__,
                 "model_type": model.config.model_type, "family": family_of(model).name,
                 "num_layers": model.config.num_hidden_layers,
                 "hidden_size": model.config.hidden_size,
                 "num_heads": model.config.num_attention_heads}
    if Path(teacher).exists():
        described["fingerprint"] = FileHasher().describe(teacher)["sha256"]
    return described


def _head_size(teacher: str | Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(teacher)).num_labels


def write_shard_output(source: Path | str, start: int, stop: int, shard_index: int,
                       teacher: str | Path, out_dir: Path | str, spec: CacheSpec, *,
                       tokenizer: str | Path | None = None, batch_size: int = 64,
                       device: str = "auto", autocast: str = "none",
                       row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES, compression_level: int = 3,
                       byte_stream_split: bool = True, task_info: dict | None = None,
                       progress: bool = False) -> dict:
    """Cache examples ``[start, stop)`` of ``source`` into ``out_dir/shards/part-NNNNN.parquet``.

    Returns the manifest ``info`` of a one-shard cache (the reader opens it as it is).
    """
    from pipeline.teacher.finetune import warn_if_untrained_head

    task_info = dict(task_info or {})
    if spec.with_logits and task_info.get("num_labels") and task_info["num_labels"] > _head_size(teacher):
        raise InputError(f"the task has {task_info['num_labels']} classes but the teacher's head has "
                         f"{_head_size(teacher)}", teacher)
    model, tok, head_trained = load_cache_teacher(teacher, spec.with_logits, tokenizer,
                                                  attention_target=spec.attention_target)
    check_layers(spec, model.config.num_hidden_layers, str(teacher))
    plan = spec.plan(can_derive_scores(model, spec.attention_target))
    if spec.with_logits:
        warn_if_untrained_head(teacher, head_trained)
    info = {
        "teacher": {**teacher_description(teacher, model), "head_trained": head_trained},
        "format_version": FORMAT_VERSION,
        "hidden_layers": spec.hidden_layers, "attention_layers": spec.attention_layers,
        "dtype": spec.dtype, "compact": plan.describe(), "with_logits": spec.with_logits,
        "attention_target": spec.attention_target,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else 0,
        "hidden_size": model.config.hidden_size, "num_heads": model.config.num_attention_heads,
        "num_labels": model.config.num_labels if spec.with_logits else 0,
        "label_names": task_info.get("label_names"), "task_type": task_info.get("task_type"),
        "task": task_info.get("task"), "metric": task_info.get("metric"),
        "max_seq_length": spec.max_seq_length,
        "tokenizer_vocab_sha256": tokenizer_vocab_sha256(tok),
        "tokenizer_vocab_size": len(tok),
        "creation": {"batch_size": batch_size, "device": str(resolve_device(device)),
                     "autocast": autocast, "row_group_bytes": row_group_bytes,
                     "compression": f"zstd-{compression_level}",
                     "byte_stream_split": byte_stream_split},
        "source": str(source),
    }
    examples = read_example_range(source, start, stop)
    shard_dir = Path(out_dir) / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    out_file = shard_dir / SHARD_NAME.format(shard_index)
    metadata = {k: info[k] for k in ("format_version", "hidden_layers", "attention_layers", "dtype",
                                     "compact", "hidden_size", "num_heads", "tokenizer_vocab_sha256",
                                     "attention_target")}
    stats = write_cache_shard(examples, model, tok, out_file, spec, batch_size=batch_size,
                              device=device, autocast=autocast, row_group_bytes=row_group_bytes,
                              compression_level=compression_level,
                              byte_stream_split=byte_stream_split, metadata=metadata,
                              source=str(source), progress=progress)
    from pipeline.stage import sha256_file

    info["shards"] = [{"file": f"shards/{out_file.name}", "index": shard_index, "start": start,
                       "stop": stop, "rows": stats["rows"], "bytes": stats["bytes"],
                       "sha256": sha256_file(out_file), "tokens": stats["tokens"],
                       "row_groups": stats["row_groups"], "seconds": stats["seconds"],
                       "column_bytes": column_bytes(out_file)}]
    info["examples"] = stats["rows"]
    return info


def column_kind(column: str) -> str:
    """``hidden`` (hidden states), ``scores`` (attention targets: scores and the layer inputs
    they are derived from) or ``other`` (ids, tokens, labels, logits), scales included."""
    if column.startswith("hidden_"):
        return "hidden"
    if column.startswith("attn_"):
        return "scores"
    return "other"


def column_bytes(parquet_file: Path | str) -> dict[str, int]:
    """Compressed bytes of a Parquet file by column kind, from its footer alone."""
    metadata = pq.read_metadata(parquet_file)
    kinds = {"hidden": 0, "scores": 0, "other": 0}
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for index in range(row_group.num_columns):
            chunk = row_group.column(index)
            kinds[column_kind(chunk.path_in_schema.split(".")[0])] += chunk.total_compressed_size
    return kinds


def size_figures(info: dict) -> dict:
    """Bytes per example and per real token, by column kind, and the naive layout beside them.

    ``shards`` counts the Parquet files; ``parts`` the teacher modules a compact cache keeps
    once (amortised over the cache: it does not grow with the examples).
    """
    shards = info["shards"]
    examples = sum(int(s["rows"]) for s in shards) or 1
    tokens = sum(int(s.get("tokens", 0)) for s in shards) or 1
    kinds = {"hidden": 0, "scores": 0, "other": 0}
    for shard in shards:
        for kind, count in (shard.get("column_bytes") or {}).items():
            kinds[kind] += int(count)
    total = sum(int(s["bytes"]) for s in shards)
    parts = int(((info.get("compact") or {}).get("parts") or {}).get("bytes", 0))
    spec = CacheSpec(info["hidden_layers"], info["attention_layers"], "float32",
                     int(info.get("max_seq_length", 128)), bool(info.get("with_logits", True)), "full")
    naive = naive_bytes_per_example(spec, spec.max_seq_length, int(info["hidden_size"]),
                                    int(info["num_heads"]), int(info.get("num_labels") or 0))
    return {
        "bytes_per_example": total / examples, "bytes_per_token": total / tokens,
        "by_kind_per_token": {k: round(v / tokens, 1) for k, v in kinds.items()},
        "by_kind_per_example": {k: round(v / examples, 1) for k, v in kinds.items()},
        "parts_bytes": parts, "mean_tokens": round(tokens / examples, 2),
        "naive_fp32_padded_bytes_per_example": naive,
        # per real token: what the naive layout costs for the same data
        "naive_fp32_padded_bytes_per_token": round(naive * examples / tokens, 1),
    }


#: Info keys that every shard of one cache must agree on.
SHARED_INFO_KEYS = ("format_version", "hidden_layers", "attention_layers", "dtype", "compact",
                    "with_logits", "hidden_size", "num_heads", "num_labels", "tokenizer_vocab_sha256",
                    "max_seq_length", "attention_target")


def _check_shard_file(file: Path, shard: dict) -> None:
    """The shard file as its manifest recorded it (present, size, sha256), or InputError."""
    from pipeline.stage import sha256_file

    if not file.is_file():
        raise InputError("teacher-cache shard listed in its manifest is missing", file)
    if file.stat().st_size != shard["bytes"]:
        raise InputError(f"teacher-cache shard has {file.stat().st_size} bytes, its manifest says "
                         f"{shard['bytes']}; remove {file.parent.parent} to rebuild it", file)
    if "sha256" in shard and sha256_file(file) != shard["sha256"]:
        raise InputError("teacher-cache shard's content differs from its manifest (sha256); "
                         f"remove {file.parent.parent} to rebuild it", file)


def write_teacher_parts(teacher: str | Path, plan: CompactPlan, out_dir: Path, expected: dict) -> dict:
    """Save the modules a compact cache recomputes from (once per cache); the manifest entry.

    ``expected`` is the teacher description the shards recorded: the parts must come from the
    very teacher that wrote them (same local content fingerprint).
    """
    from pipeline.stage import sha256_file
    from pipeline.teacher.finetune import load_bare_encoder

    model = load_bare_encoder(teacher)
    described = teacher_description(teacher, model)
    if expected.get("fingerprint") and described.get("fingerprint") != expected["fingerprint"]:
        raise InputError("the teacher changed since the shards were written (content fingerprint "
                         "differs); rebuild the shards", teacher)
    score_layers = sorted(plan.score_sources)
    parts = TeacherParts.from_model(model, score_layers)
    out_file = out_dir / PARTS_FILE
    entry = parts.save(out_file, model.config)
    entry.update(bytes=out_file.stat().st_size, sha256=sha256_file(out_file))
    return entry


def assemble_cache(shard_dirs: Sequence[Path | str], out_dir: Path | str,
                   teacher: str | Path | None = None) -> dict:
    """Make ``out_dir`` a self-contained cache over the given one-shard outputs.

    Shard files are hard-linked (a copy where the filesystem cannot link), so the cache costs
    no extra disk and stays readable if the shard outputs are garbage-collected. Each shard
    file is checked against its manifest (size, sha256) before it is linked. A compact cache
    also gets the teacher's parts (``teacher``: the teacher that wrote the shards).
    """
    import os
    import shutil

    from pipeline.stage import load_manifest

    out_dir = Path(out_dir)
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    infos = [load_manifest(d)["info"] for d in shard_dirs]
    if not infos:
        raise InputError("no shards to assemble (the example source is empty)")
    first = infos[0]
    merged = {k: v for k, v in first.items() if k not in ("shards", "examples")}
    merged["shards"] = []
    for shard_dir, info in zip(shard_dirs, infos):
        for key in SHARED_INFO_KEYS:
            if info.get(key) != first.get(key):
                raise InputError(f"shard disagrees with the first shard on {key}: "
                                 f"{info.get(key)!r} vs {first.get(key)!r}", shard_dir)
        for shard in info["shards"]:
            target = out_dir / shard["file"]
            source = Path(shard_dir) / shard["file"]
            # A hard link shares the inode: a shard corrupted since it was written would be
            # published again under the cache's new fingerprint. Check it first.
            _check_shard_file(source, shard)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
            merged["shards"].append(shard)
    merged["shards"].sort(key=lambda s: s["index"])
    merged["examples"] = sum(s["rows"] for s in merged["shards"])
    merged["tokens"] = sum(s["tokens"] for s in merged["shards"])
    merged["bytes"] = sum(s["bytes"] for s in merged["shards"])
    plan = CompactPlan.from_info(merged)
    if plan.needs_parts:
        if teacher is None:
            raise InputError("a compact cache needs its teacher to store the teacher parts", out_dir)
        merged["compact"] = {**merged["compact"],
                             "parts": write_teacher_parts(teacher, plan, out_dir, first.get("teacher") or {})}
    merged["size"] = size_figures(merged)
    return merged


def build_cache(source: Path | str, teacher: str | Path, out_dir: Path | str, spec: CacheSpec,
                shard_size: int = DEFAULT_SHARD_SIZE, **kwargs) -> dict:
    """Every shard in this process, then the manifest: the cache without Luigi (tests, benchmarks).

    Writes ``out_dir/manifest.json`` in the stage manifest's shape (``info`` section only).
    """
    out_dir = Path(out_dir)
    pieces = []
    for index, (start, stop) in enumerate(shard_ranges(count_examples(source), shard_size)):
        piece = out_dir / ".pieces" / f"{index:05d}"
        info = write_shard_output(source, start, stop, index, teacher, piece, spec, **kwargs)
        (piece / "manifest.json").write_text(json.dumps({"info": info}))
        pieces.append(piece)
    info = assemble_cache(pieces, out_dir, teacher)
    (out_dir / "manifest.json").write_text(json.dumps({"info": info}, indent=1))
    import shutil

    shutil.rmtree(out_dir / ".pieces")
    return info


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"
