"""``tinykd inspect``: what a teacher cache holds, what it costs, and whether it is intact.

The summary comes from the manifest and the Parquet footers only (instant on any cache size):
examples, shards, bytes per example and per real token, the naive layout it replaces, the
layers and dtype, the teacher and the parameters it was created with. ``verify`` re-reads
everything: each shard's sha256 against the manifest, every row group decoded (page CRCs
checked) and every ragged list checked against its example's length.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import InputError


def summarise(cache_dir: Path | str) -> dict:
    """The cache summary as a dict (see the module docstring)."""
    from pipeline.cache.reader import open_cache
    from pipeline.cache.writer import CacheSpec, naive_bytes_per_example

    reader = open_cache(cache_dir)
    info = reader.info
    shards = info["shards"]
    examples = reader.num_examples
    total_bytes = sum(int(s["bytes"]) for s in shards)
    tokens = sum(int(s.get("tokens", 0)) for s in shards)
    spec = CacheSpec(info["hidden_layers"], info["attention_layers"], info["dtype"],
                     info.get("max_seq_length", 128), info.get("with_logits", True))
    naive = naive_bytes_per_example(spec, spec.max_seq_length, reader.hidden_size, reader.num_heads,
                                    int(info.get("num_labels") or 0))
    return {
        "cache_dir": str(Path(cache_dir)),
        "examples": examples,
        "shards": len(shards),
        "row_groups": len(reader.row_groups),
        "bytes": total_bytes,
        "bytes_per_example": total_bytes / examples if examples else 0.0,
        "mean_tokens": tokens / examples if examples else 0.0,
        "naive_bytes_per_example": naive,
        "hidden_layers": info["hidden_layers"],
        "attention_layers": info["attention_layers"],
        "attention_target": info.get("attention_target", "scores"),
        "dtype": info["dtype"],
        "with_logits": info.get("with_logits", True),
        "num_labels": info.get("num_labels"),
        "label_names": info.get("label_names"),
        "task": info.get("task"),
        "teacher": info.get("teacher"),
        "max_seq_length": info.get("max_seq_length"),
        "tokenizer_vocab_sha256": info.get("tokenizer_vocab_sha256"),
        "creation": info.get("creation"),
        "parameters": info.get("parameters"),
        "source": info.get("source"),
    }


def _human(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"


def inspect_cache(cache_dir: Path | str, verify: bool = False) -> tuple[str, bool]:
    """A human-readable report and whether the cache is usable (and, with ``verify``, intact)."""
    try:
        summary = summarise(cache_dir)
    except InputError as exc:
        return f"teacher cache {cache_dir}: UNUSABLE: {exc}", False
    teacher = summary["teacher"] or {}
    lines = [
        f"teacher cache {summary['cache_dir']}",
        f"  examples        {summary['examples']} in {summary['shards']} shard(s), "
        f"{summary['row_groups']} row group(s); mean {summary['mean_tokens']:.1f} real tokens",
        f"  size            {_human(summary['bytes'])}; {summary['bytes_per_example']:.0f} bytes/example "
        f"(naive fp32 padded to {summary['max_seq_length']}: {summary['naive_bytes_per_example']} "
        f"bytes/example, {summary['naive_bytes_per_example'] / max(summary['bytes_per_example'], 1):.0f}x more)",
        f"  layers          hidden {summary['hidden_layers']}, attention "
        f"{summary['attention_target'].replace('_', '-')} {summary['attention_layers']}",
        f"  dtype           {summary['dtype']}; logits: {'yes' if summary['with_logits'] else 'no (bare encoder)'}"
        f"; labels: {summary['num_labels']} {summary['label_names'] or ''}".rstrip(),
        f"  teacher         {teacher.get('path')} ({teacher.get('architecture')}, "
        f"{teacher.get('num_layers')} layers, {teacher.get('hidden_size')} wide, "
        f"{teacher.get('num_heads')} heads); fingerprint {str(teacher.get('fingerprint'))[:16]}",
        f"  tokenizer       vocabulary sha256 {str(summary['tokenizer_vocab_sha256'])[:16]}",
        f"  created with    {summary['creation']}",
    ]
    if summary["parameters"]:
        lines.append(f"  parameters      {summary['parameters']}")
    if summary["with_logits"] and teacher.get("head_trained") is False:
        lines.append("  WARNING         the teacher's classifier head was never trained: its logits are noise")
    ok = True
    if verify:
        from pipeline.cache.reader import open_cache

        problems = open_cache(cache_dir).verify()
        ok = not problems
        lines.append("  verify: OK (checksums, page CRCs, ragged lengths)" if ok
                     else f"  verify: {len(problems)} problem(s)")
        lines += [f"    {p}" for p in problems]
    return "\n".join(lines), ok
