"""The Augment stage: ``N`` variants per example sampled over the Candidates stage's lists.

Only ``N``, ``p`` and the seed enter here; the expensive half (the masked-LM forward, the GloVe
queries) is :mod:`pipeline.augment.candidates`, stored once. Randomness comes from
:func:`~pipeline.augment.augmenter.example_rng` per (seed, example id, side), so the output is
the one the single-stage augmentation (:meth:`~pipeline.augment.augmenter.Augmenter.augment`)
gives, shard file for shard file.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.augment.augmenter import (COUNTS_METADATA_KEY, SHARD_DIR, AugmentConfig,
                                        output_schema, sample_examples, shard_path)
from pipeline.augment.candidates import candidate_shards, read_candidate_shard
from pipeline.errors import InputError


def augment_split(table, candidates_dir: Path | str, out_dir: Path | str, config: AugmentConfig,
                  *, progress: bool = True) -> dict[str, Any]:
    """Sample the augmented split from a Candidates output: ``N``, ``p`` and the seed only.

    ``table`` is the prepared split (id, text_a, text_b, label) the candidates were built from.
    Output shard ``k`` holds the variants of candidates shard ``k``'s examples, written
    atomically with that shard's candidate counts plus ``examples_in``/``examples_out`` in its
    Parquet metadata: the same bytes the single-stage augmentation wrote. A killed run resumes
    from the shards it finished. No model and no vectors are loaded: a new ``N``, ``p`` or seed
    costs seconds. Returns the summed counts and timings for the manifest.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from pipeline.stage import write_file_atomic

    missing = {"id", "text_a", "text_b", "label"} - set(table.column_names)
    if missing:
        raise InputError(f"the split lacks columns {sorted(missing)}")
    out_dir = Path(out_dir)
    (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    schema = output_schema(table.schema.field("label").type)
    shards = candidate_shards(candidates_dir, table.num_rows)
    counts: Counter = Counter()
    resumed = 0
    started = time.perf_counter()
    bar = tqdm(total=table.num_rows, unit="ex", desc="augment (sampling)", disable=not progress,
               smoothing=0.1)
    for shard in shards:
        path = shard_path(out_dir, shard.index)
        if path.exists():
            metadata = pq.read_schema(path).metadata or {}
            counts.update(json.loads(metadata[COUNTS_METADATA_KEY]))
            resumed += 1
            bar.update(shard.end - shard.begin)
            continue
        examples = table.slice(shard.begin, shard.end - shard.begin).to_pylist()
        try:
            rows = sample_examples(examples, read_candidate_shard(shard.path), config)
        except InputError as exc:
            raise InputError(str(exc), shard.path) from None
        shard_counts = Counter(shard.counts)
        shard_counts.update(examples_in=len(examples), examples_out=len(rows))
        shard_counts = dict(+shard_counts)  # positive entries only, as the counts always were
        out = pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata(
            {COUNTS_METADATA_KEY: json.dumps(shard_counts, sort_keys=True).encode()})
        # page CRCs: a flipped byte fails the read instead of decoding into other rows
        write_file_atomic(path, lambda tmp: pq.write_table(out, tmp, compression="zstd",
                                                           write_page_checksum=True))
        counts.update(shard_counts)
        bar.update(shard.end - shard.begin)
    bar.close()
    return {"counts": dict(sorted(counts.items())), "shards": len(shards),
            "shards_resumed": resumed, "seconds": round(time.perf_counter() - started, 3)}
