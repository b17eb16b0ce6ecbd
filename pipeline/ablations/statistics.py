"""How sure an ablation is: seeds, their spread, and a paired bootstrap over dev examples.

A single run's dev score moves with the seed (student initialisation, data order, dropout)
and with the dev sample itself (one SST-2 sentence is 0.11 points). The grid therefore runs
every variant once per seed (``[Ablations] seeds``) and reports, per variant:

* the **mean and standard deviation over seeds** of the dev metric (sample standard
  deviation, ``ddof = 1``; none with one seed) -- the seed-to-seed spread;
* its **difference from** ``full`` with a **95 % paired-bootstrap interval** over dev
  examples. The statistic is the difference of the seed-averaged metrics,
  ``mean_s metric(variant_s) - mean_s metric(full_s)``. One resample draws ``n`` dev example
  indices with replacement (``n`` = the dev size) and applies the *same* indices to every run
  of both variants, so each example's pairing across variants and seeds is kept (the pooled
  sample is seeds × examples, with the example as the resampling unit). The metric is
  recomputed on every resample (F1 and Matthews correlation are not means over examples).
  10,000 resamples from a seeded NumPy generator: the same predictions give the same
  interval. A difference whose interval contains 0 is **within noise**.

The interval measures how much the difference could move with another dev sample of the same
size, averaged over the seeds run; the seed-to-seed spread is the standard deviation beside it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.common import metrics as task_metrics
from pipeline.errors import InputError

#: The default number of bootstrap resamples, the interval's coverage and the generator's seed.
RESAMPLES = 10_000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0
#: ``seeds = N`` runs the seeds ``first, first + 1, ..., first + N - 1`` (``first``: the
#: configured ``[DistillPrediction] seed``, 42 by default): ``seeds = 1`` is the configured run.
MAX_SEEDS = 100


def parse_seeds(value: Any, first_seed: int, where: str | Path | None = None) -> list[int]:
    """The seeds an ``[Ablations] seeds`` value asks for.

    ``value``: a count ``N`` (an integer, or its text) -> ``first_seed .. first_seed + N - 1``;
    or a list of distinct positive integers (a JSON list, or a list/tuple) -> those seeds, in
    that order. Anything else is one :class:`InputError` naming the value.
    """
    text = value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InputError(f"seeds = {text!r}: give a count (e.g. 3) or a list of seeds "
                             "(e.g. [42, 43, 44])", where) from None
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
        raise InputError(f"seeds = {text!r}: give a count (e.g. 3) or a list of seeds "
                         "(e.g. [42, 43, 44])", where)
    if isinstance(value, int):
        if not 1 <= value <= MAX_SEEDS:
            raise InputError(f"seeds = {value}: the number of seeds must be within 1..{MAX_SEEDS}", where)
        return [first_seed + i for i in range(value)]
    seeds = list(value)
    if not seeds:
        raise InputError("seeds = []: give at least one seed", where)
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s <= 0]
    if bad:
        raise InputError(f"seeds = {list(value)}: every seed must be a positive integer (not {bad})", where)
    duplicates = sorted({s for s in seeds if seeds.count(s) > 1})
    if duplicates:
        raise InputError(f"seeds = {list(value)}: seed(s) {duplicates} given twice (a repeated seed "
                         "is the same run, counted twice)", where)
    return seeds


def mean_and_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``ddof = 1``; ``None`` for fewer than two values)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)


def predicted(logits: np.ndarray, metric: str) -> np.ndarray:
    """What a metric scores: the arg-max class, or the regression output itself."""
    logits = np.asarray(logits)
    if metric in task_metrics.METRICS_BY_TYPE["regression"]:
        return logits.reshape(len(logits), -1)[:, 0].astype(float)
    return logits.reshape(len(logits), -1).argmax(axis=-1)


def metric_value(metric: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    """The named metric of one run (the same functions as the stage-2 evaluation)."""
    functions = {"accuracy": task_metrics.accuracy, "f1": task_metrics.f1_binary,
                 "mcc": task_metrics.matthews_corrcoef, "pearson": task_metrics.pearson,
                 "spearman": task_metrics.spearman}
    if metric == "corr":
        return (task_metrics.pearson(predictions, labels) + task_metrics.spearman(predictions, labels)) / 2
    if metric not in functions:
        raise ValueError(f"no metric {metric!r}")
    return float(functions[metric](predictions, labels))


def resampled_metric(metric: str, predictions: np.ndarray, labels: np.ndarray,
                     indices: np.ndarray) -> np.ndarray:
    """``metric`` of each run on each resample, averaged over runs: shape ``[resamples]``.

    ``predictions`` [runs, n] (one row per seed), ``labels`` [n], ``indices`` [resamples, n].
    Accuracy, F1 and Matthews correlation are computed from confusion counts for all
    resamples at once; the correlations resample by resample.
    """
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if metric in ("accuracy", "f1", "mcc"):
        gold = labels[indices]                                     # [B, n]
        values = []
        for run in predictions:
            guess = run[indices]                                   # [B, n]
            if metric == "accuracy":
                values.append((guess == gold).mean(axis=1))
                continue
            tp = ((guess == 1) & (gold == 1)).sum(axis=1).astype(float)
            if metric == "f1":   # as metrics.f1_binary: the positive class against the rest
                fp = ((guess == 1) & (gold != 1)).sum(axis=1).astype(float)
                fn = ((guess != 1) & (gold == 1)).sum(axis=1).astype(float)
                denominator = 2 * tp + fp + fn
                values.append(np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0))
                continue
            # as metrics.matthews_corrcoef: binary labels 0 / 1
            tn = ((guess == 0) & (gold == 0)).sum(axis=1).astype(float)
            fp = ((guess == 1) & (gold == 0)).sum(axis=1).astype(float)
            fn = ((guess == 0) & (gold == 1)).sum(axis=1).astype(float)
            denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
            values.append(np.divide(tp * tn - fp * fn, denominator, out=np.zeros_like(tp),
                                    where=denominator > 0))
        return np.mean(values, axis=0)
    return np.array([np.mean([metric_value(metric, run[row], labels[row]) for run in predictions])
                     for row in indices])


@dataclass(frozen=True)
class Difference:
    """A variant's difference from the reference with its bootstrap interval."""

    delta: float            # mean over seeds of the variant's metric minus the reference's
    low: float
    high: float
    resamples: int
    confidence: float

    @property
    def within_noise(self) -> bool:
        return self.low <= 0.0 <= self.high

    def as_dict(self) -> dict[str, Any]:
        return {"delta": self.delta, "low": self.low, "high": self.high, "within_noise": self.within_noise,
                "resamples": self.resamples, "confidence": self.confidence}


def bootstrap_indices(n: int, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``[resamples, n]`` example indices drawn with replacement by a generator seeded ``seed``."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def paired_bootstrap(metric: str, variant: np.ndarray, reference: np.ndarray, labels: np.ndarray,
                     resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     confidence: float = CONFIDENCE, chunk: int = 1000) -> Difference:
    """The paired bootstrap of ``mean_s metric(variant_s) - mean_s metric(reference_s)``.

    ``variant``, ``reference``: predictions [seeds, n] (:func:`predicted`), row ``s`` of each
    from the same seed; ``labels`` [n]: the dev labels both were scored on. Every resample
    applies the same example indices to all rows of both. The interval is the percentile
    interval of the resampled differences (``confidence`` central mass).
    """
    variant, reference, labels = np.asarray(variant), np.asarray(reference), np.asarray(labels)
    if variant.ndim == 1:
        variant = variant[None]
    if reference.ndim == 1:
        reference = reference[None]
    if variant.shape[1] != len(labels) or reference.shape[1] != len(labels):
        raise ValueError(f"predictions over {variant.shape[1]} and {reference.shape[1]} examples, "
                         f"{len(labels)} labels")
    delta = float(np.mean([metric_value(metric, run, labels) for run in variant])
                  - np.mean([metric_value(metric, run, labels) for run in reference]))
    indices = bootstrap_indices(len(labels), resamples, seed)
    differences = np.concatenate([
        resampled_metric(metric, variant, labels, indices[start:start + chunk])
        - resampled_metric(metric, reference, labels, indices[start:start + chunk])
        for start in range(0, resamples, chunk)])
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(differences, [tail, 100 - tail])
    return Difference(delta, float(low), float(high), resamples, confidence)
