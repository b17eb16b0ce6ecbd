"""Luigi wiring of the GLUE harness (``<workdir>/glue/<fingerprint>/``).

``tinykd run GLUE`` runs the per-task DAGs of ``[GLUE] tasks`` (any subset of the nine GLUE
tasks) and writes the paper-style table (:mod:`pipeline.glue.table`) and the GLUE server's
submission files. Luigi's configuration is global, so each task's settings come from its own
**profile**, ``<profile_dir>/<TASK>.cfg`` (``configs/glue/``: the paper's sizes;
``configs/glue/cpu/``: reduced for a CPU), layered over luigi.cfg and ``--config`` for that
task's stages only (``StageTask.profile``, passed down the DAG). A task's stages are exactly
those of ``tinykd --config <profile> run DistillPrediction``: the same fingerprints, so
outputs are shared with single-task runs. Stages whose settings agree across profiles (the
packaged word vectors) are one output; every task's teacher, candidates, augmentation, cache
and students are its own. Adding a task or a seed runs only the new stages.

``seeds`` runs each task's two distillation stages once per seed (the seeds of
``[Ablations] seeds``: a count from the configured seed, or a JSON list). Every problem the
harness can see before training is collected while the DAG is built, over every task, and
raised once (:class:`~pipeline.errors.InputErrors`: one line per problem, each with its file),
before anything is built or written: a missing profile, a profile naming another task,
train/dev files missing from ``glue_dir``, a test file without its task's columns, a bad
``holdout_fraction``. (An unknown or repeated name in ``tasks`` is refused first: it is the
list itself that is wrong.)

The build recomputes nothing that trained: it reads the stage-2 dev predictions, runs the
teacher once over dev (its interval), every model over MNLI's mismatched dev set, and the
selected student (best held-out score over the seeds) over each present test file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import luigi

from pipeline.errors import InputError, check_plain_name, raise_problems
from pipeline.stage import StageBuild
from tasks.base import StageTask, num_threads_parameter, resolve_profile, walk_dag
from tasks.distill import DistillPrediction
from tasks.prepare import PrepareData
from tasks.teacher import FineTuneTeacher, TeacherCache

_ALL_TASKS = ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI"]


class GLUE(StageTask):
    """Every listed GLUE task distilled with its own profile; the table and submission files."""

    stage_name = "glue"
    # 2: the selection prose and the pre-flight summary generated per task from the manifests,
    # the cache shards' seconds counted in every run
    stage_version = "2"
    report_files = ("glue.md", "glue.csv", "glue.png", "summary.json")

    tasks = luigi.ListParameter(
        default=_ALL_TASKS, significant=True,
        description="GLUE tasks to run, any subset of CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, "
                    "RTE, WNLI (JSON list, exact names); each reads <profile_dir>/<TASK>.cfg.")
    seeds = luigi.Parameter(
        default="1", significant=True,
        description="Seeds of each task's two distillation stages: a count N (the configured "
                    "seed and the N-1 after it) or a JSON list; the teacher and cache are shared.")
    profile_dir = luigi.Parameter(
        default="configs/glue", significant=False,
        description="Directory of the per-task profiles <TASK>.cfg (configs/glue: the paper's "
                    "settings; configs/glue/cpu: reduced for a CPU). Not significant: the values "
                    "a profile gives reach the fingerprint through the task's stages.")
    bootstrap_resamples = luigi.IntParameter(
        default=10_000, significant=True,
        description="Bootstrap resamples of the 95 % intervals over dev examples.")
    device = luigi.Parameter(default="auto", significant=False,
                             description="Device of the report's forward passes (teacher on dev, "
                                         "test-set predictions): auto, cpu, cuda, ...")
    num_threads = num_threads_parameter()

    # --- the per-task DAGs --------------------------------------------------------------
    def task_profile(self, name: str) -> str:
        path = Path(self.profile_dir) / f"{name}.cfg"
        try:
            return str(resolve_profile(str(path)))
        except InputError:
            raise InputError(f"[GLUE] task {name}: no profile {path.name} in profile_dir "
                             f"{self.profile_dir}", path) from None

    def task_runs(self) -> dict[str, dict[str, Any]]:
        """``task -> {profile, data, teacher, cache, seeds: {seed: DistillPrediction}}``, every
        task checked (names, profiles, files) before any is returned."""
        if getattr(self, "_runs", None) is not None:
            return self._runs
        names = list(self.tasks)
        if not names:
            raise InputError("[GLUE] tasks is empty: name at least one GLUE task")
        unknown = [n for n in names if n not in _ALL_TASKS]
        if unknown:
            raise InputError(f"[GLUE] tasks: unknown task(s) {unknown}; the GLUE tasks are {_ALL_TASKS}")
        if len(set(names)) != len(names):
            raise InputError(f"[GLUE] tasks lists a task twice: {names}")
        runs: dict[str, dict[str, Any]] = {}
        problems: list[InputError] = []
        for name in names:
            try:
                runs[name] = self._task_run(name)
            except InputError as exc:   # the next task's problems are reported with it
                problems.append(exc)
        raise_problems(problems, f"in the pre-flight of {len(names)} GLUE task(s); nothing was run")
        self._runs = runs
        return runs

    def _task_run(self, name: str) -> dict[str, Any]:
        """One task's stages (see :meth:`task_runs`); every problem of its profile and files."""
        from pipeline.ablations.statistics import parse_seeds
        from pipeline.prepare.splits import check_glue_layout

        check_plain_name(name, "task name", "[GLUE] tasks")
        profile = self.task_profile(name)
        data = PrepareData(profile=profile)
        if data.task != name or data.source != "glue":
            raise InputError(f"[GLUE] task {name}: its profile sets [PrepareData] source = "
                             f"{data.source}, task = {data.task!r}; it must read the GLUE "
                             f"directory's {name}", profile)
        glue_dir = data.glue_dir or os.environ.get("GLUE_DIR", "")
        if not glue_dir:
            raise InputError(f"[GLUE] task {name}: no GLUE directory (--PrepareData-glue-dir or $GLUE_DIR)")
        problems: list[InputError] = []
        try:
            check_glue_layout(Path(glue_dir).expanduser().resolve(), name, data.submission)
        except InputError as exc:   # the profile's own settings are still checked below
            problems.append(exc)
        try:
            data.stage_params()   # holdout_fraction and the like: checked now, for every task
        except InputError as exc:
            problems.append(InputError(f"[GLUE] task {name}: {exc.problem}", exc.path or profile, exc.line))
        raise_problems(problems)
        stage2 = DistillPrediction(profile=profile)
        configured = {"stage1": stage2.requires()["stage1"].seed, "stage2": stage2.seed}
        seeds = {}
        for seed in parse_seeds(self.seeds, stage2.seed, "[GLUE] seeds"):
            if seed == configured["stage2"] and seed == configured["stage1"]:
                seeds[seed] = stage2
            else:
                seeds[seed] = DistillPrediction(profile=profile, seed=seed, stage1={"seed": seed})
        return {"profile": profile, "data": data, "teacher": FineTuneTeacher(profile=profile),
                "cache": TeacherCache(profile=profile), "seeds": seeds}

    def requires(self):
        required: dict[str, luigi.Task] = {}
        for name, run in self.task_runs().items():
            required.update({f"{name}-data": run["data"], f"{name}-teacher": run["teacher"],
                             f"{name}-cache": run["cache"]})
            required.update({f"{name}-seed{seed}": task for seed, task in run["seeds"].items()})
        return required

    def stage_params(self) -> dict[str, Any]:
        params = super().stage_params()
        params["seeds"] = {name: sorted(run["seeds"]) for name, run in self.task_runs().items()}
        params["tasks"] = list(self.tasks)
        return params

    # --- the report ---------------------------------------------------------------------
    def build(self, out: StageBuild) -> None:
        from pipeline.glue.table import write_summary, write_table

        tasks = []
        with out.timed("report"):
            for name, run in self.task_runs().items():
                tasks.append(self._task_data(name, run, out.path))
            summary = write_table(tasks, out.path, self.bootstrap_resamples)
            write_summary(summary, out.path / "summary.json")
        out.rows["tasks"] = len(tasks)
        out.info.update(tasks=list(self.task_runs()), averages=summary["averages"])

    def _task_data(self, name: str, run: dict, out_dir: Path):
        import numpy as np

        from distill.predictions import (BEST_ON_DEV_PREDICTIONS, BEST_PREDICTIONS, read_predictions)
        from pipeline.glue.paper import GLUE_METRICS, columns_of
        from pipeline.glue.predict import predict_table
        from pipeline.glue.submission import check_submission, predictions_as_labels, write_submission
        from pipeline.glue.table import ColumnData, TaskData
        from pipeline.prepare.splits import EXTRA_DEV_DIR, TEST_DIR, read_split

        from pipeline.common.selection import StudentSelection

        data_dir = run["data"].readable_dir()
        data_manifest = run["data"].manifest()
        data_info = data_manifest["info"]
        label_names = data_info.get("label_names") or None
        cache_info = run["cache"].manifest()["info"]
        max_len = int(cache_info.get("max_seq_length", 128))
        teacher_dir = run["teacher"].model_dir()
        stage2 = {seed: task for seed, task in run["seeds"].items()}
        # the rule every seed's stage 2 kept its student by, as the manifests record it
        selection = StudentSelection.from_manifests(data_manifest, [t.manifest() for t in stage2.values()],
                                                    name)
        students = {seed: task.readable_dir() for seed, task in stage2.items()}
        best = {seed: read_predictions(d / BEST_PREDICTIONS) for seed, d in students.items()}
        on_dev = ({seed: read_predictions(d / BEST_ON_DEV_PREDICTIONS) for seed, d in students.items()}
                  if selection.held_out else None)
        dev = read_split(data_dir, "dev")
        labels = np.asarray(dev.column("label").to_pylist())
        teacher_dev = predict_table(teacher_dir, dev, max_len, device=self.device)
        columns = [ColumnData(columns_of(name)[0], labels, teacher_dev, [best[s].logits for s in stage2],
                              [on_dev[s].logits for s in stage2] if on_dev else None)]
        for extra in columns_of(name)[1:]:   # MNLI-mm: every model once more
            table = read_split(data_dir, f"{EXTRA_DEV_DIR}/{extra}")
            extra_labels = np.asarray(table.column("label").to_pylist())
            columns.append(ColumnData(extra, extra_labels, predict_table(teacher_dir, table, max_len, device=self.device),
                                      [predict_table(d / "student", table, max_len, device=self.device)
                                       for d in students.values()]))
        # the submitted student: the best held-out score over the seeds (dev under selection = dev)
        rule_key = "holdout_metrics" if selection.held_out else "dev_metrics"
        scores = {seed: float(task.manifest()["info"][rule_key]["primary"]) for seed, task in stage2.items()}
        chosen = max(scores, key=lambda s: (scores[s], -s))
        submission: dict[str, Any] = {"seed": chosen, "rule": selection.seed_rule(len(scores)), "files": {}}
        test_dir = data_dir / TEST_DIR
        for path in sorted(test_dir.glob("*.parquet")) if test_dir.is_dir() else []:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            logits = predict_table(students[chosen] / "student", table, max_len, device=self.device)
            target = out_dir / "submission" / f"{path.stem}.tsv"
            write_submission(target, table.column("index").to_pylist(), predictions_as_labels(logits, label_names))
            check_submission(target, path.stem, table.num_rows)
            submission["files"][path.stem] = table.num_rows
        if not submission["files"]:
            submission["why"] = ("no test file in the GLUE directory" if data_info.get("test") is not None
                                 else "[PrepareData] submission = false")
        metrics = GLUE_METRICS[name]
        return TaskData(name, selection, sorted(stage2), columns, metrics,
                        checks=self._checks(name, run, students), compute=self._compute(name, run),
                        submission=submission, selection_metric=data_info.get("metric", ""))

    def _checks(self, name: str, run: dict, students: dict) -> list[dict]:
        """Pre-flight problems known to break reproductions (docs/ALGORITHM.md §5)."""
        teacher = run["teacher"].manifest()["info"]
        cache = run["cache"].manifest()["info"]
        check = teacher.get("baseline_check") or {}
        checks = [{"check": "teacher better than the majority class",
                   "status": "fail" if check.get("degenerate") else "ok",
                   "detail": (f"dev {check.get('metric')} {check.get('teacher')} vs the constant "
                              f"{check.get('predicts')!r} {check.get('baseline')}") if check else "not recorded"}]
        mapping = str(teacher.get("label_mapping") or "")
        checks.append({"check": "label order of the teacher's head vs the task's label names",
                       "status": "ok" if mapping in ("names agree",) or not teacher.get("head_trained_before")
                       else "warn" if mapping.startswith("not checked") else "ok",
                       "detail": (f"{mapping}" if teacher.get("head_trained_before")
                                  else "fresh head fine-tuned here: its order is the task's")})
        mismatched = []
        for seed, directory in students.items():
            recorded = json.loads((directory / "student" / "tinykd_distill.json").read_text())
            if recorded.get("tokenizer_vocab_sha256") != cache.get("tokenizer_vocab_sha256"):
                mismatched.append(seed)
        checks.append({"check": "student reads the teacher's tokenizer",
                       "status": "fail" if mismatched else "ok",
                       "detail": f"vocabulary differs for seed(s) {mismatched}" if mismatched
                       else "vocabulary sha256 equal to the cache's"})
        augment = run["cache"].upstream_tasks().get("examples")
        if augment is None:
            checks.append({"check": "masked LM with a trained head", "status": "n/a",
                           "detail": "no augmentation"})
        else:
            mode = augment.mode
            checks.append({"check": "masked LM with a trained head",
                           "status": "n/a" if mode == "glove" else "ok",
                           "detail": "glove mode: no masked LM" if mode == "glove" else
                           f"{augment.mlm_model}: Candidates refuses an MLM whose head is untrained"})
        return checks

    def _compute(self, name: str, run: dict) -> dict[str, Any]:
        """Seconds (wall, CPU) and devices per stage over the task's outputs; the cache's bytes.

        The cache's shards are counted whether or not its ``requires()`` listed them: a run that
        found the augmented examples missing at scheduling got them as dynamic dependencies
        (outside the DAG walk), a resumed run as static ones; both tables must be the same."""
        cache = run["cache"]
        shards = cache.shard_tasks(cache.num_examples() or 0)
        stages_of_task = [stage for task in run["seeds"].values() for stage in walk_dag(task)] + shards
        seen, stages = set(), {}
        total = cpu = 0.0
        cpu_known = True
        for stage in stages_of_task:
            if not isinstance(stage, StageTask) or stage.output_dir() in seen:
                continue
            seen.add(stage.output_dir())
            manifest = stage.manifest()
            if stage.task_name() != name:
                continue   # shared with other tasks (the packaged word vectors)
            timings, host = manifest.get("timings") or {}, manifest.get("host") or {}
            entry = stages.setdefault(stage.stage_name, {"outputs": 0, "seconds": 0.0, "cpu_seconds": 0.0,
                                                          "devices": []})
            entry["outputs"] += 1
            entry["seconds"] += float(timings.get("seconds") or 0)
            total += float(timings.get("seconds") or 0)
            if "cpu_seconds" in timings:
                entry["cpu_seconds"] += float(timings["cpu_seconds"])
                cpu += float(timings["cpu_seconds"])
            else:
                entry["cpu_seconds"] = None if entry["outputs"] == 1 else entry["cpu_seconds"]
                cpu_known = False
            device = host.get("device", "not recorded")
            if device not in entry["devices"]:
                entry["devices"].append(device)
        cache_files = run["cache"].manifest().get("files") or {}
        return {"stages": stages, "seconds": total, "cpu_seconds": cpu if cpu_known else None,
                "cache_bytes": sum(int(f["bytes"]) for rel, f in cache_files.items() if rel.endswith(".parquet")),
                "cpu_count": os.cpu_count()}
