"""Luigi wiring of the ablation grid (``<workdir>/ablations/<fingerprint>/``).

An ablation asks what one part of the recipe buys: the same student distilled without the
attention loss, without augmentation, with another layer map... Every variant of the grid
(``ablations.toml``, parsed by :mod:`pipeline.ablations.report`) is a ``DistillPrediction``
task whose parameters, and whose ``stage1`` parameters, differ from the configured recipe.
They all require the *same* ``TeacherCache()``, ``FineTuneTeacher()`` and ``PrepareData()``,
so Luigi finds those complete and only trainer stages run; the ``full`` variant is exactly
the configured ``DistillPrediction()``, the main job's own output.

A variant that changes the augmentation's sampling (``num_aug``, ``replace_prob``,
``aug_seed``) trains on other examples, so it needs its own ``Augment`` output and its own
``TeacherCache``: its trainer stages carry ``augment={...}`` down to them. The ``Candidates``
stage stays shared (it does not depend on those settings), so the new augmentation costs
seconds and the new cache one teacher pass. Variants asking for the same augmentation share
one cache, and a variant whose settings equal the configured ones reads the main cache; the
report says which variants read which cache.

Two settings read the shared cache differently rather than rebuilding it:
``augmentation = false`` trains on the cache's original rows (``originals_only``), and a
``layer_map`` other than the cache's needs the cache to hold those layers too
(``[TeacherCache] extra_layer_maps``). A grid that asks for layers the configured cache will
not hold is refused when the DAG is built, before anything trains, rather than silently
scheduling a second teacher run.

``seeds`` runs every variant once per seed (both distillation stages take it: student
initialisation, data order, dropout); the caches are shared by all seeds, and adding a seed
later runs only the new seed's trainer stages. The configured seed's runs are the same tasks
(and outputs) as a grid without seeds.

The stage writes ``ablations.md``, ``ablations.csv``, ``ablations.png`` (per variant the mean
and spread over seeds, the difference from ``full`` with its 95 % paired-bootstrap interval,
the teacher's score as a reference line) and ``summary.json``. The statistics come from the
dev predictions each stage-2 output saves, so they are recomputed without retraining.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import luigi

from pipeline.errors import InputError, check_plain_name
from pipeline.stage import StageBuild
from tasks.base import PROJECT_ROOT, StageTask, workdir, workdir_store
from tasks.distill import DistillIntermediate, DistillPrediction
from tasks.prepare import PrepareData
from tasks.teacher import FineTuneTeacher, TeacherCache

DEFAULT_GRID = PROJECT_ROOT / "ablations.toml"


class Ablations(StageTask):
    """Distil one student per variant of an ablation grid from one teacher cache; report."""

    stage_name = "ablations"
    # 3: seeds, mean ± std, paired-bootstrap intervals, last-eval scores; 4: the selection prose
    # generated from the manifests (pipeline.common.selection), under both rules
    stage_version = "4"
    report_files = ("ablations.md", "ablations.csv", "ablations.png", "summary.json")

    grid = luigi.Parameter(
        default=str(DEFAULT_GRID), significant=False,
        description="The ablation grid (TOML; see ablations.toml). Not significant: its content "
                    "is hashed into the fingerprint.")
    variants = luigi.ListParameter(
        default=[], significant=True,
        description="Run only these variants of the grid (the full recipe always runs); empty: "
                    "every variant.")

    seeds = luigi.Parameter(
        default="1", significant=True,
        description="Seeds per variant: a count N runs the seeds s, s+1, ..., s+N-1 (s: the "
                    "configured [DistillPrediction] seed, 42 by default; 1: the configured run "
                    "alone), or a JSON list of distinct positive seeds, e.g. [42, 7]. Each seed is "
                    "the seed of both distillation stages (student initialisation, data order, "
                    "dropout); the teacher cache is shared.")

    def seed_list(self) -> list[int]:
        """The seeds every variant runs with (one clear error for a bad ``seeds`` value)."""
        from pipeline.ablations.statistics import parse_seeds

        return parse_seeds(self.seeds, self.upstream(DistillPrediction).seed, "[Ablations] seeds")

    def stage_params(self) -> dict[str, Any]:
        # "3" and "[42, 43, 44]" run the same seeds: one output
        return {**super().stage_params(), "seeds": self.seed_list()}

    def grid_path(self) -> Path:
        return Path(self.grid).expanduser().resolve()

    def grid_variants(self):
        """The grid's variants, ``full`` first, restricted to ``variants`` when given."""
        from pipeline.ablations.report import REFERENCE_VARIANT, load_grid

        variants = load_grid(self.grid_path())
        for name in self.variants:   # names reach file names and table rows: never a path
            check_plain_name(name, "variant name", "[Ablations] variants")
        if self.variants:
            known = {v.name for v in variants}
            unknown = sorted(set(self.variants) - known)
            if unknown:
                raise InputError(f"variant(s) {unknown} not in the grid (it has {sorted(known)})",
                                 self.grid_path())
            variants = [v for v in variants if v.name == REFERENCE_VARIANT or v.name in self.variants]
        return variants

    def variant_tasks(self) -> dict[tuple[str, int], DistillPrediction]:
        """``(variant, seed) -> DistillPrediction``, variants in grid order, seeds in order.

        A run's seed is set on both stages only where it differs from the configured one, so
        the configured seed's runs are the very tasks of a grid without seeds (same outputs).
        """
        if getattr(self, "_variant_tasks", None) is None:
            seeds = self.seed_list()   # checked before the grid: both fail before anything runs
            configured = {"stage1": self.upstream(DistillIntermediate).seed,
                          "stage2": self.upstream(DistillPrediction).seed}
            tasks = {}
            for variant in self.grid_variants():
                stage1, stage2 = variant.stage_parameters()
                augment = _own_augmentation(variant.augment_parameters(), self.profile)
                if augment:
                    stage2["augment"] = augment
                for seed in seeds:
                    seeded1 = stage1 if seed == configured["stage1"] else {**stage1, "seed": seed}
                    seeded2 = stage2 if seed == configured["stage2"] else {**stage2, "seed": seed}
                    tasks[variant.name, seed] = self.upstream(DistillPrediction, **seeded2, stage1=seeded1)
            _check_cache_holds_the_maps({name: task for (name, _), task in tasks.items()}, self.grid_path(),
                                        self.profile)
            self._variant_tasks = tasks
        return self._variant_tasks

    def requires(self):
        required: dict[str, luigi.Task] = {"data": self.upstream(PrepareData),
                                           "teacher": self.upstream(FineTuneTeacher),
                                           "cache": self.upstream(TeacherCache)}
        required.update({f"variant-{name}-seed{seed}": task
                         for (name, seed), task in self.variant_tasks().items()})
        return required

    def stage_inputs(self) -> dict[str, str | Path]:
        return {"grid": self.grid_path()}

    def build(self, out: StageBuild) -> None:
        from pipeline.ablations.report import VariantResult, write_report
        from pipeline.ablations.statistics import BOOTSTRAP_SEED, CONFIDENCE, RESAMPLES
        from pipeline.common.selection import StudentSelection

        descriptions = {v.name: v.describe() for v in self.grid_variants()}
        runs: dict[str, list] = {}
        for (name, seed), task in self.variant_tasks().items():
            runs.setdefault(name, []).append(_run_result(seed, task))
        metric_name = _primary_metric(next(iter(self.variant_tasks().values())))
        results = [VariantResult.from_runs(name, metric_name, descriptions[name], variant_runs)
                   for name, variant_runs in runs.items()]
        # manifests only: with a URL workdir nothing is downloaded for them
        teacher = self.upstream_tasks()["teacher"].manifest()["info"]
        data = self.upstream_tasks()["data"].manifest()
        cache = self.upstream_tasks()["cache"].manifest()
        teacher_dev = (teacher.get("dev") or {})
        teacher_metric = teacher_dev.get(results[0].metric_name)
        task = data["info"].get("task") or "task"
        caches = {name: variant.cache_task().fingerprint() for (name, _), variant in self.variant_tasks().items()}
        augmentations = {name: dict(task.augment) for (name, _), task in self.variant_tasks().items()}
        one_cache = len(set(caches.values())) == 1
        notes = [
            f"Task {task}: {data['rows'].get('train', '?')} train examples "
            f"({cache['info'].get('examples', '?')} in the {'' if one_cache else 'main '}teacher "
            "cache, augmentation included), "
            f"{data['rows'].get('dev', '?')} dev examples.",
            f"Teacher: {teacher.get('teacher')} "
            f"({'as given' if teacher.get('skipped_finetune') else 'fine-tuned by the pipeline'}); "
            f"cache {cache['info'].get('dtype')}, hidden layers {cache['info'].get('hidden_layers')}, "
            f"attention layers {cache['info'].get('attention_layers')}.",
            f"Each run is a stage-1 + stage-2 distillation from "
            f"{'that one cache' if one_cache else 'its teacher cache (below)'}.",
        ]
        notes += _cache_notes(caches, augmentations)
        # how every stage-2 run kept its student, from the manifests: the report's words for it
        selection = StudentSelection.from_manifests(
            data, [task.manifest() for task in self.variant_tasks().values()], self.output_location())
        notes.append(selection.sentence())
        held_out = selection.held_out
        check = teacher.get("baseline_check") or {}
        if check.get("degenerate"):
            notes.insert(0, f"**WARNING: the teacher is no better than the majority class** (dev "
                            f"{check.get('metric')} {check.get('teacher'):.4f}, the constant "
                            f"prediction {check.get('predicts')!r} {check.get('baseline'):.4f}): the "
                            "students below learned from a degenerate teacher.")
        with out.timed("report"):
            report = write_report(results, out.path, f"{task} ablations", selection, teacher_metric, notes)
        if workdir_store() is None:   # local outputs only: a store would mean downloading each run
            from pipeline.ablations.report import gather_tensorboard

            runs = {}
            for (name, seed), variant in self.variant_tasks().items():
                runs[f"{name}/seed{seed}/stage1"] = variant.requires()["stage1"].output_dir()
                runs[f"{name}/seed{seed}/stage2"] = variant.output_dir()
            gather_tensorboard(runs, out.path / "tb")   # how many: run history, not recorded
        rows = {row["variant"]: row for row in report.pop("rows")}
        paths = report
        full = results[0]
        summary = {
            "task": task, "metric": full.metric_name, "teacher": teacher_metric,
            "teacher_dev": teacher_dev, "student": full.metric, "student_std": full.metric_std,
            "student_last": full.last_metric, "seeds": self.seed_list(),
            "headline": ("dev score of the stage-2 evaluation best on the held-out train rows (mean over "
                         "seeds); student_last: the last evaluation" if held_out else
                         "best stage-2 dev evaluation (mean over seeds); student_last: the last evaluation"),
            "selection": selection.rule,
            "bootstrap": {"resamples": RESAMPLES, "seed": BOOTSTRAP_SEED, "confidence": CONFIDENCE,
                          "statistic": "mean over seeds of the variant's metric minus full's, paired "
                                       "over dev examples (same indices for every seed and both)"},
            "teacher_degenerate": bool(check.get("degenerate")),
            "majority_baseline": check.get("baseline"),
            "student_vs_teacher": full.metric / teacher_metric if teacher_metric else None,
            "teacher_caches": len(set(caches.values())),
            "variants": {r.name: {"dev": r.metric, "dev_std": r.metric_std,
                                  "dev_last": r.last_metric, "dev_last_std": r.last_metric_std,
                                  "delta_vs_full": _interval(rows[r.name], ""),
                                  "last_delta_vs_full": _interval(rows[r.name], "last_"),
                                  "runs": [{"seed": run.seed, "dev": run.metric, "dev_last": run.last_metric,
                                            "train_seconds": run.train_seconds, "output": run.output_dir,
                                            **({"extra": dict(run.extra_metrics)} if run.extra_metrics else {})}
                                           for run in r.runs],
                                  "settings": r.settings, "train_seconds": r.train_seconds,
                                  "train_examples": r.examples, "output": r.output_dir,
                                  "teacher_cache": caches[r.name],
                                  **({"extra": dict(r.extra_metrics)} if r.extra_metrics else {})}
                         for r in results},
            "files": {k: p.name for k, p in paths.items()},
        }
        (out.path / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        out.rows["variants"] = len(results)
        out.info.update(task=task, metric=full.metric_name, teacher=teacher_metric, student=full.metric,
                        student_vs_teacher=summary["student_vs_teacher"],
                        teacher_degenerate=summary["teacher_degenerate"])


def _own_augmentation(settings: dict[str, Any], profile: str = "") -> dict[str, Any]:
    """A variant's Augment overrides, or ``{}`` when they equal the configured augmentation
    (then it reads the main cache: one task, not two tasks that would build the same output)."""
    from tasks.augment import Augment

    if not settings or Augment(**settings, profile=profile).task_id == Augment(profile=profile).task_id:
        return {}
    return dict(settings)


def _cache_notes(caches: dict[str, str], augment: dict[str, dict]) -> list[str]:
    """Report lines: which variants read which teacher cache (only when there is more than one)."""
    main = caches[next(iter(caches))]
    own = {fingerprint: [n for n, f in caches.items() if f == fingerprint]
           for fingerprint in dict.fromkeys(caches.values()) if fingerprint != main}
    if not own:
        return []
    lines = [f"Teacher caches: {1 + len(own)}. Variants that change the augmentation's sampling "
             "train on other examples, so each such augmentation has its own Augment output (over "
             "the same candidates) and its own teacher cache:"]
    lines.append(f"- {main}: {', '.join(n for n, f in caches.items() if f == main)} "
                 "(the configured augmentation)")
    for fingerprint, names in own.items():
        settings = ", ".join(f"{k}={v}" for k, v in sorted(augment[names[0]].items()))
        lines.append(f"- {fingerprint}: {', '.join(names)} ({settings})")
    return lines


def _dev_metrics(task: DistillPrediction) -> dict:
    metrics = task.manifest()["info"].get("dev_metrics") or {}
    if "primary" not in metrics:
        raise InputError("stage-2 output has no dev metrics (was it built without a dev split?)",
                         task.output_location())
    return metrics


def _primary_metric(task: DistillPrediction) -> str:
    return _dev_metrics(task)["primary_metric"]


def _run_result(seed: int, task: DistillPrediction):
    """One run's best and last dev metrics, predictions and training time, from its two stage outputs."""
    from distill.predictions import BEST_PREDICTIONS, LAST_PREDICTIONS, read_predictions
    from pipeline.ablations.report import RunResult

    # manifests read in place; the predictions from the output's files (with a URL workdir
    # fetched once into scratch)
    stage2 = task.manifest()
    stage1 = task.requires()["stage1"].manifest()
    metrics = _dev_metrics(task)
    primary = metrics["primary_metric"]
    extra = {k: float(v) for k, v in metrics.items()
             if k not in ("primary", "primary_metric", "examples", primary) and isinstance(v, (int, float))}
    last = stage2["info"].get("last_dev_metrics") or {}
    seconds = float(stage1["info"].get("train_seconds") or 0) + float(stage2["info"].get("train_seconds") or 0)
    return RunResult(seed, float(metrics["primary"]), float(last["primary"]) if "primary" in last else None,
                     seconds, str(task.output_dir().relative_to(workdir())),
                     int(stage2["rows"].get("examples", 0)), extra,
                     read_predictions(task.readable_dir() / BEST_PREDICTIONS),
                     read_predictions(task.readable_dir() / LAST_PREDICTIONS))


def _interval(row: dict, prefix: str) -> dict | None:
    """A report row's difference from full and its interval (``prefix``: "" best, "last_" last eval)."""
    if row["variant"] == "full" or row[f"{prefix}delta_low"] == "":
        return None
    return {"delta": row[f"{prefix}delta_vs_full"], "low": row[f"{prefix}delta_low"],
            "high": row[f"{prefix}delta_high"], "within_noise": row[f"{prefix}within_noise"] == "yes"}


def _check_cache_holds_the_maps(variants: dict[str, DistillPrediction], grid: Path, profile: str = "") -> None:
    """Refuse, before anything trains, a variant whose layer map the configured cache lacks."""
    cache = TeacherCache(profile=profile)
    if cache.hidden_layers or cache.attention_layers:
        return  # explicit layer lists: the trainer's own check names what is missing
    available = {cache.layer_map, *[m.strip() for m in cache.extra_layer_maps.split(",") if m.strip()]}
    for name, task in variants.items():
        stage1: DistillIntermediate = task.requires()["stage1"]
        wanted = stage1.layer_map or cache.layer_map
        if stage1.uses_intermediate_losses() and wanted not in available:
            raise InputError(f"variant {name!r} trains with layer map {wanted!r}, but the teacher cache "
                             f"is configured for {sorted(available)}; add it to [TeacherCache] "
                             f"extra_layer_maps so every variant reads the one cache", grid)


def teacher_and_student(summary: dict[str, Any]) -> str:
    """One human line: teacher vs student on the task's metric."""
    ratio = summary.get("student_vs_teacher")
    return (f"{summary['task']}: teacher dev {summary['metric']} {summary['teacher']:.4f}, student "
            f"{summary['student']:.4f} ({100 * ratio:.1f}% of the teacher)"
            if ratio is not None else f"{summary['task']}: student dev {summary['metric']} {summary['student']:.4f}")
