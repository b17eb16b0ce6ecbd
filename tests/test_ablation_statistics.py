"""The ablation statistics: seeds, the paired bootstrap over dev examples, and its intervals."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.ablations.statistics import (bootstrap_indices, mean_and_std, paired_bootstrap,
                                           parse_seeds, predicted, resampled_metric)
from pipeline.common import metrics
from pipeline.errors import InputError


def noisy_runs(labels, accuracy, seeds, rng):
    """Binary predictions, one row per seed, each right on about ``accuracy`` of the examples."""
    right = rng.random((seeds, len(labels))) < accuracy
    return np.where(right, labels, 1 - labels)


@pytest.mark.parametrize("metric", ["accuracy", "f1", "mcc"])
def test_identical_predictions_give_the_interval_zero(metric):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    runs = noisy_runs(labels, 0.8, 3, rng)
    difference = paired_bootstrap(metric, runs, runs.copy(), labels, resamples=2000)
    assert (difference.delta, difference.low, difference.high) == (0.0, 0.0, 0.0)
    assert difference.within_noise


@pytest.mark.parametrize("metric", ["accuracy", "f1", "mcc"])
def test_a_variant_better_on_many_examples_is_beyond_noise(metric):
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 400)
    reference = noisy_runs(labels, 0.7, 3, rng)
    better = reference.copy()
    better[:, :120] = labels[:120]            # right wherever the reference was, and on 120 more
    difference = paired_bootstrap(metric, better, reference, labels, resamples=2000)
    assert difference.delta > 0 and difference.low > 0 and not difference.within_noise
    worse = paired_bootstrap(metric, reference, better, labels, resamples=2000)
    assert worse.high < 0 and worse.delta == pytest.approx(-difference.delta)


def test_a_difference_of_a_few_examples_is_within_noise():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 872)
    reference = noisy_runs(labels, 0.85, 3, rng)
    variant = reference.copy()
    variant[:, :2] = 1 - variant[:, :2]       # two sentences flipped: 0.2 points
    difference = paired_bootstrap("accuracy", variant, reference, labels)
    assert abs(difference.delta) <= 2 / 872 + 1e-12 and difference.within_noise


def test_the_bootstrap_is_seeded():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 2, 150)
    a, b = noisy_runs(labels, 0.8, 2, rng), noisy_runs(labels, 0.75, 2, rng)
    first = paired_bootstrap("f1", a, b, labels, resamples=3000, seed=11)
    assert paired_bootstrap("f1", a, b, labels, resamples=3000, seed=11) == first
    other = paired_bootstrap("f1", a, b, labels, resamples=3000, seed=12)
    assert other.delta == first.delta and (other.low, other.high) != (first.low, first.high)


@pytest.mark.parametrize("metric, function", [("accuracy", metrics.accuracy), ("f1", metrics.f1_binary),
                                              ("mcc", metrics.matthews_corrcoef)])
def test_the_bootstrap_equals_a_direct_computation(metric, function):
    """Resample by resample with the stage-2 evaluation's own metric functions: the metric of
    each seed on the resampled examples, averaged over seeds, variant minus reference."""
    labels = np.array([1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1])
    variant = np.array([[1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 1],
                        [1, 1, 1, 1, 0, 1, 0, 0, 0, 1, 0, 1]])
    reference = np.array([[0, 0, 1, 0, 1, 1, 0, 0, 1, 0, 0, 1],
                          [1, 0, 0, 1, 1, 1, 1, 0, 1, 0, 0, 0]])
    resamples, seed = 500, 9
    indices = bootstrap_indices(len(labels), resamples, seed)
    direct = np.array([np.mean([function(run[i], labels[i]) for run in variant])
                       - np.mean([function(run[i], labels[i]) for run in reference]) for i in indices])
    difference = paired_bootstrap(metric, variant, reference, labels, resamples=resamples, seed=seed,
                                  chunk=128)
    low, high = np.percentile(direct, [2.5, 97.5])
    assert (difference.low, difference.high) == pytest.approx((low, high), abs=1e-12)
    assert difference.delta == pytest.approx(np.mean([function(r, labels) for r in variant])
                                             - np.mean([function(r, labels) for r in reference]))
    # the vectorised metric is the metric: F1 and MCC are not means over examples
    for run in variant:
        assert resampled_metric(metric, run[None], labels, indices[:50]) == pytest.approx(
            [function(run[i], labels[i]) for i in indices[:50]])


def test_regression_metrics_resample_too():
    rng = np.random.default_rng(8)
    labels = rng.random(60) * 5
    runs = labels + rng.normal(0, 1, (2, 60))
    difference = paired_bootstrap("corr", runs, runs, labels, resamples=200)
    assert (difference.low, difference.high) == (0.0, 0.0)
    assert predicted(runs[0][:, None], "corr").shape == (60,)
    assert list(predicted(np.array([[0.1, 0.9], [2.0, -1.0]]), "f1")) == [1, 0]


def test_mean_and_sample_std_over_seeds():
    assert mean_and_std([0.8, 0.9]) == pytest.approx((0.85, np.std([0.8, 0.9], ddof=1)))
    assert mean_and_std([0.8]) == (0.8, None)


def test_seeds_a_count_or_a_list():
    assert parse_seeds("1", 42) == [42]            # the configured run alone
    assert parse_seeds("3", 42) == [42, 43, 44]
    assert parse_seeds(3, 7) == [7, 8, 9]
    assert parse_seeds("[44, 42]", 42) == [44, 42]


@pytest.mark.parametrize("value, problem", [
    ("0", "within 1..100"), ("-2", "within 1..100"), ("[]", "at least one seed"),
    ("[42, 43, 42]", "[42] given twice"), ("[0, 1]", "positive integer"), ("[-1]", "positive integer"),
    ("three", "a count"), ("2.5", "a count"), ("true", "a count"), ('["42"]', "positive integer"),
])
def test_bad_seeds_are_one_clear_error(value, problem):
    with pytest.raises(InputError) as err:
        parse_seeds(value, 42, "[Ablations] seeds")
    assert problem in str(err.value) and "[Ablations] seeds" in str(err.value)
