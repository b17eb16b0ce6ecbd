"""The student's dev predictions, saved beside the stage-2 student (torch-free).

Stage 2 evaluates its student on dev every ``eval_every`` steps and keeps the best. The
scores it reports are functions of the per-example predictions, so it saves those too: the
predictions of the **best** evaluation (the exported student's) and of the **last** one (the
end of training), one Parquet file each. Statistics that need the examples -- a paired
bootstrap between two ablation variants, another metric -- are then recomputed from the stage
outputs without retraining (:mod:`pipeline.ablations.report`).

A file holds one row per dev example, in the prepared dev split's order: ``index`` (the row
number in ``dev.parquet``), ``id``, ``label`` (the gold label: class index, or the score of a
regression task) and ``logits`` (the student's output: one value per class, one for
regression). The evaluation's step and metrics are in the file's schema metadata, so a file
says which evaluation it holds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

#: File names inside a stage-2 output.
BEST_PREDICTIONS = "dev_predictions_best.parquet"
LAST_PREDICTIONS = "dev_predictions_last.parquet"
#: selection = holdout only: the dev predictions of the evaluation that scored best *on dev*
#: (not the kept student's: that is BEST_PREDICTIONS), so that one run shows what selecting on
#: dev would have reported (the flattery of the reference's rule)
BEST_ON_DEV_PREDICTIONS = "dev_predictions_best_on_dev.parquet"
_METADATA_KEY = b"tinykd.evaluation"


@dataclass
class DevPredictions:
    """One evaluation's per-example outputs: ``logits`` [N, C] and gold ``labels`` [N]."""

    ids: list[str]
    labels: np.ndarray
    logits: np.ndarray
    step: int
    metrics: dict[str, Any]


def write_predictions(path: Path | str, ids: Sequence[Any], labels: np.ndarray, logits: np.ndarray,
                      step: int, metrics: dict[str, Any]) -> None:
    """Write one evaluation's predictions to ``path`` atomically (a rename over the old file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.stage import write_file_atomic

    path = Path(path)
    logits = np.asarray(logits, dtype=np.float32)
    logits = logits.reshape(len(logits), -1)
    labels = np.asarray(labels)
    if len(ids) != len(labels) or len(labels) != len(logits):
        raise ValueError(f"{len(ids)} ids, {len(labels)} labels and {len(logits)} logit rows")
    label_type = pa.float32() if labels.dtype.kind == "f" else pa.int64()
    table = pa.table({
        "index": pa.array(np.arange(len(labels), dtype=np.int32)),
        "id": pa.array([str(i) for i in ids], pa.string()),
        "label": pa.array(labels, label_type),
        "logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), logits.shape[1]),
    })
    record = json.dumps({"step": int(step), "metrics": metrics}, sort_keys=True, default=float)
    table = table.replace_schema_metadata({_METADATA_KEY: record.encode()})
    write_file_atomic(path, lambda temporary: pq.write_table(table, temporary))


def read_predictions(path: Path | str) -> DevPredictions:
    """Read a file written by :func:`write_predictions`."""
    import pyarrow.parquet as pq

    from pipeline.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError("no dev predictions here (a stage-2 output built before they were saved? "
                         "remove it to rebuild it)", path)
    table = pq.read_table(path)
    metadata = (table.schema.metadata or {}).get(_METADATA_KEY)
    if metadata is None:
        raise InputError("not a dev-predictions file (no evaluation record)", path)
    record = json.loads(metadata)
    width = table.schema.field("logits").type.list_size
    logits = table.column("logits").combine_chunks().flatten().to_numpy().reshape(-1, width)
    return DevPredictions(ids=table.column("id").to_pylist(), labels=table.column("label").to_numpy(),
                          logits=logits, step=int(record["step"]), metrics=record["metrics"])
