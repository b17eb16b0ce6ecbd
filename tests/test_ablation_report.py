"""Ablation grid parsing and the report files (Markdown, CSV, PNG)."""
from __future__ import annotations

import csv

import pytest

from pipeline.ablations.report import (REFERENCE_VARIANT, Variant, VariantResult, load_grid, write_report)
from pipeline.errors import InputError
from tests.conftest import PROJECT_ROOT


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


def test_report_files(tmp_path):
    results = [VariantResult("full", "accuracy", 0.90, 12.0, "a", "the full recipe", 800),
               VariantResult("no_attention", "accuracy", 0.85, 10.0, "b", "attention_weight=0.0", 800)]
    paths = write_report(results, tmp_path, "SST-2 ablations", teacher_metric=0.92, notes=["Task SST-2."])
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["variant"] for r in rows] == ["full", "no_attention"]
    assert float(rows[1]["delta_vs_full"]) == pytest.approx(-0.05)
    md = paths["md"].read_text()
    assert "| no_attention | 0.8500 | -0.0500 | 92.4% | 800 | 10 | attention_weight=0.0 |" in md
    assert "Teacher dev accuracy: 0.9200" in md and "Task SST-2." in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_shows_secondary_metrics(tmp_path):
    results = [VariantResult("full", "f1", 0.88, 5.0, "a", "", 100, {"accuracy": 0.83})]
    md = write_report(results, tmp_path, "MRPC", teacher_metric=0.9)["md"].read_text()
    assert "| dev accuracy |" in md and "| full | 0.8800 | +0.0000 | 97.8% | 0.8300 | 100 |" in md
