"""Teacher cache: scores as the model computes them, writer/reader parity, layout, refusals."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cache.packed import PackedBatch
from pipeline.cache.reader import open_cache
from pipeline.errors import InputError
from pipeline.cache.writer import CacheSpec, shard_ranges
from pipeline.cache.assemble import build_cache, write_shard_output
from pipeline.common.examples import count_examples, read_example_range
from pipeline.common.encoder_outputs import forward_internals, zero_padding

PROJECT_ROOT = Path(__file__).resolve().parents[1]

SENTENCES = [
    "a gripping , funny and ultimately heartbreaking film .",
    "dull .",
    "the acting is wooden and the plot never finds its footing",
    "one of the year 's best",
    "it 's a charming , often hilarious little movie that knows exactly what it wants to be",
    "a mess",
    "beautifully shot but emotionally inert",
    "i loved every minute of it",
    "the script feels like a first draft that nobody bothered to revise before the cameras rolled",
    "smart and sassy",
    "too long , too loud and too stupid",
    "an unexpected delight",
    "what a waste of a talented cast",
    "moving",
    "the director has a fine eye for detail and a tin ear for dialogue",
    "never boring",
    "by the end you will not care who lives or dies",
]


def make_teacher(directory: Path, tokenizer_dir: Path, layers: int = 4, num_labels: int = 2,
                 vocab_size: int | None = None, bare: bool = False, hidden_size: int = 32) -> Path:
    """A small random BERT with the real bert-base-uncased vocabulary, saved like a checkpoint."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size or tokenizer.vocab_size, hidden_size=hidden_size,
                        num_hidden_layers=layers, num_attention_heads=4, intermediate_size=2 * hidden_size,
                        max_position_embeddings=128, num_labels=num_labels)
    model = BertModel(config) if bare else BertForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, minilm_dir) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher"), minilm_dir)


def write_examples(path: Path, n: int = 17, pair: bool = False) -> Path:
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(n)]
    table = pa.table({
        "id": [f"train-{i}" for i in range(n)],
        "text_a": texts,
        "text_b": [SENTENCES[(i + 3) % len(SENTENCES)] for i in range(n)] if pair else pa.nulls(n, pa.string()),
        "label": pa.array([i % 2 for i in range(n)], pa.int64()),
    })
    pq.write_table(table, path)
    return path


@pytest.fixture
def examples(tmp_path) -> Path:
    return write_examples(tmp_path / "train.parquet")


def live_teacher(teacher_dir: Path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()


# --------------------------------------------------------------------------------------------
def test_scores_equal_the_pre_softmax_scores_transformers_computes(teacher_dir, monkeypatch):
    """Our hook-derived scores are exactly what BERT's eager attention feeds its softmax."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    encoded = tokenizer(SENTENCES[:3], SENTENCES[3:6], padding=True, return_tensors="pt")
    ours = forward_internals(model, encoded["input_ids"], encoded["token_type_ids"],
                             encoded["attention_mask"], attention_layers=[1, 2, 3, 4]).scores

    softmax_inputs = []
    original_softmax = torch.nn.functional.softmax

    def recording_softmax(tensor, *args, **kwargs):
        softmax_inputs.append(tensor.detach().clone())
        return original_softmax(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "softmax", recording_softmax)
    with torch.no_grad():
        probs = model(**encoded, output_attentions=True).attentions
    monkeypatch.undo()

    assert len(softmax_inputs) == 4  # one per layer, in order
    real_key = encoded["attention_mask"].bool()[:, None, None, :].expand_as(ours[1])
    assert (~real_key).any(), "the batch must contain padding for the test to mean something"
    for layer in (1, 2, 3, 4):
        internal = softmax_inputs[layer - 1]  # scores + additive mask (0 on real keys)
        assert internal.shape == ours[layer].shape
        torch.testing.assert_close(ours[layer][real_key], internal[real_key], rtol=0, atol=1e-6)
        additive = (1 - encoded["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
        torch.testing.assert_close(original_softmax(ours[layer] + additive, dim=-1), probs[layer - 1],
                                   rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
def test_shard_assignment_is_contiguous_and_deterministic(tmp_path):
    assert shard_ranges(25, 10) == [(0, 10), (10, 20), (20, 25)]
    assert shard_ranges(0, 10) == []
    a = write_examples(tmp_path / "a.parquet", 5)
    (tmp_path / "aug" / "shards").mkdir(parents=True)
    shutil.copy(a, tmp_path / "aug" / "shards" / "part-00000.parquet")
    write_examples(tmp_path / "aug" / "shards" / "part-00001.parquet", 7)
    assert count_examples(tmp_path / "aug") == 12
    ids = read_example_range(tmp_path / "aug", 3, 8).column("id").to_pylist()
    assert ids == ["train-3", "train-4", "train-0", "train-1", "train-2"]  # crosses the file boundary
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("first line\n\nsecond line\nthird\n")
    assert count_examples(corpus) == 3
    table = read_example_range(corpus, 1, 3)
    assert table.column("text_a").to_pylist() == ["second line", "third"]
    assert table.column("label").null_count == 2


@pytest.mark.parametrize("layout", ["full", "compact"])
@pytest.mark.parametrize("dtype,atol", [("float32", 2e-5), ("float16", 2e-2), ("bfloat16", 1e-1),
                                        ("int8", 4e-2)])
def test_cached_batches_equal_the_live_teacher(teacher_dir, examples, tmp_path, dtype, atol, layout):
    """Reader batches (padded, shuffled, bucketed, completed) hold what the teacher computes live.

    Layers 0, 2, 4 and scores of 2, 4 with a 32-wide, 4-head teacher: in the compact layout
    layer 0 is recomputed, the scores of rows longer than 8 tokens come from stored inputs.
    """
    spec = CacheSpec([0, 2, 4], [2, 4], dtype, 64, layout=layout)
    info = build_cache(examples, teacher_dir, tmp_path / "cache", spec, shard_size=6, batch_size=4,
                       row_group_bytes=4000)
    assert [s["rows"] for s in info["shards"]] == [6, 6, 5]
    schema = pq.read_schema(tmp_path / "cache" / info["shards"][0]["file"])
    expected_type = {"float32": pa.list_(pa.float32()), "float16": pa.list_(pa.float16()),
                     "bfloat16": pa.list_(pa.uint16()), "int8": pa.binary()}[dtype]
    assert schema.field("attn_2").type == expected_type
    assert ("hidden_0" in schema.names) == (layout == "full")
    assert ("attn_input_2" in schema.names) == (layout == "compact")
    model = live_teacher(teacher_dir)
    reader = open_cache(tmp_path / "cache")
    seen = []
    for batch in reader.batches(5, seed=3, epoch=0, shuffle_buffer=6, bucket_batches=2):
        seen += batch["ids"]
        batch = reader.complete(batch)
        with torch.inference_mode():
            live = forward_internals(model, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                                     hidden_layers=[0, 2, 4], attention_layers=[2, 4])
        zero_padding(live.hidden, live.scores, batch["attention_mask"])
        torch.testing.assert_close(batch["teacher_logits"], live.logits, rtol=0, atol=1e-5)
        for layer in (0, 2, 4):
            assert batch["teacher_hidden"][layer].dtype == torch.float32
            torch.testing.assert_close(batch["teacher_hidden"][layer], live.hidden[layer], rtol=1e-2, atol=atol)
        for layer in (2, 4):
            torch.testing.assert_close(batch["teacher_scores"][layer], live.scores[layer], rtol=1e-2, atol=atol)
        assert batch["labels"].dtype == torch.long
        assert batch["labels"].tolist() == [int(i.split("-")[1]) % 2 for i in batch["ids"]]
    assert sorted(seen) == sorted(f"train-{i}" for i in range(17))


def test_values_do_not_depend_on_the_batch_an_example_was_cached_in(teacher_dir, tmp_path):
    """Batch 1 (no padding) vs batch 8 (padded to other examples): the same numbers, up to noise."""
    source = write_examples(tmp_path / "train.parquet", 12)
    spec = CacheSpec([0, 4], [1, 4], "float32", 64, layout="full")
    tables = []
    for batch_size in (1, 8):
        out = tmp_path / f"bs{batch_size}"
        info = write_shard_output(source, 0, 12, 0, teacher_dir, out, spec, batch_size=batch_size)
        tables.append(pq.read_table(out / info["shards"][0]["file"]))
    alone, batched = tables
    assert alone.column("id").to_pylist() == batched.column("id").to_pylist()  # source order
    assert alone.column("input_ids").to_pylist() == batched.column("input_ids").to_pylist()
    for column in ("logits", "hidden_0", "hidden_4", "attn_1", "attn_4"):
        a = alone.column(column).combine_chunks()
        b = batched.column(column).combine_chunks()
        assert a.offsets.equals(b.offsets)  # real tokens only: the same ragged shapes
        np.testing.assert_allclose(a.values.to_numpy(), b.values.to_numpy(), rtol=1e-4, atol=1e-5)


def test_layout_is_ragged_zstd_with_byte_sized_row_groups(teacher_dir, examples, tmp_path):
    spec = CacheSpec([0, 4], [4], "float16", 64, layout="full")
    info = write_shard_output(examples, 0, 17, 0, teacher_dir, tmp_path / "out", spec, row_group_bytes=6000)
    shard = pq.ParquetFile(tmp_path / "out" / info["shards"][0]["file"])
    table = shard.read()
    lengths = table.column("length").to_numpy()
    heads, hidden = 4, 32
    assert (table.column("hidden_4").combine_chunks().value_lengths().to_numpy() == lengths * hidden).all()
    assert (table.column("attn_4").combine_chunks().value_lengths().to_numpy() == heads * lengths ** 2).all()
    assert shard.metadata.num_row_groups == info["shards"][0]["row_groups"] > 1
    for group in range(shard.metadata.num_row_groups):
        column = shard.metadata.row_group(group).column(0)
        assert column.compression == "ZSTD"
    split = write_shard_output(examples, 0, 5, 0, teacher_dir, tmp_path / "bss", spec, byte_stream_split=True)
    encodings = pq.read_metadata(tmp_path / "bss" / split["shards"][0]["file"]).row_group(0)
    assert "BYTE_STREAM_SPLIT" in encodings.column(shard.schema_arrow.get_field_index("attn_4")).encodings
    meta = json.loads(shard.schema_arrow.metadata[b"tinykd.teacher_cache"])
    assert meta["hidden_layers"] == [0, 4] and meta["dtype"] == "float16"
    assert info["tokenizer_vocab_sha256"] and info["teacher"]["head_trained"] is True


# --------------------------------------------------------------------------------------------
@pytest.fixture
def cache_dir(teacher_dir, examples, tmp_path) -> Path:
    build_cache(examples, teacher_dir, tmp_path / "cache", CacheSpec([0, 2, 4], [2, 4], "float16", 64),
                shard_size=6, row_group_bytes=3000)
    return tmp_path / "cache"


def _ids(batches):
    # the DataLoader hands over packed batches (expanded on the training device)
    return [b.ids if isinstance(b, PackedBatch) else b["ids"] for b in batches]


def test_reader_order_is_deterministic_resumable_and_worker_independent(cache_dir):
    reader = open_cache(cache_dir)
    kwargs = dict(seed=7, shuffle_buffer=5, bucket_batches=2)
    first = _ids(reader.batches(4, epoch=0, **kwargs))
    assert first == _ids(reader.batches(4, epoch=0, **kwargs))
    assert first != _ids(reader.batches(4, epoch=1, **kwargs))
    assert len(first) == reader.num_batches(4) == 5
    assert [len(b) for b in first] == [4, 4, 4, 4, 1]  # only the last batch is partial
    assert sorted(sum(first, [])) == sorted(f"train-{i}" for i in range(17))
    assert _ids(reader.batches(4, epoch=0, start_batch=3, **kwargs)) == first[3:]
    dataset = reader.dataset(4, seed=7, epoch=0, start_batch=1, shuffle_buffer=5, bucket_batches=2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    assert len(dataset) == 4
    assert _ids(loader) == first[1:]


def test_originals_only_reads_the_unaugmented_rows_of_the_same_shards(teacher_dir, tmp_path):
    """The "without augmentation" setting: the rows with aug_index 0, values as in a full read."""
    n = 23
    table = pa.table({"id": [f"train-{i // 3}-aug{i % 3}" for i in range(n)],
                      "orig_id": [f"train-{i // 3}" for i in range(n)],
                      "aug_index": pa.array([i % 3 for i in range(n)], pa.int32()),
                      "text_a": [SENTENCES[i % len(SENTENCES)] for i in range(n)],
                      "label": pa.array([(i // 3) % 2 for i in range(n)], pa.int64())})
    pq.write_table(table, tmp_path / "augmented.parquet")
    build_cache(tmp_path / "augmented.parquet", teacher_dir, tmp_path / "cache",
                CacheSpec([0, 2], [2], "float16", 64), shard_size=10, row_group_bytes=2000)
    full, originals = open_cache(tmp_path / "cache"), open_cache(tmp_path / "cache", originals_only=True)
    assert (full.num_examples, originals.num_examples) == (23, 8)
    assert len(originals.row_groups) < len(full.row_groups)   # groups holding no original are skipped
    kwargs = dict(seed=3, shuffle_buffer=6, bucket_batches=2)
    batches = list(originals.batches(3, **kwargs))
    assert len(batches) == originals.num_batches(3) == 3
    assert sorted(sum(_ids(batches), [])) == sorted(f"train-{k}-aug0" for k in range(8))
    reference = {}
    for batch in full.batches(32, shuffle=False):
        for row, example_id in enumerate(batch["ids"]):
            length = int(batch["attention_mask"][row].sum())
            reference[example_id] = (batch["teacher_logits"][row], batch["teacher_hidden"][2][row, :length])
    for batch in batches:
        for row, example_id in enumerate(batch["ids"]):
            length = int(batch["attention_mask"][row].sum())
            assert torch.equal(batch["teacher_logits"][row], reference[example_id][0])
            assert torch.equal(batch["teacher_hidden"][2][row, :length], reference[example_id][1])
    assert _ids(originals.batches(3, start_batch=1, **kwargs)) == _ids(batches)[1:]


def test_originals_only_refuses_a_cache_without_aug_index(cache_dir):
    shard = cache_dir / "shards" / "part-00000.parquet"
    table = pq.read_table(shard).drop_columns(["aug_index"])
    pq.write_table(table, shard)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    manifest["info"]["shards"][0].update(bytes=shard.stat().st_size)
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="predates; rebuild") as err:
        open_cache(cache_dir, originals_only=True)
    assert str(shard) in str(err.value)


def test_reader_reads_only_requested_columns(cache_dir):
    no_attention = open_cache(cache_dir, hidden_layers=[0, 4], attention_layers=[])
    assert not any(c.startswith("attn_") for c in no_attention.columns)
    assert "hidden_2" not in no_attention.columns
    batch = next(iter(no_attention.batches(8)))
    assert set(batch["teacher_hidden"]) == {4}                  # layer 0 is recomputed ...
    batch = no_attention.complete(batch)                        # ... from the token ids
    assert batch["teacher_scores"] == {} and set(batch["teacher_hidden"]) == {0, 4}
    tokens_only = open_cache(cache_dir, with_teacher=False)
    assert tokens_only.columns == ["id", "label", "length", "input_ids", "token_type_ids"]
    batch = next(iter(tokens_only.batches(8)))
    assert batch["teacher_logits"] is None and batch["teacher_hidden"] == {} and batch["teacher_scores"] == {}
    assert batch["input_ids"].shape == batch["attention_mask"].shape


def test_reader_refuses_a_cache_that_does_not_fit_the_request(cache_dir):
    with pytest.raises(InputError, match=r"hidden layer\(s\) \[1\].*holds \[0, 2, 4\]"):
        open_cache(cache_dir, hidden_layers=[0, 1])
    with pytest.raises(InputError, match=r"attention layer\(s\) \[3\]"):
        open_cache(cache_dir, attention_layers=[3])
    with pytest.raises(InputError, match="stores float16, the trainer asked for float32"):
        open_cache(cache_dir, dtype="float32")


def test_corrupt_or_truncated_shards_are_refused_with_the_file_named(cache_dir):
    from pipeline.cache.inspect_cache import inspect_cache

    assert open_cache(cache_dir).verify() == []
    shard = sorted((cache_dir / "shards").glob("part-*.parquet"))[1]
    data = bytearray(shard.read_bytes())
    # Damage a data page in place (same size): the page CRC and the checksum catch it.
    shard.unlink()  # shards are hard links: break the link instead of writing through it
    middle = len(data) // 3
    data[middle:middle + 64] = bytes(64)
    shard.write_bytes(bytes(data))
    reader = open_cache(cache_dir)  # sizes and footers are fine
    problems = reader.verify()
    assert problems and str(shard) in problems[0]
    with pytest.raises(InputError, match=str(shard)):
        for _ in reader.batches(4, shuffle=False):
            pass
    report, ok = inspect_cache(cache_dir, verify=True)
    assert not ok and str(shard) in report
    # Truncated: refused at open, naming the file.
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(InputError, match=f"{shard}.*truncated"):
        open_cache(cache_dir)
    shard.unlink()
    with pytest.raises(InputError, match=f"{shard}.*missing"):
        open_cache(cache_dir)


def test_inspect_summarises_the_cache(cache_dir):
    from pipeline.cache.inspect_cache import inspect_cache, summarise

    report, ok = inspect_cache(cache_dir, verify=True)
    assert ok, report
    summary = summarise(cache_dir)
    assert summary["examples"] == 17 and summary["shards"] == 3
    assert summary["hidden_layers"] == [0, 2, 4] and summary["dtype"] == "float16"
    assert summary["bytes_per_example"] == pytest.approx(summary["bytes"] / 17)
    tokens = sum(s["tokens"] for s in json.loads((cache_dir / "manifest.json").read_text())["info"]["shards"])
    assert summary["bytes_per_token"] == pytest.approx(summary["bytes"] / tokens)
    kinds = summary["by_kind_per_token"]
    assert set(kinds) == {"hidden", "scores", "other"} and all(v > 0 for v in kinds.values())
    assert sum(kinds.values()) <= summary["bytes_per_token"]   # the rest: Parquet footers
    assert summary["parts_bytes"] > 0 and summary["layout"] == "compact"
    assert summary["naive_bytes_per_token"] == pytest.approx(
        summary["naive_bytes_per_example"] / summary["mean_tokens"], rel=1e-3)
    assert summary["naive_bytes_per_example"] > 5 * summary["bytes_per_example"]
    for needle in ("examples", "17", "bytes/token", "bytes/example", "float16", "verify: OK", "teacher",
                   "teacher parts", "naive layout"):
        assert needle in report


# --------------------------------------------------------------------------------------------
def test_bad_teachers_and_layers_are_one_clear_error(teacher_dir, examples, tmp_path, minilm_dir):
    spec = CacheSpec([0, 4], [4], "float16", 64)
    small_vocab = make_teacher(tmp_path / "small-vocab", minilm_dir, vocab_size=1000)
    with pytest.raises(InputError, match="vocabulary"):
        write_shard_output(examples, 0, 5, 0, small_vocab, tmp_path / "a", spec)
    with pytest.raises(InputError, match=r"hidden layer\(s\) \[9\] outside 0..4"):
        write_shard_output(examples, 0, 5, 0, teacher_dir, tmp_path / "b", CacheSpec([0, 9], [4]))
    with pytest.raises(InputError, match=r"attention layer\(s\) \[0\] outside 1..4"):
        write_shard_output(examples, 0, 5, 0, teacher_dir, tmp_path / "c", CacheSpec([0], [0, 4]))
    with pytest.raises(InputError, match="task has 3 classes but the teacher's head has 2"):
        write_shard_output(examples, 0, 5, 0, teacher_dir, tmp_path / "d", spec, task_info={"num_labels": 3})
    for name in ("a", "b", "c", "d"):
        assert not list((tmp_path / name).glob("shards/*.parquet"))


def test_full_disk_mid_shard_is_one_clear_error_and_leaves_nothing(teacher_dir, tmp_path):
    """A real write failure (RLIMIT_FSIZE) inside a stage build: clear error, no shard visible."""
    source = write_examples(tmp_path / "train.parquet", 40)
    work = tmp_path / "work"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(PROJECT_ROOT)!r})
        from pipeline.stage import StageKey, build_stage
        from pipeline.cache.writer import CacheSpec
        from pipeline.cache.assemble import write_shard_output
        key = StageKey("teacher_cache_shard", "1", {{"shard_index": 0}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write (EFBIG), not the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        with build_stage({str(work)!r}, key) as out:
            write_shard_output({str(source)!r}, 0, 40, 0, {str(teacher_dir)!r}, out.path,
                               CacheSpec([0, 2, 4], [2, 4], "float32", 64), row_group_bytes=4000)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "part-00000.parquet" in last and "disk full" in last, result.stderr[-2000:]
    stage_dir = work / "teacher_cache_shard"
    assert not stage_dir.exists() or [p for p in stage_dir.iterdir() if p.suffix != ".lock"] == []


def _synthetic_cache(directory: Path, rows: int, hidden: int = 64, heads: int = 4) -> Path:
    """A cache of random values written by the real writer classes (no model needed)."""
    from pipeline.stage import sha256_file
    from pipeline.cache.writer import RowGroupBuffer, cache_schema

    spec = CacheSpec([0, 1], [1], "float16", 64, layout="full")   # a format-1 cache, as before
    schema = cache_schema(spec, pa.int64())
    shard = directory / "shards" / "part-00000.parquet"
    shard.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(shard, schema, compression="zstd") as writer:
        buffer = RowGroupBuffer(writer, schema, 64 << 10)
        for i in range(rows):
            length = int(rng.integers(5, 40))
            buffer.add({"id": f"x-{i}", "orig_id": f"x-{i}", "aug_index": 0, "label": i % 2, "length": length,
                        "input_ids": np.arange(length, dtype=np.int32),
                        "token_type_ids": np.zeros(length, np.int8),
                        "logits": rng.standard_normal(2).astype(np.float32),
                        "hidden_0": rng.standard_normal(length * hidden).astype(np.float16),
                        "hidden_1": rng.standard_normal(length * hidden).astype(np.float16),
                        "attn_1": rng.standard_normal(heads * length * length).astype(np.float16)})
        buffer.flush()
    info = {"hidden_layers": [0, 1], "attention_layers": [1], "dtype": "float16", "with_logits": True,
            "hidden_size": hidden, "num_heads": heads, "num_labels": 2,
            "shards": [{"file": "shards/part-00000.parquet", "index": 0, "rows": rows,
                        "bytes": shard.stat().st_size, "sha256": sha256_file(shard)}]}
    (directory / "manifest.json").write_text(json.dumps({"info": info}))
    return directory


def test_reader_memory_does_not_grow_with_the_cache(tmp_path):
    """Peak memory while streaming an epoch (Arrow's decoded row groups and the numpy windows
    and batches gathered from them): bounded by the shuffle window, not the cache."""
    import tracemalloc

    peaks = []
    for rows in (300, 1200):
        reader = open_cache(_synthetic_cache(tmp_path / f"c{rows}", rows))
        assert len(reader.row_groups) > 10
        tracemalloc.start()   # numpy reports its allocations to tracemalloc
        baseline, peak, count = pa.total_allocated_bytes(), 0, 0
        for batch in reader.batches(16, seed=0, shuffle_buffer=100):
            peak = max(peak, pa.total_allocated_bytes() - baseline + tracemalloc.get_traced_memory()[0])
            count += len(batch["ids"])
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert count == rows
        peaks.append(peak)
    cache_bytes = (tmp_path / "c1200" / "shards" / "part-00000.parquet").stat().st_size
    assert peaks[1] < 2 * peaks[0] and peaks[1] < cache_bytes, peaks


def test_a_manifest_that_disagrees_with_its_shards_is_refused_naming_both(cache_dir):
    manifest_path = cache_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["info"]["hidden_size"] += 16
    manifest_path.write_text(json.dumps(manifest))
    shard = cache_dir / manifest["info"]["shards"][0]["file"]
    with pytest.raises(InputError, match=rf"{shard}: the manifest \({manifest_path}\) says hidden_size="):
        open_cache(cache_dir)


def test_a_corrupt_shard_is_not_linked_into_a_new_cache(teacher_dir, examples, tmp_path):
    """assemble_cache hard-links shards: a shard damaged since it was written is refused."""
    from pipeline.cache.assemble import assemble_cache, write_shard_output

    piece = tmp_path / "piece"
    info = write_shard_output(examples, 0, 17, 0, teacher_dir, piece, CacheSpec([0, 2], [2], "float16", 64))
    (piece / "manifest.json").write_text(json.dumps({"info": info}))
    shard = piece / info["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match=rf"{shard}: teacher-cache shard's content differs"):
        assemble_cache([piece], tmp_path / "cache")
    assert not list((tmp_path / "cache" / "shards").glob("*.parquet"))
