"""Packed batches: the rows of a training batch as the cache stores them, expanded on the device.

A teacher-cache row is ragged: ``L`` token ids, ``L·H`` hidden values per stored layer,
``heads·L²`` scores per stored attention layer, in the cache's storage (fp16, bf16 bits, fp32,
or int8 with one float32 scale per token / per head and query row). The trainer wants the
padded fp32 ``Batch`` of docs/DESIGN.md. Building that on the host, row by row, was the
reader's whole cost (issue 27: 0.02-0.07x of pyarrow's own decode of the same columns, and up
to ~400 MB of fp32 per batch of 256 copied to the GPU). So the work is split in two:

**Host side: gather, never pad.** A shuffle window's row groups are decoded by pyarrow and each
column concatenated once into one flat numpy buffer (:class:`RowBlock`; a row is then a
``(start, size)`` pair into it). A batch is *gathered* from that buffer with no padding, no
dequantising and no widening: the bytes of its rows as stored. Its rows come sorted by length
(the reader sorts each bucket of batches by length), so they fall into a few *runs*:
consecutive rows of one length (and, in a compact cache's per-row columns, all present). The
rows of a run have slices of one size, so a run is one numpy fancy index over a sliding-window
view of the buffer (``view[starts]``), which copies whole slices at memcpy speed into one
``[rows, values]`` array: the run's *piece*. The Python work is per (column, run), a handful per
batch, never per row. The result is a :class:`PackedBatch`: about 41 KB per example at
BERT-base width in int8 (``scripts/bench_loader.py``), against ~1.5 MB padded fp32.

**Device side: one function expands.** :func:`expand` takes a packed batch to a device and
builds the Batch there with vectorised torch: per (column, run), one strided copy of the piece
into the zero-padded output (fp16/bf16 widen to fp32 in that copy; int8 is multiplied by its scales in
the same kernel, ``torch.mul(..., out=...)``). The values are those of the old host collation,
bit for bit (fp16/bf16/fp32: an exact widening; int8: the same fp32 product). On the CPU the
very same function runs on the CPU. What cannot be known without a sync is computed on the
host: the batch width, the runs, and which rows of a compact cache derive their scores (given
to :func:`pipeline.cache.compact.complete_batch` as an index, not a mask to ``nonzero``).

**Transfer.** :meth:`PackedBatch.into_arena` copies a batch's pieces into one contiguous byte
buffer (8-byte aligned regions), taken from an :class:`ArenaPool` of reused pinned buffers on
CUDA: one non-blocking host-to-device copy per batch, and the buffer goes back to the pool
behind a CUDA event, so it is never overwritten while a copy from it is in flight. A batch
larger than every free buffer gets a new, larger one (never a partial write).

**Threads, not worker processes, by default.** Decoding is pyarrow (zstd, Parquet decoding)
and numpy gathers, which release the GIL, so a reader thread in the training process overlaps
the step without copying anything twice. DataLoader worker processes must send every batch
through shared memory (:meth:`PackedBatch.into_arena` into a fresh shared tensor, then the
loader's pin thread copies it again into pinned memory): two more copies of each batch, and a
process per worker. ``scripts/bench_loader.py`` measures both on the same cache; workers stay
available (``num_workers``) for machines where decoding outgrows one thread.
"""
from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pipeline.cache.compact import DERIVE_KEY, CompactPlan, attention_column, hidden_column, scale_column
from pipeline.errors import InputError

#: Bytes each region of an arena is aligned to (the widest element: int64 / float64).
ALIGN = 8
#: Numpy dtype of each storage's values (bf16 raw bits as uint16; int8 rows are bytes).
STORAGE_NUMPY = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32, "int8": np.int8}


def column_kind(column: str) -> str:
    """``tokens`` (L values a row), ``hidden`` (L·H), ``scores`` (heads·L²), ``logits`` (C)."""
    if column in ("input_ids", "token_type_ids"):
        return "tokens"
    if column == "logits":
        return "logits"
    if column.endswith("_scale"):
        return "hidden_scale" if column_kind(column[:-len("_scale")]) == "hidden" else "scores_scale"
    if column.startswith(("hidden_", "attn_input_")):
        return "hidden"
    if column.startswith("attn_"):
        return "scores"
    raise ValueError(f"not a cache column with per-row values: {column}")


@dataclass
class BatchLayout:
    """What every batch of one reader holds and how to expand it (shared by its batches)."""

    dtype: str                     # storage of the teacher columns
    hidden_size: int
    num_heads: int
    pad_token_id: int
    with_logits: bool
    hidden_layers: list[int]       # the layers the trainer asked for
    attention_layers: list[int]
    plan: CompactPlan
    columns: list[str]             # every column read (base, logits, teacher, scales)

    @property
    def ragged_columns(self) -> list[str]:
        """The columns with values per row (everything but id, label and length)."""
        return [c for c in self.columns if c not in ("id", "label", "length")]

    def values_per_row(self, column: str, lengths: np.ndarray, num_logits: int = 0) -> np.ndarray:
        """How many values ``column`` holds for rows of these lengths (present rows)."""
        kind = column_kind(column)
        lengths = lengths.astype(np.int64)
        return {"tokens": lengths, "hidden": lengths * self.hidden_size,
                "scores": self.num_heads * lengths * lengths, "hidden_scale": lengths,
                "scores_scale": self.num_heads * lengths,
                "logits": np.full_like(lengths, num_logits)}[kind]

    def numpy_dtype(self, column: str):
        if column == "input_ids":
            return np.int32
        if column == "token_type_ids":
            return np.int8
        if column == "logits" or column.endswith("_scale"):
            return np.float32
        return STORAGE_NUMPY[self.dtype]


# --------------------------------------------------------------------------------------------
# Host side: rows of a window, concatenated per column
# --------------------------------------------------------------------------------------------

#: Threads copying columns side by side (numpy releases the GIL in its copies); at most this
#: many, one per core. On two cores 4 threads made the host side of a batch of 256 1.25x
#: faster (scripts/bench_loader.py) and a batch of 32 slower: below :data:`THREADED_BYTES`
#: of copying a batch's columns are copied in the calling thread.
COPY_THREADS = 4
THREADED_BYTES = 4 << 20
_copiers: dict[int, Any] = {}


def each_column(function: Callable, names: list[str], nbytes: int) -> list:
    """``[function(name) for name in names]``, the columns copied on this process's threads
    when there are ``nbytes`` or more to copy.

    The pool belongs to the process that made it (a forked DataLoader worker makes its own:
    an inherited pool has no threads behind it)."""
    threads = min(COPY_THREADS, os.cpu_count() or 1)
    if threads < 2 or len(names) < 2 or nbytes < THREADED_BYTES:
        return [function(name) for name in names]
    pool = _copiers.get(os.getpid())
    if pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _copiers.clear()
        pool = _copiers[os.getpid()] = ThreadPoolExecutor(threads, thread_name_prefix="tinykd-copy")
    return list(pool.map(function, names))

@dataclass
class Ragged:
    """One column of a :class:`RowBlock`: every row's values in one flat buffer."""

    values: np.ndarray                   # flat, in the column's numpy dtype
    starts: np.ndarray                   # int64 [rows]: where each row's values begin
    sizes: np.ndarray                    # int64 [rows]: values of each row (0 where null)
    present: np.ndarray | None = None    # bool [rows]; None: no row is null


def _ragged_from_arrow(array, dtype) -> Ragged:
    """A list or binary Arrow array as a :class:`Ragged` (zero-copy views of its buffers)."""
    import pyarrow as pa

    if pa.types.is_binary(array.type):   # int8 storage: a row's values as bytes
        offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset:array.offset + len(array) + 1]
        data = array.buffers()[2]
        values = np.frombuffer(data, dtype=np.int8) if data is not None else np.zeros(0, np.int8)
    else:
        offsets = array.offsets.to_numpy()
        values = array.values.to_numpy(zero_copy_only=True)
        if values.dtype != np.dtype(dtype):   # bf16 bits: stored as uint16, same width
            values = values.view(dtype)
    offsets = offsets.astype(np.int64)
    present = array.is_valid().to_numpy(zero_copy_only=False) if array.null_count else None
    return Ragged(values, offsets[:-1], np.diff(offsets), present)


def runs_of(lengths: np.ndarray, present: np.ndarray | None = None) -> list[tuple[int, int, int]]:
    """``(first row, end row, length)`` of each run of consecutive (present) rows of one length."""
    positions = np.arange(len(lengths)) if present is None else np.flatnonzero(present)
    if not len(positions):
        return []
    run_lengths = lengths[positions]
    breaks = np.flatnonzero((np.diff(positions) != 1) | (np.diff(run_lengths) != 0)) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(positions)]])
    return [(int(positions[a]), int(positions[b - 1]) + 1, int(run_lengths[a])) for a, b in zip(starts, ends)]


@dataclass
class RowBlock:
    """Rows to gather batches from: ids, labels, lengths, and every ragged column concatenated.

    A window of the reader is one block (the previous window's carry and its row groups, in
    that order); :func:`gather_batch` cuts a batch out of it.
    """

    lengths: np.ndarray                          # int64 [rows]
    ids: np.ndarray                              # object [rows] (str)
    labels: np.ndarray                           # [rows] int64 or float64
    label_valid: np.ndarray                      # bool [rows]
    label_kind: str                              # "int", "float" or "none"
    columns: dict[str, Ragged] = field(default_factory=dict)
    num_logits: int = 0
    _views: dict = field(default_factory=dict, repr=False)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @classmethod
    def from_table(cls, table, layout: BatchLayout, rows: np.ndarray | None, where: str) -> "RowBlock":
        """The block of one row group's ``table`` (``rows``: the row numbers to keep, None =
        all), checked: every present row must hold the values its length implies, and an int8
        column's scales must be present exactly where its values are."""
        import pyarrow as pa

        def whole(name):
            column = table.column(name)
            return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)

        keep = np.arange(table.num_rows) if rows is None else np.asarray(rows, dtype=np.int64)
        lengths = whole("length").to_numpy(zero_copy_only=False).astype(np.int64)
        label = whole("label")
        if pa.types.is_null(label.type):
            kind, labels, valid = "none", np.zeros(table.num_rows), np.zeros(table.num_rows, bool)
        else:
            kind = "int" if pa.types.is_integer(label.type) else "float"
            valid = label.is_valid().to_numpy(zero_copy_only=False)
            labels = (label.fill_null(0) if label.null_count else label).to_numpy(zero_copy_only=False)
            labels = labels.astype(np.int64 if kind == "int" else np.float64)
        block = cls(lengths[keep], whole("id").to_numpy(zero_copy_only=False)[keep], labels[keep],
                    valid[keep], kind)
        everything = np.ones(len(lengths), bool)
        for name in layout.ragged_columns:
            ragged = _ragged_from_arrow(whole(name), layout.numpy_dtype(name))
            if name == "logits":
                block.num_logits = int(ragged.sizes[0]) if len(ragged.sizes) else 0
            expected = layout.values_per_row(name, lengths, block.num_logits)
            present = ragged.present if ragged.present is not None else everything
            bad = np.flatnonzero(present & (ragged.sizes != expected))
            if len(bad):
                raise InputError(f"column {name}: row {int(bad[0])} holds {int(ragged.sizes[bad[0]])} "
                                 f"values, its length {int(lengths[bad[0]])} implies {int(expected[bad[0]])} "
                                 f"({len(bad)} such row(s)): the shard does not match its manifest", where)
            if name.endswith("_scale"):
                values = block.columns[name[:-len("_scale")]].present
                mismatch = np.flatnonzero((values if values is not None else everything[keep]) != present[keep])
                if len(mismatch):
                    raise InputError(f"column {name}: row {int(keep[mismatch[0]])} has scales where its "
                                     "values are null or none where they are present", where)
            block.columns[name] = Ragged(ragged.values, ragged.starts[keep], ragged.sizes[keep],
                                         None if ragged.present is None else ragged.present[keep])
        return block

    @classmethod
    def concat(cls, blocks: list["RowBlock"]) -> "RowBlock":
        """The blocks' rows one after the other (one copy of each column's values)."""
        blocks = [b for b in blocks if b.rows]
        if len(blocks) == 1:
            return blocks[0]
        kinds = {b.label_kind for b in blocks}
        kind = "float" if "float" in kinds else "int" if "int" in kinds else "none"
        out = cls(np.concatenate([b.lengths for b in blocks]), np.concatenate([b.ids for b in blocks]),
                  np.concatenate([b.labels.astype(np.float64 if kind == "float" else np.int64)
                                  for b in blocks]),
                  np.concatenate([b.label_valid for b in blocks]), kind,
                  num_logits=max(b.num_logits for b in blocks))

        def joined(name: str) -> Ragged:
            parts = [b.columns[name] for b in blocks]
            bases = np.cumsum([0] + [len(p.values) for p in parts[:-1]])
            any_null = any(p.present is not None for p in parts)
            return Ragged(np.concatenate([p.values for p in parts]),
                          np.concatenate([p.starts + base for p, base in zip(parts, bases)]),
                          np.concatenate([p.sizes for p in parts]),
                          np.concatenate([p.present if p.present is not None else np.ones(len(p.sizes), bool)
                                          for p in parts]) if any_null else None)

        names = list(blocks[0].columns)
        nbytes = sum(b.columns[name].values.nbytes for b in blocks for name in names)
        out.columns = dict(zip(names, each_column(joined, names, nbytes)))
        return out

    def present(self, name: str, rows: np.ndarray) -> np.ndarray | None:
        """Which of ``rows`` hold values in column ``name`` (None: all of them)."""
        present = self.columns[name].present
        return None if present is None else present[rows]

    def pieces(self, name: str, rows: np.ndarray, runs: list[tuple[int, int, int]]) -> list[np.ndarray]:
        """Column ``name``'s values of each run of ``rows`` (positions into ``rows``): one
        ``[run rows, values per row]`` array per run, a single fancy index each."""
        column = self.columns[name]
        out = []
        for first, end, _ in runs:
            chosen = rows[first:end]
            size = int(column.sizes[chosen[0]])
            out.append(self._windows(name, size)[column.starts[chosen]] if size
                       else np.zeros((end - first, 0), column.values.dtype))
        return out

    def _windows(self, name: str, size: int) -> np.ndarray:
        """Column ``name``'s buffer seen as every slice of ``size`` values (a view, kept per
        size: a block serves a window's batches, which reuse a few lengths)."""
        key = (name, size)
        if key not in self._views:
            self._views[key] = sliding_window_view(self.columns[name].values, size)
        return self._views[key]


def take_rows(block: RowBlock, rows: np.ndarray) -> tuple[RowBlock, np.ndarray]:
    """A block of ``rows`` of ``block`` (the carry of a window: fewer than a batch) and where
    each of them went in it.

    The rows are gathered in stable length order, so that each length is one run and the cost
    does not grow with the number of rows; ``position[i]`` is where ``rows[i]`` is.
    """
    order = np.argsort(block.lengths[rows], kind="stable")
    chosen = rows[order]
    lengths = block.lengths[chosen]
    out = RowBlock(lengths, block.ids[chosen], block.labels[chosen], block.label_valid[chosen],
                   block.label_kind, num_logits=block.num_logits)
    for name, column in block.columns.items():
        present = block.present(name, chosen)
        pieces = block.pieces(name, chosen, runs_of(lengths, present))
        sizes = column.sizes[chosen] if present is None else np.where(present, column.sizes[chosen], 0)
        values = np.concatenate([p.reshape(-1) for p in pieces]) if pieces else np.zeros(0, column.values.dtype)
        out.columns[name] = Ragged(values, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64),
                                   sizes, present)
    position = np.empty(len(rows), dtype=np.int64)
    position[order] = np.arange(len(rows))
    return out, position


# --------------------------------------------------------------------------------------------
# The packed batch
# --------------------------------------------------------------------------------------------

@dataclass
class PackedBatch:
    """One batch's rows as stored, unpadded: host arrays, or views of one arena buffer.

    ``arrays``: per ragged column, one piece per run (``runs[column]``: the runs of its present
    rows, planned on the host), plus single arrays ``lengths`` (int64), ``labels`` and, per
    column with null rows in this batch, ``present/<column>`` (uint8) and ``derive/<column>``
    (int64: the rows with no value there, whose scores the trainer recomputes).
    ``rank_rows``/``batch_rows``: see the reader (rank slicing).
    """

    layout: BatchLayout
    width: int
    lengths_host: np.ndarray
    ids: list
    label_kind: str                       # "int", "float" or "none" (labels None)
    runs: dict[str, list[tuple[int, int, int]]]
    present_host: dict[str, np.ndarray]
    arrays: dict[str, list]
    rank_rows: int | None = None
    batch_rows: int | None = None
    arena: Any = None                     # torch uint8 tensor holding every array, or None
    regions: dict[str, list[tuple[int, int, str]]] | None = None   # name -> (offset, bytes, dtype) each
    _release: Callable | None = None
    _moved: tuple | None = None           # (device, arrays there, the device buffer)
    _device_data: Any = None

    @property
    def rows(self) -> int:
        return len(self.lengths_host)

    @property
    def nbytes(self) -> int:
        """Bytes of the batch as packed (what one host-to-device copy moves)."""
        if self.arena is not None:
            return max((o + n for pieces in self.regions.values() for o, n, _ in pieces), default=0)
        return sum(_aligned(a.nbytes) for pieces in self.arrays.values() for a in pieces)

    def into_arena(self, pool: "ArenaPool | None" = None) -> "PackedBatch":
        """Copy every piece into one byte buffer (from ``pool``, else a new tensor) so that a
        single copy moves the batch; ``arrays`` become typed views of it."""
        import torch

        if self.arena is not None:
            return self
        regions, offset = {}, 0
        for name, pieces in self.arrays.items():
            regions[name] = []
            for piece in pieces:
                regions[name].append((offset, piece.nbytes, piece.dtype.str))
                offset += _aligned(piece.nbytes)
        if pool is not None:
            arena, release = pool.acquire(offset)
        else:
            arena, release = torch.empty(max(offset, 1), dtype=torch.uint8), None
        target = arena.numpy()
        for name, pieces in self.arrays.items():
            for (start, size, _), piece in zip(regions[name], pieces):
                target[start:start + size] = np.ascontiguousarray(piece).reshape(-1).view(np.uint8)
        self.arrays = {}
        self.arena, self.regions, self._release = arena, regions, release
        return self

    def pin_memory(self) -> "PackedBatch":
        """The DataLoader's pin thread calls this: the arena in page-locked memory."""
        self.into_arena()
        self.arena = self.arena.pin_memory()
        return self

    def __getstate__(self):   # a pool's release hook and device copies do not cross processes
        state = dict(self.__dict__)
        state.update(_release=None, _moved=None, _device_data=None)
        return state

    def move_to(self, device) -> None:
        """Start the copy to ``device`` now (on the current CUDA stream); :func:`expand` on that
        device then uses it instead of copying again."""
        import torch

        device = torch.device(device)
        self._moved = (device, self.device_arrays(device), self._device_data)

    def record_stream(self, stream) -> None:
        """The device buffer is used on ``stream`` too (it was copied on another one): the
        caching allocator must not reuse it before ``stream`` is done with it."""
        if self._moved is not None and self._moved[2] is not None and self._moved[2].is_cuda:
            self._moved[2].record_stream(stream)

    def device_arrays(self, device) -> dict[str, list]:
        """Every piece as a flat torch tensor on ``device``: one non-blocking copy of the arena
        off the CPU (after which the arena returns to its pool behind an event), views on it."""
        import torch

        device = torch.device(device)
        if self._moved is not None and self._moved[0] == device:
            return self._moved[1]
        if self.arena is None:
            if device.type == "cpu":
                return {name: [_as_tensor(np.ascontiguousarray(p).reshape(-1)) for p in pieces]
                        for name, pieces in self.arrays.items()}
            self.into_arena()
        data = self.arena
        if device.type != "cpu":
            data = self.arena[:max(self.nbytes, 1)].to(device, non_blocking=True)
            if self._release is not None:
                event = torch.cuda.Event()
                event.record()
                self._release(event)
                self._release = None
        self._device_data = data
        return {name: [_tensor_view(data[start:start + size], dtype) for start, size, dtype in pieces]
                for name, pieces in self.regions.items()}

    def release(self) -> None:
        """Give the arena back to its pool (a batch dropped without being expanded)."""
        if self._release is not None:
            self._release(None)
            self._release = None


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


def _as_tensor(array: np.ndarray):
    """A numpy array as a torch tensor without a copy (bf16 bits: uint16 viewed as bfloat16)."""
    import torch

    if array.dtype == np.uint16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _tensor_view(data, dtype: str):
    """A byte tensor as a typed tensor (bf16 bits are stored as uint16: viewed as bfloat16)."""
    return data.view(_torch_dtype(dtype))


@functools.lru_cache(maxsize=None)
def _torch_dtype(dtype: str):
    import torch

    if np.dtype(dtype) == np.uint16:
        return torch.bfloat16
    return torch.from_numpy(np.zeros(0, dtype)).dtype


class ArenaPool:
    """Reused byte buffers for packed batches (page-locked with ``pin=True``).

    :meth:`acquire` returns a free buffer of at least the size asked for (waiting for the CUDA
    event of the copy last made from it) or, when none is free or large enough, a new one: a
    batch larger than every buffer grows the pool, it never writes past a buffer. The release
    hook it returns puts the buffer back, with the event of the copy that reads it.
    """

    def __init__(self, pin: bool = False, keep: int = 8):
        self.pin = pin
        self.keep = keep
        self._free: list[tuple[Any, Any]] = []   # (buffer, event or None)
        self._lock = threading.Lock()
        self.allocated = 0                        # buffers made (for tests and figures)

    def acquire(self, size: int):
        import torch

        size = max(size, 1)
        with self._lock:
            fits = [i for i, (buffer, _) in enumerate(self._free) if buffer.numel() >= size]
            found = self._free.pop(fits[0]) if fits else None
        if found is None:
            # Room for growth: the next batches of a length-bucketed epoch are often a little longer.
            buffer = torch.empty(size + size // 4, dtype=torch.uint8, pin_memory=self.pin)
            self.allocated += 1
        else:
            buffer, event = found
            if event is not None:
                event.synchronize()   # the last copy out of this buffer has finished
        return buffer, lambda event, buffer=buffer: self._give_back(buffer, event)

    def _give_back(self, buffer, event) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append((buffer, event))


# --------------------------------------------------------------------------------------------
# Gathering a batch (host) and expanding it (device)
# --------------------------------------------------------------------------------------------

def gather_batch(block: RowBlock, rows: np.ndarray, layout: BatchLayout, width: int | None = None) -> PackedBatch:
    """The packed batch of ``rows`` of ``block`` (in that order), to be padded to ``width``
    (default: the longest of them)."""
    lengths = block.lengths[rows]
    arrays: dict[str, list] = {"lengths": [lengths.astype(np.int64)]}
    label_kind = block.label_kind if bool(block.label_valid[rows].all()) else "none"
    if label_kind != "none":
        arrays["labels"] = [block.labels[rows].astype(np.int64 if label_kind == "int" else np.float32)]
    every_row = runs_of(lengths)
    runs, present_host = {}, {}
    for name in layout.ragged_columns:
        if name.endswith("_scale"):    # planned with its values (present exactly where they are)
            runs[name] = runs[name[:-len("_scale")]]
        else:
            present = block.present(name, rows)
            if present is None or present.all():
                runs[name] = every_row
            else:
                runs[name] = runs_of(lengths, present)
                present_host[name] = present
                arrays[f"present/{name}"] = [present.astype(np.uint8)]
                arrays[f"derive/{name}"] = [np.flatnonzero(~present).astype(np.int64)]
    names = layout.ragged_columns
    nbytes = sum(int(block.columns[name].sizes[rows].sum()) * block.columns[name].values.itemsize
                 for name in names)
    arrays.update(zip(names, each_column(lambda name: block.pieces(name, rows, runs[name]), names, nbytes)))
    return PackedBatch(layout, int(lengths.max()) if width is None else int(width), lengths,
                       block.ids[rows].tolist(), label_kind, runs, present_host, arrays)


def expand(packed: PackedBatch, device=None) -> dict[str, Any]:
    """The Batch of docs/DESIGN.md from a packed batch, built on ``device`` (default: CPU).

    Equal to the old host collation: zero padding, fp32 teacher tensors (widened or
    dequantised here), ids/labels/masks, and under :data:`~pipeline.cache.compact.DERIVE_KEY`
    what a compact cache leaves to :func:`~pipeline.cache.compact.complete_batch`.
    """
    import torch

    device = torch.device(device or "cpu")
    layout = packed.layout
    arrays = packed.device_arrays(device)
    batch, width = packed.rows, packed.width
    int8 = layout.dtype == "int8"

    def padded_tokens(name: str, fill: int):
        out = torch.full((batch, width), fill, dtype=torch.long, device=device)
        _scatter(out, arrays[name], None, packed.runs[name])
        return out

    out: dict[str, Any] = {"ids": packed.ids}
    out["input_ids"] = padded_tokens("input_ids", layout.pad_token_id)
    out["token_type_ids"] = padded_tokens("token_type_ids", 0)
    out["attention_mask"] = (torch.arange(width, device=device)[None, :]
                             < arrays["lengths"][0][:, None]).to(torch.long)
    out["labels"] = None if packed.label_kind == "none" else arrays["labels"][0].clone()
    out["teacher_logits"] = (torch.cat([p.view(-1) for p in arrays["logits"]]).view(batch, -1)
                             if layout.with_logits else None)
    padded: dict[str, Any] = {}

    def teacher(column: str, shape: tuple):
        if column not in padded:   # a column serving two purposes is expanded once
            value = torch.zeros(shape, dtype=torch.float32, device=device)
            _scatter(value, arrays[column], arrays[scale_column(column)] if int8 else None, packed.runs[column])
            padded[column] = value
        return padded[column]

    def hidden_like(column: str):
        return teacher(column, (batch, width, layout.hidden_size))

    plan = layout.plan
    hidden = {layer: hidden_like(hidden_column(layer)) for layer in layout.hidden_layers
              if layer in plan.stored_hidden}
    scores, derive_inputs, derive_rows, derive_index = {}, {}, {}, {}
    for layer in layout.attention_layers:
        source = plan.score_sources.get(layer)
        column = attention_column(layer)
        if source in (None, "row"):
            scores[layer] = teacher(column, (batch, layout.num_heads, width, width))
            if source == "row" and column in packed.present_host:   # some rows derive instead
                derive_inputs[layer] = hidden_like(plan.input_of(layer))
                derive_rows[layer] = arrays[f"present/{column}"][0] == 0
                derive_index[layer] = arrays[f"derive/{column}"][0]
        elif source == "embeddings":
            derive_inputs[layer] = "embeddings"
        else:   # "hidden": the input is a stored hidden layer
            derive_inputs[layer] = hidden_like(plan.input_of(layer))
    out["teacher_hidden"] = hidden
    out["teacher_scores"] = scores
    layer0 = 0 in layout.hidden_layers and 0 not in plan.stored_hidden
    if layer0 or derive_inputs:
        out[DERIVE_KEY] = {"layer0": layer0, "inputs": derive_inputs, "rows": derive_rows,
                           "index": derive_index}
    if packed.rank_rows is not None:
        out.update(rank_rows=packed.rank_rows, batch_rows=packed.batch_rows)
    return out


def _scatter(target, pieces: list, scales: list | None, runs: list[tuple[int, int, int]]) -> None:
    """Copy each run's piece into the target's real positions: rows ``first:end``, their first
    ``length`` tokens (and for scores [B, heads, T, T] the first ``length`` keys), widened to
    the target's dtype, or multiplied by its scales (int8: one fp32 product written in place)."""
    import torch

    for index, (first, end, length) in enumerate(runs):
        rows = end - first
        if target.dim() == 4:          # scores: [rows, heads, L, L], a scale per (head, query)
            region = target[first:end, :, :length, :length]
            shape, scale_shape = (rows, target.shape[1], length, length), (rows, target.shape[1], length, 1)
        else:                          # tokens [rows, L]; hidden [rows, L, H], a scale per token
            region = target[first:end, :length]
            shape, scale_shape = region.shape, (rows, length, 1)
        piece = pieces[index].view(shape)
        if scales is None:
            region.copy_(piece)
        else:
            torch.mul(piece, scales[index].view(scale_shape), out=region)
