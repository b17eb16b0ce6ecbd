"""The teacher-cache reader's collation as it was before the packed path (issue 27): the oracle.

The reader now ships each batch's rows as stored (:mod:`pipeline.cache.packed`) and pads and
dequantises them on the training device. Its batches must equal what the old host-side
collation built, row by row: bit for bit for fp16, bf16 and fp32 caches, within one int8 step
for int8 ones, in the same order. Nothing else can serve as that oracle (a live teacher differs
by storage precision and batch composition), so the old code is kept here, in the tests only:
the plan of an epoch (windows, shuffle, length buckets, carry) and the per-row padding copy,
as they were at commit 54db3fd, reading through the new reader's opened shards.
``scripts/bench_loader.py`` also times it, as the "before" of the benchmark.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from pipeline.cache.compact import DERIVE_KEY, attention_column, hidden_column, scale_column


class _Loaded:
    """One table's columns as numpy (offsets and values per list/binary column)."""

    def __init__(self, table: pa.Table):
        self.table = table
        self.ids = table.column("id").to_pylist()
        self.labels = table.column("label").to_pylist()
        self.length = table.column("length").to_numpy()
        self.offsets: dict[str, np.ndarray] = {}
        self.values: dict[str, np.ndarray] = {}
        self.valid: dict[str, np.ndarray] = {}
        for name in table.column_names:
            column = table.column(name)
            array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
            if pa.types.is_list(column.type):
                self.offsets[name] = array.offsets.to_numpy()
                self.values[name] = array.values.to_numpy(zero_copy_only=True)
            elif pa.types.is_binary(column.type):
                offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)
                self.offsets[name] = offsets[array.offset:array.offset + len(array) + 1]
                self.values[name] = np.frombuffer(array.buffers()[2], dtype=np.int8)
            else:
                continue
            if array.null_count:
                self.valid[name] = array.is_valid().to_numpy(zero_copy_only=False)

    def row(self, column: str, row: int) -> np.ndarray:
        offsets = self.offsets[column]
        return self.values[column][offsets[row]:offsets[row + 1]]

    def present(self, column: str, row: int) -> bool:
        valid = self.valid.get(column)
        return True if valid is None else bool(valid[row])


def rank_block(rows: np.ndarray, rank: int, size: int) -> tuple[np.ndarray, int]:
    base, extra = divmod(len(rows), size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    if stop == start:
        return rows[:1], 0
    return rows[start:stop], stop - start


def _take(table: _Loaded, row: int, columns: Sequence[str]) -> pa.Table:
    return table.table.slice(row, 1).select(["id", "label", "length",
                                             *[c for c in columns if c in table.values]])


def reference_batches(reader, batch_size: int, seed: int = 0, epoch: int = 0, start_batch: int = 0,
                      shuffle: bool = True, drop_last: bool = False, shuffle_buffer: int = 4096,
                      bucket_batches: int = 32, worker: tuple[int, int] = (0, 1),
                      rank: tuple[int, int] | None = None) -> Iterator[dict[str, Any]]:
    """The batches the reader yielded before issue 27 (the body of the old ``batches``)."""
    worker_id, num_workers = worker
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(reader.row_groups)) if shuffle else np.arange(len(reader.row_groups))
    windows: list[list] = [[]]
    rows_in_window = 0
    for position in order:
        if rows_in_window >= shuffle_buffer:
            windows.append([])
            rows_in_window = 0
        windows[-1].append(reader.row_groups[position])
        rows_in_window += reader.row_groups[position].rows
    carry: _Loaded | None = None
    carry_lengths = np.zeros(0, dtype=np.int64)
    emitted = 0
    for number, window in enumerate(windows):
        last = number == len(windows) - 1
        row_numbers = [np.arange(len(carry_lengths))] + [rg.row_numbers() for rg in window]
        lengths = [carry_lengths] + [reader._read(rg, ["length"]).column("length").to_numpy()[numbers]
                                     for rg, numbers in zip(window, row_numbers[1:])]
        sources = np.concatenate([np.full(len(l), t, dtype=np.int64) for t, l in enumerate(lengths)])
        rows = np.concatenate(row_numbers)
        all_lengths = np.concatenate(lengths)
        pool = rng.permutation(len(all_lengths)) if shuffle else np.arange(len(all_lengths))
        full = len(pool) // batch_size * batch_size
        body, rest = pool[:full], pool[full:]
        plan = []
        chunk = batch_size * bucket_batches
        for start in range(0, len(body), chunk):
            piece = body[start:start + chunk]
            piece = piece[np.argsort(all_lengths[piece], kind="stable")]
            plan += [piece[i:i + batch_size] for i in range(0, len(piece), batch_size)]
        if shuffle and plan:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        if last and len(rest) and not drop_last:
            plan.append(rest[np.argsort(all_lengths[rest], kind="stable")])
            rest = rest[:0]
        wanted = [j for j in range(len(plan)) if emitted + j >= start_batch
                  and (emitted + j) % num_workers == worker_id]
        tables: list[_Loaded | None] = [carry] + [None] * len(window)
        needed = {int(sources[i]) for j in wanted for i in plan[j]}
        needed |= {int(sources[i]) for i in rest}
        for t in sorted(needed - {0}):
            tables[t] = _Loaded(reader._read(window[t - 1], reader.columns))
        for j in wanted:
            if rank is None:
                yield collate_rows(reader, [(tables[sources[i]], rows[i]) for i in plan[j]])
                continue
            chosen, owned = rank_block(plan[j], *rank)
            batch = collate_rows(reader, [(tables[sources[i]], rows[i]) for i in chosen],
                                 width=int(all_lengths[plan[j]].max()))
            batch.update(rank_rows=owned, batch_rows=len(plan[j]))
            yield batch
        emitted += len(plan)
        if len(rest):
            carry = _Loaded(pa.concat_tables(
                [_take(tables[sources[i]], rows[i], reader.columns) for i in rest]).combine_chunks())
        else:
            carry = None
        carry_lengths = all_lengths[rest]


def dequantise_into(target, values: np.ndarray, scales: np.ndarray, rows: int, width: int) -> None:
    """``target = values · scale``: ``rows`` scaled rows of ``width`` int8 values, written into
    ``target`` (any view of ``rows·width`` elements, e.g. a padded batch's slice)."""
    quantised = torch.from_numpy(values).view(rows, width)
    dequantised = quantised.to(torch.float32) * torch.from_numpy(scales).view(rows, 1)
    target.copy_(dequantised.view(target.shape))


def _tensor(reader, values: np.ndarray):
    if reader.dtype == "bfloat16":
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


def _fill(reader, target, table: _Loaded, column: str, row: int, rows: int, width: int) -> None:
    values = table.row(column, row)
    if reader.dtype == "int8":
        dequantise_into(target, values, table.row(scale_column(column), row), rows, width)
    else:
        target.copy_(_tensor(reader, values).view(target.shape))


def collate_rows(reader, refs: list[tuple[_Loaded, int]], width: int | None = None) -> dict[str, Any]:
    """The old per-row padding copy into fp32 host tensors."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return _collate_rows(reader, refs, width)


def _collate_rows(reader, refs, width=None):
    lengths = [int(t.length[r]) for t, r in refs]
    batch, width = len(refs), max(lengths) if width is None else width
    input_ids = torch.full((batch, width), reader.pad_token_id, dtype=torch.long)
    token_types = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    out: dict[str, Any] = {"ids": [t.ids[r] for t, r in refs]}
    labels = [t.labels[r] for t, r in refs]
    for b, ((table, row), length) in enumerate(zip(refs, lengths)):
        input_ids[b, :length] = torch.from_numpy(table.row("input_ids", row))
        token_types[b, :length] = torch.from_numpy(table.row("token_type_ids", row))
        mask[b, :length] = 1
    out.update(input_ids=input_ids, token_type_ids=token_types, attention_mask=mask)
    if any(label is None for label in labels):
        out["labels"] = None
    elif all(isinstance(label, int) for label in labels):
        out["labels"] = torch.tensor(labels, dtype=torch.long)
    else:
        out["labels"] = torch.tensor(labels, dtype=torch.float32)
    out["teacher_logits"] = (torch.stack([torch.from_numpy(t.row("logits", r)) for t, r in refs])
                             if reader.with_logits else None)
    plan = reader.plan
    padded: dict[str, Any] = {}

    def hidden_like(column: str):
        if column not in padded:
            value = torch.zeros((batch, width, reader.hidden_size), dtype=torch.float32)
            for b, ((table, row), length) in enumerate(zip(refs, lengths)):
                if table.present(column, row):
                    _fill(reader, value[b, :length], table, column, row, length, reader.hidden_size)
            padded[column] = value
        return padded[column]

    hidden = {layer: hidden_like(hidden_column(layer)) for layer in reader.hidden_layers
              if layer in plan.stored_hidden}
    scores, derive_inputs, derive_rows = {}, {}, {}
    for layer in reader.attention_layers:
        source = plan.score_sources.get(layer)
        column = attention_column(layer)
        if source in (None, "row"):
            value = torch.zeros((batch, reader.num_heads, width, width), dtype=torch.float32)
            stored = torch.zeros(batch, dtype=torch.bool)
            for b, ((table, row), length) in enumerate(zip(refs, lengths)):
                if table.present(column, row):
                    _fill(reader, value[b, :, :length, :length], table, column, row,
                          reader.num_heads * length, length)
                    stored[b] = True
            scores[layer] = value
            if source == "row" and not bool(stored.all()):
                derive_inputs[layer] = hidden_like(plan.input_of(layer))
                derive_rows[layer] = ~stored
        elif source == "embeddings":
            derive_inputs[layer] = "embeddings"
        else:
            derive_inputs[layer] = hidden_like(plan.input_of(layer))
    out["teacher_hidden"] = hidden
    out["teacher_scores"] = scores
    layer0 = 0 in reader.hidden_layers and 0 not in plan.stored_hidden
    if layer0 or derive_inputs:
        out[DERIVE_KEY] = {"layer0": layer0, "inputs": derive_inputs, "rows": derive_rows}
    return out
