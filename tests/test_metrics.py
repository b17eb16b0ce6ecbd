"""GLUE metrics against independent formulas."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.common.metrics import (accuracy, f1_binary, matthews_corrcoef, pearson, spearman, task_metrics)


def test_accuracy_and_f1_by_hand():
    predictions = [1, 1, 0, 0, 1, 0]
    labels = [1, 0, 0, 1, 1, 0]
    assert accuracy(predictions, labels) == pytest.approx(4 / 6)
    # tp=2, fp=1, fn=1 -> precision = recall = 2/3
    assert f1_binary(predictions, labels) == pytest.approx(2 / 3)
    assert f1_binary([0, 0], [0, 0]) == 0.0


def test_matthews_equals_pearson_of_binary_vectors():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    predictions = np.where(rng.random(200) < 0.8, labels, 1 - labels)
    expected = np.corrcoef(predictions, labels)[0, 1]
    assert matthews_corrcoef(predictions, labels) == pytest.approx(expected)
    assert matthews_corrcoef(np.ones(5), [0, 1, 0, 1, 1]) == 0.0   # constant prediction


def test_correlations():
    rng = np.random.default_rng(1)
    x = rng.normal(size=50)
    y = x ** 3 + rng.normal(scale=0.1, size=50)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    ranks = lambda v: np.argsort(np.argsort(v))
    assert spearman(x, y) == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1])


def test_task_metrics_pick_the_glue_metric():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    labels = np.array([0, 1, 0, 0])
    sst = task_metrics("SST-2", "classification", logits, labels)
    assert sst["primary_metric"] == "accuracy" and sst["primary"] == pytest.approx(0.75)
    mrpc = task_metrics("MRPC", "classification", logits, labels)
    assert mrpc["primary_metric"] == "f1" and mrpc["f1"] == pytest.approx(2 / 3)
    assert mrpc["accuracy"] == pytest.approx(0.75)
    cola = task_metrics("CoLA", "classification", logits, labels)
    assert cola["primary_metric"] == "mcc"
    stsb = task_metrics("STS-B", "regression", np.array([[0.1], [0.5], [0.4], [0.9]]),
                        np.array([0.0, 1.0, 2.0, 3.0]))
    assert stsb["spearman"] == pytest.approx(0.8)
    assert stsb["primary"] == pytest.approx((stsb["pearson"] + stsb["spearman"]) / 2)
