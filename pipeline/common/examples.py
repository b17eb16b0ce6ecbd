"""Example sources: where the rows the teacher and the cache read come from.

An *example source* is what the teacher cache (and the teacher's own evaluation) reads: the
prepared split (one Parquet file), the augmentation stage's output (a directory of
``part-*.parquet`` shards, possibly under ``shards/``) or a plain-text corpus (one example per
non-empty line, for general distillation). Whatever the source, a range of examples comes back
as one table with the columns ``id, orig_id, aug_index, text_a, text_b, label`` in source order,
so the cache's deterministic shard assignment (example i goes to shard i // shard_size) holds
for every kind of source and counting examples costs only Parquet footers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError


def source_files(source: Path | str) -> list[Path]:
    """The files of an example source: a Parquet file, a directory of ``part-*.parquet``
    (optionally under ``shards/``, as the augmentation stage writes them), or a text corpus."""
    source = Path(source)
    if source.is_file():
        return [source]
    if source.is_dir():
        for folder in (source / "shards", source):
            parts = sorted(folder.glob("part-*.parquet"))
            if parts:
                return parts
    raise InputError("no examples found (expected a .parquet/.txt file or a directory of "
                     "part-*.parquet shards)", source)


def _is_text(path: Path) -> bool:
    return path.suffix in (".txt", ".text")


def read_parquet_checked(file: Path | str) -> pa.Table:
    """A Parquet file with its page CRCs verified; a corrupt file is an InputError naming it."""
    try:
        return pq.read_table(file, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"corrupt Parquet file ({exc})", file) from None


def count_examples(source: Path | str) -> int:
    """Number of examples in ``source``, from Parquet footers only (cheap: no data read).

    A text corpus counts its non-empty lines.
    """
    total = 0
    for file in source_files(source):
        if _is_text(file):
            with open(file, encoding="utf-8") as handle:
                total += sum(1 for line in handle if line.strip())
        else:
            try:
                total += pq.read_metadata(file).num_rows
            except (OSError, pa.ArrowException) as exc:
                raise InputError(f"not a readable Parquet file ({exc})", file) from None
    return total


def read_example_range(source: Path | str, start: int, stop: int) -> pa.Table:
    """Examples ``[start, stop)`` of ``source`` in source order, as a table with
    ``id, orig_id, aug_index, text_a, text_b, label`` (``orig_id`` = ``id``, ``aug_index`` = 0
    and ``label`` null where the source has none: unaugmented data, a plain-text corpus)."""
    pieces = []
    offset = 0
    for file in source_files(source):
        if _is_text(file):
            table, rows = _read_text_range(file, start - offset, stop - offset, offset)
        else:
            rows = pq.read_metadata(file).num_rows
            lo, hi = max(start - offset, 0), min(stop - offset, rows)
            table = normalise_examples(read_parquet_checked(file).slice(lo, hi - lo), file) \
                if lo < hi else None
        if table is not None and table.num_rows:
            pieces.append(table)
        offset += rows
        if offset >= stop:
            break
    if not pieces:
        return normalise_examples(pa.table({"text_a": pa.array([], pa.string())}), Path(source))
    return pa.concat_tables(pieces, promote_options="permissive")


def _read_text_range(file: Path, lo: int, hi: int, offset: int) -> tuple[pa.Table | None, int]:
    texts, ids, index = [], [], 0
    with open(file, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            if lo <= index < hi:
                texts.append(line)
                ids.append(f"corpus-{offset + index}")
            index += 1
    table = pa.table({"id": pa.array(ids, pa.string()), "text_a": pa.array(texts, pa.string())})
    return normalise_examples(table, file), index


def normalise_examples(table: pa.Table, file: Path) -> pa.Table:
    if "text_a" not in table.column_names:
        raise InputError(f"no text_a column (columns: {table.column_names})", file)
    n = table.num_rows
    ids = table.column("id") if "id" in table.column_names else pa.array([f"row-{i}" for i in range(n)])
    orig = table.column("orig_id") if "orig_id" in table.column_names else ids
    # 0 marks an original example (the augmentation stage's convention): the reader's
    # originals_only selection trains on exactly these rows, without another teacher run.
    aug_index = (table.column("aug_index") if "aug_index" in table.column_names
                 else pa.array(np.zeros(n, dtype=np.int32)))
    text_b = table.column("text_b") if "text_b" in table.column_names else pa.nulls(n, pa.string())
    label = table.column("label") if "label" in table.column_names else pa.nulls(n, pa.int64())
    if pa.types.is_null(label.type):
        label = label.cast(pa.int64())
    return pa.table({"id": ids.cast(pa.string()), "orig_id": orig.cast(pa.string()),
                     "aug_index": aug_index.cast(pa.int32()),
                     "text_a": table.column("text_a").cast(pa.string()),
                     "text_b": text_b.cast(pa.string()), "label": label})
