"""Evaluate the student alone on the dev split (no teacher involved).

The dev split of the prepare_data stage is tokenised with the teacher's tokenizer and maximum
length -- the same tokenisation the teacher cache used for the training data -- and held in
memory; every evaluation runs the student in eval mode and scores its logits with the task's
GLUE metrics (:mod:`pipeline.common.metrics`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from distill.data import TokenizedExamples, tokenize_rows
from pipeline.common.metrics import task_metrics
from distill.trainer import predict_logits


def load_dev(prepared_dir: Path | str, tokenizer, max_seq_length: int, task_type: str,
             limit: int = 0, split: str = "dev") -> TokenizedExamples:
    """The prepared dev split (or ``split``: ``holdout``, ``extra_dev/<name>``), tokenised
    (first ``limit`` rows when > 0)."""
    from pipeline.prepare.splits import read_split

    table = read_split(prepared_dir, split)
    if limit > 0:
        table = table.slice(0, limit)
    rows = table.select(["id", "text_a", "text_b", "label"]).to_pylist()
    return TokenizedExamples(tokenize_rows(tokenizer, rows, max_seq_length), task_type,
                             pad_token_id=tokenizer.pad_token_id or 0)


class Evaluator:
    """Callable ``student -> metrics dict`` over a fixed dev source (in file order).

    ``last`` holds the latest call's per-example outputs (``(logits, labels)``), so that the
    caller can save the predictions behind the metrics (:mod:`distill.predictions`).
    """

    def __init__(self, source: TokenizedExamples, task: str | None, task_type: str,
                 batch_size: int = 128, device: torch.device | None = None, metric: str | None = None):
        self.source = source
        self.task = task
        self.metric = metric
        self.task_type = task_type
        self.batch_size = batch_size
        self.device = device or torch.device("cpu")
        self.last: tuple | None = None

    @property
    def ids(self) -> list:
        """The dev examples' ids, in evaluation order."""
        return [example["id"] for example in self.source.examples]

    def __call__(self, student: torch.nn.Module) -> dict:
        was_training = student.training
        student.eval()
        try:
            logits, labels = predict_logits(student, self.source.batches(self.batch_size, seed=None),
                                            self.device)
        finally:
            student.train(was_training)
        self.last = (logits, labels)
        metrics = task_metrics(self.task, self.task_type, logits, labels, self.metric)
        metrics["examples"] = int(len(labels))
        return metrics
