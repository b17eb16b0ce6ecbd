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
  plain fp16+zstd on a BERT-base-shaped teacher's outputs, at no measurable write cost);
  level 3 (the codec figures of scripts/bench_writer.py and why zstd-3 stays: below);
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

**The pipelined writer.** On a GPU the forward is fast (a BERT-base teacher with hidden states
and attention: ~20k examples/s on an H200), and whatever runs on its thread between two
forwards idles the device: the row-wise writer this one replaced (per-example numpy slices,
per-row dicts turned into Arrow arrays, Parquet encoding and zstd all on the forward's thread)
wrote 630-924 examples/s there. Three threads now overlap, joined by bounded queues:

1. *this thread* pads a batch with whole-array numpy (:class:`TokenizedRows`), runs the
   forward, and packs the outputs **on the device** (:class:`TeacherForward`): quantisation
   or the storage dtype, real tokens only, cut with one slice per run of equal lengths, so
   nothing waits for the device. Non-blocking copies on a side stream bring each column to
   pinned host memory, an event marking their end (:class:`HostCopy`); the next forward is
   launched at once. On the CPU the same code runs without copies or events;
2. a *host thread* waits for a batch's event and copies its bytes into per-window buffers
   (:class:`RowGroupAssembler`). Row groups are cut by lengths alone
   (:func:`row_group_bounds`), so once a sort window's last batch is in, each of its row groups
   is a zero-copy Arrow array over flat bytes plus offsets, put in source order by one Arrow
   ``take`` per window: no Python loop over rows;
3. a *Parquet thread* encodes and compresses the row groups in order. Its queue holds every
   row group one window completes, so the forward of window w+1 overlaps the encoding of w.

Threads, not processes: torch kernels, numpy copies, Arrow's take and Parquet's encoder all
release the GIL, so the threads use separate cores without any batch crossing a process
boundary (a worker process would receive every batch, tens of MB, through pickling or shared
memory), and one file keeps one ``ParquetWriter``. Host memory holds about two sort windows of
outputs (the row-wise writer held one): a window of 4,096 SST-2 examples at BERT-base width is
~100 MB in int8. Any error reaches the caller with the shard named, the half-written file is
removed, and a killed writer leaves only the stage's partial directory.

The Parquet thread is the ceiling at GPU rates: pyarrow encodes one file's column chunks one
after another on one core. scripts/bench_writer.py measures it per codec on the writer's row
groups: on int8 rows of real activations (MiniLM-L6) zstd levels 1-9 are within 0.2 % in bytes
while level 9 encodes ~2.4x slower than level 3; lz4 encodes over 2x faster than zstd-3 for 18 %
more bytes, snappy and none are larger still; on fp16 rows (Parquet's per-value list levels
dominate) no codec encodes more than 25 % faster than zstd-3, which saves 14 %. zstd-3 stays the
default: it keeps existing caches' bytes, and on a CPU, where the forward is ~50x slower than
encoding, it is simply the smallest file. For a GPU teacher whose forward outruns one core of
zstd-3 (the GPU kit's BERT-base cache holds ~43 KB per example, which one core of this
project's CPU would encode at roughly 7-10k examples/s, scaling the benchmark's 23-26 KB
rows), ``compression = lz4`` roughly doubles the writer's ceiling; a codec changes a file's
bytes, never its values.

The bytes of a shard are those of the row-wise writer: same schema, row groups, values and
Parquet options (tests/test_cache_writer.py compares the files byte for byte for every storage
and layout), so fingerprints and checksums of existing caches stay valid and so does the
format version.
"""
from __future__ import annotations

import contextlib
import errno
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common.device import resolve_device
from pipeline.common.tokenize import TokenizedRows, length_sorted_batches, tokenize_examples
from pipeline.cache.compact import (CompactPlan, attention_column, hidden_column, input_column, quantise_rows,
                                    scale_column, scores_are_smaller)
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


def can_derive_scores(model, attention_target: str = "scores") -> bool:
    """Whether a compact cache can leave layer 0 and attention scores to
    :class:`~pipeline.cache.compact.TeacherParts`: the pre-softmax scores of plain query/key
    families (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT). Other families (rotary or
    disentangled positions) and the ``log_probs`` target store every listed layer."""
    from pipeline.cache.compact import TeacherParts

    return attention_target == "scores" and TeacherParts.supports(model)


@dataclass(frozen=True)
class StoredColumn:
    """One teacher-value column of a shard (its int8 scale column aside) and where it comes from.

    ``source`` is ``hidden`` (layer ``layer``'s output ``[B, T, H]``: a row of H values per
    token) or ``scores`` (layer ``layer``'s scores ``[B, heads, T, T]``: a row of T values per
    head and query). ``rows`` says which examples store it: ``all``; ``scores``, the rows of a
    per-row layer that keep their scores (null in the others); ``input``, the rows that keep
    that layer's input instead (:meth:`CompactPlan.row_stores_scores`).
    """

    name: str
    source: str
    layer: int
    rows: str = "all"

    def stored(self, lengths: np.ndarray, hidden_size: int, num_heads: int) -> np.ndarray:
        """Per example of ``lengths`` tokens: whether it stores this column (else null)."""
        if self.rows == "all":
            return np.ones(len(lengths), dtype=bool)
        keeps_scores = scores_are_smaller(np.asarray(lengths), hidden_size, num_heads)
        return keeps_scores if self.rows == "scores" else ~keeps_scores

    def sizes(self, lengths: np.ndarray, hidden_size: int, num_heads: int) -> tuple[np.ndarray, np.ndarray]:
        """Per example: ``(values, int8 scales)`` a stored row of this column holds."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if self.source == "hidden":
            return lengths * hidden_size, lengths
        return num_heads * lengths * lengths, num_heads * lengths


def stored_columns(spec: CacheSpec, plan: CompactPlan) -> list[StoredColumn]:
    """The teacher-value columns a shard stores, in schema order, scale columns excluded."""
    columns = [StoredColumn(hidden_column(l), "hidden", l) for l in plan.stored_hidden]
    for layer in spec.attention_layers:
        source = plan.score_sources.get(layer)
        if source in (None, "row"):
            columns.append(StoredColumn(attention_column(layer), "scores", layer,
                                        "all" if source is None else "scores"))
    for layer, source in sorted(plan.score_sources.items()):
        if source == "row":
            columns.append(StoredColumn(input_column(layer), "hidden", layer - 1, "input"))
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
        fields.append(pa.field(column.name, pa.binary() if spec.dtype == "int8" else pa.list_(value_type)))
        if spec.dtype == "int8":
            fields.append(pa.field(scale_column(column.name), pa.list_(pa.float32())))
    schema = pa.schema(fields)
    if metadata is not None:
        schema = schema.with_metadata({SCHEMA_METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return schema


# --------------------------------------------------------------------------------------------
# The forward pass and the device-side packing (tokenisation: pipeline.common.tokenize)
# --------------------------------------------------------------------------------------------

def _equal_length_runs(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """``(start, stop, length)`` of each run of consecutive rows with the same length (a
    length-sorted batch has one run per distinct length)."""
    cuts = np.flatnonzero(np.diff(lengths)) + 1
    starts, stops = np.r_[0, cuts], np.r_[cuts, len(lengths)]
    return [(int(a), int(b), int(lengths[a])) for a, b in zip(starts, stops)]


class TeacherForward:
    """Runs the teacher on a padded batch and packs, on its device, what the shard stores.

    What a row holds follows the cache's :class:`~pipeline.cache.compact.CompactPlan` (see
    :class:`StoredColumn`). :meth:`run` returns, per column, the batch's stored rows in the
    batch's order as flat pieces, one per run of equal lengths (a length-sorted batch has a
    few): real tokens only, already in storage form (int8 values and float32 scales, or the
    storage float type; bfloat16 as its int16 bits), the bytes Arrow stores. Cutting by runs
    needs no data-dependent shapes, so nothing waits for the device.
    """

    def __init__(self, model, spec: CacheSpec, device, autocast: str = "none",
                 plan: CompactPlan | None = None):
        import torch

        self.model = model.eval().to(device)
        self.spec = spec
        self.plan = plan or spec.plan(True)
        self.device = device
        self.storage_dtype = getattr(torch, STORAGE_DTYPES[spec.dtype][0])
        if autocast not in ("none", "bf16", "fp16"):
            raise InputError(f"autocast must be none, bf16 or fp16, got {autocast!r}")
        self.autocast = autocast
        self.hidden_size = model.config.hidden_size
        self.num_heads = model.config.num_attention_heads
        self.columns = stored_columns(spec, self.plan)
        # Layers the forward must return: stored ones, and the inputs of per-row derived scores.
        self.forward_hidden = sorted({c.layer for c in self.columns if c.source == "hidden"})
        self.forward_attention = sorted({c.layer for c in self.columns if c.source == "scores"})

    def _autocast(self):
        import torch

        if self.autocast == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.autocast == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def run(self, tokens: TokenizedRows, rows: np.ndarray, pad_token_id: int) -> dict:
        """The teacher's outputs for examples ``rows`` of ``tokens``, packed: ``column -> flat
        tensors`` on the device, to be concatenated (int8 storage adds ``<column>_scale``)."""
        import torch

        from pipeline.common.encoder_outputs import forward_internals

        ids, types, mask = tokens.pad(rows, pad_token_id)
        with torch.inference_mode(), self._autocast():
            # From pageable memory a non-blocking copy is staged at once: no wait for the device.
            internals = forward_internals(
                self.model, ids.to(self.device, non_blocking=True), types.to(self.device, non_blocking=True),
                mask.to(self.device, non_blocking=True), hidden_layers=self.forward_hidden,
                attention_layers=self.forward_attention, with_logits=self.spec.with_logits,
                attention_target=self.spec.attention_target)
            return self._pack(internals, tokens.lengths[rows])

    def _pack(self, internals, lengths: np.ndarray) -> dict:
        import torch

        int8 = self.spec.dtype == "int8"
        packed = {}
        if self.spec.with_logits:
            packed["logits"] = [internals.logits.float().reshape(-1)]
        runs = _equal_length_runs(lengths)
        for column in self.columns:
            source = (internals.hidden if column.source == "hidden" else internals.scores)[column.layer]
            stored = column.stored(lengths, self.hidden_size, self.num_heads)
            values, scales = [], []
            for start, stop, length in runs:
                if not stored[start]:   # whether a row stores a column depends on its length only
                    continue
                piece = (source[start:stop, :length] if column.source == "hidden"
                         else source[start:stop, :, :length, :length])
                if int8:   # one scale per token (hidden) or per head and query row (scores)
                    quantised, scale = quantise_rows(piece, piece.shape[-1])
                    values.append(quantised.reshape(-1))
                    scales.append(scale.reshape(-1))
                else:
                    value = piece.to(self.storage_dtype).reshape(-1)
                    # bfloat16 has no numpy type: its bits travel as int16 (stored as uint16).
                    values.append(value.view(torch.int16) if self.spec.dtype == "bfloat16" else value)
            packed[column.name] = values
            if int8:
                packed[scale_column(column.name)] = scales
        return packed


class HostCopy:
    """One batch's packed tensors on their way to the host.

    On CUDA each column's pieces are concatenated on the device and copied, on a side stream
    (``copy_stream``, after the compute stream's work), into a pinned buffer from torch's
    pinned-memory cache; an event marks the copies' end, and the device tensors are kept until
    then (the caching allocator must not hand their memory to the next forward earlier). The
    main thread launches the next forward at once. On the CPU the pieces are host memory
    already: no copy and no event, the same code.
    """

    def __init__(self, packed: dict, copy_stream=None):
        self.event = None
        self._device = None
        self._host = packed
        if copy_stream is None:
            return
        import torch

        gathered = {name: torch.cat(pieces) for name, pieces in packed.items() if pieces}
        copy_stream.wait_stream(torch.cuda.current_stream(copy_stream.device))
        with torch.cuda.stream(copy_stream):
            self._host = {name: [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)]
                          for name, t in gathered.items()}
            self.event = torch.cuda.Event(blocking=True)   # the host thread sleeps, not spins
            self.event.record(copy_stream)
        self._device = gathered

    def arrays(self) -> dict[str, list[np.ndarray]]:
        """Wait for the copies; per column, numpy views of the host pieces (a caller copies what
        it keeps: pinned buffers go back to torch's cache once the views are gone)."""
        if self.event is not None:
            self.event.synchronize()
            self._device = None   # copied: the device memory may be reused
        return {name: [t.numpy() for t in pieces] for name, pieces in self._host.items()}


# --------------------------------------------------------------------------------------------
# Row groups: cut by nominal bytes, rows back in source order
# --------------------------------------------------------------------------------------------

class RowGroupBuffer:
    """Row-wise Parquet writing: accumulates row dicts in order, closes a row group once it
    holds ``row_group_bytes``.

    The cache writer does not use it (it builds whole columns from flat buffers:
    :class:`RowGroupAssembler`); synthetic caches in tests and benchmarks do.
    ``add(row, cost)`` counts ``cost`` bytes for the row (default: its arrays' bytes).
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


def nominal_row_bytes(spec: CacheSpec, length, hidden_size: int, num_heads: int, num_logits: int):
    """The bytes a row of ``length`` tokens takes in the *full fp16* layout (format 1's default);
    ``length`` may be a numpy array of lengths.

    Row groups are the reader's shuffle unit, so their boundaries decide the training order.
    Cutting them by this nominal size, whatever the cache's layout and storage, gives every
    format of the same examples the same row groups, hence the same batches: a format change
    changes the values a student sees, never which examples it sees together. (A compact int8
    row group is therefore several times smaller on disk than ``row_group_bytes``.)
    """
    teacher_values = (len(spec.hidden_layers) * length * hidden_size
                      + len(spec.attention_layers) * num_heads * length * length)
    return 2 * teacher_values + 4 * length + length + (4 * num_logits if spec.with_logits else 0)


def row_group_bounds(costs: np.ndarray, row_group_bytes: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each row group of rows costing ``costs`` bytes, in order: a group
    closes with the row that brings it to ``row_group_bytes``, the last takes the rest.

    Costs depend on lengths alone (:func:`nominal_row_bytes`), so the groups are known before
    any forward pass. (:class:`RowGroupBuffer` applies the same rule row by row.)
    """
    total = np.zeros(len(costs) + 1, dtype=np.int64)
    np.cumsum(costs, out=total[1:])
    bounds, start = [], 0
    while start < len(costs):
        stop = int(np.searchsorted(total, total[start] + row_group_bytes, side="left"))
        stop = min(max(stop, start + 1), len(costs))
        bounds.append((start, stop))
        start = stop
    return bounds


def _bytes_array(flat: np.ndarray, byte_sizes: np.ndarray, stored: np.ndarray | None) -> pa.BinaryArray:
    """Rows of ``byte_sizes`` bytes cut from ``flat`` (zero-copy), null where not ``stored``."""
    offsets = np.zeros(len(byte_sizes) + 1, dtype=np.int32)
    np.cumsum(byte_sizes, out=offsets[1:])
    validity = None if stored is None or stored.all() else pa.py_buffer(np.packbits(stored, bitorder="little"))
    return pa.Array.from_buffers(pa.binary(), len(byte_sizes),
                                 [validity, pa.py_buffer(offsets), pa.py_buffer(flat.reshape(-1).view(np.uint8))])


def _bytes_as(column: pa.Array, field_type: pa.DataType) -> pa.Array:
    """A binary array of row bytes as ``field_type``: itself for ``binary``, else a zero-copy
    ``list<value>`` view (offsets divided by the value width)."""
    if pa.types.is_binary(field_type):
        return column
    width = field_type.value_type.byte_width
    _, offsets, data = column.buffers()
    byte_offsets = np.frombuffer(offsets, dtype=np.int32)[column.offset:column.offset + len(column) + 1]
    values = pa.Array.from_buffers(field_type.value_type, int(byte_offsets[-1]) // width,
                                   [None, data if data is not None else pa.py_buffer(b"")])
    mask = column.is_null() if column.null_count else None
    return pa.ListArray.from_arrays(pa.array(byte_offsets // width, pa.int32()), values, mask=mask)


class RowGroupAssembler:
    """Puts the batches' rows back in source order and cuts the shard's row groups.

    Batches are sorted by length within *windows*: runs of consecutive batches that together
    hold a contiguous range of source rows (:func:`length_sorted_batches`' sort windows). Row
    groups, the windows each one needs, and where every row's bytes go depend on lengths alone,
    so all of it is known before any forward. Each batch's packed host arrays are copied, as
    they arrive, into one buffer per column and window (the window's rows in batch order);
    when a window's last batch is in, the buffer becomes an Arrow ``binary`` array (flat bytes
    + offsets, zero-copy) and a row group is one ``take`` per window it draws from (Arrow
    copies a row of bytes with one memcpy, ~15x faster than it takes a ``list<float16>``
    row), viewed as its schema type. The columns that do not come from the forward (ids,
    labels, tokens) are zero-copy slices of shard-wide arrays. No Python loop over rows.
    """

    def __init__(self, schema: pa.Schema, static: dict[str, pa.Array], columns: list[StoredColumn],
                 lengths: np.ndarray, batches: list[np.ndarray], bounds: list[tuple[int, int]],
                 hidden_size: int, num_heads: int, num_logits: int, storage: str):
        self.schema = schema
        self.static = static
        self.bounds = bounds
        rows = len(lengths)
        # column -> (bytes of each row, which rows are non-null or None for all)
        self.layouts: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        if num_logits:
            self.layouts["logits"] = (np.full(rows, 4 * num_logits, dtype=np.int64), None)
        width = STORAGE_DTYPES[storage][1].bit_width // 8
        for column in columns:
            stored = column.stored(lengths, hidden_size, num_heads)
            values, scales = column.sizes(lengths, hidden_size, num_heads)
            nulls = None if stored.all() else stored
            self.layouts[column.name] = (np.where(stored, values * width, 0), nulls)
            if storage == "int8":
                self.layouts[scale_column(column.name)] = (np.where(stored, scales * 4, 0), nulls)
        # Windows: cut after a batch once the batches since the last cut hold exactly the rows
        # from there on up to some row (a sort window of length_sorted_batches).
        self.window_of_batch = np.zeros(len(batches), dtype=np.int64)
        self.window_of_row = np.zeros(rows, dtype=np.int64)
        self.index_in_window = np.zeros(rows, dtype=np.int64)
        self.window_rows: list[np.ndarray] = []   # a window's rows in batch order
        first, start, high, count = 0, 0, -1, 0
        for index, batch in enumerate(batches):
            self.index_in_window[batch] = count + np.arange(len(batch))
            high, count = max(high, int(batch.max())), count + len(batch)
            if high + 1 - start == count:
                self.window_of_batch[first:index + 1] = len(self.window_rows)
                self.window_of_row[start:high + 1] = len(self.window_rows)
                self.window_rows.append(np.concatenate(batches[first:index + 1]))
                first, start, high, count = index + 1, high + 1, -1, 0
        if count:   # a bug in the batching, never input
            raise ValueError("the batches do not form windows of contiguous rows in source order")
        # Per column: where batch k's bytes start in its window's buffer, and how many they are.
        self.batch_spans: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if batches:
            in_batch_order = np.concatenate(batches)
            batch_starts = np.cumsum([0] + [len(batch) for batch in batches[:-1]])
            first_of_window = np.r_[0, np.flatnonzero(np.diff(self.window_of_batch)) + 1]
            for name, (sizes, _) in self.layouts.items():
                batch_bytes = np.add.reduceat(sizes[in_batch_order], batch_starts)
                before = np.cumsum(batch_bytes) - batch_bytes
                self.batch_spans[name] = (before - before[first_of_window][self.window_of_batch], batch_bytes)
        self.batches_left = np.bincount(self.window_of_batch, minlength=len(self.window_rows)).tolist()
        self.windows_of_group = [(int(self.window_of_row[start]), int(self.window_of_row[stop - 1]))
                                 for start, stop in bounds]
        self.last_group_of_window = {}
        for group, (first_window, last_window) in enumerate(self.windows_of_group):
            for window in range(first_window, last_window + 1):
                self.last_group_of_window[window] = group
        #: Row groups that one window's last batch can complete at once (a queue holding them
        #: lets the forward run on while they are encoded).
        self.most_groups_at_once = int(np.bincount([last for _, last in self.windows_of_group]).max()) \
            if bounds else 0
        self.buffers: dict[int, dict[str, np.ndarray]] = {}   # windows being filled
        self.windows: dict[int, dict[str, pa.BinaryArray]] = {}   # complete windows
        self.next_group = 0

    def add(self, index: int, arrays: dict[str, list[np.ndarray]]) -> Iterator[pa.Table]:
        """Take batch ``index``'s packed arrays (per column, pieces to concatenate; batches
        arrive in order); return the row groups it completes, each assembled as the iterator
        reaches it (ready for ``write_table``)."""
        window = int(self.window_of_batch[index])
        if window not in self.buffers:
            rows = self.window_rows[window]
            self.buffers[window] = {name: np.empty(int(sizes[rows].sum()), dtype=np.uint8)
                                    for name, (sizes, _) in self.layouts.items()}
        for name, buffer in self.buffers[window].items():
            offsets, sizes = self.batch_spans[name]
            pieces = [piece.reshape(-1).view(np.uint8) for piece in arrays.get(name, ())]
            if sum(piece.size for piece in pieces) != sizes[index]:   # a bug in the packing, never input
                raise RuntimeError(f"packed {name} of batch {index} holds {sum(p.size for p in pieces)} "
                                   f"bytes, its rows' lengths say {sizes[index]}")
            position = int(offsets[index])
            for piece in pieces:
                buffer[position:position + piece.size] = piece
                position += piece.size
        self.batches_left[window] -= 1
        if self.batches_left[window]:
            return iter(())
        rows = self.window_rows[window]
        self.windows[window] = {name: _bytes_array(buffer, sizes[rows], None if stored is None else stored[rows])
                                for (name, buffer), (sizes, stored)
                                in zip(self.buffers.pop(window).items(), self.layouts.values())}
        return self._ready_groups()

    def _ready_groups(self) -> Iterator[pa.Table]:
        while self.next_group < len(self.bounds) and self.windows_of_group[self.next_group][1] in self.windows:
            yield self._assemble(self.next_group)
            first_window, last_window = self.windows_of_group[self.next_group]
            for done in range(first_window, last_window + 1):
                if self.last_group_of_window[done] == self.next_group:
                    del self.windows[done]
            self.next_group += 1

    def _assemble(self, group: int) -> pa.Table:
        start, stop = self.bounds[group]
        windows = self.window_of_row[start:stop]
        cuts = np.flatnonzero(np.diff(windows)) + 1   # windows are contiguous: one run each
        runs = list(zip(np.r_[0, cuts], np.r_[cuts, stop - start]))
        columns = []
        for field in self.schema:
            if field.name in self.static:
                columns.append(self.static[field.name].slice(start, stop - start))
                continue
            pieces = [self.windows[int(windows[a])][field.name].take(pa.array(self.index_in_window[start + a:start + b]))
                      for a, b in runs]
            columns.append(_bytes_as(pieces[0] if len(pieces) == 1 else pa.concat_arrays(pieces), field.type))
        return pa.Table.from_arrays(columns, schema=self.schema)


# --------------------------------------------------------------------------------------------
# Background threads
# --------------------------------------------------------------------------------------------

_STOP = object()


class _Worker:
    """A thread that handles queued items in order; a bounded queue makes a fast producer wait.

    The first error stops the handling (later items are drained, so no producer stays blocked)
    and is raised to whoever submits next or leaves the ``with`` block. Leaving it because of
    an error elsewhere abandons the queued items. ``busy`` counts the seconds spent handling,
    ``waited`` the seconds producers were blocked on a full queue.
    """

    def __init__(self, name: str, handle, depth: int):
        import queue
        import threading

        self._queue = queue.Queue(maxsize=depth)
        self._handle = handle
        self._abandon = False
        self.error: BaseException | None = None
        self.busy = self.waited = 0.0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self.error is not None or self._abandon:
                continue
            started = _time()
            try:
                self._handle(item)
            except BaseException as exc:   # re-raised in the producer's thread
                self.error = exc
            self.busy += _time() - started

    def submit(self, item) -> None:
        if self.error is not None:
            raise self.error
        started = _time()
        self._queue.put(item)
        self.waited += _time() - started

    def __enter__(self) -> "_Worker":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self._abandon = kind is not None
        self._queue.put(_STOP)
        self._thread.join()
        if kind is None and self.error is not None:
            raise self.error


#: Batches that may wait between the forward and the host thread: enough to absorb the host's
#: work at a window's end (a window's concatenation and row groups), few enough to keep device
#: and pinned memory small.
BATCHES_IN_FLIGHT = 4


#: Parquet codecs a shard may use (``compression``); zstd is the default (module docstring).
CODECS = ("zstd", "lz4", "snappy", "none")


def compression_name(compression: str, compression_level: int) -> str:
    """How the manifest names a shard's codec (``zstd-3``, ``lz4``...), checking it."""
    if compression not in CODECS:
        raise InputError(f"unknown Parquet compression {compression!r}; choose one of {list(CODECS)}")
    return f"zstd-{compression_level}" if compression == "zstd" else compression


def shard_parquet_writer(out_file, schema: pa.Schema, compression: str, compression_level: int,
                    byte_stream_split: bool) -> pq.ParquetWriter:
    """A ``ParquetWriter`` with a shard's options (``out_file``: a path or a pyarrow sink);
    any change here changes every shard's bytes."""
    return pq.ParquetWriter(
        out_file, schema, compression=compression,
        compression_level=compression_level if compression == "zstd" else None,
        use_dictionary=["id", "orig_id"], write_statistics=["length", "label"],
        # Page CRCs let the reader detect a corrupt data page when it decodes it.
        write_page_checksum=True,
        # Options on list columns name the leaf ("<column>.list.element"), not the column.
        use_byte_stream_split=[f"{f.name}.list.element" for f in schema
                               if f.name.startswith(("hidden_", "attn_")) and pa.types.is_list(f.type)]
        if byte_stream_split else False)


def _example_columns(examples: pa.Table, tokens: TokenizedRows, schema: pa.Schema) -> dict[str, pa.Array]:
    """The columns that do not come from the forward, shard-wide, in source order."""
    columns = {name: examples.column(name).combine_chunks().cast(schema.field(name).type)
               for name in ("id", "orig_id", "aug_index", "label")}
    columns["input_ids"], columns["token_type_ids"] = tokens.to_arrow()
    columns["length"] = pa.array(tokens.lengths.astype(np.int32))
    return columns


def write_cache_shard(examples: pa.Table, model, tokenizer, out_file: Path | str, spec: CacheSpec, *,
                      batch_size: int = 64, device: str = "auto", autocast: str = "none",
                      row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
                      sort_window: int = DEFAULT_SORT_WINDOW, compression: str = "zstd",
                      compression_level: int = 3, byte_stream_split: bool = True,
                      metadata: dict | None = None, source: str = "", progress: bool = False) -> dict:
    """Run the teacher over ``examples`` and write one cache shard to ``out_file``.

    Three threads overlap (module docstring): this one runs the forward passes and packs their
    outputs on the device; a host thread takes each batch's copies and assembles row groups in
    source order; a Parquet thread encodes and compresses them.

    Returns statistics: rows, row groups, real tokens, bytes, seconds, and ``writer_figures``
    (examples/s and where the time went, run history). ``out_file`` should live inside a
    stage's partial directory: on any failure (including a full disk) the exception propagates
    with the file named, the file is removed, and the stage contract removes the partial output.
    """
    import torch

    out_file = Path(out_file)
    compression_name(compression, compression_level)
    device_ = resolve_device(device)
    plan = spec.plan(can_derive_scores(model, spec.attention_target))
    forward = TeacherForward(model, spec, device_, autocast, plan)
    began = _time()
    tokens = TokenizedRows.from_lists(*tokenize_examples(tokenizer, examples, spec.max_seq_length, source))
    lengths = tokens.lengths
    schema = cache_schema(spec, examples.schema.field("label").type, metadata, plan)
    if spec.with_logits and model.config.num_labels:
        _check_labels(examples.column("label"), model.config.num_labels, source)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    num_logits = model.config.num_labels if spec.with_logits else 0
    batches = [np.asarray(b, dtype=np.int64) for b in length_sorted_batches(lengths.tolist(), batch_size, sort_window)]
    costs = nominal_row_bytes(spec, lengths, forward.hidden_size, forward.num_heads, num_logits)
    assembler = RowGroupAssembler(schema, _example_columns(examples, tokens, schema), forward.columns, lengths,
                                  batches, row_group_bounds(costs, row_group_bytes), forward.hidden_size,
                                  forward.num_heads, num_logits, spec.dtype)
    copy_stream = torch.cuda.Stream(device_) if device_.type == "cuda" else None
    tokenize_seconds = _time() - began
    started = _time()
    forward_seconds = 0.0
    try:
        writer = shard_parquet_writer(out_file, schema, compression, compression_level, byte_stream_split)
        try:
            # Room for every row group one window completes: the forward runs on while they are encoded.
            with _Worker(f"parquet {out_file.name}", lambda table: writer.write_table(table, table.num_rows),
                         assembler.most_groups_at_once + 1) as parquet:
                def to_row_groups(item) -> None:
                    index, copy = item
                    for table in assembler.add(index, copy.arrays()):
                        parquet.submit(table)

                with _Worker(f"host {out_file.name}", to_row_groups, BATCHES_IN_FLIGHT) as host:
                    iterator = batches
                    if progress:
                        from tqdm import tqdm
                        iterator = tqdm(batches, desc=out_file.name, unit="batch")
                    for index, rows in enumerate(iterator):
                        launched = _time()
                        copy = HostCopy(forward.run(tokens, rows, pad_id), copy_stream)
                        forward_seconds += _time() - launched
                        host.submit((index, copy))
            writer.close()
        except BaseException as exc:
            exc.add_note(f"while writing teacher-cache shard {out_file}")
            with contextlib.suppress(Exception):
                writer.close()   # releases the file; it is removed below, never left looking complete
            out_file.unlink(missing_ok=True)
            raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise OSError(exc.errno, f"writing teacher-cache shard {out_file} failed: "
                                     f"{exc.strerror or exc} (disk full?); nothing was published") from exc
        raise
    seconds = _time() - started
    return {"rows": len(lengths), "row_groups": len(assembler.bounds), "tokens": int(lengths.sum()),
            "bytes": out_file.stat().st_size, "seconds": round(seconds, 3),
            "writer_figures": {
                "examples_per_s": round(len(lengths) / seconds, 1) if seconds > 0 else None,
                # this thread: forward and packing (on CUDA: launching them), and waiting for the
                # host thread; the host thread's work; the Parquet thread's (tokenising before all)
                "seconds": {"tokenize": round(tokenize_seconds, 3), "total": round(seconds, 3),
                            "forward": round(forward_seconds, 3), "forward_waited": round(host.waited, 3),
                            "transfer_encode": round(host.busy - parquet.waited, 3),
                            "parquet_write": round(parquet.busy, 3)}}}


def _time() -> float:
    import time

    return time.perf_counter()


def _check_labels(labels: pa.ChunkedArray, num_labels: int, source: str) -> None:
    """Integer labels must index the teacher's head: one error naming the first bad row."""
    if not pa.types.is_integer(labels.type):
        return
    import pyarrow.compute as pc

    bad = pc.or_(pc.less(labels, 0), pc.greater_equal(labels, num_labels)).fill_null(False)
    rows = np.flatnonzero(bad.to_numpy(zero_copy_only=False))
    if rows.size:
        row = int(rows[0])
        raise InputError(f"label {labels[row].as_py()} does not fit the teacher's {num_labels}-class head",
                         source or None, row)
