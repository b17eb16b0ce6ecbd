"""The shipped configuration files: every key names a real parameter, and the demo's DAG resolves.

Luigi ignores a configuration key that no parameter reads, so a typo in a profile (``epoch``
for ``epochs``) would silently run the default; these tests make it an error.
"""
from __future__ import annotations

import configparser

import luigi
import pytest

import tasks  # noqa: F401  - registers every task
from tests.conftest import PROJECT_ROOT

CONFIG_FILES = [PROJECT_ROOT / "luigi.cfg", *sorted((PROJECT_ROOT / "configs").glob("*.cfg"))]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_key_is_a_parameter_of_its_section(path):
    parser = configparser.ConfigParser()
    parser.read(path)
    registry = luigi.task_register.Register._get_reg()
    assert parser.sections()
    for section in parser.sections():
        assert section in registry, f"{path.name}: [{section}] is not a task or config class"
        names = {name for name, _ in registry[section].get_params()}
        unknown = set(parser.options(section)) - names
        assert not unknown, f"{path.name}: [{section}] has no parameter(s) {sorted(unknown)}"


def test_demo_profile_builds_the_whole_dag_offline(monkeypatch, tmp_path):
    """configs/demo.cfg + data/demo: the DAG the README's first command runs resolves offline."""
    from luigi.configuration import LuigiConfigParser

    from pipeline.prepare.demo_task import write_demo_task
    from tasks.ablations import Ablations
    from tasks.base import walk_dag
    from tasks.cli import DEMO_CONFIG, explain_lines

    monkeypatch.setattr(LuigiConfigParser, "_config_paths",
                        [str(PROJECT_ROOT / "luigi.cfg"), str(DEMO_CONFIG)])
    monkeypatch.setattr(LuigiConfigParser, "_instance", None)
    luigi.task_register.Register.clear_instance_cache()
    write_demo_task(tmp_path)                        # what `tinykd demo` writes into DEMO_DATA
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))   # and passes as glue_dir
    root = Ablations()
    families = [t.task_family for t in walk_dag(root)]
    assert families[-1] == "Ablations"
    assert {"PrepareData", "WordVectors", "Augment", "FineTuneTeacher", "TeacherCache",
            "DistillIntermediate", "DistillPrediction"} <= set(families)
    stages = [line for line in explain_lines(root) if not line.startswith(" ")]
    assert len(stages) == len(families) and stages[-1].startswith("will run    Ablations")
    # `tinykd demo` runs Demo: the grid and the export of its headline student (the full run)
    from tasks.deploy import Demo, ExportStudent

    demo = walk_dag(Demo())
    export = Demo().export()
    assert isinstance(export, ExportStudent) and export.quantize == "dynamic"
    assert export.requires()["student"].task_id == root.variant_tasks()["full", 42].task_id
    # the export comes after the grid, as Demo's dynamic dependency (not in its static DAG)
    assert {t.task_id for t in demo} == {t.task_id for t in walk_dag(root)} | {Demo().task_id}
    assert Demo.dynamic_requirements == "ExportStudent" and not Demo().complete()


@pytest.mark.parametrize("base, seeds, variants", [("mrpc", "mrpc-seeds", 3), ("sst2", "sst2-seeds", 5)])
def test_seeds_profiles_reuse_everything_up_to_the_cache(monkeypatch, isolated_workdir, shared_glue,
                                                         base, seeds, variants):
    """The rerun profiles (configs/*-seeds.cfg over their task's profile) change only trainer
    stages: the same data, augmentation, teacher and cache outputs; 3 seeds of each variant."""
    from luigi.configuration import LuigiConfigParser

    from tasks.ablations import Ablations
    from tasks.base import StageTask, walk_dag

    def stages(*profiles):
        monkeypatch.setattr(LuigiConfigParser, "_config_paths",
                            [str(PROJECT_ROOT / "luigi.cfg"),
                             *(str(PROJECT_ROOT / "configs" / f"{p}.cfg") for p in profiles)])
        monkeypatch.setattr(LuigiConfigParser, "_instance", None)
        luigi.task_register.Register.clear_instance_cache()
        monkeypatch.setenv("GLUE_DIR", str(shared_glue))
        found: dict[str, set[str]] = {}
        for task in walk_dag(Ablations()):
            if isinstance(task, StageTask):
                found.setdefault(task.stage_name, set()).add(task.output_dir().name)
        return found

    plain, seeded = stages(base), stages(base, seeds)
    for stage in ("prepare_data", "word_vectors", "candidates", "augment", "teacher", "teacher_cache"):
        assert seeded[stage] == plain[stage], stage
    assert len(seeded["distill_stage2"]) == 3 * variants
    assert len(seeded["distill_stage1"]) == 3 * variants
    assert not seeded["distill_stage2"] & plain["distill_stage2"]   # shortened: new trainer outputs
