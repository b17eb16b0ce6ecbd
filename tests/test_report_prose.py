"""What a report says about how its numbers were chosen is generated from the run's settings
and manifests (issue 29, item 1): under ``selection = dev`` and ``selection = holdout`` the
reports name the split each student was chosen on, and no sentence claims the other; the GLUE
table never lists a failed pre-flight check as passed."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from pipeline.common.selection import StudentSelection
from pipeline.errors import InputError
from tests.conftest import PROJECT_ROOT
from tests.test_distill_tasks import one_torch_thread  # noqa: F401  (autouse fixture)

#: What a report says when the student was chosen on one split: the other split's words must
#: never appear (the fixed paragraph of ablations.md claimed dev selection under holdout).
CLAIMS = {
    "dev": ["Student selection: the best stage-2 evaluation on dev", "**Headline: the best stage-2 dev evaluation.**",
            "(best dev eval)"],
    "holdout": ["held-out train rows", "**Headline: the dev score of the student chosen on",
                "(chosen on held-out rows)"],
}


def _e2e_report():
    spec = importlib.util.spec_from_file_location("e2e_report", PROJECT_ROOT / "scripts" / "e2e_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["dev", "holdout"])
def test_ablation_and_e2e_reports_name_the_split_the_student_was_chosen_on(
        rule, tmp_path, monkeypatch, minilm_dir, isolated_workdir):
    from tests.test_ablations import built_small_grid

    ablations = built_small_grid(tmp_path, monkeypatch, minilm_dir, selection=rule)
    md = (ablations.output_dir() / "ablations.md").read_text()
    other = "dev" if rule == "holdout" else "holdout"
    for claim in CLAIMS[rule]:
        assert claim in md, claim
    for claim in CLAIMS[other]:
        assert claim not in md, claim
    text = _e2e_report().report_text(ablations, "python scripts/e2e_report.py ...", "SST-2", None)
    for claim in CLAIMS[rule]:
        assert claim in text, claim
    for claim in CLAIMS[other]:
        assert claim not in text, claim
    # every setting the prose names is the manifests': the held-out rows, the evaluation interval
    data = ablations.upstream_tasks()["data"].manifest()
    stage2 = [t.manifest() for t in ablations.variant_tasks().values()]
    assert {m["params"]["eval_every"] for m in stage2} == {2} and "every 2 steps and after the last one" in md
    assert {m["info"].get("selection", "dev") for m in stage2} == {rule}
    if rule == "holdout":
        rows = data["info"]["holdout"]["rows"]
        assert f"the best stage-2 evaluation on {rows} held-out train rows" in md
        assert f"student chosen on {rows} held-out train rows" in md
    assert json.loads((ablations.output_dir() / "summary.json").read_text())["selection"] == rule
    # the end-to-end report: the teacher as its manifest records it (the tiny teacher is kept
    # as given: finetune = never), the machine the stages ran on
    assert f"`{tmp_path / 'teacher'}`, as given" in text and "fine-tuned by the pipeline" not in text
    assert f"({os.cpu_count()}-core CPU, wall seconds" in text
    assert f"(full recipe; {StudentSelection.from_manifests(data, stage2).short()})" in text


def _task(name: str, selection: StudentSelection, teacher_ok: bool, rng):
    from pipeline.glue.table import ColumnData, TaskData

    labels = rng.integers(0, 2, 40)
    logits = [np.eye(2)[np.where(rng.random(40) < 0.8, labels, 1 - labels)] for _ in range(2)]
    columns = [ColumnData(name, labels, np.eye(2)[labels], logits, logits if selection.held_out else None)]
    checks = [{"check": "teacher better than the majority class", "status": "ok" if teacher_ok else "fail",
               "detail": "dev accuracy 0.5 vs the constant 0 0.5"},
              {"check": "student reads the teacher's tokenizer", "status": "ok", "detail": "equal"},
              {"check": "masked LM with a trained head", "status": "n/a", "detail": "glove mode"}]
    return TaskData(name, selection, [1, 2], columns, ("accuracy",), checks=checks,
                    submission={"files": {}, "why": "no test file"}, selection_metric="accuracy")


@pytest.mark.parametrize("rule", ["dev", "holdout"])
def test_glue_table_names_each_tasks_selection_and_never_passes_a_failed_check(rule, tmp_path):
    from pipeline.glue.table import write_table

    rng = np.random.default_rng(0)
    selection = StudentSelection(rule, (20,), 30 if rule == "holdout" else None)
    # RTE's and CoLA's teachers failed the majority-class check; SST-2's passed
    tasks = [_task("RTE", selection, False, rng), _task("CoLA", selection, False, rng),
             _task("SST-2", selection, True, rng)]
    write_table(tasks, tmp_path, resamples=100)
    md = (tmp_path / "glue.md").read_text()
    assert "- **FAIL RTE: teacher better than the majority class**" in md
    assert "- **FAIL CoLA: teacher better than the majority class**" in md
    passed = next(line for line in md.splitlines() if line.startswith("- passed or not applicable"))
    assert passed.startswith("- passed or not applicable: 7 of 9 (")
    # listed as passed only for the task it passed for
    assert "teacher better than the majority class (SST-2)" in passed and "RTE" not in passed
    assert "student reads the teacher's tokenizer;" in passed   # passed for every task: no list
    selected = next(line for line in md.splitlines() if line.startswith("**Student selection:**"))
    for name in ("RTE", "CoLA", "SST-2"):
        assert f"{name}: {selection.short()}" in selected
    if rule == "holdout":
        assert "30 held-out train rows (dev only scored)" in selected and "on dev" not in selected
    else:
        assert "held-out" not in selected and "best stage-2 evaluation on dev" in selected


def test_selection_from_manifests_refuses_outputs_that_disagree():
    data = {"info": {"selection": "holdout", "holdout": {"rows": 8, "fraction": 0.2, "stratified_by": "label"}}}
    held = {"fingerprint": "a", "params": {"eval_every": 4}, "info": {"selection": "holdout"}}
    selection = StudentSelection.from_manifests(data, [held, {**held, "params": {"eval_every": 2}}])
    assert selection.split == "8 held-out train rows" and selection.eval_every == (2, 4)
    assert "every 2 or 4 steps" in selection.sentence()
    with pytest.raises(InputError, match="chose its student by selection = dev, the prepared data says holdout"):
        StudentSelection.from_manifests(data, [held, {"fingerprint": "b", "params": {}, "info": {}}])
