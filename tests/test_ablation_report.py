"""Ablation grid parsing and the report files (Markdown, CSV, PNG)."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from pipeline.ablations.report import (REFERENCE_VARIANT, RunResult, Variant, VariantResult, load_grid,
                                       write_report)
from pipeline.common.selection import StudentSelection
from pipeline.errors import InputError
from tests.conftest import PROJECT_ROOT

#: Stage 2 kept the student of its best dev evaluation, evaluating every 10 steps.
ON_DEV = StudentSelection("dev", (10,))


def test_project_grid_parses_with_full_first():
    variants = load_grid(PROJECT_ROOT / "ablations.toml")
    assert variants[0].name == REFERENCE_VARIANT and variants[0].settings == {}
    names = [v.name for v in variants]
    assert {"no_attention", "no_augmentation", "map_top", "map_bottom"} <= set(names)
    assert len(names) == len(set(names))


@pytest.mark.parametrize("text, problem", [
    ("[variants.x]\nlearning_rate = 1.0\n", "unknown setting"),
    ("[variants.full]\nkd_alpha = 0.1\n", "cannot override"),
    ("[variants.x]\nlayer_map = 'middle'\n", "choose one of"),
    ("[variants.x]\nkd_alpha = 2.0\n", "within [0, 1]"),
    ("[variants.x]\naugmentation = 'no'\n", "true or false"),
    ("[variants.x]\nstage1_epochs = 0\n", "positive integer"),
    ("title = 'x'\n", "no [variants"),
    ("[variants.x\n", "not valid TOML"),
    ('[variants."a|b"]\nkd_alpha = 0.1\n', "is not a plain name"),       # breaks a table row
    ('[variants."two\\nlines"]\nkd_alpha = 0.1\n', "is not a plain name"),
    ('[variants."../../x"]\nkd_alpha = 0.1\n', "is not a plain name"),
])
def test_bad_grid_names_file_and_problem(tmp_path, text, problem):
    path = tmp_path / "grid.toml"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        load_grid(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_variant_settings_reach_the_stage_they_belong_to():
    variants = {v.name: v for v in load_grid(PROJECT_ROOT / "ablations.toml")}
    assert variants["full"].stage_parameters() == ({}, {})
    assert variants["no_attention"].stage_parameters() == ({"attention_weight": 0.0}, {})
    assert variants["map_top"].stage_parameters() == ({"layer_map": "top"}, {})
    assert variants["temperature_2"].stage_parameters() == ({}, {"temperature": 2.0})
    assert variants["no_augmentation"].stage_parameters() == ({"originals_only": True},
                                                              {"originals_only": True})
    assert Variant("x", {"stage1_epochs": 3, "stage2_learning_rate": 1e-5}).stage_parameters() == (
        {"epochs": 3}, {"learning_rate": 1e-5})


def runs_of(labels, right_share, seeds, rng, extra=None):
    """RunResults whose best and last dev predictions are right on about ``right_share``."""
    from distill.predictions import DevPredictions
    from pipeline.common.metrics import accuracy

    runs = []
    for seed in seeds:
        guess = np.where(rng.random(len(labels)) < right_share, labels, 1 - labels)
        last = np.where(rng.random(len(labels)) < 0.97, guess, 1 - guess)
        logits = [np.eye(2)[g] for g in (guess, last)]
        ids = [f"dev-{i}" for i in range(len(labels))]
        best, final = (DevPredictions(ids, labels, lg, 10, {}) for lg in logits)
        runs.append(RunResult(seed, accuracy(guess, labels), accuracy(last, labels), 10.0, f"out-{seed}",
                              800, extra, best, final))
    return runs


def test_report_files(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    full = VariantResult.from_runs("full", "accuracy", "the full recipe", runs_of(labels, 0.9, [42, 43, 44], rng))
    worse = VariantResult.from_runs("no_augmentation", "accuracy", "augmentation=False",
                                    runs_of(labels, 0.7, [42, 43, 44], rng))
    same = VariantResult.from_runs("no_attention", "accuracy", "attention_weight=0.0",
                                   [RunResult(r.seed, r.metric, r.last_metric, 9.0, "x", 800, None,
                                              r.best_predictions, r.last_predictions) for r in full.runs])
    paths = write_report([full, worse, same], tmp_path, "SST-2 ablations", ON_DEV, teacher_metric=0.92,
                         notes=["Task SST-2."], resamples=1000)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["variant"] for r in rows] == ["full", "no_augmentation", "no_attention"]
    assert rows[0]["seeds"] == "42 43 44"
    assert float(rows[0]["dev"]) == pytest.approx(np.mean([r.metric for r in full.runs]), abs=1e-4)
    assert float(rows[0]["dev_std"]) == pytest.approx(np.std([r.metric for r in full.runs], ddof=1), abs=1e-4)
    assert float(rows[1]["delta_vs_full"]) == pytest.approx(worse.metric - full.metric, abs=1e-4)
    assert float(rows[1]["delta_high"]) < 0 and rows[1]["within_noise"] == "no"
    assert (rows[2]["delta_low"], rows[2]["delta_high"], rows[2]["within_noise"]) == ("0.0", "0.0", "yes")
    assert float(rows[1]["last_dev"]) == pytest.approx(worse.last_metric, abs=1e-4)
    md = paths["md"].read_text()
    assert "Task SST-2." in md and "Teacher dev accuracy: 0.9200" in md
    assert "**Headline: the best stage-2 dev evaluation.**" in md and "last eval" in md
    assert "3 seeds (42, 43, 44" in md and "1,000 resamples" in md
    row = next(line for line in md.splitlines() if line.startswith("| no_attention |"))
    assert f"| {full.metric:.4f} ± {full.metric_std:.4f} | +0.0000 [+0.0000, +0.0000] within noise |" in row
    row = next(line for line in md.splitlines() if line.startswith("| no_augmentation |"))
    assert f"{worse.metric - full.metric:+.4f} [" in row and "within noise" not in row.split("|")[3]
    # the paper's ordering: both asked questions, one effect beyond noise, one not
    assert "## Compared with the TinyBERT paper's ablations" in md
    assert "| no_augmentation | without data augmentation | 68.4 | -7.2 |" in md
    assert "reproduces: a drop beyond noise" in md and "not shown: within noise" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_seed_says_so_and_runs_without_predictions_have_no_interval(tmp_path):
    results = [VariantResult("full", "f1", 0.88, 5.0, "a", "", 100, {"accuracy": 0.83}),
               VariantResult("no_hidden", "f1", 0.86, 5.0, "b", "hidden_weight=0.0", 100, {"accuracy": 0.8})]
    md = write_report(results, tmp_path, "MRPC", ON_DEV, teacher_metric=0.9)["md"].read_text()
    assert "| dev accuracy |" in md and "| full | 0.8800 | – | – | – | 97.8% | 0.8300 | 100 |" in md
    assert "| no_hidden | 0.8600 | -0.0200 | – | – | 95.6% | 0.8000 | 100 |" in md
    assert "One seed per variant" in md and "no interval" in md


def test_paired_comparison_needs_the_same_seeds_and_examples(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 50)
    full = VariantResult.from_runs("full", "accuracy", "", runs_of(labels, 0.9, [42, 43], rng))
    other = VariantResult.from_runs("x", "accuracy", "", runs_of(labels, 0.9, [42, 44], rng))
    with pytest.raises(InputError, match="same seeds"):
        write_report([full, other], tmp_path, "t", ON_DEV)
    shifted = VariantResult.from_runs("x", "accuracy", "", runs_of(labels[::-1].copy(), 0.9, [42, 43], rng))
    with pytest.raises(InputError, match="different dev examples"):
        write_report([full, shifted], tmp_path, "t", ON_DEV)
