"""Model selection on held-out train rows (issue 22): the split, and what it keeps out of train."""
from __future__ import annotations

import luigi
import pytest

from pipeline.errors import InputError
from pipeline.prepare.splits import REGRESSION, SplitTable, TaskSpec, holdout_split, prepare


def _table(labels):
    return SplitTable([f"train-{i}" for i in range(len(labels))], [f"text {i}" for i in range(len(labels))],
                      [None] * len(labels), list(labels))


BINARY = TaskSpec("SST-2", "classification", False, ("0", "1"))


def test_holdout_is_disjoint_stable_and_stratified():
    labels = [0] * 300 + [1] * 100
    train, held, info = holdout_split(_table(labels), 0.1, 7, BINARY)
    assert not set(train.ids) & set(held.ids)
    assert sorted(train.ids + held.ids, key=lambda i: int(i.split("-")[1])) == [f"train-{i}" for i in range(400)]
    # stratified: 10 % of each class, not 10 % of the whole drawn at random
    assert held.labels.count(0) == 30 and held.labels.count(1) == 10 and info["stratified_by"] == "label"
    again = holdout_split(_table(labels), 0.1, 7, BINARY)[1]
    assert again.ids == held.ids                         # stable under reruns
    assert holdout_split(_table(labels), 0.1, 8, BINARY)[1].ids != held.ids   # seeded
    assert held.ids == sorted(held.ids, key=lambda i: int(i.split("-")[1]))   # source order


def test_regression_holdout_is_stratified_by_score_bins():
    scores = [i / 100 for i in range(500)]   # 0.00 .. 4.99
    spec = TaskSpec("STS-B", REGRESSION, True, None, (0.0, 5.0))
    _, held, info = holdout_split(_table(scores), 0.1, 0, spec)
    assert info["stratified_by"] == "5 equal-count score bins"
    assert [sum(1 for s in held.labels if b <= s < b + 1) for b in range(5)] == [10] * 5


@pytest.mark.parametrize("fraction", [0.0, -0.1, 0.51, 1.0])
def test_holdout_fraction_outside_the_range_is_refused(fraction):
    with pytest.raises(InputError, match=r"holdout_fraction must be in \(0, 0.5\]"):
        holdout_split(_table([0, 1] * 20), fraction, 0, BINARY)


def _write_sst2(path, labels):
    path.mkdir(parents=True)
    (path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"row {i} text\t{l}\n" for i, l in enumerate(labels)))
    (path / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"dev {i}\t{i % 2}\n" for i in range(6)))


def test_a_class_too_rare_to_hold_out_is_one_error_and_nothing_written(tmp_path):
    _write_sst2(tmp_path / "glue" / "SST-2", [0] * 30 + [1])
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"class '1' has 1 train row.*held-out") as error:
        prepare({"kind": "glue", "glue_dir": str(tmp_path / "glue"), "task": "SST-2"}, out,
                selection="holdout", holdout_fraction=0.1)
    assert "train.tsv" in str(error.value)
    assert not out.exists() or not any(out.iterdir())


def test_prepared_holdout_leaves_train_and_dev_fingerprints_of_selection_dev(tmp_path, monkeypatch):
    """selection = dev (the default) keeps every PrepareData fingerprint as it was before the
    parameters existed: they are left out of the key, whatever holdout_fraction says."""
    from tasks.prepare import PrepareData

    _write_sst2(tmp_path / "glue" / "SST-2", [0, 1] * 20)
    common = dict(source="glue", task="SST-2", glue_dir=str(tmp_path / "glue"))
    plain = PrepareData(**common)
    assert not {"selection", "holdout_fraction", "submission"} & set(plain.stage_params())
    assert PrepareData(**common, selection="dev", holdout_fraction=0.3).fingerprint() == plain.fingerprint()
    assert PrepareData(**common, submission=False).fingerprint() == plain.fingerprint()
    held = PrepareData(**common, selection="holdout")
    assert held.fingerprint() != plain.fingerprint()
    assert PrepareData(**common, selection="holdout", holdout_fraction=0.1).fingerprint() != held.fingerprint()
    with pytest.raises(InputError, match="holdout_fraction"):
        PrepareData(**common, selection="holdout", holdout_fraction=0.7).fingerprint()
    # no test file in the directory: submission = true reads nothing more, and says so
    result = prepare({"kind": "glue", "glue_dir": str(tmp_path / "glue"), "task": "SST-2", "submission": True},
                     tmp_path / "out", selection="holdout", holdout_fraction=0.1)
    assert result["rows"]["holdout"] == 4 and result["rows"]["train"] == 36 and result["info"]["test"] == {}
    luigi.task_register.Register.clear_instance_cache()


@pytest.mark.slow
def test_ablation_grid_with_held_out_selection(tmp_path, monkeypatch, minilm_dir, isolated_workdir):
    """The grid runs under selection = holdout: every variant's stage 2 picks on the held-out
    rows, the report says so, and the dev scores are the kept students' dev evaluations."""
    import json

    from distill.predictions import BEST_ON_DEV_PREDICTIONS, BEST_PREDICTIONS, read_predictions
    from tests.test_ablations import built_small_grid
    from tests.test_distill_tasks import one_torch_thread  # noqa: F401

    ablations = built_small_grid(tmp_path, monkeypatch, minilm_dir, selection="holdout")
    md = (ablations.output_dir() / "ablations.md").read_text()
    assert "Student selection: the best stage-2 evaluation on 8 held-out train rows" in md
    summary = json.loads((ablations.output_dir() / "summary.json").read_text())
    assert summary["selection"] == "holdout"
    for task in ablations.variant_tasks().values():
        info = task.manifest()["info"]
        assert info["selection"] == "holdout" and info["holdout_metrics"]["examples"] == 8
        kept = read_predictions(task.output_dir() / BEST_PREDICTIONS)
        on_dev = read_predictions(task.output_dir() / BEST_ON_DEV_PREDICTIONS)
        assert len(kept.ids) == 10 and kept.step == info["dev_best_step"]
        assert kept.metrics["primary"] == pytest.approx(info["dev_metrics"]["primary"])
        assert on_dev.metrics["primary"] >= kept.metrics["primary"] and on_dev.step == info["best_on_dev"]["step"]
        log = [json.loads(line) for line in (task.output_dir() / "metrics.jsonl").read_text().splitlines()]
        evals = [r["eval"] for r in log if "eval" in r]
        # the kept step is the best held-out evaluation (the first of equals), not the best dev one
        best = max(range(len(evals)), key=lambda i: (evals[i]["primary"], -i))
        assert [r["step"] for r in log if "eval" in r][best] == kept.step
        assert max(e["dev"]["primary"] for e in evals) == pytest.approx(on_dev.metrics["primary"])
