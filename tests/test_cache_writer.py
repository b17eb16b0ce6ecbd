"""The pipelined cache writer: the same shard bytes as the row-wise writer it replaced, its
Parquet work off the forward's thread, and failures that leave nothing complete-looking.

The oracle is :func:`rowwise_shard`, a reference copy of the writer as it was before the
pipeline (commit 54db3fd: per-example dicts of numpy slices, ``RowGroupBuffer``, Parquet on
the forward's thread). Shard bytes are what fingerprints and manifests (sha256) vouch for, so
the new writer must reproduce them exactly, not merely read back equal.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cache.compact import quantise_rows
from pipeline.cache.writer import (STORAGE_DTYPES, CacheSpec, RowGroupBuffer, attention_column, cache_schema,
                                   can_derive_scores, hidden_column, input_column, nominal_row_bytes, scale_column,
                                   write_cache_shard)
from pipeline.cache.assemble import assemble_cache, load_cache_teacher, write_shard_output
from pipeline.common.encoder_outputs import forward_internals
from pipeline.common.examples import read_example_range
from pipeline.common.tokenize import length_sorted_batches, tokenize_examples
from pipeline.errors import InputError
from pipeline.stage import without_run_history
from tests.test_cache import teacher_dir, write_examples  # noqa: F401  (fixture)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HIDDEN, ATTENTION = [0, 2, 4], [1, 2, 4]


def rowwise_shard(examples: pa.Table, model, tokenizer, out_file: Path, spec: CacheSpec, *, batch_size: int,
                  row_group_bytes: int, sort_window: int, metadata: dict) -> None:
    """The writer of commit 54db3fd, condensed: one forward per length-sorted batch, its padded
    outputs encoded on the host, sliced into one dict per example, written back in source
    order through :class:`RowGroupBuffer` with today's Parquet options."""
    plan = spec.plan(can_derive_scores(model, spec.attention_target))
    input_ids, token_type_ids = tokenize_examples(tokenizer, examples, spec.max_seq_length)
    lengths = [len(x) for x in input_ids]
    schema = cache_schema(spec, examples.schema.field("label").type, metadata, plan)
    hidden_size, heads = model.config.hidden_size, model.config.num_attention_heads
    num_logits = model.config.num_labels if spec.with_logits else 0
    row_layers = [l for l, s in plan.score_sources.items() if s == "row"]
    forward_hidden = sorted(set(plan.stored_hidden) | {l - 1 for l in row_layers})
    forward_attention = [l for l in spec.attention_layers if plan.score_sources.get(l) in (None, "row")]
    int8 = spec.dtype == "int8"

    def encode(value, width):
        if int8:
            return quantise_rows(value, width)
        return value.to(getattr(torch, STORAGE_DTYPES[spec.dtype][0])), None

    def storage(tensor):
        tensor = tensor.contiguous()
        return tensor.view(torch.int16).numpy().view(np.uint16) if spec.dtype == "bfloat16" else tensor.numpy()

    def put(row, column, encoded, b, length, kind):
        if encoded is None:
            row[column] = None
            if int8:
                row[scale_column(column)] = None
            return
        values, scale = encoded
        if kind == "hidden":
            row[column] = storage(values[b, :length].reshape(-1))
            if int8:
                row[scale_column(column)] = scale[b, :length].contiguous().numpy()
        else:
            row[column] = storage(values[b, :, :length, :length].reshape(-1))
            if int8:
                row[scale_column(column)] = scale[b, :, :length].reshape(-1).contiguous().numpy()

    columns = examples.to_pydict()
    writer = pq.ParquetWriter(
        out_file, schema, compression="zstd", compression_level=3, use_dictionary=["id", "orig_id"],
        write_statistics=["length", "label"], write_page_checksum=True,
        use_byte_stream_split=[f"{f.name}.list.element" for f in schema
                               if f.name.startswith(("hidden_", "attn_")) and pa.types.is_list(f.type)])
    with writer:
        buffer = RowGroupBuffer(writer, schema, row_group_bytes)
        pending, next_row = {}, 0
        for batch in length_sorted_batches(lengths, batch_size, sort_window):
            width = max(lengths[i] for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            types = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, i in enumerate(batch):
                ids[b, :lengths[i]] = torch.as_tensor(input_ids[i])
                types[b, :lengths[i]] = torch.as_tensor(token_type_ids[i])
                mask[b, :lengths[i]] = 1
            with torch.inference_mode():
                internals = forward_internals(model, ids, types, mask, hidden_layers=forward_hidden,
                                              attention_layers=forward_attention, with_logits=spec.with_logits,
                                              attention_target=spec.attention_target)
                hidden = {l: encode(t, hidden_size) for l, t in internals.hidden.items()}
                scores = internals.scores
                if int8:
                    key_mask = mask.bool()[:, None, None, :]
                    scores = {l: t.masked_fill(~key_mask, 0.0) for l, t in scores.items()}
                scores = {l: encode(t, t.shape[-1]) for l, t in scores.items()}
                logits = internals.logits.float() if spec.with_logits else None
            for b, i in enumerate(batch):
                row, length = {}, lengths[i]
                if logits is not None:
                    row["logits"] = logits[b].numpy()
                for layer in plan.stored_hidden:
                    put(row, hidden_column(layer), hidden[layer], b, length, "hidden")
                for layer in forward_attention:
                    if plan.row_stores_scores(layer, length, hidden_size, heads):
                        put(row, attention_column(layer), scores[layer], b, length, "scores")
                        if plan.score_sources.get(layer) == "row":
                            put(row, input_column(layer), None, b, length, "hidden")
                    else:
                        put(row, attention_column(layer), None, b, length, "scores")
                        put(row, input_column(layer), hidden[layer - 1], b, length, "hidden")
                pending[i] = row
            while next_row in pending:
                row = pending.pop(next_row)
                row.update(id=columns["id"][next_row], orig_id=columns["orig_id"][next_row],
                           aug_index=columns["aug_index"][next_row], label=columns["label"][next_row],
                           length=lengths[next_row], input_ids=np.asarray(input_ids[next_row], dtype=np.int32),
                           token_type_ids=np.asarray(token_type_ids[next_row], dtype=np.int8))
                buffer.add(row, nominal_row_bytes(spec, lengths[next_row], hidden_size, heads, num_logits))
                next_row += 1
        buffer.flush()


@pytest.fixture(scope="module")
def single_sentences(tmp_path_factory) -> Path:
    """40 sentences of 3-20 tokens: with the 32-wide, 4-head teacher (d_head 8), short rows keep
    their scores and long ones the layer input, so compact columns have per-row nulls."""
    return write_examples(tmp_path_factory.mktemp("writer") / "train.parquet", 40)


def _both_writers(teacher_dir, source, tmp_path, spec, **options) -> tuple[pq.ParquetFile, pq.ParquetFile, dict]:
    model, tokenizer, _ = load_cache_teacher(teacher_dir, True)
    examples = read_example_range(source, 0, 40)
    options["metadata"] = {"dtype": spec.dtype, "layout": spec.layout}
    rowwise_shard(examples, model, tokenizer, tmp_path / "rowwise.parquet", spec, **options)
    stats = write_cache_shard(examples, model, tokenizer, tmp_path / "pipelined.parquet", spec, device="cpu",
                              **options)
    old, new = pq.ParquetFile(tmp_path / "rowwise.parquet"), pq.ParquetFile(tmp_path / "pipelined.parquet")
    assert new.metadata.num_row_groups == old.metadata.num_row_groups == stats["row_groups"]
    for group in range(old.metadata.num_row_groups):   # a readable diagnosis before the byte check
        assert new.read_row_group(group).equals(old.read_row_group(group)), f"row group {group} differs"
    assert (tmp_path / "pipelined.parquet").read_bytes() == (tmp_path / "rowwise.parquet").read_bytes()
    return old, new, stats


@pytest.mark.parametrize("layout", ["full", "compact"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "int8"])
def test_shards_are_byte_identical_to_the_rowwise_writer(teacher_dir, single_sentences, tmp_path, dtype, layout):
    """Batches of 3 sorted in windows of 8 and row groups of ~5 rows: row groups draw from
    several batches and straddle windows, so rows really are put back in order."""
    spec = CacheSpec(HIDDEN, ATTENTION, dtype, 64, layout=layout)
    _, new, stats = _both_writers(teacher_dir, single_sentences, tmp_path, spec, batch_size=3,
                                  row_group_bytes=20000, sort_window=8)
    assert stats["row_groups"] >= 5
    if layout == "compact":   # the per-row null columns were exercised
        table = new.read()
        assert 0 < table.column("attn_2").null_count < len(table)
        assert table.column("attn_input_2").null_count == len(table) - table.column("attn_2").null_count


@pytest.mark.parametrize("batch_size,sort_window,row_group_bytes", [(1, 16, 20000), (7, 12, 9000), (64, 4096, 10**9)])
def test_any_batching_writes_the_same_bytes(teacher_dir, single_sentences, tmp_path, batch_size, sort_window,
                                            row_group_bytes):
    """One-row batches (a window closes only with its last row), batches that do not divide
    the window, and one batch and one row group for the whole shard."""
    _both_writers(teacher_dir, single_sentences, tmp_path, CacheSpec(HIDDEN, ATTENTION, "int8", 64),
                  batch_size=batch_size, row_group_bytes=row_group_bytes, sort_window=sort_window)


def test_row_groups_close_at_the_row_that_reaches_the_budget():
    from pipeline.cache.writer import row_group_bounds

    costs = np.array([5, 5, 5, 1, 20, 3, 3])
    assert row_group_bounds(costs, 10) == [(0, 2), (2, 5), (5, 7)]
    assert row_group_bounds(costs, 1) == [(i, i + 1) for i in range(7)]
    assert row_group_bounds(costs, 10**6) == [(0, 7)]
    assert row_group_bounds(np.array([], dtype=np.int64), 10) == []


def test_parquet_runs_off_the_forward_thread_and_its_failure_names_the_file(teacher_dir, single_sentences,
                                                                             tmp_path, monkeypatch):
    """An error on the Parquet thread reaches the caller with the shard named; the half-written
    file is removed, not closed into something that looks complete."""
    model, tokenizer, _ = load_cache_teacher(teacher_dir, True)
    examples = read_example_range(single_sentences, 0, 40)
    threads = []
    real_write = pq.ParquetWriter.write_table

    def failing_write(self, table, row_group_size=None):
        import threading

        threads.append(threading.current_thread().name)
        if len(threads) == 3:
            raise OSError(errno.EIO, "injected write failure")
        return real_write(self, table, row_group_size)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", failing_write)
    out = tmp_path / "part-00000.parquet"
    with pytest.raises(OSError, match="injected write failure") as caught:
        write_cache_shard(examples, model, tokenizer, out, CacheSpec(HIDDEN, ATTENTION, "int8", 64),
                          device="cpu", batch_size=4, row_group_bytes=20000)
    assert any(str(out) in note for note in getattr(caught.value, "__notes__", []))
    assert threads and all(name.startswith("parquet part-00000") for name in threads)
    assert not out.exists()


def test_bad_labels_are_one_error_naming_file_and_row(teacher_dir, tmp_path):
    source = tmp_path / "train.parquet"
    table = pq.read_table(write_examples(source, 6))
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label",
                                    pa.array([0, 1, 0, 5, 1, 7], pa.int64())), source)
    with pytest.raises(InputError, match=r"train.parquet:3: label 5 does not fit the teacher's 2-class head"):
        write_shard_output(source, 0, 6, 0, teacher_dir, tmp_path / "out", CacheSpec([0, 4], [4], "float16", 64))
    assert not list((tmp_path / "out").glob("shards/*.parquet"))


def test_the_manifest_records_the_writers_throughput_as_run_history(teacher_dir, single_sentences, tmp_path):
    info = write_shard_output(single_sentences, 0, 40, 0, teacher_dir, tmp_path / "out",
                              CacheSpec(HIDDEN, ATTENTION, "int8", 64), batch_size=8)
    figures = info["shards"][0]["writer_figures"]
    assert figures["examples_per_s"] > 0 and info["examples_per_s"] == figures["examples_per_s"]
    assert set(figures["seconds"]) == {"tokenize", "total", "forward", "forward_waited", "transfer_encode",
                                       "parquet_write"}
    assert all(value >= 0 for value in figures["seconds"].values())
    assert figures["seconds"]["forward"] <= figures["seconds"]["total"]
    content = without_run_history(info)   # what two builds of one fingerprint must agree on
    assert "examples_per_s" not in content and content["shards"][0]["writer_figures"] == {}
    (tmp_path / "out" / "manifest.json").write_text(__import__("json").dumps({"info": info}))
    assembled = assemble_cache([tmp_path / "out"], tmp_path / "cache", teacher_dir)
    assert "examples_per_s" not in assembled   # shard 0's figure is not the whole cache's


def test_a_writer_killed_mid_shard_leaves_nothing_complete_looking(teacher_dir, tmp_path):
    """SIGKILL while row groups are being written (a slowed Parquet thread makes "while"
    certain): no published output, a partial file without a footer, and a rerun that builds the
    same bytes as an uninterrupted run."""
    source = write_examples(tmp_path / "train.parquet", 60)
    work = tmp_path / "work"
    spec_args = "[0, 2, 4], [2, 4], 'float16', 64"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(PROJECT_ROOT)!r})
        import pyarrow.parquet as pq
        real_write = pq.ParquetWriter.write_table
        def slow_write(self, table, row_group_size=None):
            time.sleep(0.2)
            return real_write(self, table, row_group_size)
        pq.ParquetWriter.write_table = slow_write
        from pipeline.stage import StageKey, build_stage
        from pipeline.cache.writer import CacheSpec
        from pipeline.cache.assemble import write_shard_output
        with build_stage({str(work)!r}, StageKey("teacher_cache_shard", "1", {{"shard_index": 0}})) as out:
            write_shard_output({str(source)!r}, 0, 60, 0, {str(teacher_dir)!r}, out.path, CacheSpec({spec_args}),
                               batch_size=4, row_group_bytes=3000)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    stage_dir = work / "teacher_cache_shard"
    deadline = time.monotonic() + 120
    partial_shard = None
    while time.monotonic() < deadline and process.poll() is None:
        found = list(stage_dir.glob(".*.partial/shards/part-00000.parquet")) if stage_dir.exists() else []
        if found and found[0].stat().st_size > 20000:   # a few row groups are on disk
            partial_shard = found[0]
            break
        time.sleep(0.01)
    assert partial_shard is not None, f"the writer finished or failed before it was killed: {process.stderr.read()}"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)

    published = [p for p in stage_dir.iterdir() if not p.name.startswith(".") and p.suffix != ".lock"]
    assert published == []
    with pytest.raises(pa.ArrowInvalid):
        pq.read_metadata(partial_shard)   # no footer: nothing would take it for a shard

    from pipeline.stage import StageKey, build_stage

    with build_stage(work, StageKey("teacher_cache_shard", "1", {"shard_index": 0})) as out:
        rerun = write_shard_output(source, 0, 60, 0, teacher_dir, out.path, CacheSpec([0, 2, 4], [2, 4], "float16", 64),
                                   batch_size=4, row_group_bytes=3000)
    fresh = write_shard_output(source, 0, 60, 0, teacher_dir, tmp_path / "fresh",
                               CacheSpec([0, 2, 4], [2, 4], "float16", 64), batch_size=4, row_group_bytes=3000)
    assert rerun["shards"][0]["rows"] == 60 and rerun["shards"][0]["row_groups"] > 3
    assert rerun["shards"][0]["sha256"] == fresh["shards"][0]["sha256"]
    assert not list(stage_dir.glob(".*.partial"))
