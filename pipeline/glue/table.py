"""The GLUE table: teacher vs student per task, with intervals, averages and compute.

Per table column (a GLUE task; MNLI: matched and mismatched) and metric:

* **teacher**: the task's fine-tuned teacher on dev (one run: the teacher is not re-trained
  per seed), with a 95 % bootstrap interval over the dev examples;
* **student**: the stage-2 students of every seed, each the one the task's selection rule
  kept (``holdout``: best on held-out train rows; ``dev``: best on dev, the reference's rule),
  as mean ± std over seeds, with a 95 % bootstrap interval of that mean over dev examples
  (every resample draws the same examples for every seed:
  :func:`pipeline.ablations.statistics.resampled_metric`);
* **student as % of the teacher** (headline metric);
* **best on dev − kept** (``holdout`` only): how much higher the best of the run's dev
  evaluations is than the held-out-selected student's dev score, mean over seeds, with its
  paired-bootstrap interval: the optimism of reporting the best dev evaluation;
* the paper's figures (:mod:`pipeline.glue.paper`; test-server scores) beside them.

Averages: the **GLUE score** way (within a task the mean of its metrics, MRPC/QQP F1 and
accuracy, STS-B Pearson and Spearman, MNLI the mean of matched and mismatched; then the mean
over tasks) and the **paper's** way (the mean of the headline metric over the paper's columns
present, the paper's own figures averaged over the same columns).

Scores are in points (×100). Everything is recomputed from saved predictions.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.ablations.statistics import (CONFIDENCE, bootstrap_indices, mean_and_std, metric_value,
                                           paired_bootstrap, predicted, resampled_metric)
from pipeline.common.selection import StudentSelection
from pipeline.glue.paper import PAPER_AVERAGE, PAPER_TABLE1, UNCHECKED_FIGURES, headline_metric

POINTS = 100.0


@dataclass
class ColumnData:
    """One table column's dev predictions (logits) and labels."""

    column: str
    labels: np.ndarray
    teacher: np.ndarray                      # [n, C]
    students: list[np.ndarray]               # per seed [n, C]: the kept student
    best_on_dev: list[np.ndarray] | None = None   # per seed: the best-on-dev evaluation (holdout)


@dataclass
class TaskData:
    task: str
    selection: StudentSelection              # how stage 2 kept each seed's student (manifests)
    seeds: list[int]
    columns: list[ColumnData]
    metrics: tuple[str, ...]
    checks: list[dict] = field(default_factory=list)
    compute: dict[str, Any] = field(default_factory=dict)
    submission: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: the metric stage 2 selected by (PrepareData's ``metric``): best on dev >= kept holds in it
    selection_metric: str = ""


def _score(metric: str, logits: np.ndarray, labels: np.ndarray) -> float:
    return POINTS * metric_value(metric, predicted(logits, metric), labels)


def interval(metric: str, runs: list[np.ndarray], labels: np.ndarray, resamples: int,
             confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval (over examples) of the mean over ``runs`` of ``metric``."""
    guesses = np.stack([predicted(run, metric) for run in runs])
    indices = bootstrap_indices(len(labels), resamples)
    values = np.concatenate([resampled_metric(metric, guesses, labels, indices[s:s + 1000])
                             for s in range(0, resamples, 1000)])
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return POINTS * float(low), POINTS * float(high)


def column_rows(task: TaskData, resamples: int) -> list[dict]:
    rows = []
    for data in task.columns:
        for metric in task.metrics:
            headline = metric == headline_metric(data.column) or (
                data.column not in PAPER_TABLE1 and metric == task.metrics[0])
            per_seed = [_score(metric, s, data.labels) for s in data.students]
            mean, std = mean_and_std(per_seed)
            teacher = _score(metric, data.teacher, data.labels)
            t_low, t_high = interval(metric, [data.teacher], data.labels, resamples)
            s_low, s_high = interval(metric, data.students, data.labels, resamples)
            row = {"task": task.task, "column": data.column, "metric": metric, "headline": headline,
                   "selection": task.selection.rule, "selection_metric": metric == task.selection_metric,
                   "seeds": len(per_seed), "dev_examples": len(data.labels),
                   "teacher": teacher, "teacher_low": t_low, "teacher_high": t_high,
                   "student": mean, "student_std": std, "student_low": s_low, "student_high": s_high,
                   "student_runs": per_seed,
                   "student_pct_teacher": 100 * mean / teacher if teacher else None,
                   "paper_bert_base": PAPER_TABLE1[data.column][1] if headline and data.column in PAPER_TABLE1 else None,
                   "paper_tinybert4": PAPER_TABLE1[data.column][2] if headline and data.column in PAPER_TABLE1 else None,
                   "best_on_dev": None, "flattery": None, "flattery_low": None, "flattery_high": None}
            if data.best_on_dev:
                best = [_score(metric, b, data.labels) for b in data.best_on_dev]
                diff = paired_bootstrap(metric, np.stack([predicted(b, metric) for b in data.best_on_dev]),
                                        np.stack([predicted(s, metric) for s in data.students]),
                                        data.labels, resamples=resamples)
                row.update(best_on_dev=float(np.mean(best)), flattery=POINTS * diff.delta,
                           flattery_low=POINTS * diff.low, flattery_high=POINTS * diff.high)
            rows.append(row)
    return rows


def averages(rows: list[dict]) -> dict[str, Any]:
    """GLUE-score and paper-style averages of teacher and student (see the module docstring)."""
    by_task: dict[str, dict[str, list[dict]]] = {}
    for row in rows:
        by_task.setdefault(row["task"], {}).setdefault(row["column"], []).append(row)
    glue = {"teacher": [], "student": []}
    for columns in by_task.values():
        for who in glue:
            # within a column the mean of its metrics; MNLI: the mean of its two columns
            glue[who].append(float(np.mean([np.mean([r[who] for r in metric_rows])
                                            for metric_rows in columns.values()])))
    headline = [r for r in rows if r["headline"] and r["column"] in PAPER_TABLE1]
    paper_columns = [r["column"] for r in headline]
    result = {
        "glue_score": {who: float(np.mean(v)) if v else None for who, v in glue.items()},
        "glue_score_tasks": list(by_task),
        "paper_columns": paper_columns,
        "paper_style": {"teacher": float(np.mean([r["teacher"] for r in headline])) if headline else None,
                        "student": float(np.mean([r["student"] for r in headline])) if headline else None,
                        "paper_bert_base": float(np.mean([PAPER_TABLE1[c][1] for c in paper_columns])) if headline else None,
                        "paper_tinybert4": float(np.mean([PAPER_TABLE1[c][2] for c in paper_columns])) if headline else None},
    }
    if len(set(paper_columns)) == len(PAPER_TABLE1):
        result["paper_style"].update(paper_bert_base=PAPER_AVERAGE["bert_base"],
                                     paper_tinybert4=PAPER_AVERAGE["tinybert4"])
    return result


def _paper(row: dict, model: str) -> str:
    """A paper figure of ``row``, with a dagger when it is one of UNCHECKED_FIGURES."""
    value = row[f"paper_{model}"]
    return _fmt(value) + ("†" if value is not None and (row["column"], model) in UNCHECKED_FIGURES else "")


def _fmt(value, digits: int = 1, sign: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def preflight_lines(tasks: list[TaskData]) -> list[str]:
    """glue.md's pre-flight list: one bold line per problem (fail or warn, with its task), then
    the checks that passed or did not apply, each with the tasks it passed for when it did not
    pass for all: a check that failed for a task is never listed as passed for it."""
    checks = [(task.task, c) for task in tasks for c in task.checks]
    problems = [(t, c) for t, c in checks if c["status"] not in ("ok", "n/a")]
    lines = [f"- **{c['status'].upper()} {t}: {c['check']}**: {c['detail']}" for t, c in problems]
    passed: dict[str, list[str]] = {}
    for t, c in checks:
        if c["status"] in ("ok", "n/a"):
            passed.setdefault(c["check"], []).append(t)
    failed_for = {c["check"] for _, c in problems}
    listed = [f"{check} ({', '.join(passed[check])})" if check in failed_for else check
              for check in sorted(passed)]
    lines.append(f"- passed or not applicable: {len(checks) - len(problems)} of {len(checks)}"
                 + (f" ({'; '.join(listed)})" if listed else ""))
    return lines


def write_table(tasks: list[TaskData], out_dir: Path, resamples: int, title: str = "GLUE") -> dict:
    """Write ``glue.md``, ``glue.csv``, ``glue.png`` and return the summary (``summary.json``'s body)."""
    rows = [row for task in tasks for row in column_rows(task, resamples)]
    avg = averages(rows)
    md = [f"# {title}: teacher and distilled student on dev", ""]
    md.append("**Pre-flight checks** (problems known to break reproductions):")
    md.append("")
    md += preflight_lines(tasks)
    md.append("")
    md.append("**Student selection:** " + "; ".join(f"{task.task}: {task.selection.short()}"
                                                    for task in tasks) + ".")
    md.append("")
    md.append(f"Scores in points on dev; student = mean ± std over seeds; [95 % bootstrap interval over "
              f"dev examples, {resamples:,} resamples]. Paper figures: Table 1 of the TinyBERT paper, "
              "GLUE **test** server (not dev): a reference for direction and size only.")
    md.append("")
    md.append("| task | metric | teacher | student | % of teacher | best on dev − kept | paper BERT-base | paper TinyBERT4 |")
    md.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        std = f" ± {r['student_std']:.1f}" if r["student_std"] is not None else ""
        flattery = (f"{_fmt(r['flattery'], 2, True)} [{_fmt(r['flattery_low'], 2, True)}, {_fmt(r['flattery_high'], 2, True)}]"
                    if r["flattery"] is not None else "—")
        md.append(f"| {r['column']} | {r['metric']}{'' if r['headline'] else ' (also)'} | "
                  f"{r['teacher']:.1f} [{r['teacher_low']:.1f}, {r['teacher_high']:.1f}] | "
                  f"{r['student']:.1f}{std} [{r['student_low']:.1f}, {r['student_high']:.1f}] ({r['seeds']} seeds) | "
                  f"{_fmt(r['student_pct_teacher'])} | {flattery} | {_paper(r, 'bert_base')} | "
                  f"{_paper(r, 'tinybert4')} |")
    g, p = avg["glue_score"], avg["paper_style"]
    md.append(f"| **average (GLUE score: {', '.join(avg['glue_score_tasks'])})** | mean of each task's metrics | "
              f"{_fmt(g['teacher'])} | {_fmt(g['student'])} | "
              f"{_fmt(100 * g['student'] / g['teacher'] if g['teacher'] else None)} | | | |")
    if avg["paper_columns"]:
        md.append(f"| **average (paper's columns: {', '.join(avg['paper_columns'])})** | headline metrics | "
                  f"{_fmt(p['teacher'])} | {_fmt(p['student'])} | "
                  f"{_fmt(100 * p['student'] / p['teacher'] if p['teacher'] else None)} | | "
                  f"{_fmt(p['paper_bert_base'])} | {_fmt(p['paper_tinybert4'])} |")
    if any((r["column"], model) in UNCHECKED_FIGURES and r[f"paper_{model}"] is not None
           for r in rows for model in ("bert_base", "tinybert4")):
        md.append("")
        md.append("† a paper figure entered from memory of its table and not yet checked against the "
                  "paper (`pipeline/glue/paper.py`, `UNCHECKED_FIGURES`); the paper's averages are checked.")
    md.append("")
    md.append("## Compute (from the stage manifests)")
    md.append("")
    md.append("| task | stage | outputs | wall s | CPU s | device |")
    md.append("|---|---|---:|---:|---:|---|")
    for task in tasks:
        for stage, c in task.compute.get("stages", {}).items():
            md.append(f"| {task.task} | {stage} | {c['outputs']} | {c['seconds']:.0f} | "
                      f"{_fmt(c.get('cpu_seconds'), 0)} | {', '.join(c['devices'])} |")
        md.append(f"| {task.task} | **total** (teacher cache {task.compute.get('cache_bytes', 0) / 2**20:.1f} MiB) | | "
                  f"{task.compute.get('seconds', 0):.0f} | {_fmt(task.compute.get('cpu_seconds'), 0)} | |")
    md.append("")
    md.append("## Submission files")
    md.append("")
    for task in tasks:
        files = task.submission.get("files") or {}
        line = ", ".join(f"`submission/{n}.tsv` ({rows_} rows)" for n, rows_ in files.items()) or "none"
        md.append(f"- {task.task}: {line}" + (f" (student of seed {task.submission['seed']}, "
                                            f"{task.submission['rule']})" if files else
                                            f" ({task.submission.get('why', 'no test file')})"))
    notes = [n for task in tasks for n in task.notes]
    if notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    (out_dir / "glue.md").write_text("\n".join(md) + "\n")
    fields = ["task", "column", "metric", "headline", "selection", "seeds", "dev_examples", "teacher",
              "teacher_low", "teacher_high", "student", "student_std", "student_low", "student_high",
              "student_pct_teacher", "best_on_dev", "flattery", "flattery_low", "flattery_high",
              "paper_bert_base", "paper_tinybert4"]
    with (out_dir / "glue.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r[k] is None else round(r[k], 4) if isinstance(r[k], float) else r[k])
                             for k in fields})
    _plot([r for r in rows if r["headline"]], out_dir / "glue.png", title)
    return {"rows": rows, "averages": avg, "bootstrap": {"resamples": resamples, "confidence": CONFIDENCE},
            "tasks": {t.task: {"selection": t.selection.rule, "seeds": t.seeds, "checks": t.checks,
                               "compute": t.compute, "submission": t.submission} for t in tasks},
            "files": ["glue.md", "glue.csv", "glue.png", "summary.json"]}


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(rows) + 1), 3.6), dpi=100)
    x = np.arange(len(rows))
    for offset, who, colour in ((-0.2, "teacher", "#888888"), (0.2, "student", "#1f77b4")):
        values = [r[who] for r in rows]
        low = [r[who] - r[f"{who}_low"] for r in rows]
        high = [r[f"{who}_high"] - r[who] for r in rows]
        ax.bar(x + offset, values, 0.38, yerr=[low, high], capsize=3, color=colour, label=f"{who} (dev)")
    paper = [r["paper_tinybert4"] for r in rows]
    ax.scatter(x[[p is not None for p in paper]] + 0.2, [p for p in paper if p is not None], marker="_",
               s=400, color="black", label="paper TinyBERT4 (test)", zorder=3)
    ax.set_xticks(x, [f"{r['column']}\n{r['metric']}" for r in rows])
    ax.set_ylabel("points")
    ax.set_title(f"{title}: teacher vs student, 95 % intervals")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def write_summary(summary: dict, path: Path) -> None:
    path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=float) + "\n")
