"""What the GLUE harness costs: measured on this machine, estimated for a GPU from FLOPs.

    python scripts/glue_cost.py [--summary <workdir>/glue/<fp>/summary.json] [--gpu-tflops 100]

Measured: per task, the wall and CPU seconds of every stage output of the task's DAG, from
the GLUE stage's summary.json (itself read from the stage manifests).

Estimated (an **estimate**, not a measurement): the arithmetic of each stage in FLOPs, ~2 per
parameter per token for a forward pass and ~6 for a training step (the encoder's
non-embedding parameters; attention's L² term and the embeddings are left out, a few percent
at these lengths), divided by a sustained GPU throughput (``--gpu-tflops``; 100 TFLOP/s is
roughly what an A100 sustains on BERT-base training in bf16, a third of its peak: small
students and short sequences sustain less, so read the figures as lower bounds). Rows and
lengths: GLUE's train sizes; mean real tokens per example measured for SST-2 (13) and MRPC
(52) (README's cache table), assumed for the others (marked).

Prints one JSON line per table and a human table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

TRAIN_ROWS = {"CoLA": 8551, "SST-2": 67349, "MRPC": 3668, "STS-B": 5749, "QQP": 363846,
              "MNLI": 392702, "QNLI": 104743, "RTE": 2490, "WNLI": 635}
#: mean real tokens per example; (value, measured?)
TOKENS = {"CoLA": (11, False), "SST-2": (13, True), "MRPC": (52, True), "STS-B": (31, False),
          "QQP": (30, False), "MNLI": (39, False), "QNLI": (50, False), "RTE": (68, False),
          "WNLI": (38, False)}
#: the paper's N (augmentation attempts) and stage-1 epochs (configs/glue/<TASK>.cfg)
PAPER_N = {"CoLA": 30, "SST-2": 20, "MRPC": 30, "STS-B": 30, "QQP": 10, "MNLI": 10, "QNLI": 20,
           "RTE": 30, "WNLI": 20}
PAPER_STAGE1_EPOCHS = {"CoLA": 50, "SST-2": 10, "MRPC": 20, "STS-B": 20, "QQP": 10, "MNLI": 10,
                       "QNLI": 10, "RTE": 20, "WNLI": 20}
#: non-embedding parameters: BERT-base 12 x 768 (teacher, MLM), TinyBERT4 4 x 312 (FFN 1200)
BERT_BASE = 12 * (4 * 768 * 768 + 2 * 768 * 3072)
TINYBERT4 = 4 * (4 * 312 * 312 + 2 * 312 * 1200)


def paper_flops(task: str) -> dict[str, float]:
    """FLOPs per stage of configs/glue/<task>.cfg (BERT-base teacher and MLM, TinyBERT4)."""
    rows, tokens = TRAIN_ROWS[task], TOKENS[task][0]
    augmented = rows * (PAPER_N[task] + 1)   # upper bound: every attempt a distinct example
    return {
        "teacher": 6 * BERT_BASE * tokens * rows * 3,
        # the reference rule: one MLM forward of the sentence per one-piece word (~0.8 per token)
        "candidates": 2 * BERT_BASE * tokens * 0.8 * tokens * rows,
        "teacher_cache": 2 * BERT_BASE * tokens * augmented,
        "distill_stage1": 6 * TINYBERT4 * tokens * augmented * PAPER_STAGE1_EPOCHS[task],
        "distill_stage2": 6 * TINYBERT4 * tokens * augmented * 3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", type=Path, help="a GLUE output's summary.json (measured costs)")
    parser.add_argument("--gpu-tflops", type=float, default=100.0)
    args = parser.parse_args()
    rate = args.gpu_tflops * 1e12
    estimate = {}
    for task in TRAIN_ROWS:
        flops = paper_flops(task)
        estimate[task] = {"flops": sum(flops.values()), "gpu_hours": sum(flops.values()) / rate / 3600,
                          "by_stage_gpu_s": {k: round(v / rate, 1) for k, v in flops.items()},
                          "tokens_measured": TOKENS[task][1]}
    print(json.dumps({"paper_profile_gpu_estimate": estimate, "gpu_tflops": args.gpu_tflops}))
    print(f"paper settings (configs/glue/<TASK>.cfg), ESTIMATED GPU time at {args.gpu_tflops:g} TFLOP/s:")
    for task, e in estimate.items():
        mark = "" if e["tokens_measured"] else " (tokens assumed)"
        print(f"  {task:6s} {e['gpu_hours']:8.2f} h  {e['flops']:.2e} FLOPs{mark}")
    if args.summary:
        summary = json.loads(args.summary.read_text())
        measured = {task: {"wall_s": round(t["compute"]["seconds"], 1), "cpu_s": t["compute"].get("cpu_seconds"),
                           "stages": {k: round(v["seconds"], 1) for k, v in t["compute"]["stages"].items()},
                           "cache_bytes": t["compute"]["cache_bytes"]}
                    for task, t in summary["tasks"].items()}
        print(json.dumps({"measured": measured}))
        for task, m in measured.items():
            print(f"  measured {task}: {m['wall_s']:.0f} s wall, {m['cpu_s']} CPU s, stages {m['stages']}")


if __name__ == "__main__":
    main()
