"""Ablation grid parsing and the report files (Markdown, CSV, PNG)."""
from __future__ import annotations

import csv

import pytest

from pipeline.ablation_report import REFERENCE_VARIANT, VariantResult, load_grid, write_report
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
    ("[variants.full]\nalpha = 0.1\n", "cannot override"),
    ("title = 'x'\n", "no [variants"),
    ("[variants.x\n", "not valid TOML"),
])
def test_bad_grid_names_file_and_problem(tmp_path, text, problem):
    path = tmp_path / "grid.toml"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        load_grid(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_report_files(tmp_path):
    results = [VariantResult("full", "accuracy", 0.90, 12.0, "a"),
               VariantResult("no_attention", "accuracy", 0.85, 10.0, "b")]
    paths = write_report(results, tmp_path, "SST-2 ablations", teacher_metric=0.92)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["variant"] for r in rows] == ["full", "no_attention"]
    assert float(rows[1]["delta_vs_full"]) == pytest.approx(-0.05)
    md = paths["md"].read_text()
    assert "| no_attention | 0.8500 | -0.0500 | 92.4% |" in md and "Teacher dev accuracy: 0.9200" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
