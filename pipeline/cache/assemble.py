"""A teacher cache as a stage output: one shard's output, the assembled cache, its size.

:mod:`pipeline.cache.writer` writes the Parquet file of one shard from a loaded teacher. This
module is what the Luigi tasks (``tasks/teacher.py``) call around it: load and check the
teacher (:func:`load_cache_teacher`), write one shard's output with the manifest ``info`` of a
one-shard cache (:func:`write_shard_output`), and assemble shard outputs into a self-contained
cache (:func:`assemble_cache`: hard links, the compact layout's teacher parts, the merged
manifest and its size figures). :func:`build_cache` does all of it in one process, without
Luigi (tests, benchmarks).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pyarrow.parquet as pq

from pipeline.cache.compact import FORMAT_VERSION, PARTS_FILE, CompactPlan, TeacherParts
from pipeline.cache.writer import (DEFAULT_ROW_GROUP_BYTES, DEFAULT_SHARD_SIZE, SHARD_NAME, CacheSpec,
                                   can_derive_scores, check_layers, compression_name, shard_ranges,
                                   write_cache_shard)
from pipeline.common.device import resolve_device
from pipeline.common.examples import count_examples, read_example_range
from pipeline.common.loading import load_pretrained
from pipeline.common.tokenize import check_tokenizer_matches_teacher, tokenizer_vocab_sha256
from pipeline.errors import InputError


def check_teacher_family(teacher: str | Path, attention_target: str = "scores") -> None:
    """Refuse, from its config alone, a teacher without an adapter or without the attention
    target asked for: before any weights are loaded, any forward or any file written."""
    from transformers import AutoConfig

    from pipeline.common.encoders import family_of

    try:
        config = AutoConfig.from_pretrained(str(teacher))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the teacher's config ({exc})", teacher) from None
    family_of(config, str(teacher)).check_target(attention_target, str(teacher))


def load_cache_teacher(teacher: str | Path, with_logits: bool, tokenizer: str | Path | None = None,
                       num_labels: int | None = None, attention_target: str = "scores"):
    """Load the teacher (classifier or bare encoder) and the tokenizer used for the data.

    The data is tokenised with the teacher's tokenizer (or ``tokenizer``, which must share its
    vocabulary): its special tokens and pair template, e.g. RoBERTa's ``<s> A </s></s> B </s>``.
    Returns ``(model, tokenizer, head_trained)`` (``head_trained`` None for a bare encoder).
    """
    from transformers import AutoModel, AutoTokenizer

    from pipeline.common.encoders import family_of, use_eager_attention
    from pipeline.teacher.finetune import load_sequence_classifier

    teacher = str(teacher)
    check_teacher_family(teacher, attention_target)
    tokenizer_source = str(tokenizer) if tokenizer else teacher
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_source)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load a tokenizer ({exc})", tokenizer_source) from None
    head_trained = None
    if with_logits:
        model, head_trained, _ = load_sequence_classifier(teacher, num_labels)
    else:
        try:
            # hidden states only: a fine-tuned teacher's classifier is left out on purpose
            model = load_pretrained(AutoModel, teacher, partial=True)[0]
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot load the teacher ({exc})", teacher) from None
    check_tokenizer_matches_teacher(tok, model, teacher, tokenizer_source)
    if not family_of(model).exposes_scores:
        use_eager_attention(model)   # its log_probs come from output_attentions
    if tokenizer and tokenizer_source != teacher:
        try:
            own = AutoTokenizer.from_pretrained(teacher)
        except (OSError, ValueError):
            own = None  # the teacher ships no tokenizer: the size check above is all we have
        if own is not None and tokenizer_vocab_sha256(own) != tokenizer_vocab_sha256(tok):
            raise InputError(f"the teacher's own tokenizer vocabulary differs from the data's "
                             f"tokenizer ({tokenizer_source})", teacher)
    return model, tok, head_trained


def shard_values_per_row(spec: CacheSpec, length: int, hidden_size: int, num_heads: int) -> int:
    """Teacher values stored for one example of ``length`` tokens (for size arithmetic)."""
    return (len(spec.hidden_layers) * length * hidden_size
            + len(spec.attention_layers) * num_heads * length * length)


def naive_bytes_per_example(spec: CacheSpec, max_length: int, hidden_size: int, num_heads: int,
                            num_labels: int) -> int:
    """The naive layout the issue compares with: fp32, padded to ``max_length``, the same
    mapped layers, int64 token and segment ids."""
    values = shard_values_per_row(spec, max_length, hidden_size, num_heads) + num_labels
    return 4 * values + 8 * 2 * max_length


# --------------------------------------------------------------------------------------------
# Stage-level functions (called by tasks/teacher.py)
# --------------------------------------------------------------------------------------------

def teacher_description(teacher: str | Path, model) -> dict:
    """Identity of the teacher for the manifest: path/name, content hash of a local directory."""
    from pipeline.stage import FileHasher

    teacher = str(teacher)
    from pipeline.common.encoders import family_of

    described = {"path": teacher, "architecture": type(model).__name__,
                 "model_type": model.config.model_type, "family": family_of(model).name,
                 "num_layers": model.config.num_hidden_layers,
                 "hidden_size": model.config.hidden_size,
                 "num_heads": model.config.num_attention_heads}
    if Path(teacher).exists():
        described["fingerprint"] = FileHasher().describe(teacher)["sha256"]
    return described


def _head_size(teacher: str | Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(teacher)).num_labels


def write_shard_output(source: Path | str, start: int, stop: int, shard_index: int,
                       teacher: str | Path, out_dir: Path | str, spec: CacheSpec, *,
                       tokenizer: str | Path | None = None, batch_size: int = 64,
                       device: str = "auto", autocast: str = "none",
                       row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES, compression: str = "zstd",
                       compression_level: int = 3, byte_stream_split: bool = True, task_info: dict | None = None,
                       progress: bool = False) -> dict:
    """Cache examples ``[start, stop)`` of ``source`` into ``out_dir/shards/part-NNNNN.parquet``.

    Returns the manifest ``info`` of a one-shard cache (the reader opens it as it is).
    """
    from pipeline.teacher.finetune import warn_if_untrained_head

    task_info = dict(task_info or {})
    if spec.with_logits and task_info.get("num_labels") and task_info["num_labels"] > _head_size(teacher):
        raise InputError(f"the task has {task_info['num_labels']} classes but the teacher's head has "
                         f"{_head_size(teacher)}", teacher)
    model, tok, head_trained = load_cache_teacher(teacher, spec.with_logits, tokenizer,
                                                  attention_target=spec.attention_target)
    check_layers(spec, model.config.num_hidden_layers, str(teacher))
    plan = spec.plan(can_derive_scores(model, spec.attention_target))
    if spec.with_logits:
        warn_if_untrained_head(teacher, head_trained)
    info = {
        "teacher": {**teacher_description(teacher, model), "head_trained": head_trained},
        "format_version": FORMAT_VERSION,
        "hidden_layers": spec.hidden_layers, "attention_layers": spec.attention_layers,
        "dtype": spec.dtype, "compact": plan.describe(), "with_logits": spec.with_logits,
        "attention_target": spec.attention_target,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else 0,
        "hidden_size": model.config.hidden_size, "num_heads": model.config.num_attention_heads,
        "num_labels": model.config.num_labels if spec.with_logits else 0,
        "label_names": task_info.get("label_names"), "task_type": task_info.get("task_type"),
        "task": task_info.get("task"), "metric": task_info.get("metric"),
        "max_seq_length": spec.max_seq_length,
        "tokenizer_vocab_sha256": tokenizer_vocab_sha256(tok),
        "tokenizer_vocab_size": len(tok),
        "creation": {"batch_size": batch_size, "device": str(resolve_device(device)),
                     "autocast": autocast, "row_group_bytes": row_group_bytes,
                     "compression": compression_name(compression, compression_level),
                     "byte_stream_split": byte_stream_split},
        "source": str(source),
    }
    examples = read_example_range(source, start, stop)
    shard_dir = Path(out_dir) / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    out_file = shard_dir / SHARD_NAME.format(shard_index)
    metadata = {k: info[k] for k in ("format_version", "hidden_layers", "attention_layers", "dtype",
                                     "compact", "hidden_size", "num_heads", "tokenizer_vocab_sha256",
                                     "attention_target")}
    stats = write_cache_shard(examples, model, tok, out_file, spec, batch_size=batch_size,
                              device=device, autocast=autocast, row_group_bytes=row_group_bytes,
                              compression=compression, compression_level=compression_level,
                              byte_stream_split=byte_stream_split, metadata=metadata,
                              source=str(source), progress=progress)
    from pipeline.stage import sha256_file

    info["shards"] = [{"file": f"shards/{out_file.name}", "index": shard_index, "start": start,
                       "stop": stop, "rows": stats["rows"], "bytes": stats["bytes"],
                       "sha256": sha256_file(out_file), "tokens": stats["tokens"],
                       "row_groups": stats["row_groups"], "seconds": stats["seconds"],
                       "column_bytes": column_bytes(out_file), "writer_figures": stats["writer_figures"]}]
    info["examples"] = stats["rows"]
    # The stage's throughput (run history, like every examples_per_s): the writer's, teacher loading aside.
    info["examples_per_s"] = stats["writer_figures"]["examples_per_s"]
    return info


def column_kind(column: str) -> str:
    """``hidden`` (hidden states), ``scores`` (attention targets: scores and the layer inputs
    they are derived from) or ``other`` (ids, tokens, labels, logits), scales included."""
    if column.startswith("hidden_"):
        return "hidden"
    if column.startswith("attn_"):
        return "scores"
    return "other"


def column_bytes(parquet_file: Path | str) -> dict[str, int]:
    """Compressed bytes of a Parquet file by column kind, from its footer alone."""
    metadata = pq.read_metadata(parquet_file)
    kinds = {"hidden": 0, "scores": 0, "other": 0}
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for index in range(row_group.num_columns):
            chunk = row_group.column(index)
            kinds[column_kind(chunk.path_in_schema.split(".")[0])] += chunk.total_compressed_size
    return kinds


def size_figures(info: dict) -> dict:
    """Bytes per example and per real token, by column kind, and the naive layout beside them.

    ``shards`` counts the Parquet files; ``parts`` the teacher modules a compact cache keeps
    once (amortised over the cache: it does not grow with the examples).
    """
    shards = info["shards"]
    examples = sum(int(s["rows"]) for s in shards) or 1
    tokens = sum(int(s.get("tokens", 0)) for s in shards) or 1
    kinds = {"hidden": 0, "scores": 0, "other": 0}
    for shard in shards:
        for kind, count in (shard.get("column_bytes") or {}).items():
            kinds[kind] += int(count)
    total = sum(int(s["bytes"]) for s in shards)
    parts = int(((info.get("compact") or {}).get("parts") or {}).get("bytes", 0))
    spec = CacheSpec(info["hidden_layers"], info["attention_layers"], "float32",
                     int(info.get("max_seq_length", 128)), bool(info.get("with_logits", True)), "full")
    naive = naive_bytes_per_example(spec, spec.max_seq_length, int(info["hidden_size"]),
                                    int(info["num_heads"]), int(info.get("num_labels") or 0))
    return {
        "bytes_per_example": total / examples, "bytes_per_token": total / tokens,
        "by_kind_per_token": {k: round(v / tokens, 1) for k, v in kinds.items()},
        "by_kind_per_example": {k: round(v / examples, 1) for k, v in kinds.items()},
        "parts_bytes": parts, "mean_tokens": round(tokens / examples, 2),
        "naive_fp32_padded_bytes_per_example": naive,
        # per real token: what the naive layout costs for the same data
        "naive_fp32_padded_bytes_per_token": round(naive * examples / tokens, 1),
    }


#: Info keys that every shard of one cache must agree on.
SHARED_INFO_KEYS = ("format_version", "hidden_layers", "attention_layers", "dtype", "compact",
                    "with_logits", "hidden_size", "num_heads", "num_labels", "tokenizer_vocab_sha256",
                    "max_seq_length", "attention_target")


def _check_shard_file(file: Path, shard: dict) -> None:
    """The shard file as its manifest recorded it (present, size, sha256), or InputError."""
    from pipeline.stage import sha256_file

    if not file.is_file():
        raise InputError("teacher-cache shard listed in its manifest is missing", file)
    if file.stat().st_size != shard["bytes"]:
        raise InputError(f"teacher-cache shard has {file.stat().st_size} bytes, its manifest says "
                         f"{shard['bytes']}; remove {file.parent.parent} to rebuild it", file)
    if "sha256" in shard and sha256_file(file) != shard["sha256"]:
        raise InputError("teacher-cache shard's content differs from its manifest (sha256); "
                         f"remove {file.parent.parent} to rebuild it", file)


def write_teacher_parts(teacher: str | Path, plan: CompactPlan, out_dir: Path, expected: dict) -> dict:
    """Save the modules a compact cache recomputes from (once per cache); the manifest entry.

    ``expected`` is the teacher description the shards recorded: the parts must come from the
    very teacher that wrote them (same local content fingerprint).
    """
    from pipeline.stage import sha256_file
    from pipeline.teacher.finetune import load_bare_encoder

    model = load_bare_encoder(teacher)
    described = teacher_description(teacher, model)
    if expected.get("fingerprint") and described.get("fingerprint") != expected["fingerprint"]:
        raise InputError("the teacher changed since the shards were written (content fingerprint "
                         "differs); rebuild the shards", teacher)
    score_layers = sorted(plan.score_sources)
    parts = TeacherParts.from_model(model, score_layers)
    out_file = out_dir / PARTS_FILE
    entry = parts.save(out_file, model.config)
    entry.update(bytes=out_file.stat().st_size, sha256=sha256_file(out_file))
    return entry


def assemble_cache(shard_dirs: Sequence[Path | str], out_dir: Path | str,
                   teacher: str | Path | None = None) -> dict:
    """Make ``out_dir`` a self-contained cache over the given one-shard outputs.

    Shard files are hard-linked (a copy where the filesystem cannot link), so the cache costs
    no extra disk and stays readable if the shard outputs are garbage-collected. Each shard
    file is checked against its manifest (size, sha256) before it is linked. A compact cache
    also gets the teacher's parts (``teacher``: the teacher that wrote the shards).
    """
    import os
    import shutil

    from pipeline.stage import load_manifest

    out_dir = Path(out_dir)
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    infos = [load_manifest(d)["info"] for d in shard_dirs]
    if not infos:
        raise InputError("no shards to assemble (the example source is empty)")
    first = infos[0]
    merged = {k: v for k, v in first.items() if k not in ("shards", "examples", "examples_per_s")}
    merged["shards"] = []
    for shard_dir, info in zip(shard_dirs, infos):
        for key in SHARED_INFO_KEYS:
            if info.get(key) != first.get(key):
                raise InputError(f"shard disagrees with the first shard on {key}: "
                                 f"{info.get(key)!r} vs {first.get(key)!r}", shard_dir)
        for shard in info["shards"]:
            target = out_dir / shard["file"]
            source = Path(shard_dir) / shard["file"]
            # A hard link shares the inode: a shard corrupted since it was written would be
            # published again under the cache's new fingerprint. Check it first.
            _check_shard_file(source, shard)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
            merged["shards"].append(shard)
    merged["shards"].sort(key=lambda s: s["index"])
    merged["examples"] = sum(s["rows"] for s in merged["shards"])
    merged["tokens"] = sum(s["tokens"] for s in merged["shards"])
    merged["bytes"] = sum(s["bytes"] for s in merged["shards"])
    plan = CompactPlan.from_info(merged)
    if plan.needs_parts:
        if teacher is None:
            raise InputError("a compact cache needs its teacher to store the teacher parts", out_dir)
        merged["compact"] = {**merged["compact"],
                             "parts": write_teacher_parts(teacher, plan, out_dir, first.get("teacher") or {})}
    merged["size"] = size_figures(merged)
    return merged


def build_cache(source: Path | str, teacher: str | Path, out_dir: Path | str, spec: CacheSpec,
                shard_size: int = DEFAULT_SHARD_SIZE, **kwargs) -> dict:
    """Every shard in this process, then the manifest: the cache without Luigi (tests, benchmarks).

    Writes ``out_dir/manifest.json`` in the stage manifest's shape (``info`` section only).
    """
    out_dir = Path(out_dir)
    pieces = []
    for index, (start, stop) in enumerate(shard_ranges(count_examples(source), shard_size)):
        piece = out_dir / ".pieces" / f"{index:05d}"
        info = write_shard_output(source, start, stop, index, teacher, piece, spec, **kwargs)
        (piece / "manifest.json").write_text(json.dumps({"info": info}))
        pieces.append(piece)
    info = assemble_cache(pieces, out_dir, teacher)
    (out_dir / "manifest.json").write_text(json.dumps({"info": info}, indent=1))
    import shutil

    shutil.rmtree(out_dir / ".pieces")
    return info


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"
