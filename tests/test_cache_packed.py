"""The packed reader (issue 27): the host gathers rows as stored, the device expands them.

Its batches must equal the old host collation (tests/reference_collation.py) in values, order
and shape: bit for bit for fp32, fp16 and bf16 caches, and for int8 too on the CPU (the same
fp32 product; the issue allows one int8 step, which a GPU's kernels could differ by). This
holds for every cache kind and reading mode the trainer uses: format 1 and compact layouts
(per-row null columns included), several windows with a carry, ``start_batch``, DataLoader
workers, ``rank=(r, k)``, ``originals_only`` and a store URL.
"""
from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cache.compact import DERIVE_KEY, complete_batch
from pipeline.cache.packed import ArenaPool, PackedBatch, expand
from pipeline.cache.reader import open_cache
from pipeline.cache.writer import CacheSpec
from pipeline.cache.assemble import build_cache
from pipeline.errors import InputError
from tests.reference_collation import reference_batches
from tests.store_server import s3  # noqa: F401
from tests.test_cache import SENTENCES, _synthetic_cache, examples, teacher_dir, write_examples  # noqa: F401
from pipeline.store import open_store

HIDDEN, ATTENTION = [0, 2, 4], [1, 2, 4]
#: Reading settings that force several windows, a carry and a short last batch (23 rows).
SMALL = dict(seed=5, shuffle_buffer=7, bucket_batches=2)


def assert_same_batch(new: dict, old: dict) -> None:
    """Equal keys, ids, and tensors equal in dtype, shape and every bit."""
    assert new["ids"] == old["ids"]
    assert set(new) - {"ids"} == set(old) - {"ids"}, (sorted(new), sorted(old))
    for key, value in old.items():
        if key == DERIVE_KEY:
            mine = new[key]
            assert mine["layer0"] == value["layer0"]
            assert mine["inputs"].keys() == value["inputs"].keys()
            for layer, given in value["inputs"].items():
                assert given == mine["inputs"][layer] if isinstance(given, str) else _equal(mine["inputs"][layer], given)
            assert mine["rows"].keys() == value["rows"].keys()
            for layer, rows in value["rows"].items():
                assert _equal(mine["rows"][layer], rows)
                assert mine["index"][layer].tolist() == rows.nonzero().squeeze(1).tolist()
        elif isinstance(value, torch.Tensor) or value is None:
            assert _equal(new[key], value), key
        elif isinstance(value, dict):
            assert new[key].keys() == value.keys(), key
            for layer in value:
                assert _equal(new[key][layer], value[layer]), (key, layer)
        else:
            assert new[key] == value, key


def _equal(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def check_reader(reader, batch_size: int, **kwargs) -> int:
    new = list(reader.batches(batch_size, **kwargs))
    old = list(reference_batches(reader, batch_size, **kwargs))
    assert len(new) == len(old) > 0
    for a, b in zip(new, old):
        assert_same_batch(a, b)
    return len(new)


def augmented_examples(path, n: int = 23, pair: bool = True):
    """``n`` rows, three per original (aug_index 0, 1, 2), sentence pairs of varied lengths."""
    table = pa.table({"id": [f"train-{i // 3}-aug{i % 3}" for i in range(n)],
                      "orig_id": [f"train-{i // 3}" for i in range(n)],
                      "aug_index": pa.array([i % 3 for i in range(n)], pa.int32()),
                      "text_a": [SENTENCES[i % len(SENTENCES)] for i in range(n)],
                      "text_b": [SENTENCES[(i * 7) % len(SENTENCES)] for i in range(n)] if pair
                      else pa.nulls(n, pa.string()),
                      "label": pa.array([(i // 3) % 2 for i in range(n)], pa.int64())})
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def caches(tmp_path_factory, teacher_dir):  # noqa: F811
    """One cache per storage × layout over the same 23 augmented rows (several shards and row
    groups; the compact ones hold rows that store scores and rows that store layer inputs)."""
    root = tmp_path_factory.mktemp("packed")
    source = augmented_examples(root / "train.parquet")
    built = {}
    for layout in ("full", "compact"):
        for dtype in ("float32", "float16", "bfloat16", "int8"):
            built[layout, dtype] = root / f"{layout}-{dtype}"
            build_cache(source, teacher_dir, built[layout, dtype],
                        CacheSpec(HIDDEN, ATTENTION, dtype, 64, layout=layout), shard_size=9,
                        row_group_bytes=4000)
    return built


@pytest.mark.parametrize("layout", ["full", "compact"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_batches_equal_the_old_collation_bit_for_bit(caches, layout, dtype):
    reader = open_cache(caches[layout, dtype])
    assert len(reader.row_groups) > 4
    if layout == "compact":   # both kinds of rows are present: null cells in both columns
        table = pq.read_table(caches[layout, dtype] / "shards" / "part-00000.parquet")
        assert 0 < table.column("attn_2").null_count < table.num_rows
    assert check_reader(reader, 4, **SMALL) == 6
    check_reader(reader, 5, shuffle=False)                       # one window, sorted tail
    check_reader(reader, 4, start_batch=3, **SMALL)              # resume mid-epoch
    check_reader(reader, 4, worker=(1, 3), **SMALL)              # a DataLoader worker's share
    for rank in range(3):                                        # data-parallel ranks
        check_reader(reader, 4, rank=(rank, 3), **SMALL)
    check_reader(open_cache(caches[layout, dtype], originals_only=True), 3, **SMALL)
    check_reader(open_cache(caches[layout, dtype], hidden_layers=[4], attention_layers=[]), 4, **SMALL)
    # completing a batch (layer 0 and derived scores) gives the same result from both
    new = reader.complete(next(iter(reader.batches(4, **SMALL))))
    old = complete_batch(next(iter(reference_batches(reader, 4, **SMALL))), reader.parts())
    assert_same_batch(new, old)


def test_a_format_1_cache_reads_the_same(tmp_path):
    reader = open_cache(_synthetic_cache(tmp_path / "format1", 90))
    assert reader.format_version == 1
    check_reader(reader, 16, seed=2, shuffle_buffer=40)


def test_a_cache_on_a_store_reads_the_same(caches, s3):  # noqa: F811
    local = caches["compact", "int8"]
    url = s3.url("work/teacher_cache/packed")
    store = open_store(url)
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        store.upload(file, file.relative_to(local).as_posix())
    check_reader(open_cache(url), 4, **SMALL)


def test_dataloader_workers_hand_over_the_same_packed_batches(caches):
    reader = open_cache(caches["compact", "int8"])
    expected = list(reader.batches(4, **SMALL))
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(reader.dataset(4, **SMALL), batch_size=None,
                                             num_workers=workers)
        got = [expand(packed) for packed in loader]
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert_same_batch(a, b)


def test_a_packed_batch_is_compact_and_survives_pickling_and_an_arena(caches):
    reader = open_cache(caches["full", "int8"])
    packed = next(iter(reader.packed_batches(8, **SMALL)))
    expanded = expand(packed)
    padded = sum(v.numel() * v.element_size() for layers in ("teacher_hidden", "teacher_scores")
                 for v in expanded[layers].values())
    assert packed.nbytes * 4 < padded          # stored int8, unpadded: far smaller than fp32 padded
    for arrays in (pickle.loads(pickle.dumps(packed)), packed.into_arena()):
        assert_same_batch(expand(arrays), expanded)


def test_the_arena_pool_grows_for_a_larger_batch_and_never_overwrites(caches):
    reader = open_cache(caches["full", "float16"])
    pool = ArenaPool(keep=4)
    small, large = [p for p in reader.packed_batches(23, shuffle=False)][0], None
    batches = list(reader.packed_batches(2, shuffle=False))
    large = max(batches, key=lambda p: p.nbytes)
    tiny = min(batches, key=lambda p: p.nbytes)
    expected_tiny, expected_large = expand(tiny), expand(large)
    tiny.into_arena(pool)
    tiny_arena = tiny.arena
    tiny.release()                              # back in the pool, too small for the next one
    large.into_arena(pool)
    assert large.arena.numel() >= large.nbytes and large.arena.data_ptr() != tiny_arena.data_ptr()
    assert pool.allocated == 2
    assert_same_batch(expand(large), expected_large)
    assert_same_batch(expand(tiny), expected_tiny)   # its arena was not reused while held
    assert small.nbytes > 0


def test_a_row_whose_values_disagree_with_its_length_names_the_shard(caches, tmp_path):
    """A shard rewritten with a hidden column cut short: one error naming file and row group."""
    import json
    import shutil

    cache = tmp_path / "broken"
    shutil.copytree(caches["full", "float16"], cache)
    shard = cache / "shards" / "part-00000.parquet"
    table = pq.read_table(shard)
    column = table.column("hidden_2").combine_chunks()
    values = column.values.to_numpy(zero_copy_only=False)
    offsets = column.offsets.to_numpy().copy()
    offsets[2:] -= 1                           # row 1 loses a value
    shortened = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                         pa.array(np.delete(values, offsets[2]), pa.float16()))
    table = table.set_column(table.schema.get_field_index("hidden_2"), "hidden_2", shortened)
    pq.write_table(table, shard, row_group_size=100)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["info"]["shards"][0].update(bytes=shard.stat().st_size)
    manifest["info"]["shards"][0].pop("sha256", None)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"part-00000.parquet \(row group 0\).*column hidden_2: row 1"):
        list(open_cache(cache).batches(4, shuffle=False))
