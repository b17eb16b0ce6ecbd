"""Benchmark the teacher cache: bytes per token by layout and storage, errors, write and read speed.

Sizes and errors come from *real* activations: the packaged MiniLM-L6 encoder (6 layers, 384
wide, 12 heads; random weights compress differently) on the first ``--examples`` SST-2
training sentences and MRPC training pairs from ../shared. Two layer sets: ``profile`` (what
the shipped profiles cache: the uniform, top and bottom maps of a 4-layer student, i.e. every
layer) and ``uniform`` (the uniform map alone: hidden [0,2,3,5,6], scores [2,3,5,6]). Per set
and task, four caches of the same rows:

* ``full/float32``: format-1 columns in fp32, the reference for the errors;
* ``full/float16``: format-1 columns in fp16 (the previous default);
* ``compact/float16`` and ``compact/int8``: format 2 (layer 0 and derivable scores recomputed).

Figures (one JSON line, then human-readable lines):

* ``sizes``: bytes per real token and per example, by column kind (hidden / scores / other),
  the naive fp32-padded layout, the teacher parts kept once, and each cache's ratio to
  ``full/float16``;
* ``errors``: per column, mean and max over examples of ``‖x̂ − x‖₂ / ‖x‖₂`` against fp32;
* ``write``: a BERT-base-shaped teacher (random weights: speed does not depend on them) on
  ``--timing-examples`` SST-2 sentences: bare forward vs the cache writer per layout/storage,
  examples/s, best of ``--repeats`` alternating runs (target: writer >= 0.85x the forward);
* ``reader_eps``: examples/s of batches (batch 32, every column) per cache: ``reader`` = the
  reader alone (decompression, dequantisation, padding: the DataLoader side; target: compact
  >= 0.9x ``full/float16``), ``completed`` = with the recomputed layer 0 and scores too, on this
  CPU (the trainer does that part on its device, beside the student's step);
* ``projection``: cache size for SST-2 x20 and MNLI x10 with a BERT-base teacher and the
  uniform 4-layer map, per layout/storage, from the measured bytes per stored value and a
  length distribution (SST-2: every training sentence tokenised; MNLI: MRPC's pair lengths
  stand in, stated as such; MNLI itself is not available offline).

    flock /tmp/tinykd-cpu.lock .venv/bin/python scripts/bench_cache.py --examples 512
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
VARIANTS = (("full", "float32"), ("full", "float16"), ("compact", "float16"), ("compact", "int8"))
LAYER_SETS = {"profile": ([0, 1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]),
              "uniform": ([0, 2, 3, 5, 6], [2, 3, 5, 6])}
PAPER_SETTINGS = {"SST-2 x20": (67_349, 21, "sst2"), "MNLI x10": (392_702, 11, "mnli")}


def glue_examples(task: str, limit: int | None) -> pa.Table:
    """The first ``limit`` training rows of SST-2 or MRPC in the example-source layout."""
    from pipeline.prepare.splits import prepare, read_split

    out = Path(tempfile.mkdtemp(prefix=f"bench-{task}-"))
    prepare({"kind": "glue", "glue_dir": GLUE, "task": task}, out)
    table = read_split(out, "train")
    shutil.rmtree(out)
    return table if limit is None else table.slice(0, limit)


def write_parquet(table: pa.Table, path: Path) -> Path:
    pq.write_table(table, path)
    return path


def per_example(cache_dir: Path) -> dict:
    from pipeline.cache.reader import open_cache

    reader = open_cache(cache_dir)
    found = {}
    for batch in reader.batches(32, shuffle=False):
        batch = reader.complete(batch)
        for row, example_id in enumerate(batch["ids"]):
            length = int(batch["attention_mask"][row].sum())
            found[example_id] = ({l: v[row, :length].clone() for l, v in batch["teacher_hidden"].items()},
                                 {l: v[row, :, :length, :length].clone()
                                  for l, v in batch["teacher_scores"].items()})
    return found


def read_speed(cache_dir: Path, repeats: int) -> dict[str, float]:
    """Examples/s of the reader's batches alone (what the DataLoader side does), and with
    :meth:`complete` on this CPU too (what the trainer adds on its device for a compact cache)."""
    from pipeline.cache.reader import open_cache

    reader = open_cache(cache_dir)
    figures = {}
    for label, finish in (("reader", lambda b: b), ("completed", reader.complete)):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            count = sum(len(finish(b)["ids"]) for b in reader.batches(32, seed=0, epoch=0))
            best = min(best, time.perf_counter() - start)
        figures[label] = round(count / best, 1)
    return figures


def value_bytes(cache_dir: Path, info: dict) -> dict[str, float]:
    """Compressed bytes per stored value: hidden-like (hidden states, layer inputs) and scores,
    scales included, plus the other columns' bytes per token."""
    totals = {"hidden": [0, 0], "scores": [0, 0], "other": [0, 0]}   # bytes, values
    for shard in info["shards"]:
        file = cache_dir / shard["file"]
        metadata = pq.read_metadata(file)
        table = pq.read_table(file)
        for name in table.column_names:
            base = name[:-len("_scale")] if name.endswith("_scale") else name
            kind = ("hidden" if base.startswith(("hidden_", "attn_input_")) else
                    "scores" if base.startswith("attn_") else "other")
            index = table.schema.get_field_index(name)
            totals[kind][0] += sum(metadata.row_group(g).column(index).total_compressed_size
                                   for g in range(metadata.num_row_groups))
            if kind != "other" and not name.endswith("_scale"):
                column = table.column(name).combine_chunks()
                lengths = (pa.compute.binary_length(column) if pa.types.is_binary(column.type)
                           else column.value_lengths())
                totals[kind][1] += pa.compute.sum(lengths).as_py() or 0
    tokens = sum(int(s["tokens"]) for s in info["shards"])
    return {"hidden": totals["hidden"][0] / max(totals["hidden"][1], 1),
            "scores": totals["scores"][0] / max(totals["scores"][1], 1),
            "other_per_token": totals["other"][0] / tokens}


def projected_bytes(lengths: np.ndarray, layout: str, per_value: dict, hidden=768, heads=12,
                    hidden_layers=(0, 3, 6, 9, 12), attention_layers=(3, 6, 9, 12)) -> float:
    """Bytes of one copy of every row of ``lengths`` with a BERT-base teacher (uniform 12 -> 4)."""
    from pipeline.cache.compact import CompactPlan

    plan = CompactPlan.make(layout, hidden_layers, attention_layers)
    total = 0.0
    for length in lengths.astype(np.float64):
        values_h = len(plan.stored_hidden) * length * hidden
        values_s = 0.0
        for layer in attention_layers:
            if plan.row_stores_scores(layer, int(length), hidden, heads):
                values_s += heads * length * length
            elif plan.score_sources.get(layer) == "row":
                values_h += length * hidden
        total += values_h * per_value["hidden"] + values_s * per_value["scores"] \
            + length * per_value["other_per_token"]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=512, help="rows per task for sizes and errors")
    parser.add_argument("--timing-examples", type=int, default=256, help="SST-2 rows for write timing")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-timing", action="store_true", help="sizes, errors and reader only")
    parser.add_argument("--timing-only", action="store_true",
                        help="the write timing alone (no sizes, errors, reader or projection)")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pipeline.cache.compact import relative_errors
    from pipeline.cache.writer import CacheSpec, write_cache_shard
    from pipeline.cache.assemble import build_cache
    from pipeline.common.tokenize import length_sorted_batches, pad_batch, tokenize_examples
    from pipeline.teacher.finetune import default_teacher_dir

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    teacher = default_teacher_dir()
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    result: dict = {"threads": torch.get_num_threads(), "examples": args.examples, "sizes": {},
                    "errors": {}, "reader_eps": {}}
    per_value = {}

    for task in () if args.timing_only else ("SST-2", "MRPC"):
        source = write_parquet(glue_examples(task, args.examples), work / f"{task}.parquet")
        for layer_set, (hidden, attention) in LAYER_SETS.items():
            caches = {}
            for layout, storage in VARIANTS:
                name = f"{layout}/{storage}"
                cache = work / f"{task}-{layer_set}-{layout}-{storage}"
                info = build_cache(source, teacher, cache, CacheSpec(hidden, attention, storage, 128,
                                                                     layout=layout),
                                   shard_size=args.examples, batch_size=args.batch_size)
                caches[name] = (cache, info)
            base = caches["full/float16"][1]["size"]["bytes_per_token"]
            sizes = {}
            for name, (cache, info) in caches.items():
                size = dict(info["size"])
                size["ratio_to_full_float16"] = round(size["bytes_per_token"] / base, 3)
                sizes[name] = size
                if layer_set == "uniform" and name != "full/float32":
                    per_value[(task, name)] = value_bytes(cache, info)
            result["sizes"][f"{task}/{layer_set}"] = sizes
            reference = per_example(caches["full/float32"][0])
            result["errors"][f"{task}/{layer_set}"] = {
                name: relative_errors(reference, per_example(cache))
                for name, (cache, _) in caches.items() if name != "full/float32"}
            result["reader_eps"][f"{task}/{layer_set}"] = {
                name: read_speed(cache, args.repeats) for name, (cache, _) in caches.items()
                if name != "full/float32"}
            for cache, _ in caches.values():
                shutil.rmtree(cache)

    if not args.timing_only:
        # Projection for a BERT-base teacher at the paper's augmentation, per layout/storage.
        sst2_lengths = np.array([len(x) for x in tokenize_examples(
            tokenizer, glue_examples("SST-2", None), 64)[0]])
        mrpc_lengths = np.array([len(x) for x in tokenize_examples(
            tokenizer, glue_examples("MRPC", None), 128)[0]])
        projection = {}
        for setting, (rows, copies, kind) in PAPER_SETTINGS.items():
            lengths, task = (sst2_lengths, "SST-2") if kind == "sst2" else (mrpc_lengths, "MRPC")
            scale = rows * copies / len(lengths)
            projection[setting] = {
                name: round(projected_bytes(lengths, name.split("/")[0], per_value[(task, name)]) * scale / 1e9, 1)
                for name in ("full/float16", "compact/float16", "compact/int8")}
            projection[setting]["length_distribution"] = ("SST-2 train, all sentences" if kind == "sst2"
                                                          else "MRPC train pairs (stand-in for MNLI)")
        result["projection_gb"] = projection

    if not args.skip_timing:
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, num_labels=2)).eval()
        examples = glue_examples("SST-2", args.timing_examples)
        from pipeline.common.examples import normalise_examples

        examples = normalise_examples(examples, Path("sst2"))
        spec_layers = ([0, 3, 6, 9, 12], [3, 6, 9, 12])

        def bare_forward() -> float:
            start = time.perf_counter()
            ids, types = tokenize_examples(tokenizer, examples, 128)
            with torch.inference_mode():
                for batch in length_sorted_batches([len(x) for x in ids], args.batch_size, 4096):
                    i, t, m = pad_batch([ids[k] for k in batch], [types[k] for k in batch], 0)
                    model(input_ids=i, token_type_ids=t, attention_mask=m).logits.cpu()
            return time.perf_counter() - start

        def cache_write(layout: str, storage: str) -> float:
            start = time.perf_counter()
            write_cache_shard(examples, model, tokenizer, work / "timing.parquet",
                              CacheSpec(*spec_layers, storage, 128, layout=layout), batch_size=args.batch_size,
                              device="cpu")
            return time.perf_counter() - start

        bare_forward()  # warm-up
        runs: dict[str, list[float]] = {"forward": []}
        for _ in range(args.repeats):
            runs["forward"].append(bare_forward())
            for layout, storage in VARIANTS[1:]:
                runs.setdefault(f"{layout}/{storage}", []).append(cache_write(layout, storage))
        n = examples.num_rows
        forward_eps = n / min(runs["forward"])
        result["write"] = {"examples": n, "forward_eps": round(forward_eps, 1),
                           **{name: {"eps": round(n / min(s), 1), "ratio": round(min(runs["forward"]) / min(s), 3)}
                              for name, s in runs.items() if name != "forward"},
                           "runs_s": {k: [round(x, 2) for x in v] for k, v in runs.items()}}
    shutil.rmtree(work)

    print(json.dumps(result))
    for key, sizes in result["sizes"].items():
        line = ", ".join(f"{name} {s['bytes_per_token']:.0f} B/token ({s['ratio_to_full_float16']:.2f}x)"
                         for name, s in sizes.items())
        print(f"{key}: {line}; naive fp32 padded {sizes['full/float16']['naive_fp32_padded_bytes_per_token']:.0f} B/token")
    for key, errors in result["errors"].items():
        worst = {name: max(e["max"] for e in cols.values()) for name, cols in errors.items()}
        print(f"{key}: worst per-example relative error vs fp32: " +
              ", ".join(f"{n} {w:.4f}" for n, w in worst.items()))
    for key, eps in result["reader_eps"].items():
        print(f"{key}: ex/s reader / completed on this CPU: " +
              ", ".join(f"{n} {v['reader']} / {v['completed']}" for n, v in eps.items()))
    for setting, sizes in result.get("projection_gb", {}).items():
        print(f"projected {setting} (BERT-base, uniform 4-layer map): " +
              ", ".join(f"{n} {v} GB" for n, v in sizes.items() if n != "length_distribution"))
    if "write" in result:
        w = result["write"]
        print(f"writing (BERT-base shape, {w['examples']} SST-2 rows): forward {w['forward_eps']} ex/s; " +
              ", ".join(f"{n} {v['eps']} ex/s ({v['ratio']:.2f}x)" for n, v in w.items()
                        if isinstance(v, dict) and "eps" in v))


if __name__ == "__main__":
    main()
