"""Read a teacher cache back as length-bucketed training batches.

The cache (:mod:`pipeline.cache.writer`) stores one ragged row per example. The trainer
wants the ``Batch`` of docs/DESIGN.md: ``[B, T]`` token tensors with an attention mask and
the teacher tensors padded to the batch's longest example, padding positions zero (exactly
what :func:`pipeline.common.encoder_outputs.zero_padding` does to live teacher outputs). The
reader yields each batch *packed* (:mod:`pipeline.cache.packed`: its rows as stored, gathered
with whole-column numpy operations, unpadded and still int8/fp16) and the trainer expands it
on its device; :meth:`CacheReader.batches` expands on the CPU for everything else.

**Streaming, with a bounded shuffle.** The reader never loads the cache: it permutes the row
groups of all shards (the unit Parquet decompresses), reads them in *windows* of about
``shuffle_buffer`` examples, shuffles the window's examples, sorts chunks of
``bucket_batches`` batches by length (so little of a batch is padding) and emits the window's
batches in random order. Memory is one window plus fewer than ``batch_size`` examples carried
to the next window, however large the cache. The carry makes every batch but the last full,
so an epoch has exactly ``ceil(N / batch_size)`` batches.

**Deterministic.** The order is a function of (seed, epoch, batch_size, shuffle_buffer,
bucket_batches) and the cache, nothing else: the trainer's resume skips ``start_batch``
batches by planning them from the tiny ``length`` column alone, and DataLoader workers each
materialise every k-th batch of the same plan, so ``num_workers`` does not change the order.

**Few copies.** A window's row groups are decoded by pyarrow, their columns concatenated into
one buffer each (:class:`pipeline.cache.packed.RowBlock`), and each batch gathered from those
buffers in one fancy index per run of equal lengths: decode, one concatenation, one gather.
Padding and widening to fp32 happen on the device (:func:`pipeline.cache.packed.expand`).

**One rank's rows.** ``rank=(r, k)`` (data-parallel training, :mod:`distill.distributed`)
yields the same batches of the same plan, each cut to rank ``r``'s contiguous block of its rows
(the first ``n % k`` ranks one row more) but padded to the *whole* batch's width, so the rows
are exactly those of the whole batch; only their gather and expansion is this rank's share. A batch then carries ``rank_rows`` (rows this rank owns; a rank with none gets
the batch's first row to compute with, and 0) and ``batch_rows`` (the whole batch's).

**Originals only.** ``originals_only=True`` trains on the rows with ``aug_index == 0`` (the
examples before augmentation) of the same shards: the "without augmentation" ablation re-reads
the augmented cache instead of running the teacher again. The selection is made once, at
opening, from the tiny ``aug_index`` column; row groups are still read whole, so an epoch
reads about as many bytes as an augmented one while it trains on a fraction of the rows.

**From a store.** ``cache_dir`` may be a URL (a URL workdir's teacher cache): the manifest and
footers are read through pyarrow's filesystem and row groups with ranged reads of the needed
columns only. With a :class:`pipeline.store.LocalObjectCache` (``[pipeline] local_cache_gb``)
each shard is fetched once, whole, the first time a row group of it is read, checked against
its sha256, and read from local disk from then on: the second epoch downloads nothing.

**Checked.** Opening checks the manifest against the request (layers, dtype) and every
shard's presence, size, footer and row count, naming the file at fault; :meth:`verify` also
re-checksums and decodes every row group.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache.compact import (DERIVE_KEY, CompactPlan, attention_column, check_format, hidden_column,
                                    row_group_problems, scale_column)
from pipeline.cache.packed import BatchLayout, PackedBatch, RowBlock, expand, gather_batch, take_rows
from pipeline.errors import InputError
from pipeline.stage import MANIFEST_NAME, sha256_file
from pipeline.store import LocalObjectCache, is_url, open_store, redact
from pipeline.cache.writer import SCHEMA_METADATA_KEY

DEFAULT_SHUFFLE_BUFFER = 4096
DEFAULT_BUCKET_BATCHES = 32
BASE_COLUMNS = ("id", "label", "length", "input_ids", "token_type_ids")


def load_cache_info(cache_dir: Path | str) -> dict:
    """The ``info`` section of a teacher cache's manifest, with a clear error if absent."""
    import json

    if is_url(cache_dir):
        path = f"{redact(str(cache_dir))}/{MANIFEST_NAME}"
        try:
            text = open_store(str(cache_dir)).read_bytes(MANIFEST_NAME)
        except FileNotFoundError:
            raise InputError("no manifest.json: not a completed teacher cache", redact(str(cache_dir))) from None
    else:
        cache_dir = Path(cache_dir)
        path = cache_dir / MANIFEST_NAME
        if not path.exists():
            raise InputError("no manifest.json: not a completed teacher cache", cache_dir)
        text = path.read_text()
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise InputError(f"manifest is not valid JSON ({exc})", path) from None
    info = manifest.get("info", {})
    if "shards" not in info or "hidden_layers" not in info:
        raise InputError("manifest describes no teacher cache (no shards/hidden_layers)", path)
    return info


@dataclass
class _RowGroup:
    shard: int
    index: int
    rows: int                               # rows taken from it (all, or the originals)
    selected: np.ndarray | None = None      # their row numbers; None: every row

    def row_numbers(self) -> np.ndarray:
        return np.arange(self.rows) if self.selected is None else self.selected


class CacheReader:
    """A teacher cache opened for training; see the module docstring.

    ``hidden_layers`` / ``attention_layers``: the layers the trainer needs (None = every cached
    one, ``[]`` = none: the columns are not even read). ``dtype``: the storage dtype the trainer
    expects (None = any). ``with_teacher=False`` reads only tokens, labels and ids (the
    online-teacher mode). ``originals_only``: only the rows with ``aug_index == 0``.
    ``attention_target``: what the trainer's attention loss compares (``scores`` or
    ``log_probs``); a cache holding the other is refused (None = any).
    ``cache_dir`` may be a store URL; ``local_cache`` then keeps shards on local disk once read.
    """

    #: ``batches(..., rank=(r, k))`` collates one rank's rows (see the module docstring).
    slices_ranks = True

    def __init__(self, cache_dir: Path | str, hidden_layers: Sequence[int] | None = None,
                 attention_layers: Sequence[int] | None = None, dtype: str | None = None,
                 with_teacher: bool = True, with_logits: bool | None = None,
                 originals_only: bool = False, attention_target: str | None = None,
                 local_cache: LocalObjectCache | None = None):
        self.remote = is_url(cache_dir)
        # a URL stays a string (Path would fold its "//"); messages name it redacted
        self.cache_dir = str(cache_dir).rstrip("/") if self.remote else Path(cache_dir)
        self.where = redact(self.cache_dir) if self.remote else self.cache_dir
        self.local_cache = local_cache if self.remote else None
        self.originals_only = originals_only
        self.info = load_cache_info(self.cache_dir)
        self.format_version = check_format(self.info, self._name(MANIFEST_NAME))
        self.plan = CompactPlan.from_info(self.info)
        self.dtype = self.info["dtype"]
        # caches written before the attention target existed hold scores
        self.attention_target = self.info.get("attention_target", "scores")
        if attention_target is not None and attention_layers != [] and with_teacher \
                and attention_target != self.attention_target:
            raise InputError(f"cache holds attention {self.attention_target} ([TeacherCache] "
                             f"attention_target = {self.attention_target}), the trainer asked for "
                             f"{attention_target}; set the same attention_target on the cache and "
                             "the trainer", self.where)
        # padding ids as the writer padded (RoBERTa pads with 1; its positions depend on it)
        self.pad_token_id = int(self.info.get("pad_token_id", 0) or 0)
        cached_hidden = [int(x) for x in self.info["hidden_layers"]]
        cached_attn = [int(x) for x in self.info["attention_layers"]]
        if dtype is not None and dtype != self.dtype:
            raise InputError(f"cache stores {self.dtype}, the trainer asked for {dtype}", self.where)
        self.hidden_layers = self._check_layers("hidden", hidden_layers, cached_hidden)
        self.attention_layers = self._check_layers("attention", attention_layers, cached_attn)
        self.with_teacher = with_teacher
        cached_logits = bool(self.info.get("with_logits", True))
        if with_logits and not cached_logits:
            raise InputError("cache holds no logits (bare-encoder teacher); the trainer asked for "
                             "logits", self.where)
        self.with_logits = with_teacher and cached_logits if with_logits is None else with_logits and with_teacher
        if not with_teacher:
            self.hidden_layers, self.attention_layers = [], []
        self.hidden_size = int(self.info.get("hidden_size", 0))
        self.num_heads = int(self.info.get("num_heads", 0))
        self.columns = list(BASE_COLUMNS)
        if self.with_logits:
            self.columns.append("logits")
        self.columns += self._teacher_columns()
        self.shard_files = [self._name(s["file"]) for s in self.info["shards"]]
        self._files: dict[int, pq.ParquetFile] = {}
        self._local: set[int] = set()   # shards read from local disk (a local cache entry)
        self.row_groups: list[_RowGroup] = []
        self._row_lengths: dict[tuple[int, int], np.ndarray] = {}
        self._check_shards()
        if self.derives:
            self._check_parts()

    # --- what to read -----------------------------------------------------------------------
    def _teacher_columns(self) -> list[str]:
        """The stored columns behind the requested layers (inputs of derived scores included)."""
        plan, columns = self.plan, []
        for layer in self.hidden_layers:
            if layer in plan.stored_hidden:
                columns.append(hidden_column(layer))
        for layer in self.attention_layers:
            source = plan.score_sources.get(layer)
            if source in (None, "row"):
                columns.append(attention_column(layer))
            if source in ("hidden", "row"):
                columns.append(plan.input_of(layer))
        columns = list(dict.fromkeys(columns))
        if self.dtype == "int8":
            columns += [scale_column(c) for c in columns]
        return columns

    @property
    def derives(self) -> bool:
        """Whether batches carry work for :func:`pipeline.cache.compact.complete_batch`."""
        return (0 in self.hidden_layers and 0 not in self.plan.stored_hidden) or any(
            layer in self.plan.score_sources for layer in self.attention_layers)

    # --- opening and checks ---------------------------------------------------------------
    def _check_layers(self, kind: str, requested, cached: list[int]) -> list[int]:
        if requested is None:
            return list(cached)
        requested = [int(x) for x in requested]
        missing = [l for l in requested if l not in cached]
        if missing:
            raise InputError(f"the trainer needs {kind} layer(s) {missing} but the cache holds "
                             f"{cached}; rebuild the cache with the trainer's layer map",
                             self.where)
        return requested

    def _name(self, rel: str):
        """A file of the cache as messages name it: a local path, or the object's redacted URL."""
        return f"{redact(self.cache_dir)}/{rel}" if self.remote else self.cache_dir / rel

    @property
    def store(self):
        return open_store(self.cache_dir)

    def _sizes(self) -> dict[str, int]:
        """``file -> bytes`` of every file of the cache (one listing on a store)."""
        if self.remote:
            return {rel: info.size for rel, info in self.store.list_files("").items()}
        files = [s["file"] for s in self.info["shards"]]
        parts = (self.info.get("compact") or {}).get("parts")
        if parts:
            files.append(parts["file"])
        return {rel: (self.cache_dir / rel).stat().st_size for rel in files if (self.cache_dir / rel).is_file()}

    def _check_shards(self) -> None:
        sizes = self._sizes()
        for number, (shard, file) in enumerate(zip(self.info["shards"], self.shard_files)):
            if shard["file"] not in sizes:
                raise InputError("shard listed in the manifest is missing", file)
            size = sizes[shard["file"]]
            if "bytes" in shard and size != shard["bytes"]:
                raise InputError(f"shard is truncated or modified: {size} bytes, the manifest "
                                 f"says {shard['bytes']}", file)
            parquet = self._open(number)
            self._check_layout(parquet, file)
            if parquet.metadata.num_rows != shard["rows"]:
                raise InputError(f"shard holds {parquet.metadata.num_rows} rows, the manifest says "
                                 f"{shard['rows']}", file)
            if self.originals_only and "aug_index" not in parquet.schema_arrow.names:
                raise InputError("originals_only needs the aug_index column, which this cache "
                                 "predates; rebuild the cache", file)
            for index in range(parquet.metadata.num_row_groups):
                rows = parquet.metadata.row_group(index).num_rows
                if not self.originals_only:
                    self.row_groups.append(_RowGroup(number, index, rows))
                    continue
                aug_index = parquet.read_row_group(index, columns=["aug_index"]).column(0).to_numpy()
                selected = np.flatnonzero(aug_index == 0)
                if len(selected):
                    self.row_groups.append(_RowGroup(number, index, len(selected), selected))

    def _check_parts(self) -> None:
        parts = (self.info.get("compact") or {}).get("parts")
        if not parts:
            raise InputError("the manifest of this compact cache lists no teacher parts (embeddings, "
                             "query/key weights); rebuild the cache", self._name(MANIFEST_NAME))
        path = self._name(parts["file"])
        size = self._sizes().get(parts["file"])
        if size is None:
            raise InputError("the compact cache's teacher parts (embeddings, query/key weights) are "
                             "missing; rebuild the cache", path)
        if size != parts.get("bytes"):
            raise InputError(f"teacher parts are truncated or modified: {size} bytes, "
                             f"the manifest says {parts.get('bytes')}", path)

    def parts(self, device=None):
        """The teacher modules that complete this cache's batches (None for a format-1 cache)."""
        if not self.derives:
            return None
        from pipeline.cache.compact import TeacherParts

        return TeacherParts.load(self._local_parts_dir(), self.info, device)

    def _local_parts_dir(self) -> Path:
        """A local directory holding the teacher parts file (the cache itself when local)."""
        if not self.remote:
            return self.cache_dir
        import tempfile

        parts = self.info["compact"]["parts"]
        root = self.local_cache.root if self.local_cache is not None else Path(tempfile.gettempdir())
        local = root / "teacher-parts" / parts["sha256"]
        if not (local / parts["file"]).is_file():
            digest = self.store.download(parts["file"], local / parts["file"])
            if digest != parts["sha256"]:
                (local / parts["file"]).unlink()
                raise InputError("checksum differs from the manifest (corrupt teacher parts)",
                                 self._name(parts["file"]))
        return local

    def complete(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` with what the cache recomputes filled in, on the CPU (the trainer does it on
        its device instead: :class:`distill.trainer.CachedTeacher`)."""
        from pipeline.cache.compact import complete_batch

        if DERIVE_KEY not in batch:
            return batch
        if getattr(self, "_parts", None) is None:
            self._parts = self.parts()
        return complete_batch(batch, self._parts)

    def _check_layout(self, parquet: pq.ParquetFile, file: Path) -> None:
        """The shard's own record of its layout (schema metadata) must match the manifest's:
        a manifest that disagrees would make the reader cut the values into wrong shapes."""
        import json

        raw = (parquet.schema_arrow.metadata or {}).get(SCHEMA_METADATA_KEY)
        if raw is None:
            return   # written before shards carried their layout
        try:
            recorded = json.loads(raw)
        except ValueError as exc:
            raise InputError(f"corrupt shard: its layout record is not JSON ({exc})", file) from None
        for key in ("hidden_layers", "attention_layers", "dtype", "hidden_size", "num_heads"):
            if key in recorded and recorded[key] != self.info.get(key):
                raise InputError(f"the manifest ({self._name(MANIFEST_NAME)}) says {key}="
                                 f"{self.info.get(key)!r}, the shard was written with "
                                 f"{recorded[key]!r}", file)

    def _open(self, number: int) -> pq.ParquetFile:
        if number not in self._files:
            file = self.shard_files[number]
            try:
                if not self.remote:
                    source = file
                else:   # ranged reads through pyarrow's filesystem
                    source = self.store.fs.open_input_file(self.store.path(self.info["shards"][number]["file"]))
                self._files[number] = pq.ParquetFile(source, memory_map=not self.remote,
                                                     page_checksum_verification=True)
            except (OSError, pa.ArrowException) as exc:
                raise InputError(f"corrupt shard: cannot read its Parquet footer ({exc})", file) from None
        return self._files[number]

    def _open_for_reading(self, number: int) -> pq.ParquetFile:
        """The shard's handle for data reads: from a store with a local cache, the shard is
        fetched into it first (once; later epochs and processes find it there)."""
        if self.local_cache is not None and number not in self._local:
            shard = self.info["shards"][number]
            local = self.local_cache.get(self.store, shard["file"], int(shard["bytes"]),
                                         shard["sha256"]) if "sha256" in shard else None
            if local is not None:
                try:
                    self._files[number] = pq.ParquetFile(local, memory_map=True,
                                                         page_checksum_verification=True)
                except (OSError, pa.ArrowException) as exc:
                    raise InputError(f"corrupt shard: cannot read its Parquet footer ({exc})",
                                     self.shard_files[number]) from None
            self._local.add(number)   # fetched, or too large for the cache: streamed
        return self._open(number)

    def __getstate__(self):  # ParquetFile handles are per process (DataLoader workers)
        state = dict(self.__dict__)
        state["_files"] = {}
        state["_local"] = set()
        state["_parts"] = None
        return state

    @property
    def num_examples(self) -> int:
        """Examples an epoch visits (every cached row, or the originals)."""
        return sum(rg.rows for rg in self.row_groups)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = self.num_examples
        return n // batch_size if drop_last else -(-n // batch_size)

    def verify(self) -> list[str]:
        """Re-checksum every shard and the teacher parts, decode every row group; a list of
        problems (empty: OK)."""
        problems = []
        parts = (self.info.get("compact") or {}).get("parts")
        sizes = self._sizes()
        if parts:
            path = self._name(parts["file"])
            if parts["file"] not in sizes:
                problems.append(f"{path}: the teacher parts listed in the manifest are missing")
            elif self._sha256(parts["file"]) != parts.get("sha256"):
                problems.append(f"{path}: checksum differs from the manifest (corrupt teacher parts)")
        for number, (shard, file) in enumerate(zip(self.info["shards"], self.shard_files)):
            if shard["file"] not in sizes:
                problems.append(f"{file}: the shard listed in the manifest is missing")
                continue
            if "sha256" in shard and self._sha256(shard["file"]) != shard["sha256"]:
                problems.append(f"{file}: checksum differs from the manifest (corrupt shard)")
                continue
            try:
                parquet = self._open(number)
                for index in range(parquet.metadata.num_row_groups):
                    problems += row_group_problems(file, parquet.read_row_group(index), index, self.plan,
                                                   self.info["attention_layers"], self.hidden_size,
                                                   self.num_heads, self.dtype)
            except (OSError, pa.ArrowException, InputError) as exc:
                problems.append(f"{file}: cannot decode ({exc})")
        return problems

    def _sha256(self, rel: str) -> str:
        return self.store.sha256(rel) if self.remote else sha256_file(self.cache_dir / rel)

    # --- reading ---------------------------------------------------------------------------
    def _read(self, rg: _RowGroup, columns: Sequence[str]) -> pa.Table:
        file = self.shard_files[rg.shard]
        try:
            return self._open_for_reading(rg.shard).read_row_group(rg.index, columns=list(columns))
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"corrupt shard: row group {rg.index} cannot be read ({exc})", file) from None

    def layout(self) -> BatchLayout:
        """What this reader's batches hold (shared by every :class:`PackedBatch` it yields)."""
        return BatchLayout(self.dtype, self.hidden_size, self.num_heads, self.pad_token_id,
                           self.with_logits, list(self.hidden_layers), list(self.attention_layers),
                           self.plan, list(self.columns))

    def _lengths(self, rg: _RowGroup) -> np.ndarray:
        """The lengths of a row group's (selected) rows, all the plan of an epoch needs; read
        once (a few bytes a row) and kept, so later epochs plan without reading."""
        key = (rg.shard, rg.index)
        if key not in self._row_lengths:
            self._row_lengths[key] = self._read(rg, ["length"]).column("length").to_numpy()[rg.row_numbers()]
        return self._row_lengths[key]

    def _block(self, rg: _RowGroup, layout: BatchLayout) -> RowBlock:
        """One row group's rows (the selected ones), decoded and checked."""
        return RowBlock.from_table(self._read(rg, self.columns), layout, rg.selected,
                                   f"{self.shard_files[rg.shard]} (row group {rg.index})")

    def packed_batches(self, batch_size: int, seed: int = 0, epoch: int = 0, start_batch: int = 0,
                       shuffle: bool = True, drop_last: bool = False,
                       shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                       bucket_batches: int = DEFAULT_BUCKET_BATCHES,
                       worker: tuple[int, int] = (0, 1),
                       rank: tuple[int, int] | None = None) -> Iterator[PackedBatch]:
        """Yield the epoch's batches from ``start_batch`` on, packed (see the module docstring
        and :mod:`pipeline.cache.packed`): :func:`~pipeline.cache.packed.expand` makes each the
        padded Batch on the training device.

        ``worker=(w, k)`` yields only global batches ``j`` with ``j % k == w`` (DataLoader
        workers; merged round-robin they give the single-process order). ``rank=(r, k)``
        yields rank ``r``'s rows of each batch at the whole batch's width.
        """
        worker_id, num_workers = worker
        layout = self.layout()
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(self.row_groups)) if shuffle else np.arange(len(self.row_groups))
        windows: list[list[_RowGroup]] = [[]]
        rows_in_window = 0
        for position in order:
            if rows_in_window >= shuffle_buffer:
                windows.append([])
                rows_in_window = 0
            windows[-1].append(self.row_groups[position])
            rows_in_window += self.row_groups[position].rows
        carry: RowBlock | None = None
        carry_lengths = np.zeros(0, dtype=np.int64)
        carry_rows = np.zeros(0, dtype=np.int64)   # where each carried row is in ``carry``
        emitted = 0
        for number, window in enumerate(windows):
            last = number == len(windows) - 1
            # Each pool row's source (0: the carry, t: the window's t-th row group) and its row
            # in that source's block (a row group's block holds only its selected rows).
            local = [carry_rows] + [np.arange(rg.rows) for rg in window]
            lengths = [carry_lengths] + [self._lengths(rg) for rg in window]
            sources = np.concatenate([np.full(len(l), t, dtype=np.int64) for t, l in enumerate(lengths)])
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
            needed = sorted({int(sources[i]) for j in wanted for i in plan[j]} | {int(sources[i]) for i in rest})
            # The needed sources' rows, concatenated into one block that batches are cut from.
            blocks = [carry if t == 0 else self._block(window[t - 1], layout) for t in needed]
            base = np.zeros(len(window) + 1, dtype=np.int64)
            base[needed] = np.cumsum([0] + [b.rows for b in blocks[:-1]])
            block = RowBlock.concat(blocks) if blocks else None
            position = base[sources] + np.concatenate(local)
            for j in wanted:
                if rank is None:
                    yield gather_batch(block, position[plan[j]], layout)
                    continue
                chosen, owned = rank_block(plan[j], *rank)
                packed = gather_batch(block, position[chosen], layout, width=int(all_lengths[plan[j]].max()))
                packed.rank_rows, packed.batch_rows = owned, len(plan[j])
                yield packed
            emitted += len(plan)
            # Carry the leftover rows' data (not their row groups) into the next window.
            if len(rest):
                carry, carry_rows = take_rows(block, position[rest])
            else:
                carry, carry_rows = None, np.zeros(0, dtype=np.int64)
            carry_lengths = all_lengths[rest]

    def batches(self, batch_size: int, seed: int = 0, epoch: int = 0, start_batch: int = 0,
                **kwargs) -> Iterator[dict[str, Any]]:
        """The epoch's batches as padded Batch dicts on the CPU: :meth:`packed_batches`, each
        expanded (:func:`pipeline.cache.packed.expand`). The trainer expands on its device."""
        for packed in self.packed_batches(batch_size, seed=seed, epoch=epoch, start_batch=start_batch,
                                          **kwargs):
            yield expand(packed)

    def dataset(self, batch_size: int, seed: int = 0, epoch: int = 0, **kwargs) -> "CacheBatchDataset":
        return CacheBatchDataset(self, batch_size, seed=seed, epoch=epoch, **kwargs)


def rank_block(rows: np.ndarray, rank: int, size: int) -> tuple[np.ndarray, int]:
    """Rank ``rank``'s contiguous block of a batch's ``rows`` (the first ``len % size`` ranks
    one more) and how many it owns; an empty block computes with the first row and owns 0."""
    base, extra = divmod(len(rows), size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    if stop == start:
        return rows[:1], 0
    return rows[start:stop], stop - start


def open_cache(cache_dir: Path | str, hidden_layers: Sequence[int] | None = None,
               attention_layers: Sequence[int] | None = None, dtype: str | None = None,
               with_teacher: bool = True, with_logits: bool | None = None,
               originals_only: bool = False, attention_target: str | None = None,
               local_cache: LocalObjectCache | None = None) -> CacheReader:
    """Open a teacher cache for training (a local directory or a store URL); see :class:`CacheReader`."""
    return CacheReader(cache_dir, hidden_layers, attention_layers, dtype, with_teacher, with_logits,
                       originals_only, attention_target, local_cache)


def _iterable_dataset_base():
    import torch.utils.data

    return torch.utils.data.IterableDataset


class CacheBatchDataset(_iterable_dataset_base()):
    """A torch ``IterableDataset`` of packed batches; use ``DataLoader(ds, batch_size=None)``.

    With ``num_workers=k`` each worker gathers every k-th batch of the same plan, and the
    DataLoader's in-order round-robin merge gives the single-process order. A worker hands
    each batch over in one shared-memory buffer (:meth:`PackedBatch.into_arena`); the loader's
    pin thread pins it (:meth:`PackedBatch.pin_memory`). Call :meth:`set_epoch` between epochs.
    """

    def __init__(self, reader: CacheReader, batch_size: int, seed: int = 0, epoch: int = 0,
                 start_batch: int = 0, **batch_kwargs):
        super().__init__()
        self.reader = reader
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.start_batch = start_batch
        self.batch_kwargs = batch_kwargs

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return max(0, self.reader.num_batches(self.batch_size, self.batch_kwargs.get("drop_last", False))
                   - self.start_batch)

    def __iter__(self):
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        worker = (info.id, info.num_workers) if info is not None else (0, 1)
        # The worker split is on the global batch index, counted from start_batch.
        offset = self.start_batch
        worker = ((worker[0] + offset) % worker[1], worker[1])
        batches = self.reader.packed_batches(self.batch_size, seed=self.seed, epoch=self.epoch,
                                             start_batch=self.start_batch, worker=worker, **self.batch_kwargs)
        if info is None:
            return batches
        return (packed.into_arena() for packed in batches)
