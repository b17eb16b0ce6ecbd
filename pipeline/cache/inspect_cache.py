"""``tinykd inspect``: what a teacher cache holds, what it costs, and whether it is intact.

The summary comes from the manifest and the Parquet footers only (instant on any cache size):
examples, shards, bytes per real token and per example (the headline: a cache's size is its
token count times bytes per token), split by column kind (hidden states, attention targets,
the rest), the naive fp32-padded layout it replaces, the format, layout and storage, the
layers, the teacher and the parameters it was created with. ``verify`` re-reads
everything: each shard's sha256 against the manifest, every row group decoded (page CRCs
checked) and every ragged list checked against its example's length.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import InputError


def summarise(cache_dir: Path | str) -> dict:
    """The cache summary as a dict (see the module docstring)."""
    from pipeline.cache.reader import open_cache
    from pipeline.cache.assemble import column_bytes, size_figures

    reader = open_cache(cache_dir)
    info = dict(reader.info)
    # Caches written before the manifest recorded column sizes: read them from the footers.
    info["shards"] = [shard if "column_bytes" in shard else {**shard, "column_bytes": column_bytes(file)}
                      for shard, file in zip(info["shards"], reader.shard_files)]
    shards = info["shards"]
    examples = reader.num_examples
    total_bytes = sum(int(s["bytes"]) for s in shards)
    size = size_figures(info)
    return {
        "cache_dir": str(reader.where),   # a URL redacted, a path as given
        "examples": examples,
        "shards": len(shards),
        "row_groups": len(reader.row_groups),
        "bytes": total_bytes,
        "bytes_per_example": size["bytes_per_example"],
        "bytes_per_token": size["bytes_per_token"],
        "by_kind_per_token": size["by_kind_per_token"],
        "by_kind_per_example": size["by_kind_per_example"],
        "parts_bytes": size["parts_bytes"],
        "mean_tokens": size["mean_tokens"],
        "naive_bytes_per_example": size["naive_fp32_padded_bytes_per_example"],
        "naive_bytes_per_token": size["naive_fp32_padded_bytes_per_token"],
        "format_version": reader.format_version,
        "layout": reader.plan.layout,
        "stored_hidden": reader.plan.stored_hidden,
        "score_sources": reader.plan.score_sources,
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


def inspect_cache(cache_dir: Path | str, verify: bool = False) -> tuple[str, bool]:
    """A human-readable report and whether the cache is usable (and, with ``verify``, intact)."""
    from pipeline.cache.assemble import human_bytes

    try:
        summary = summarise(cache_dir)
    except InputError as exc:
        from pipeline.store import is_url, redact

        where = redact(str(cache_dir)) if is_url(cache_dir) else cache_dir
        return f"teacher cache {where}: UNUSABLE: {exc}", False
    teacher = summary["teacher"] or {}
    kinds = summary["by_kind_per_token"]
    derived = {layer: {"embeddings": "from layer 0", "hidden": "from a stored layer",
                       "row": "per row by length"}[source]
               for layer, source in sorted(summary["score_sources"].items())}
    lines = [
        f"teacher cache {summary['cache_dir']}",
        f"  examples        {summary['examples']} in {summary['shards']} shard(s), "
        f"{summary['row_groups']} row group(s); mean {summary['mean_tokens']:.1f} real tokens",
        f"  size            {human_bytes(summary['bytes'])}: {summary['bytes_per_token']:.0f} bytes/token "
        f"(hidden {kinds['hidden']:.0f}, attention {kinds['scores']:.0f}, other {kinds['other']:.0f}), "
        f"{summary['bytes_per_example']:.0f} bytes/example"
        + (f"; teacher parts {human_bytes(summary['parts_bytes'])} once" if summary["parts_bytes"] else ""),
        f"  naive layout    fp32 padded to {summary['max_seq_length']}: {summary['naive_bytes_per_example']} "
        f"bytes/example, {summary['naive_bytes_per_example'] / max(summary['bytes_per_example'], 1):.0f}x more",
        f"  format          {summary['format_version']}, layout {summary['layout']}: hidden stored "
        f"{summary['stored_hidden']}" + (f", scores derived {derived}" if derived else ""),
        f"  layers          hidden {summary['hidden_layers']}, attention "
        f"{summary['attention_target'].replace('_', '-')} {summary['attention_layers']}",
        f"  storage         {summary['dtype']}; logits: {'yes' if summary['with_logits'] else 'no (bare encoder)'}"
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
