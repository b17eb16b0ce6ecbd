"""The ablation grid through Luigi: a real (tiny) DAG with augmentation, one teacher cache read
by every variant, only trainer stages rerunning, and the report files."""
from __future__ import annotations

import csv
import json

import luigi
import numpy as np
import pytest

from pipeline.errors import InputError
from tests.test_distill_tasks import one_torch_thread  # noqa: F401  (autouse fixture)
from tests.tiny_dag import tiny_stages, tiny_task

GRID = """
[variants.no_attention]
attention_weight = 0.0

[variants.no_augmentation]
augmentation = false

[variants.map_top]
layer_map = "top"

[variants.temperature_2]
temperature = 2.0
"""


def configure(tmp_path, monkeypatch, text: str):
    from luigi.configuration import LuigiConfigParser

    config = tmp_path / "luigi.cfg"
    config.write_text(text)
    monkeypatch.setattr(LuigiConfigParser, "_config_paths", [str(config)])
    monkeypatch.setattr(LuigiConfigParser, "_instance", None)
    luigi.task_register.Register.clear_instance_cache()


@pytest.fixture
def configured(tmp_path, monkeypatch, minilm_dir):
    """files -> packaged GloVe augmentation -> tiny 4-layer teacher -> cache (+top map) -> grid."""
    (tmp_path / "grid.toml").write_text(GRID)
    text = tiny_task(tmp_path, minilm_dir, train_rows=24, dev_rows=10) + """
[Augment]
mode = glove
num_aug = 3
aug_progress = false
""" + tiny_stages(
        TeacherCache={"examples": None, "extra_layer_maps": "top"},
        DistillIntermediate={"batch_size": 16}, DistillPrediction={"batch_size": 16, "eval_every": 4}) + f"""
[Ablations]
grid = {tmp_path / 'grid.toml'}
"""
    configure(tmp_path, monkeypatch, text)
    return tmp_path, text


def build(*tasks):
    return luigi.build(list(tasks), local_scheduler=True, detailed_summary=True, log_level="WARNING")


def built_small_grid(tmp_path, monkeypatch, minilm_dir, selection: str = "dev"):
    """The grid's full and no_attention variants on a 40-row tiny task, trainer stages capped
    (3 and 6 steps, stage 2 evaluating every 2), under ``selection``; built, and returned."""
    from tasks.ablations import Ablations
    from tests.tiny_dag import tiny_stages, tiny_task

    (tmp_path / "grid.toml").write_text(GRID)
    task = tiny_task(tmp_path, minilm_dir, train_rows=40, dev_rows=10)
    if selection == "holdout":
        task = task.replace("[FineTuneTeacher]", "selection = holdout\nholdout_fraction = 0.2\n[FineTuneTeacher]")
    by_steps = {"epochs": None, "max_steps": 3}
    configure(tmp_path, monkeypatch, task + tiny_stages(
        DistillIntermediate=by_steps, DistillPrediction={**by_steps, "max_steps": 6, "eval_every": 2}) + f"""
[Ablations]
grid = {tmp_path / 'grid.toml'}
variants = ["no_attention"]
""")
    ablations = Ablations()
    result = build(ablations)
    assert result.status.name in ("SUCCESS", "SUCCESS_WITH_RETRY"), result.summary_text
    return ablations


def ran_tasks(summary_text: str) -> dict[str, int]:
    """Task family -> count from the "ran successfully" block of Luigi's execution summary."""
    lines = summary_text.splitlines()
    start = next(i for i, line in enumerate(lines) if "ran successfully" in line)
    ran = {}
    for line in lines[start + 1:]:
        if not line.startswith("    - "):
            break
        count, family = line.split()[1], line.split()[2].split("(")[0]
        ran[family] = int(count)
    return ran


def stage_dirs(workdir, stage):
    root = workdir / stage
    return {p.name for p in root.iterdir() if not p.name.startswith(".")} if root.exists() else set()


@pytest.mark.slow
def test_grid_reads_one_cache_and_reruns_only_trainer_stages(configured, isolated_workdir, monkeypatch):
    from tasks.ablations import Ablations
    from tasks.distill import DistillPrediction

    tmp_path, text = configured
    ablations = Ablations()
    result = build(ablations)
    assert result.status.name in ("SUCCESS", "SUCCESS_WITH_RETRY"), result.summary_text
    out = ablations.output_dir()
    rows = list(csv.DictReader((out / "ablations.csv").open()))
    assert [r["variant"] for r in rows] == ["full", "no_attention", "no_augmentation", "map_top",
                                           "temperature_2"]
    assert all(r["metric"] == "accuracy" and 0.0 <= float(r["dev"]) <= 1.0 for r in rows)
    md = (out / "ablations.md").read_text()
    assert "Teacher dev accuracy:" in md and "| map_top |" in md
    assert (out / "ablations.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["student"] == pytest.approx(float(rows[0]["dev"]), abs=1e-4)
    # the tiny random teacher (finetune = never) is no better than the majority class: the
    # report says so at its top (issue 15 item 9)
    from pipeline.stage import load_manifest
    from tasks.teacher import FineTuneTeacher

    check = load_manifest(FineTuneTeacher().output_dir())["info"]["baseline_check"]
    assert check["degenerate"] is True and summary["teacher_degenerate"] is True
    assert "WARNING: the teacher is no better than the majority class" in md

    # One teacher cache for every variant; the full variant is the configured main job.
    assert len(stage_dirs(isolated_workdir, "teacher_cache")) == 1
    assert len(stage_dirs(isolated_workdir, "augment")) == 1
    assert ablations.requires()["variant-full-seed42"].output_dir() == DistillPrediction().output_dir()
    # Stage 1 is shared by the variants that change only stage 2 (full, temperature_2).
    assert len(stage_dirs(isolated_workdir, "distill_stage1")) == 4
    assert len(stage_dirs(isolated_workdir, "distill_stage2")) == 5
    # Without augmentation: the cache's original rows only, from the same shards.
    examples = {r["variant"]: int(r["train_examples"]) for r in rows}
    assert examples["no_augmentation"] == 24 < examples["full"]
    stage1_maps = {json.loads((isolated_workdir / "distill_stage1" / d / "metrics.json").read_text())["layer_map"]
                   .__repr__() for d in stage_dirs(isolated_workdir, "distill_stage1")}
    assert stage1_maps == {"[2, 4]", "[3, 4]"}   # uniform and top over a 4-layer teacher

    # A new variant: only its two trainer stages and the report run; nothing upstream.
    before = {stage: stage_dirs(isolated_workdir, stage)
              for stage in ("prepare_data", "word_vectors", "augment", "teacher", "teacher_cache_shard",
                            "teacher_cache")}
    (tmp_path / "grid.toml").write_text(GRID + "\n[variants.no_hidden]\nhidden_weight = 0.0\n")
    configure(tmp_path, monkeypatch, text)
    again = Ablations()
    assert again.output_dir() != out  # the grid's content is part of the key
    result = build(again)
    assert result.status.name == "SUCCESS", result.summary_text
    # Luigi's own summary: what ran is the new variant's two stages and the report.
    assert ran_tasks(result.summary_text) == {"Ablations": 1, "DistillIntermediate": 1, "DistillPrediction": 1}
    assert {stage: stage_dirs(isolated_workdir, stage) for stage in before} == before
    assert len(stage_dirs(isolated_workdir, "distill_stage1")) == 5
    assert len(stage_dirs(isolated_workdir, "distill_stage2")) == 6

@pytest.mark.slow
def test_seeds_run_every_variant_per_seed_and_a_new_seed_runs_only_its_trainer_stages(
        configured, isolated_workdir, monkeypatch):
    from distill.predictions import BEST_PREDICTIONS, LAST_PREDICTIONS, read_predictions
    from pipeline.common.metrics import task_metrics
    from pipeline.stage import load_manifest
    from tasks.ablations import Ablations
    from tasks.distill import DistillIntermediate, DistillPrediction

    tmp_path, text = configured
    (tmp_path / "grid.toml").write_text("[variants.no_attention]\nattention_weight = 0.0\n")
    configure(tmp_path, monkeypatch, text + "seeds = 2\n")
    ablations = Ablations()
    result = build(ablations)
    assert result.status.name in ("SUCCESS", "SUCCESS_WITH_RETRY"), result.summary_text
    assert len(stage_dirs(isolated_workdir, "teacher_cache")) == 1
    assert len(stage_dirs(isolated_workdir, "distill_stage1")) == 4    # 2 variants x 2 seeds
    assert len(stage_dirs(isolated_workdir, "distill_stage2")) == 4
    tasks = ablations.variant_tasks()
    assert sorted(tasks) == [("full", 42), ("full", 43), ("no_attention", 42), ("no_attention", 43)]
    # The configured seed's run is the configured job; the next seed sets both stages' seed.
    assert tasks["full", 42].output_dir() == DistillPrediction().output_dir()
    assert tasks["full", 42].task_id == DistillPrediction().task_id
    seeded = tasks["full", 43]
    assert seeded.seed == 43 and seeded.requires()["stage1"].seed == 43
    assert seeded.requires()["stage1"].output_dir() != DistillIntermediate().output_dir()

    # Every stage-2 output holds the dev predictions behind its best and last scores.
    for task in tasks.values():
        info = load_manifest(task.output_dir())["info"]
        best = read_predictions(task.output_dir() / BEST_PREDICTIONS)
        last = read_predictions(task.output_dir() / LAST_PREDICTIONS)
        assert len(best.ids) == 10 and best.ids == last.ids
        assert best.step == info["dev_best_step"] and last.step == load_manifest(task.output_dir())["rows"]["steps"]
        assert task_metrics("SST-2", "classification", best.logits, best.labels)["primary"] == \
            pytest.approx(info["dev_metrics"]["primary"])
        assert task_metrics("SST-2", "classification", last.logits, last.labels)["primary"] == \
            pytest.approx(info["last_dev_metrics"]["primary"])

    summary = json.loads((ablations.output_dir() / "summary.json").read_text())
    assert summary["seeds"] == [42, 43]
    runs = summary["variants"]["no_attention"]["runs"]
    assert [r["seed"] for r in runs] == [42, 43]
    assert summary["variants"]["no_attention"]["dev"] == pytest.approx(np.mean([r["dev"] for r in runs]))
    interval = summary["variants"]["no_attention"]["delta_vs_full"]
    assert interval["low"] <= interval["delta"] + 1e-4 and interval["delta"] <= interval["high"] + 1e-4
    rows = list(csv.DictReader((ablations.output_dir() / "ablations.csv").open()))
    assert rows[1]["seeds"] == "42 43" and rows[1]["within_noise"] in ("yes", "no")
    # one TensorBoard run per variant, seed and stage: one --logdir view compares them by name
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    multiplexer = EventMultiplexer().AddRunsFromDirectory(str(ablations.output_dir() / "tb"))
    multiplexer.Reload()
    assert sorted(multiplexer.Runs()) == sorted(f"{variant}/seed{seed}/stage{stage}"
                                                for variant in ("full", "no_attention")
                                                for seed in (42, 43) for stage in (1, 2))
    assert [e.step for e in multiplexer.Scalars("no_attention/seed43/stage2", "dev/primary")] == \
        [json.loads(l)["step"] for l in (tasks["no_attention", 43].output_dir() / "metrics.jsonl")
         .read_text().splitlines() if '"eval"' in l]

    # A third seed: only that seed's trainer stages (one per stage and variant) and the report.
    before = {stage: stage_dirs(isolated_workdir, stage)
              for stage in ("prepare_data", "augment", "teacher", "teacher_cache_shard", "teacher_cache")}
    configure(tmp_path, monkeypatch, text + "seeds = [42, 43, 44]\n")
    again = Ablations()
    result = build(again)
    assert result.status.name == "SUCCESS", result.summary_text
    assert ran_tasks(result.summary_text) == {"Ablations": 1, "DistillIntermediate": 2, "DistillPrediction": 2}
    assert {stage: stage_dirs(isolated_workdir, stage) for stage in before} == before
    assert len(stage_dirs(isolated_workdir, "distill_stage2")) == 6
    # "3" and "[42, 43, 44]" are the same seeds: the same report output
    configure(tmp_path, monkeypatch, text + "seeds = 3\n")
    assert Ablations().output_dir() == again.output_dir()


@pytest.mark.parametrize("seeds, problem", [("0", "within 1..100"), ("[42, 42]", "given twice"),
                                            ("[-1, 2]", "positive integer")])
def test_bad_seeds_are_refused_before_anything_runs(configured, isolated_workdir, monkeypatch, seeds, problem):
    from tasks.ablations import Ablations

    with pytest.raises(InputError, match="seeds") as err:
        Ablations(seeds=seeds).requires()
    assert problem in str(err.value)
    assert not isolated_workdir.exists() or not any(isolated_workdir.iterdir())   # nothing built


def test_a_variant_selection_that_is_not_a_plain_name_is_refused(configured):
    from tasks.ablations import Ablations

    with pytest.raises(InputError, match="is not a plain name"):
        Ablations(variants=["../../x"]).requires()


def test_a_layer_map_the_cache_lacks_is_refused_before_training(configured, monkeypatch):
    from tasks.ablations import Ablations

    tmp_path, text = configured
    (tmp_path / "grid.toml").write_text('[variants.map_bottom]\nlayer_map = "bottom"\n')
    configure(tmp_path, monkeypatch, text)
    with pytest.raises(InputError, match="extra_layer_maps") as err:
        Ablations().requires()
    assert str(tmp_path / "grid.toml") in str(err.value) and "map_bottom" in str(err.value)


def test_unknown_variant_selection_is_named(configured):
    from tasks.ablations import Ablations

    with pytest.raises(InputError, match=r"\['nope'\] not in the grid"):
        Ablations(variants=["nope"]).requires()


AUGMENT_GRID = """
[variants.n1]
num_aug = 1

[variants.n1_t2]
num_aug = 1
temperature = 2.0

[variants.seed7]
aug_seed = 7

[variants.as_configured]
num_aug = 3
"""


@pytest.mark.slow
def test_augmentation_variants_get_their_own_cache_and_share_the_candidates(
        configured, isolated_workdir, monkeypatch):
    from tasks.ablations import Ablations

    tmp_path, text = configured
    (tmp_path / "grid.toml").write_text(AUGMENT_GRID)
    configure(tmp_path, monkeypatch, text)
    ablations = Ablations()
    result = build(ablations)
    assert result.status.name in ("SUCCESS", "SUCCESS_WITH_RETRY"), result.summary_text
    ran = ran_tasks(result.summary_text)
    # One candidates computation; the configured augmentation plus two others (n1, seed7).
    # (Luigi's summary lists the first five families only; the stage directories say the rest.)
    assert (ran.get("Candidates"), ran.get("Augment")) == (1, 3), result.summary_text
    assert len(stage_dirs(isolated_workdir, "candidates")) == 1
    assert len(stage_dirs(isolated_workdir, "augment")) == 3
    assert len(stage_dirs(isolated_workdir, "teacher_cache")) == 3
    summary = json.loads((ablations.output_dir() / "summary.json").read_text())
    variants = summary["variants"]
    assert summary["teacher_caches"] == 3
    assert variants["n1"]["teacher_cache"] == variants["n1_t2"]["teacher_cache"]
    assert variants["as_configured"]["teacher_cache"] == variants["full"]["teacher_cache"]
    assert len({variants[n]["teacher_cache"] for n in ("full", "n1", "seed7")}) == 3
    assert variants["n1"]["train_examples"] < variants["full"]["train_examples"]
    md = (ablations.output_dir() / "ablations.md").read_text()
    assert "Teacher caches: 3." in md
    assert f"- {variants['n1']['teacher_cache']}: n1, n1_t2 (num_aug=1)" in md
    assert f"- {variants['seed7']['teacher_cache']}: seed7 (aug_seed=7)" in md


def test_augmentation_settings_in_the_grid_are_checked(tmp_path):
    from pipeline.ablations.report import load_grid

    path = tmp_path / "grid.toml"
    path.write_text("[variants.x]\nnum_aug = 10\nreplace_prob = 0.2\naug_seed = 3\n")
    (_, variant) = load_grid(path)
    assert variant.augment_parameters() == {"num_aug": 10, "aug_p": 0.2, "aug_seed": 3}
    assert variant.stage_parameters() == ({}, {})
    for text, problem in (("replace_prob = 1.5", "within [0, 1]"), ("num_aug = -1", "integer >= 0"),
                          ("augmentation = false\nnum_aug = 5", "would change nothing")):
        path.write_text(f"[variants.x]\n{text}\n")
        with pytest.raises(InputError) as err:
            load_grid(path)
        assert problem in str(err.value) and str(path) in str(err.value)


def test_the_grid_fingerprint_needs_no_scipy_or_torch():
    """A no-op rerun walks every task's fingerprint: Ablations' (its seeds included) must not
    pull in scipy, torch or transformers (importing scipy alone took 1.4 s of a 2 s budget)."""
    import subprocess
    import sys

    from tasks.base import PROJECT_ROOT

    code = ("import sys; from tasks.ablations import Ablations; "
            "task = Ablations(seeds='3'); task.stage_params(); "
            "bad = [m for m in ('scipy', 'torch', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
