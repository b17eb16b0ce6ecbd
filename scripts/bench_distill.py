"""Benchmark the distillation trainer: an epoch from the teacher cache vs with the live teacher.

Teacher: a BERT-base-shaped classifier (12 layers, 768 wide, 12 heads, FFN 3072; random
weights -- timing does not depend on their values) with the bert-base-uncased vocabulary.
Student: TinyBERT4 (4 layers, 312 wide, FFN 1200, 12 heads), uniform layer map -> teacher
layers 3, 6, 9, 12. Data: the first ``--examples`` training examples of SST-2 (sentences,
~13 tokens) or MRPC (sentence pairs, ~50 tokens) from ../shared (real lengths), cached once
with the real cache writer (fp16 by default).

For each stage (``intermediate``: embedding + attention + hidden losses, the heavy cache
columns; ``prediction``: logits only) it runs one epoch with the same seed and batches,

* from the cache (the trainer reads the Parquet cache, no teacher forward), and
* online (the same cache read for token ids only, the teacher run live on every batch),

through the real stage function (:func:`distill.run.distill_from_cache`), the fastest of
``--repeats`` alternating runs each, and reports the
trainer's own timing of the epoch (``train_seconds``: the training loop, data wait
included, without model loading and export), the speed-up online / cache (target >= 5x) and
the share of the cached epoch's step time spent waiting for the next batch (target < 5 %),
in all and after each epoch's first batch (whose wait includes the reader planning the epoch,
a fixed cost that a short benchmark epoch over-weights).

    flock /tmp/tinykd-cpu.lock .venv/bin/python scripts/bench_distill.py --examples 512
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_glue_subset(path: Path, task: str, limit: int) -> None:
    """The first ``limit`` training examples of a GLUE task from ../shared, as cache input."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / task / "train.tsv"
    if not source.exists():
        sys.exit(f"{source} not found: the benchmark reads real GLUE examples from ../shared")
    rows = []
    for i, line in enumerate(source.read_text(encoding="utf-8").splitlines()[1:limit + 1]):
        fields = line.split("\t")
        if task == "MRPC":   # Quality, #1 ID, #2 ID, #1 String, #2 String
            text_a, text_b, label = fields[3], fields[4], int(fields[0])
        else:                # SST-2: sentence, label
            text_a, text_b, label = fields[0].strip(), None, int(fields[1])
        rows.append({"id": f"train-{i}", "text_a": text_a, "text_b": text_b, "label": label})
    schema = pa.schema([("id", pa.string()), ("text_a", pa.string()), ("text_b", pa.string()),
                        ("label", pa.int64())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--task", default="SST-2", choices=["SST-2", "MRPC"],
                        help="real GLUE training examples (SST-2: ~13 tokens, MRPC pairs: ~50)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--stages", default="intermediate,prediction")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=-1,
                        help="DataLoader workers (-1: 4 on CUDA, else a reader thread)")
    parser.add_argument("--threads", type=int, default=0,
                        help="trainer intra-op threads (0: the trainer's default, which leaves a "
                             "core to the reader thread on CPU)")
    parser.add_argument("--prefetch", type=int, default=4,
                        help="batches the reader thread reads ahead (0: read in the training thread)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="alternating cache/online runs per stage; the fastest of each counts "
                             "(the machine is shared)")
    parser.add_argument("--keep", default="", help="keep the work directory here")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from distill.run import distill_from_cache
    from distill.student import StudentSpec
    from distill.trainer import recipe, resolve_device
    from pipeline.cache.layer_map import cached_layers, layer_map
    from pipeline.teacher.finetune import default_teacher_dir
    from pipeline.cache.writer import CacheSpec
    from pipeline.cache.assemble import build_cache

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    workers = args.num_workers if args.num_workers >= 0 else (4 if device.type == "cuda" else 0)
    try:
        tokenizer = AutoTokenizer.from_pretrained(default_teacher_dir())
        torch.manual_seed(0)
        teacher = BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, num_labels=2))
        teacher.save_pretrained(work / "teacher")
        tokenizer.save_pretrained(work / "teacher")
        write_glue_subset(work / "train.parquet", args.task, args.examples)
        hidden, attention = cached_layers(layer_map(12, 4))
        started = time.perf_counter()
        info = build_cache(work / "train.parquet", work / "teacher", work / "cache",
                           CacheSpec(hidden, attention, args.dtype, args.max_seq_length),
                           device=str(device), task_info={"task": args.task, "task_type": "classification",
                                                          "label_names": ["0", "1"], "num_labels": 2})
        cache_seconds = time.perf_counter() - started
        student = StudentSpec()   # TinyBERT4
        figures = {"task": args.task, "examples": args.examples, "batch_size": args.batch_size, "dtype": args.dtype,
                   "device": str(device), "torch_threads": torch.get_num_threads(),
                   "num_workers": workers, "cache_build_seconds": round(cache_seconds, 2),
                   "cache_bytes": info["bytes"], "tokens_per_example": round(info["tokens"] / args.examples, 1)}
        for stage in args.stages.split(","):
            config = recipe(stage, batch_size=args.batch_size, epochs=1, device=str(device),
                            log_every=0, checkpoint_every=0, eval_every=0, num_workers=workers,
                            num_threads=args.threads, prefetch=args.prefetch)
            runs = {}
            for _ in range(args.repeats):
                for mode in ("cache", "online"):
                    out = work / f"{stage}-{mode}"
                    shutil.rmtree(out, ignore_errors=True)
                    summary = distill_from_cache(work / "cache", out, config, student,
                                                 online=mode == "online")
                    if mode not in runs or summary["train_seconds"] < runs[mode]["train_seconds"]:
                        runs[mode] = summary
            cache_s, online_s = runs["cache"]["train_seconds"], runs["online"]["train_seconds"]
            figures[stage] = {
                "steps": runs["cache"]["steps"],
                "torch_threads_cache": runs["cache"]["torch_threads"],
                "torch_threads_online": runs["online"]["torch_threads"],
                "epoch_seconds_cache": cache_s, "epoch_seconds_online": online_s,
                "speedup": round(online_s / cache_s, 2),
                "data_wait_share_cache": runs["cache"]["data_wait_share"],
                "data_wait_share_online": runs["online"]["data_wait_share"],
                # waiting beyond each epoch's first batch (the reader's planning): what a long
                # epoch converges to
                "steady_data_wait_share_cache": round(runs["cache"]["data_wait_share"]
                                                      - runs["cache"]["startup_wait_share"], 5),
                "final_total_loss_cache": runs["cache"]["final_losses"]["total"],
                "final_total_loss_online": runs["online"]["final_losses"]["total"],
            }
        print(json.dumps(figures, sort_keys=True))
        parts = [f"{s}: cache {figures[s]['epoch_seconds_cache']:.1f}s vs online "
                 f"{figures[s]['epoch_seconds_online']:.1f}s per epoch = {figures[s]['speedup']:.1f}x, "
                 f"data wait {100 * figures[s]['data_wait_share_cache']:.1f}% "
                 f"({100 * figures[s]['steady_data_wait_share_cache']:.1f}% after the first batch)"
                 for s in args.stages.split(",")]
        print(f"{args.examples} {args.task} examples, BERT-base-shaped teacher -> TinyBERT4 on {device} "
              f"({os.cpu_count()} cores, trainer threads {figures[args.stages.split(',')[0]]['torch_threads_cache']}): "
              + "; ".join(parts))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
