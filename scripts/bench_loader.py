"""Benchmark the teacher-cache loader on this CPU: the host side against pyarrow's own decode.

Builds a BERT-base-width cache with the real writer: a 4-layer, 768-wide, 12-head random BERT
teacher (speed does not depend on the weights) over the first ``--examples`` SST-2 training
sentences from ../shared (real lengths, truncated at 64 tokens), in the default storage
(compact int8: hidden layers 1-4 stored with one scale per token, layer 0 and the scores
recomputed by the trainer; ``--layout full`` stores the four layers' scores too). Then, over
one epoch at ``--batch-size`` (default 256; best of ``--repeats`` runs each), examples/s of:

* ``floor``: pyarrow reading and decoding the same row groups and columns
  (``ParquetFile.read_row_group``), nothing else: what any reader pays;
* ``before``: the collation the reader had before issue 27 (tests/reference_collation.py:
  rows padded and dequantised one by one into fp32 host tensors);
* ``host``: today's host side (:meth:`CacheReader.packed_batches`: decode, one concatenation
  per column and window, one gather per column and run of equal lengths);
* ``expand_cpu``: the device side (:func:`pipeline.cache.packed.expand`) run on this CPU over
  batches already gathered (padding, dequantising, the Batch the trainer uses);
* ``host_thread`` / ``host_workers_1`` / ``host_workers_2``: the host side consumed from a
  reader thread (:class:`distill.data.Prefetcher`) and from 1 and 2 DataLoader worker
  processes, which hand every batch over through shared memory.

Ratios: ``before`` and ``host`` over ``floor`` (the issue's goal: host >= 0.5x at batch 256).
One JSON line, then a human line. Run it alone on the cores:

    flock /tmp/heavy.lock .venv/bin/python scripts/bench_loader.py
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build(work: Path, examples: int, layout: str, storage: str, max_length: int) -> Path:
    """The benchmark's cache (written once per work directory and settings)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pipeline.cache.writer import CacheSpec
    from pipeline.cache.assemble import build_cache
    from pipeline.teacher.finetune import default_teacher_dir
    from scripts.bench_distill import write_glue_subset

    cache = work / f"cache-{layout}-{storage}-{examples}-{max_length}"
    if (cache / "manifest.json").is_file():
        return cache
    tokenizer = AutoTokenizer.from_pretrained(default_teacher_dir())
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, num_hidden_layers=4,
                                                       hidden_size=768, num_attention_heads=12,
                                                       intermediate_size=3072, num_labels=2))
    teacher.save_pretrained(work / "teacher")
    tokenizer.save_pretrained(work / "teacher")
    write_glue_subset(work / "train.parquet", "SST-2", examples)
    build_cache(work / "train.parquet", work / "teacher", cache,
                CacheSpec([0, 1, 2, 3, 4], [1, 2, 3, 4], storage, max_length, layout=layout),
                device="cpu", task_info={"task": "SST-2", "task_type": "classification",
                                         "label_names": ["0", "1"], "num_labels": 2})
    return cache


def best_rate(count_fn, repeats: int) -> float:
    """Examples per second of the fastest of ``repeats`` runs of ``count_fn`` (which returns
    the examples it went through)."""
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        count = count_fn()
        best = max(best, count / (time.perf_counter() - started))
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--layout", default="compact", choices=["compact", "full"])
    parser.add_argument("--storage", default="int8", choices=["int8", "float16", "bfloat16", "float32"])
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", default="", help="keep (and reuse) the cache in this directory")
    args = parser.parse_args(argv)

    import torch

    from distill.data import Prefetcher
    from pipeline.cache.packed import expand
    from pipeline.cache.reader import open_cache
    sys.path.insert(0, str(ROOT / "tests"))
    from reference_collation import reference_batches

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-loader-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        cache = build(work, args.examples, args.layout, args.storage, args.max_seq_length)
        reader = open_cache(cache)
        size = args.batch_size
        n = reader.num_examples

        def floor() -> int:
            for rg in reader.row_groups:
                reader._read(rg, reader.columns)
            return n

        def before() -> int:
            return sum(len(b["ids"]) for b in reference_batches(reader, size))

        def host() -> int:
            return sum(p.rows for p in reader.packed_batches(size))

        packed = list(reader.packed_batches(size))

        def expand_cpu() -> int:
            return sum(len(expand(p)["ids"]) for p in packed)

        def host_thread() -> int:
            prefetcher = Prefetcher(reader.packed_batches(size), depth=4)
            return sum(p.rows for p in prefetcher)

        def host_workers(k: int):
            def run() -> int:
                loader = torch.utils.data.DataLoader(reader.dataset(size), batch_size=None, num_workers=k)
                return sum(p.rows for p in loader)
            return run

        rates = {}
        for name, fn in (("floor", floor), ("before", before), ("host", host), ("expand_cpu", expand_cpu),
                         ("host_thread", host_thread), ("host_workers_1", host_workers(1)),
                         ("host_workers_2", host_workers(2))):
            rates[name] = round(best_rate(fn, args.repeats), 1)
        info = json.loads((cache / "manifest.json").read_text())["info"]
        figures = {"examples": n, "batch_size": size, "layout": args.layout, "storage": args.storage,
                   "teacher": "4 x 768, 12 heads (random)", "cores": os.cpu_count(),
                   "torch_threads": torch.get_num_threads(), "row_groups": len(reader.row_groups),
                   "bytes_per_example": round(info["bytes"] / n), "examples_per_s": rates,
                   "packed_bytes_per_example": round(sum(p.nbytes for p in packed) / n),
                   "before_over_floor": round(rates["before"] / rates["floor"], 3),
                   "host_over_floor": round(rates["host"] / rates["floor"], 3),
                   "host_over_before": round(rates["host"] / rates["before"], 2)}
        print(json.dumps({"bench_loader": figures}, sort_keys=True))
        print(f"{n} SST-2 rows, {args.layout} {args.storage} cache of a 4x768 teacher, batch {size}, "
              f"{os.cpu_count()} cores: pyarrow decode {rates['floor']:.0f} ex/s; before {rates['before']:.0f} "
              f"({figures['before_over_floor']}x of decode); host side {rates['host']:.0f} "
              f"({figures['host_over_floor']}x of decode, {figures['host_over_before']}x before); "
              f"expand on this CPU {rates['expand_cpu']:.0f} ex/s; host side from a thread "
              f"{rates['host_thread']:.0f}, 1 worker {rates['host_workers_1']:.0f}, "
              f"2 workers {rates['host_workers_2']:.0f} ex/s; {figures['packed_bytes_per_example']} "
              "packed bytes per example")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
