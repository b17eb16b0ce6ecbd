"""The compact cache (format 2): what it recomputes equals what a full cache stores.

The teacher here is 32 wide with 4 heads (d_head = 8): rows longer than 8 tokens keep a
layer's input instead of its scores, shorter ones the scores, so both paths are exercised.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cache.compact import PARTS_FILE, CompactPlan, scores_are_smaller
from pipeline.cache.reader import open_cache
from pipeline.cache.writer import CacheSpec
from pipeline.cache.assemble import build_cache
from pipeline.errors import InputError
from tests.test_cache import examples, teacher_dir, write_examples  # noqa: F401  (fixtures)

HIDDEN, ATTENTION = [0, 2, 4], [1, 2, 4]


def per_example(reader, hidden=True):
    """``id -> (hidden {layer: [L, H]}, scores {layer: [heads, L, L]})`` over one epoch."""
    found = {}
    for batch in reader.batches(4, seed=1):
        batch = reader.complete(batch)
        for row, example_id in enumerate(batch["ids"]):
            length = int(batch["attention_mask"][row].sum())
            found[example_id] = ({l: v[row, :length] for l, v in batch["teacher_hidden"].items()},
                                 {l: v[row, :, :length, :length] for l, v in batch["teacher_scores"].items()})
    return found


@pytest.fixture(scope="module")
def fp32_caches(tmp_path_factory, teacher_dir):  # noqa: F811
    root = tmp_path_factory.mktemp("compact")
    source = write_examples(root / "train.parquet", 17, pair=True)
    caches = {}
    for layout in ("full", "compact"):
        caches[layout] = root / layout
        build_cache(source, teacher_dir, caches[layout], CacheSpec(HIDDEN, ATTENTION, "float32", 64, layout=layout),
                    shard_size=9, row_group_bytes=5000)
    return caches


def test_plan_derives_what_it_can_and_decides_long_rows_by_length():
    plan = CompactPlan.make("compact", [0, 2, 3, 5, 6], [2, 3, 5, 6])   # MiniLM-L6, uniform 6 -> 4
    assert plan.stored_hidden == [2, 3, 5, 6] and plan.derive_embeddings
    assert plan.score_sources == {2: "row", 3: "hidden", 5: "row", 6: "hidden"}  # 3 and 6: free
    assert CompactPlan.make("compact", [0, 1], [1]).score_sources == {1: "embeddings"}
    assert CompactPlan.make("full", [0, 2], [2]).score_sources == {}
    # heads·L² <= L·H  <=>  L <= H / heads: BERT-base stores the scores of rows up to 64 tokens
    assert scores_are_smaller(64, 768, 12) and not scores_are_smaller(65, 768, 12)
    assert plan.row_stores_scores(2, 32, 384, 12) and not plan.row_stores_scores(2, 33, 384, 12)
    assert not plan.row_stores_scores(3, 5, 384, 12)                    # derived whatever the length
    with pytest.raises(InputError, match="unknown cache layout 'tiny'"):
        CompactPlan.make("tiny", [0], [1])


def test_layer0_is_recomputed_bitwise_equal_to_the_stored_fp32_embedding_output(fp32_caches):
    full, compact = (per_example(open_cache(fp32_caches[k])) for k in ("full", "compact"))
    assert set(full) == set(compact) and len(full) == 17
    for example_id, (hidden, _) in full.items():
        assert torch.equal(compact[example_id][0][0], hidden[0]), example_id


def test_scores_derived_from_layer_inputs_equal_the_stored_scores(fp32_caches):
    full, compact = (per_example(open_cache(fp32_caches[k])) for k in ("full", "compact"))
    derived_long_rows = 0
    for example_id, (hidden, scores) in full.items():
        for layer in ATTENTION:
            torch.testing.assert_close(compact[example_id][1][layer], scores[layer], rtol=1e-6, atol=1e-6)
        for layer in (2, 4):
            torch.testing.assert_close(compact[example_id][0][layer], hidden[layer], rtol=0, atol=0)
        derived_long_rows += scores[2].shape[-1] > 8
    assert derived_long_rows >= 10   # most pair rows are longer than d_head: inputs stored


def test_rows_store_either_scores_or_input_by_length(fp32_caches):
    table = pq.read_table(fp32_caches["compact"] / "shards" / "part-00000.parquet")
    lengths = table.column("length").to_numpy()
    assert "hidden_0" not in table.column_names and "attn_1" not in table.column_names   # derived
    assert "attn_input_4" in table.column_names                                            # hidden_3: not cached
    scores_stored = table.column("attn_4").is_valid().to_numpy(zero_copy_only=False)
    input_stored = table.column("attn_input_4").is_valid().to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(scores_stored, lengths <= 8)
    np.testing.assert_array_equal(input_stored, lengths > 8)
    info = json.loads((fp32_caches["compact"] / "manifest.json").read_text())["info"]
    assert info["format_version"] == 2 and info["compact"]["parts"]["file"] == PARTS_FILE
    full_bytes = json.loads((fp32_caches["full"] / "manifest.json").read_text())["info"]["bytes"]
    assert info["bytes"] < full_bytes


def test_int8_stays_close_to_fp32(fp32_caches, tmp_path, teacher_dir):  # noqa: F811
    from pipeline.cache.compact import relative_errors

    source = fp32_caches["full"].parent / "train.parquet"
    build_cache(source, teacher_dir, tmp_path / "int8", CacheSpec(HIDDEN, ATTENTION, "int8", 64), shard_size=9)
    reference = per_example(open_cache(fp32_caches["full"]))
    quantised = per_example(open_cache(tmp_path / "int8"))
    errors = relative_errors(reference, quantised)
    assert set(errors) == {"hidden_0", "hidden_2", "hidden_4", "attn_1", "attn_2", "attn_4"}
    assert errors["hidden_0"]["max"] == 0.0                     # recomputed exactly, not stored
    for column in ("hidden_2", "hidden_4", "attn_2", "attn_4"):
        assert 0 < errors[column]["mean"] < 0.02 and errors[column]["max"] < 0.05, (column, errors[column])


def test_every_layout_and_storage_cuts_the_same_row_groups_so_training_sees_the_same_batches(
        tmp_path, teacher_dir):  # noqa: F811
    """Row groups are the reader's shuffle unit: cut by the full fp16 layout's bytes, they are
    the same for every format, and so is the epoch's batch order (only values differ)."""
    source = write_examples(tmp_path / "train.parquet", 17, pair=True)
    orders, groups = {}, {}
    for layout, storage in (("full", "float16"), ("compact", "float16"), ("compact", "int8")):
        cache = tmp_path / f"{layout}-{storage}"
        build_cache(source, teacher_dir, cache, CacheSpec(HIDDEN, ATTENTION, storage, 64, layout=layout),
                    shard_size=9, row_group_bytes=20000)
        reader = open_cache(cache)
        groups[layout, storage] = [rg.rows for rg in reader.row_groups]
        orders[layout, storage] = [b["ids"] for b in reader.batches(3, seed=5, shuffle_buffer=6)]
    assert len(groups["full", "float16"]) > 4
    assert groups["compact", "int8"] == groups["compact", "float16"] == groups["full", "float16"]
    assert orders["compact", "int8"] == orders["compact", "float16"] == orders["full", "float16"]


# --- refusals ---------------------------------------------------------------------------------

def _copy(cache, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(cache, target)
    return target


def _edit_info(cache, **changes):
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["info"].update(changes)
    (cache / "manifest.json").write_text(json.dumps(manifest))


def test_unknown_format_or_storage_is_one_error_naming_it(fp32_caches, tmp_path):
    cache = _copy(fp32_caches["compact"], tmp_path)
    _edit_info(cache, format_version=7)
    with pytest.raises(InputError, match="teacher-cache format 7 is unknown.*reads formats \\[1, 2\\]") as err:
        open_cache(cache)
    assert "manifest.json" in str(err.value)
    _edit_info(cache, format_version=2, dtype="int4")
    with pytest.raises(InputError, match="unknown cache storage 'int4'"):
        open_cache(cache)


def test_missing_or_corrupt_teacher_parts_are_named(fp32_caches, tmp_path):
    from distill.run import distill_from_cache
    from distill.student import StudentSpec
    from distill.trainer import recipe
    from pipeline.cache.inspect_cache import inspect_cache

    cache = _copy(fp32_caches["compact"], tmp_path)
    parts = cache / PARTS_FILE
    data = bytearray(parts.read_bytes())
    data[len(data) // 2] ^= 0xFF                                # same size: only the checksum sees it
    parts.write_bytes(bytes(data))
    report, ok = inspect_cache(cache, verify=True)
    assert not ok and f"{parts}: checksum differs" in report
    parts.unlink()
    with pytest.raises(InputError, match="teacher parts .* are missing") as err:
        open_cache(cache)
    assert str(parts) in str(err.value)
    with pytest.raises(InputError, match="missing"):
        distill_from_cache(cache, tmp_path / "run", recipe("intermediate", max_steps=1, device="cpu"),
                           StudentSpec(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()   # nothing trained
    assert open_cache(cache, hidden_layers=[2], attention_layers=[]).derives is False  # not needed: fine
