"""Benchmark the teacher-cache writer: the writer of an older commit and today's, side by side,
against the bare teacher forward, in one process.

The setup is BERT-base width on this CPU: a seeded random 4-layer, 768-wide, 12-head BERT
teacher (speed does not depend on its weights) on the first ``--examples`` SST-2 training
sentences from ../shared, truncated to 64 tokens. It caches ``--hidden`` / ``--attention``
(default: the uniform map of a 2-layer student, 0,2,4 / 2,4; per mapped layer that is what the
paper's 12 -> 4 map stores: a hidden layer, and per row either the scores or the layer's
input). The old writer is ``pipeline/cache/writer.py`` as of ``--old-rev`` (default 54db3fd,
the commit of the GPU baseline in ../shared/gpu/README.md), read with ``git show`` and
imported beside today's; both run on the same model object and the same examples.

Figures (one JSON line, then human lines), best of ``--repeats`` alternating runs:

* ``forward_eps``: the bound, the bare teacher forward with hidden states and attention
  probabilities (eager attention), length-sorted batches, outputs left where they are;
* per layout/storage, ``old`` and ``new``: the writer's examples/s end to end (tokenising
  aside) and its ratio to the bound; ``bytes_identical``: whether the two shards are the
  same file; ``new_seconds``: where the new writer's time went (its manifest figures);
* ``host_eps``: the same writers with the forward replayed from memory (every batch's
  outputs recorded once beforehand): the examples/s the writer absorbs when the forward
  costs nothing, i.e. what it can keep up with on a GPU whose forward outruns this CPU;
* ``codecs``: Parquet codecs and levels on the new shards' row groups with the writer's other
  options: bytes per example, and examples/s of encoding alone (one thread, as the writer
  does), for the random teacher at BERT-base width and for real activations (the packaged
  MiniLM-L6, 384 wide) whose compressibility is realistic.

    flock /tmp/heavy.lock .venv/bin/python scripts/bench_writer.py
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

VARIANTS = (("compact", "int8"), ("compact", "float16"), ("full", "float16"))
CODECS = (("zstd", 1), ("zstd", 3), ("zstd", 6), ("zstd", 9), ("lz4", None), ("snappy", None), ("none", None))


def load_old_writer(rev: str, work: Path):
    """``pipeline/cache/writer.py`` at git revision ``rev`` as a module of its own (it imports
    today's helpers: the tokeniser, the compact plan, the encoder outputs)."""
    source = subprocess.run(["git", "show", f"{rev}:pipeline/cache/writer.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = work / f"writer_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"tinykd_writer_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _only(full, hidden_layers, attention_layers, with_logits):
    """The part of recorded outputs one forward call asked for."""
    import pipeline.common.encoder_outputs as outputs

    return outputs.Internals(logits=full.logits if with_logits else None,
                             hidden={l: full.hidden[l] for l in hidden_layers},
                             scores={l: full.scores[l] for l in attention_layers})


@contextlib.contextmanager
def forward_patched(recorded: dict, replay: bool, every_hidden=(), every_attention=()):
    """``forward_internals`` (both writers import it at call time) answered from ``recorded``,
    keyed by the padded input ids (``replay``), or run for real on every layer any variant
    needs and kept there."""
    import pipeline.common.encoder_outputs as outputs

    real = outputs.forward_internals

    def patched(model, input_ids, token_type_ids, attention_mask, hidden_layers=(), attention_layers=(),
                with_logits=True, attention_target="scores"):
        key = (tuple(input_ids.shape), input_ids.numpy().tobytes())
        if not replay:
            recorded[key] = real(model, input_ids, token_type_ids, attention_mask, hidden_layers=every_hidden,
                                 attention_layers=every_attention, with_logits=with_logits,
                                 attention_target=attention_target)
        return _only(recorded[key], hidden_layers, attention_layers, with_logits)

    outputs.forward_internals = patched
    try:
        yield
    finally:
        outputs.forward_internals = real


def codec_figures(shard: Path, repeats: int) -> dict:
    """Bytes per example and encoding examples/s of the shard's row groups per codec, with the
    writer's other Parquet options."""
    from pipeline.cache.writer import shard_parquet_writer

    file = pq.ParquetFile(shard)
    groups = [file.read_row_group(g) for g in range(file.metadata.num_row_groups)]
    rows = sum(g.num_rows for g in groups)
    figures = {}
    for codec, level in CODECS:
        best, size = float("inf"), 0
        for _ in range(repeats):
            sink = pa.BufferOutputStream()
            started = time.perf_counter()
            with shard_parquet_writer(sink, file.schema_arrow, codec, level, True) as writer:
                for group in groups:
                    writer.write_table(group, group.num_rows)
            best = min(best, time.perf_counter() - started)
            size = sink.getvalue().size
        figures[codec if level is None else f"{codec}-{level}"] = {
            "bytes_per_example": round(size / rows), "encode_eps": round(rows / best, 1)}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="SST-2 training rows")
    parser.add_argument("--batch-size", type=int, default=64, help="forward batch (the writer's default)")
    parser.add_argument("--hidden", default="0,2,4", help="teacher layers whose hidden states are cached")
    parser.add_argument("--attention", default="2,4", help="teacher layers whose scores are cached")
    parser.add_argument("--sort-window", type=int, default=4096,
                        help="length-sorting window (the writer's default; a shard of one window "
                             "cannot overlap its forward with its encoding)")
    parser.add_argument("--old-rev", default="54db3fd", help="git revision of the old writer")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-codecs", action="store_true")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from bench_cache import glue_examples
    from pipeline.cache import writer as new_writer
    from pipeline.common.examples import normalise_examples
    from pipeline.common.tokenize import TokenizedRows, length_sorted_batches, tokenize_examples
    from pipeline.teacher.finetune import default_teacher_dir

    work = Path(tempfile.mkdtemp(prefix="bench-writer-"))
    old_writer = load_old_writer(args.old_rev, work)
    tokenizer = AutoTokenizer.from_pretrained(default_teacher_dir())
    examples = normalise_examples(glue_examples("SST-2", args.examples), Path("sst2"))
    hidden = [int(x) for x in args.hidden.split(",")]
    attention = [int(x) for x in args.attention.split(",")]
    config = dict(vocab_size=tokenizer.vocab_size, num_hidden_layers=4, hidden_size=768, num_attention_heads=12,
                  intermediate_size=3072, num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**config)).eval()   # as the cache loads it (sdpa)
    eager = BertForSequenceClassification(BertConfig(**config, attn_implementation="eager")).eval()
    eager.load_state_dict(model.state_dict())
    tokens = TokenizedRows.from_lists(*tokenize_examples(tokenizer, examples, 64))
    batches = length_sorted_batches(tokens.lengths.tolist(), args.batch_size, args.sort_window)
    rows = examples.num_rows

    def bare_forward() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                ids, types, mask = tokens.pad(batch, tokenizer.pad_token_id)
                eager(input_ids=ids, token_type_ids=types, attention_mask=mask, output_hidden_states=True,
                      output_attentions=True)
        return time.perf_counter() - started

    def write(module, layout: str, storage: str) -> tuple[float, Path, dict]:
        out = work / f"{module.__name__}-{layout}-{storage}.parquet"
        spec = module.CacheSpec(hidden, attention, storage, 64, layout=layout)
        stats = module.write_cache_shard(examples, model, tokenizer, out, spec, batch_size=args.batch_size,
                                         sort_window=args.sort_window, device="cpu")
        return stats["seconds"], out, stats

    writers = {"old": old_writer, "new": new_writer}
    runs: dict[str, list[float]] = {"forward": []}
    last: dict = {}
    bare_forward()   # warm-up
    for _ in range(args.repeats):
        runs["forward"].append(bare_forward())
        for layout, storage in VARIANTS:
            for label, module in writers.items():
                seconds, out, stats = write(module, layout, storage)
                runs.setdefault(f"{layout}/{storage}/{label}", []).append(seconds)
                last[(layout, storage, label)] = (out, stats)

    # The host side alone: the forward replayed from memory.
    recorded: dict = {}
    with forward_patched(recorded, False, list(range(5)), list(range(1, 5))):
        write(new_writer, "full", "float32")
    host_runs: dict[str, list[float]] = {}
    with forward_patched(recorded, True):
        for _ in range(args.repeats):
            for layout, storage in VARIANTS:
                for label, module in writers.items():
                    host_runs.setdefault(f"{layout}/{storage}/{label}", []).append(write(module, layout, storage)[0])
    recorded.clear()

    forward_eps = rows / min(runs["forward"])
    result: dict = {"threads": torch.get_num_threads(), "examples": rows, "mean_tokens": round(float(tokens.lengths.mean()), 2),
                    "teacher": "random BERT 4 x 768, 12 heads", "hidden": hidden, "attention": attention,
                    "batch_size": args.batch_size, "sort_window": args.sort_window, "old_rev": args.old_rev,
                    "forward_eps": round(forward_eps, 1), "variants": {}}
    for layout, storage in VARIANTS:
        name = f"{layout}/{storage}"
        old_file, new_file = last[(layout, storage, "old")][0], last[(layout, storage, "new")][0]
        entry = {label: {"eps": round(rows / min(runs[f"{name}/{label}"]), 1),
                         "ratio": round(min(runs["forward"]) / min(runs[f"{name}/{label}"]), 3)}
                 for label in writers}
        entry["host_eps"] = {label: round(rows / min(host_runs[f"{name}/{label}"]), 1) for label in writers}
        entry["bytes_identical"] = old_file.read_bytes() == new_file.read_bytes()
        entry["new_seconds"] = last[(layout, storage, "new")][1]["writer_figures"]["seconds"]
        entry["bytes_per_example"] = round(new_file.stat().st_size / rows)
        result["variants"][name] = entry
    result["runs_s"] = {k: [round(x, 2) for x in v] for k, v in runs.items()}

    if not args.skip_codecs:
        result["codecs"] = {f"bert-base-width/{layout}/{storage}": codec_figures(last[(layout, storage, "new")][0],
                                                                                args.repeats + 1)
                            for layout, storage in VARIANTS[:2]}
        minilm = default_teacher_dir()
        for layout, storage in VARIANTS[:2]:
            out = work / f"minilm-{layout}-{storage}"
            source = work / "sst2.parquet"
            pq.write_table(examples, source)
            new_writer.write_shard_output(source, 0, rows, 0, minilm, out,
                                          new_writer.CacheSpec([0, 2, 3, 5, 6], [2, 3, 5, 6], storage, 64,
                                                               with_logits=False, layout=layout),
                                          batch_size=args.batch_size)
            result["codecs"][f"minilm-real/{layout}/{storage}"] = codec_figures(
                out / "shards" / "part-00000.parquet", args.repeats + 1)
    shutil.rmtree(work)

    print(json.dumps(result))
    print(f"writer vs bare forward (hidden states + attention, {forward_eps:.1f} ex/s), {rows} SST-2 rows, "
          f"BERT-base width, sort window {args.sort_window}, {result['threads']} threads, old = {args.old_rev}:")
    for name, entry in result["variants"].items():
        print(f"  {name}: old {entry['old']['eps']} ex/s ({entry['old']['ratio']:.2f}x), new {entry['new']['eps']} "
              f"ex/s ({entry['new']['ratio']:.2f}x); forward replayed: old {entry['host_eps']['old']}, new "
              f"{entry['host_eps']['new']} ex/s ({entry['host_eps']['new'] / entry['host_eps']['old']:.1f}x); "
              f"shard bytes identical: {entry['bytes_identical']}")
    for name, codecs in result.get("codecs", {}).items():
        print(f"  codecs {name}: " + ", ".join(f"{c} {v['bytes_per_example']} B/ex {v['encode_eps']:.0f} ex/s"
                                               for c, v in codecs.items()))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
