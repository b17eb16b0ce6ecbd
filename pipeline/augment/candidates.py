"""The Candidates stage: every replaceable word's replacement candidates, computed once.

Augmentation has two halves of very different cost. Finding the candidates of a position
(a masked-LM forward, or a GloVe nearest-neighbour query) is the whole cost, and depends only
on the sentence, the MLM (and its arithmetic, ``mlm_precision``), the word vectors, ``M``, the
GloVe vocabulary cut and the stop-word list. Sampling ``N`` variants with probability ``p``
from a seed is plain Python over short lists. Storing the first half as its own
content-addressed stage makes ``N``, ``p`` and the seed free to change: a new setting reruns
only the sampling (:func:`pipeline.augment.sampling.augment_split`), and an ablation over
augmentation settings shares one Candidates output.

**Layout.** ``shards/part-NNNNN.parquet``: shard ``k`` covers examples ``[k*S, (k+1)*S)`` of
the prepared train split, one row per sentence side (``a``, then ``b`` for a pair), in example
order::

    id          string            the example's id
    side        string            "a" or "b"
    words       list<string>      the sentence split by BERT's basic tokenizer
    positions   list<int32>       the replacement positions (indexes into words)
    sources     list<string>      per position: "mlm" or "glove"
    candidates  list<list<string>> per position, in rank order; empty when its source has none

Each shard's Parquet metadata holds its example range and its counts. The counts are those of
the shard's own examples (``glove_distinct_words`` counts a word in the shard of its first
occurrence in the split), so a resumed run records what an uninterrupted one records. Each
shard is written atomically; a killed run resumes from the shards it finished.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.augment.augmenter import (SHARD_DIR, AugmentConfig, AugmentResources, Augmenter,
                                        SideCandidates, build_augmenter, shard_path)
from pipeline.errors import InputError

COUNTS_KEY = b"tinykd.candidates.counts"
RANGE_KEY = b"tinykd.candidates.examples"


def candidates_schema():
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("side", pa.string()),
                      ("words", pa.list_(pa.string())), ("positions", pa.list_(pa.int32())),
                      ("sources", pa.list_(pa.string())),
                      ("candidates", pa.list_(pa.list_(pa.string())))])


@dataclass(frozen=True)
class CandidateShard:
    """One finished candidates shard: its file, example range and counts."""

    index: int
    path: Path
    begin: int
    end: int
    counts: dict[str, int]


def _shard_metadata(path: Path) -> tuple[tuple[int, int], dict[str, int]]:
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
        begin, end = json.loads(metadata[RANGE_KEY])
        return (int(begin), int(end)), json.loads(metadata[COUNTS_KEY])
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"not a candidates shard ({type(exc).__name__}: {exc})", path) from None


def candidate_shards(candidates_dir: Path | str, num_examples: int) -> list[CandidateShard]:
    """The shards of a Candidates output, checked to cover examples ``[0, num_examples)``."""
    files = sorted((Path(candidates_dir) / SHARD_DIR).glob("part-*.parquet"))
    if not files:
        raise InputError("no candidates shards", Path(candidates_dir) / SHARD_DIR)
    shards, expected = [], 0
    for index, path in enumerate(files):
        if path.name != shard_path(candidates_dir, index).name:
            raise InputError(f"candidates shard {index} is missing (found {path.name} instead)", path)
        (begin, end), counts = _shard_metadata(path)
        if begin != expected:
            raise InputError(f"covers examples [{begin}, {end}), expected it to start at {expected}",
                             path)
        shards.append(CandidateShard(index, path, begin, end, counts))
        expected = end
    if expected != num_examples:
        raise InputError(f"the candidates cover {expected} examples, the split has {num_examples}",
                         Path(candidates_dir))
    return shards


def read_candidate_shard(path: Path | str) -> list[SideCandidates]:
    """One shard's rows as :class:`~pipeline.augment.augmenter.SideCandidates`, in order."""
    from pipeline.common.examples import read_parquet_checked

    return [SideCandidates(**row) for row in read_parquet_checked(path).to_pylist()]


def read_candidates(out_dir: Path | str):
    """All shards of a Candidates output, in example order, as one pyarrow Table."""
    import pyarrow as pa

    from pipeline.common.examples import read_parquet_checked

    files = sorted((Path(out_dir) / SHARD_DIR).glob("part-*.parquet"))
    return pa.concat_tables([read_parquet_checked(f) for f in files])


def _glove_words(path: Path) -> set[str]:
    """The words of a shard's GloVe positions (to count first occurrences after a resume)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["words", "positions", "sources"])
    return {words[pos] for words, positions, sources in zip(*(c.to_pylist() for c in table.columns))
            for pos, source in zip(positions, sources) if source == "glove"}


def candidates_split(table, out_dir: Path | str, config: AugmentConfig,
                     resources: AugmentResources, *, examples_per_shard: int = 2000,
                     progress: bool = True, augmenter: Augmenter | None = None) -> dict[str, Any]:
    """Find the candidates of every position of a prepared split, into Parquet shards.

    Uses ``config.mode`` and ``config.top_m`` only (never ``N``, ``p`` or the seed). The MLM
    and the vectors are loaded only when a shard still has to be built. Returns the summed
    counts, timings and MLM figures for the manifest.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from pipeline.stage import write_file_atomic

    missing = {"id", "text_a", "text_b", "label"} - set(table.column_names)
    if missing:
        raise InputError(f"the split lacks columns {sorted(missing)}")
    if examples_per_shard < 1:
        raise InputError(f"examples_per_shard must be >= 1, got {examples_per_shard}")
    if augmenter is None and config.mode != "glove":
        from pipeline.augment.mlm_candidates import check_precision, pick_device

        # Before anything is loaded or written: a precision the device cannot run.
        check_precision(resources.mlm_precision, pick_device(resources.device).split(":")[0])
    out_dir = Path(out_dir)
    (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    schema = candidates_schema()
    total = table.num_rows
    num_shards = max(1, -(-total // examples_per_shard))
    counts: Counter = Counter()
    resumed = 0
    seen_glove_words: set[str] = set()  # of the shards before the one being built
    started = time.perf_counter()
    bar = tqdm(total=total, unit="ex", desc=f"candidates ({config.mode})", disable=not progress,
               smoothing=0.1)
    for shard in range(num_shards):
        path = shard_path(out_dir, shard)
        begin, end = shard * examples_per_shard, min(total, (shard + 1) * examples_per_shard)
        if path.exists():
            found_range, shard_counts = _shard_metadata(path)
            if found_range != (begin, end):
                raise InputError(f"covers examples {list(found_range)}, expected [{begin}, {end})",
                                 path)
            counts.update(shard_counts)
            words = _glove_words(path)
            if augmenter is None:
                seen_glove_words |= words
            else:
                augmenter.glove_words_seen |= words
            resumed += 1
            bar.update(end - begin)
            continue
        if augmenter is None:
            augmenter = build_augmenter(config, resources)
            augmenter.glove_words_seen |= seen_glove_words
        before = Counter(augmenter.counts)
        sides = augmenter.side_candidates(table.slice(begin, end - begin).to_pylist())
        shard_counts = dict(augmenter.counts - before)
        out = pa.Table.from_pylist([vars(side) for side in sides], schema=schema)
        out = out.replace_schema_metadata({
            RANGE_KEY: json.dumps([begin, end]).encode(),
            COUNTS_KEY: json.dumps(shard_counts, sort_keys=True).encode()})
        # page CRCs: a flipped byte fails the read instead of decoding into other rows
        write_file_atomic(path, lambda tmp: pq.write_table(out, tmp, compression="zstd",
                                                           write_page_checksum=True))
        counts.update(shard_counts)
        bar.update(end - begin)
    bar.close()
    result: dict[str, Any] = {"counts": dict(sorted(counts.items())), "shards": num_shards,
                              "shards_resumed": resumed,
                              "seconds": round(time.perf_counter() - started, 3)}
    if augmenter is not None and augmenter.mlm is not None:
        result["mlm_forward_seconds"] = round(augmenter.mlm.forward_seconds, 3)
        result["mlm_forwards"] = augmenter.mlm.forwards
        result["mlm_windowed_inputs"] = augmenter.mlm.windowed
    return result
