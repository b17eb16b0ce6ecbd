"""GLUE dev metrics by task, and which one decides the "best" checkpoint.

GLUE reports accuracy for most tasks, F1 and accuracy for MRPC/QQP, Matthews correlation for
CoLA and Pearson/Spearman correlation for STS-B. The selection metric (``primary``) is the
one the benchmark leads with: F1 for MRPC/QQP, Matthews for CoLA, the mean of Pearson and
Spearman for STS-B (as the reference's ``corr``), accuracy otherwise.
"""
from __future__ import annotations

import math

import numpy as np

#: Task name (upper-cased, as in the GLUE folder names) -> metric names reported.
TASK_METRICS = {
    "COLA": ("mcc", "accuracy"),
    "MRPC": ("f1", "accuracy"),
    "QQP": ("f1", "accuracy"),
    "STS-B": ("corr", "pearson", "spearman"),
    "STSB": ("corr", "pearson", "spearman"),
}


def accuracy(predictions, labels) -> float:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    return float((predictions == labels).mean()) if len(labels) else float("nan")


def f1_binary(predictions, labels, positive: int = 1) -> float:
    """F1 of the positive class (GLUE's MRPC/QQP convention); 0 when nothing is predicted right."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    true_pos = int(((predictions == positive) & (labels == positive)).sum())
    false_pos = int(((predictions == positive) & (labels != positive)).sum())
    false_neg = int(((predictions != positive) & (labels == positive)).sum())
    denominator = 2 * true_pos + false_pos + false_neg
    return 2 * true_pos / denominator if denominator else 0.0


def matthews_corrcoef(predictions, labels) -> float:
    """Matthews correlation for binary labels; 0 when a marginal is constant (as sklearn)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    tp = float(((predictions == 1) & (labels == 1)).sum())
    tn = float(((predictions == 0) & (labels == 0)).sum())
    fp = float(((predictions == 1) & (labels == 0)).sum())
    fn = float(((predictions == 0) & (labels == 1)).sum())
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def pearson(predictions, labels) -> float:
    predictions, labels = np.asarray(predictions, float), np.asarray(labels, float)
    if predictions.std() == 0 or labels.std() == 0:
        return 0.0
    from scipy import stats  # here, not at the top: tasks/ reach this module on every no-op rerun

    return float(stats.pearsonr(predictions, labels)[0])


def spearman(predictions, labels) -> float:
    predictions, labels = np.asarray(predictions, float), np.asarray(labels, float)
    if predictions.std() == 0 or labels.std() == 0:
        return 0.0
    from scipy import stats

    return float(stats.spearmanr(predictions, labels)[0])


#: Metrics a task may name as its own (``PrepareData.metric``), by task type.
METRICS_BY_TYPE = {"classification": ("accuracy", "f1", "mcc"),
                   "regression": ("corr", "pearson", "spearman")}


def metric_names(task: str | None, task_type: str, metric: str | None = None) -> tuple[str, ...]:
    """The metrics reported for a task, the primary (selection) one first: ``metric`` when given,
    else GLUE's for a GLUE task name, else accuracy (classification) or corr (regression)."""
    names = TASK_METRICS.get((task or "").upper()) or (
        ("corr", "pearson", "spearman") if task_type == "regression" else ("accuracy",))
    if metric:
        if metric not in METRICS_BY_TYPE.get(task_type, ()):
            raise ValueError(f"metric {metric!r} is not one for {task_type} "
                             f"(choose from {METRICS_BY_TYPE.get(task_type)})")
        names = (metric, *(n for n in names if n != metric))
    return names


def task_metrics(task: str | None, task_type: str, logits: np.ndarray, labels: np.ndarray,
                 metric: str | None = None) -> dict:
    """All metrics for ``task`` from raw logits [N, C] (or [N, 1] for regression) and labels.

    The returned dict holds ``primary`` (its value) and ``primary_metric`` (its name): ``metric``
    when given (the task's declared metric), else the task's own (:func:`metric_names`).
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    names = metric_names(task, task_type, metric) if metric else TASK_METRICS.get((task or "").upper())
    if task_type == "regression":
        values = logits.reshape(-1)
        result = {"pearson": pearson(values, labels), "spearman": spearman(values, labels)}
        result["corr"] = (result["pearson"] + result["spearman"]) / 2
        names = names or ("corr", "pearson", "spearman")
    else:
        predictions = logits.argmax(axis=-1)
        result = {"accuracy": accuracy(predictions, labels)}
        names = names or ("accuracy",)
        if "f1" in names:
            result["f1"] = f1_binary(predictions, labels)
        if "mcc" in names:
            result["mcc"] = matthews_corrcoef(predictions, labels)
    result["primary_metric"] = names[0]
    result["primary"] = result[names[0]]
    return result
