"""Ablation grids and their report: what each loss, the augmentation and the layer map buy.

An ablation grid is a small TOML file (default ``ablations.toml`` at the project root): a
``[variants.<name>]`` table per variant, holding the trainer settings that differ from the
full recipe. Every variant re-reads the same teacher cache, so only trainer stages run --
except a variant that changes the augmentation's sampling (``num_aug``, ``replace_prob``,
``aug_seed``): its examples differ, so it gets its own Augment output (sampled over the same
Candidates, in seconds) and its own teacher cache, shared by the variants that ask for the
same augmentation. Every variant runs once per seed (``[Ablations] seeds``).

The report lists, per variant, the mean ± standard deviation over seeds of the kept stage-2
student's dev score (the evaluation best on dev or on held-out train rows, as the run's
``selection`` says: :mod:`pipeline.common.selection` writes every sentence about it) and of
the last evaluation's, the difference from the ``full`` variant with a 95 %
paired-bootstrap interval over dev examples (:mod:`pipeline.ablations.statistics`; "within
noise" when it contains 0), the training time, and how the effects compare with the TinyBERT
paper's ablations -- as Markdown, CSV and a PNG (means with seed spread, differences with
their intervals).
"""
from __future__ import annotations

import csv
import io
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline.ablations.statistics import (BOOTSTRAP_SEED, RESAMPLES, Difference, mean_and_std,
                                           paired_bootstrap, predicted)
from pipeline.common.selection import StudentSelection
from pipeline.errors import InputError, check_plain_name

#: Settings a variant may change, by the distillation stage whose parameter they set. Names
#: are the Luigi parameters of DistillIntermediate (stage 1) and DistillPrediction (stage 2).
STAGE1_SETTINGS = {"embedding_weight", "attention_weight", "hidden_weight", "layer_map",
                   "attention_mode", "projection_mode", "student_init", "student_hidden_size",
                   "student_intermediate_size"}
STAGE2_SETTINGS = {"prediction_loss", "temperature", "kd_alpha"}
#: Settings whose parameter name is the same in both stages: prefixed by the stage.
PREFIXED_SETTINGS = {"stage1_epochs": ("stage1", "epochs"), "stage2_epochs": ("stage2", "epochs"),
                     "stage1_learning_rate": ("stage1", "learning_rate"),
                     "stage2_learning_rate": ("stage2", "learning_rate")}
#: ``augmentation = false``: both stages train on the cache's original examples only.
TRAINER_SETTINGS = STAGE1_SETTINGS | STAGE2_SETTINGS | set(PREFIXED_SETTINGS) | {"augmentation"}
#: Augmentation settings (grid name -> the Augment parameter): another sampling over the same
#: candidates, hence another teacher cache.
AUGMENT_SETTINGS = {"num_aug": "num_aug", "replace_prob": "aug_p", "aug_seed": "aug_seed"}
GRID_SETTINGS = TRAINER_SETTINGS | set(AUGMENT_SETTINGS)
REFERENCE_VARIANT = "full"
_CHOICES = {"layer_map": ("uniform", "top", "bottom"), "attention_mode": ("reference", "masked"),
            "projection_mode": ("shared", "per_layer"), "prediction_loss": ("soft_ce", "kd"),
            "student_init": ("config", "teacher_layers")}


@dataclass(frozen=True)
class Variant:
    name: str
    settings: Mapping[str, Any]

    def stage_parameters(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(stage1, stage2)``: the parameters this variant passes to DistillIntermediate and
        DistillPrediction (over their luigi.cfg sections); ``({}, {})`` for the full recipe."""
        stage1: dict[str, Any] = {}
        stage2: dict[str, Any] = {}
        for name, value in self.settings.items():
            if name in STAGE1_SETTINGS:
                stage1[name] = value
            elif name in STAGE2_SETTINGS:
                stage2[name] = value
            elif name in PREFIXED_SETTINGS:
                stage, parameter = PREFIXED_SETTINGS[name]
                (stage1 if stage == "stage1" else stage2)[parameter] = value
            elif name == "augmentation" and not value:
                stage1["originals_only"] = stage2["originals_only"] = True
        return stage1, stage2

    def augment_parameters(self) -> dict[str, Any]:
        """The Augment parameters this variant sets (``{}``: the configured augmentation)."""
        return {AUGMENT_SETTINGS[name]: value for name, value in self.settings.items()
                if name in AUGMENT_SETTINGS}

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.settings.items())) or "the full recipe"


def load_grid(path: Path | str) -> list[Variant]:
    """Parse an ablation grid; the ``full`` variant (no overrides) always comes first."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("ablation grid not found", path) from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"not valid TOML ({exc})", path) from None
    tables = document.get("variants")
    if not isinstance(tables, dict) or not tables:
        raise InputError("no [variants.<name>] tables", path)
    variants = [Variant(REFERENCE_VARIANT, {})]
    for name, settings in tables.items():
        check_plain_name(name, "variant name", path)   # a table row and a file name, never markup
        if not isinstance(settings, dict):
            raise InputError(f"variant {name!r} must be a table of settings", path)
        unknown = sorted(set(settings) - GRID_SETTINGS)
        if unknown:
            raise InputError(f"variant {name!r}: unknown setting(s) {unknown}; "
                             f"allowed: {sorted(GRID_SETTINGS)}", path)
        if settings.get("augmentation") is False and set(settings) & set(AUGMENT_SETTINGS):
            raise InputError(f"variant {name!r}: augmentation = false trains on the original "
                             f"examples only, so {sorted(set(settings) & set(AUGMENT_SETTINGS))} "
                             "would change nothing", path)
        for setting, value in settings.items():
            problem = _setting_problem(setting, value)
            if problem:
                raise InputError(f"variant {name!r}: {setting} = {value!r}: {problem}", path)
        if name == REFERENCE_VARIANT:
            if settings:
                raise InputError(f"variant {REFERENCE_VARIANT!r} is the unmodified recipe; "
                                 "it cannot override settings", path)
            continue
        variants.append(Variant(name, dict(settings)))
    return variants


def _setting_problem(name: str, value: Any) -> str:
    """Why ``value`` cannot be the setting ``name`` ("" when it can)."""
    if name in _CHOICES:
        return "" if value in _CHOICES[name] else f"choose one of {list(_CHOICES[name])}"
    if name == "augmentation":
        return "" if isinstance(value, bool) else "must be true or false"
    if name in ("num_aug", "aug_seed"):
        return "" if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
            else "must be an integer >= 0"
    if name == "replace_prob":
        return "" if isinstance(value, (int, float)) and not isinstance(value, bool) \
            and 0 <= value <= 1 else "must be a number within [0, 1]"
    if name.endswith("_epochs") or name.startswith("student_"):
        return "" if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
            else "must be a positive integer"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "must be a number"
    if name == "kd_alpha" and not 0 <= value <= 1:
        return "must be within [0, 1]"
    if name in ("temperature",) or name.endswith("learning_rate"):
        return "" if value > 0 else "must be positive"
    return "" if value >= 0 else "must not be negative"


#: The TinyBERT paper's ablations (Jiao et al., 2020: TinyBERT4, BERT-base teacher; dev average
#: of MNLI-m, MNLI-mm, MRPC and CoLA; full recipe 75.6), by the grid variant that asks the same
#: question (docs/ALGORITHM.md §2.8 lists them). tinybert4_scratch stands in for "without
#: general distillation" when the configured student starts from teacher layers.
PAPER_FULL = 75.6
PAPER_ABLATIONS = {
    "no_augmentation": ("without data augmentation", 68.4),
    "no_attention": ("without the attention loss", 71.0),
    "map_top": ("layer map top", 70.9),
    "map_bottom": ("layer map bottom", 71.3),
    "tinybert4_scratch": ("without general distillation (here: no teacher-layer start)", 72.5),
    "no_hidden": ("without the hidden-state loss", 72.9),
    "no_prediction": ("without the prediction loss", 73.5),
    "no_embedding": ("without the embedding loss", 74.1),
}


@dataclass
class RunResult:
    """One run of a variant (one seed): the stage-2 student's dev scores and what it cost."""

    seed: int
    metric: float                    # the kept stage-2 evaluation's dev primary metric
    last_metric: float | None        # the last evaluation's (end of training)
    train_seconds: float             # stage 1 + stage 2 training loops
    output_dir: str                  # the stage-2 output, relative to the workdir
    examples: int = 0                # training examples per epoch (augmented or originals)
    extra_metrics: Mapping[str, float] | None = None   # the kept evaluation's other metrics
    best_predictions: Any = None     # distill.predictions.DevPredictions of the kept evaluation
    last_predictions: Any = None     # ... and of the last one


@dataclass
class VariantResult:
    """One variant's outcome over its seeds: the report's row.

    ``metric`` is the mean over ``runs`` of the kept stage-2 student's dev score (a single value
    when built without runs); ``last_metric`` the mean of the last evaluations.
    """

    name: str
    metric_name: str                 # the task's primary metric (accuracy, f1, mcc, corr)
    metric: float
    train_seconds: float             # per run: stage 1 + stage 2 training loops
    output_dir: str                  # the first run's stage-2 output, relative to the workdir
    settings: str = ""               # Variant.describe()
    examples: int = 0                # training examples per epoch (augmented or originals)
    extra_metrics: Mapping[str, float] | None = None   # e.g. MRPC's accuracy beside its F1
    runs: list[RunResult] = field(default_factory=list)

    @classmethod
    def from_runs(cls, name: str, metric_name: str, settings: str, runs: list[RunResult]) -> "VariantResult":
        extra_names = sorted(set.intersection(*(set(r.extra_metrics or {}) for r in runs)))
        return cls(name, metric_name, mean_and_std([r.metric for r in runs])[0],
                   float(np.mean([r.train_seconds for r in runs])), runs[0].output_dir, settings,
                   runs[0].examples,
                   {k: float(np.mean([r.extra_metrics[k] for r in runs])) for k in extra_names} or None,
                   list(runs))

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def metric_std(self) -> float | None:
        return mean_and_std([r.metric for r in self.runs])[1] if self.runs else None

    @property
    def last_metric(self) -> float | None:
        values = [r.last_metric for r in self.runs]
        return mean_and_std(values)[0] if values and None not in values else None

    @property
    def last_metric_std(self) -> float | None:
        values = [r.last_metric for r in self.runs]
        return mean_and_std(values)[1] if values and None not in values else None


def compare_with_reference(result: VariantResult, reference: VariantResult, which: str = "best",
                           resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Difference | None:
    """The paired bootstrap of ``result`` against ``reference`` over their seeds' dev predictions
    (``which``: the ``best`` or the ``last`` evaluation); ``None`` when predictions are missing.

    Runs are paired by seed: both variants must have run the same seeds on the same dev examples.
    """
    attribute = f"{which}_predictions"
    if not result.runs or not reference.runs or any(getattr(r, attribute) is None
                                                    for r in result.runs + reference.runs):
        return None
    by_seed = {r.seed: getattr(r, attribute) for r in reference.runs}
    if sorted(by_seed) != sorted(result.seeds):
        raise InputError(f"variant {result.name!r} ran seeds {result.seeds}, {reference.name!r} "
                         f"seeds {sorted(by_seed)}: a paired comparison needs the same seeds")
    ours = [getattr(r, attribute) for r in result.runs]
    theirs = [by_seed[r.seed] for r in result.runs]
    first = theirs[0]
    for predictions in ours + theirs:
        if predictions.ids != first.ids or not np.array_equal(predictions.labels, first.labels):
            raise InputError(f"variants {result.name!r} and {reference.name!r} were evaluated on "
                             "different dev examples: no paired comparison")
    metric = result.metric_name
    return paired_bootstrap(metric, np.stack([predicted(p.logits, metric) for p in ours]),
                            np.stack([predicted(p.logits, metric) for p in theirs]),
                            first.labels, resamples=resamples, seed=seed)


def report_rows(results: list[VariantResult], resamples: int = RESAMPLES,
                seed: int = BOOTSTRAP_SEED) -> list[dict]:
    full = next((r for r in results if r.name == REFERENCE_VARIANT), None)
    rows = []
    for result in results:
        delta = result.metric - full.metric if full else float("nan")
        best = last = None
        if full is not None and result is not full:
            best = compare_with_reference(result, full, "best", resamples, seed)
            last = compare_with_reference(result, full, "last", resamples, seed)
        last_delta = (result.last_metric - full.last_metric
                      if full is not None and result.last_metric is not None and full.last_metric is not None
                      else None)
        rows.append({
            "variant": result.name,
            "settings": result.settings,
            "metric": result.metric_name,
            "seeds": " ".join(str(s) for s in result.seeds),
            "dev": round(result.metric, 4),
            "dev_std": _rounded(result.metric_std),
            "delta_vs_full": round(delta, 4),
            "delta_low": _rounded(best.low if best else None),
            "delta_high": _rounded(best.high if best else None),
            "within_noise": "" if best is None else ("yes" if best.within_noise else "no"),
            "last_dev": _rounded(result.last_metric),
            "last_dev_std": _rounded(result.last_metric_std),
            "last_delta_vs_full": _rounded(last_delta),
            "last_delta_low": _rounded(last.low if last else None),
            "last_delta_high": _rounded(last.high if last else None),
            "last_within_noise": "" if last is None else ("yes" if last.within_noise else "no"),
            **{f"dev_{k}": round(v, 4) for k, v in sorted((result.extra_metrics or {}).items())},
            "train_examples": result.examples,
            "train_seconds": round(result.train_seconds, 1),
            "output": result.output_dir,
        })
    return rows


def _rounded(value: float | None) -> float | str:
    return "" if value is None else round(value, 4)


def _with_std(value: float | str, std: float | str) -> str:
    if value == "":
        return "–"
    return f"{value:.4f} ± {std:.4f}" if std != "" else f"{value:.4f}"


def _difference(delta: float | str, low: float | str, high: float | str, within_noise: str = "") -> str:
    """``+0.0123 [-0.0040, +0.0290] within noise``: a difference and its interval."""
    if delta == "":
        return "–"
    if low == "":
        return f"{delta:+.4f}"
    return f"{delta:+.4f} [{low:+.4f}, {high:+.4f}]" + (" within noise" if within_noise == "yes" else "")


def paper_comparison(rows: list[dict]) -> list[str]:
    """Markdown lines: each grid variant that asks one of the paper's ablation questions, the
    paper's drop beside this grid's difference, and whether the effect shows beyond noise."""
    ours = {row["variant"]: row for row in rows if row["variant"] in PAPER_ABLATIONS}
    if not ours:
        return []
    lines = ["## Compared with the TinyBERT paper's ablations", "",
             f"The paper (Jiao et al., 2020) reports dev averages over MNLI-m, MNLI-mm, MRPC and CoLA "
             f"for TinyBERT4 distilled from BERT-base (full recipe {PAPER_FULL}); this grid has another "
             "teacher, student start and task, so compare the direction and the order of the "
             "effects, not their size.", "",
             "| variant | the paper's question | paper (points) | paper Δ (points) | Δ here [95 % CI] | here |",
             "|---|---|---:|---:|---:|---|"]
    order = sorted(ours, key=lambda name: PAPER_ABLATIONS[name][1])
    for name in order:
        question, score = PAPER_ABLATIONS[name]
        row = ours[name]
        if row["within_noise"] == "":
            verdict = "no interval"
        elif row["within_noise"] == "yes":
            verdict = "not shown: within noise"
        elif row["delta_vs_full"] < 0:
            verdict = "reproduces: a drop beyond noise"
        else:
            verdict = "reversed: a gain beyond noise"
        lines.append(f"| {name} | {question} | {score:.1f} | {score - PAPER_FULL:+.1f} | "
                     f"{_difference(row['delta_vs_full'], row['delta_low'], row['delta_high'], row['within_noise'])} | {verdict} |")
    here = sorted(ours, key=lambda name: ours[name]["delta_vs_full"])
    lines += ["", f"Largest drop first: the paper {', '.join(order)}; here {', '.join(here)}."]
    return lines


def write_report(results: list[VariantResult], out_dir: Path, title: str, selection: StudentSelection,
                 teacher_metric: float | None = None, notes: list[str] | None = None,
                 resamples: int = RESAMPLES, bootstrap_seed: int = BOOTSTRAP_SEED) -> dict[str, Path]:
    """Write ``ablations.md``, ``ablations.csv`` and ``ablations.png`` into ``out_dir``.

    ``selection``: how stage 2 chose each student (from the run's manifests); it writes every
    sentence and header that says how the dev scores were chosen. ``notes``: lines printed
    under the title (what was run, on which data). Returns the paths and, under ``"rows"``,
    the report rows (the statistics, for ``summary.json``).
    """
    rows = report_rows(results, resamples, bootstrap_seed)
    csv_buffer = io.StringIO()
    writer = csv.DictWriter(csv_buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    paths = {"csv": out_dir / "ablations.csv", "md": out_dir / "ablations.md",
             "png": out_dir / "ablations.png"}
    paths["csv"].write_text(csv_buffer.getvalue())

    metric = rows[0]["metric"]
    seeds = rows[0]["seeds"].split()
    extra = [k for k in rows[0] if k.startswith("dev_") and k != "dev_std"]
    lines = [f"# {title}", ""]
    if notes:
        lines += [*notes, ""]
    lines += [
        selection.headline(metric),
        "",
        (f"Each variant ran {len(seeds)} seeds ({', '.join(seeds)}: student initialisation, data order "
         "and dropout of both distillation stages): mean ± sample standard deviation over seeds. "
         if len(seeds) > 1 else
         f"One seed per variant ({', '.join(seeds) or 'the configured one'}): no seed-to-seed spread "
         "is measured (set `[Ablations] seeds`). ")
        + f"Δ vs full: the difference of the seed means, with a 95 % paired-bootstrap interval over "
        f"dev examples ({resamples:,} resamples, seed {bootstrap_seed}; the same example indices for "
        f"both variants and every seed; {metric} recomputed on each resample); **within noise** when "
        "the interval contains 0.",
        "",
    ]
    if teacher_metric is not None:
        lines += [f"Teacher dev {metric}: {teacher_metric:.4f}", ""]
    lines += [f"| variant | {selection.column(metric)} | Δ vs full [95 % CI] | last eval | "
              "Δ last vs full [95 % CI] | % of teacher | "
              + "".join(f"dev {k[4:]} | " for k in extra)
              + "train examples | training time per run (s) | settings |",
              "|---|---:|---:|---:|---:|---:|" + "---:|" * len(extra) + "---:|---:|---|"]
    for row in rows:
        share = f"{100 * row['dev'] / teacher_metric:.1f}%" if teacher_metric else "–"
        is_full = row["variant"] == REFERENCE_VARIANT
        lines.append(
            f"| {row['variant']} | {_with_std(row['dev'], row['dev_std'])} | "
            f"{'–' if is_full else _difference(row['delta_vs_full'], row['delta_low'], row['delta_high'], row['within_noise'])} | "
            f"{_with_std(row['last_dev'], row['last_dev_std'])} | "
            f"{'–' if is_full else _difference(row['last_delta_vs_full'], row['last_delta_low'], row['last_delta_high'], row['last_within_noise'])} | "
            f"{share} | " + "".join(f"{row[k]:.4f} | " for k in extra)
            + f"{row['train_examples']} | {row['train_seconds']:.0f} | {row['settings']} |")
    comparison = paper_comparison(rows)
    if comparison:
        lines += ["", *comparison]
    paths["md"].write_text("\n".join(lines) + "\n")
    _plot(rows, paths["png"], title, teacher_metric, selection.column(metric))
    return {**paths, "rows": rows}


def _plot(rows: list[dict], path: Path, title: str, teacher_metric: float | None, label: str) -> None:
    """Left: each variant's mean dev metric with its seed standard deviation; right: its
    difference from ``full`` with the 95 % bootstrap interval (grey: within noise)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workstations run over ssh or in CI
    import matplotlib.pyplot as plt

    width = max(5.0, 0.8 * len(rows) + 2)
    fig, (ax, delta_ax) = plt.subplots(1, 2, figsize=(2 * width, 3.8), dpi=120)
    names = [r["variant"] for r in rows]
    values = [r["dev"] for r in rows]
    errors = [r["dev_std"] if r["dev_std"] != "" else 0.0 for r in rows]
    bars = ax.bar(names, values, yerr=errors, capsize=3,
                  color=["#3b6ea8" if n == REFERENCE_VARIANT else "#8fb3d9" for n in names])
    for bar, value, error in zip(bars, values, errors):
        ax.annotate(f"{value:.3f}", (bar.get_x() + bar.get_width() / 2, value + error), ha="center",
                    va="bottom", fontsize=8)
    if teacher_metric is not None:
        ax.axhline(teacher_metric, color="#c0392b", linestyle="--", linewidth=1,
                   label=f"teacher {teacher_metric:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    low = min([v - e for v, e in zip(values, errors)] + ([teacher_metric] if teacher_metric is not None else []))
    ax.set_ylim(max(0.0, low - 0.1), 1.0 if max(values) <= 1.0 else None)
    seeds = len(rows[0]["seeds"].split())
    ax.set_ylabel(label)
    ax.set_title(title + (f": mean ± std over {seeds} seeds" if seeds > 1 else ""), fontsize=10)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)

    others = [r for r in rows if r["variant"] != REFERENCE_VARIANT]
    positions = range(len(others))
    for x, row in zip(positions, others):
        delta = row["delta_vs_full"]
        if row["delta_low"] == "":
            delta_ax.plot([x], [delta], "o", color="#8fb3d9")
            continue
        color = "#999999" if row["within_noise"] == "yes" else "#3b6ea8"
        delta_ax.errorbar([x], [delta], yerr=[[delta - row["delta_low"]], [row["delta_high"] - delta]],
                          fmt="o", color=color, capsize=3)
    delta_ax.axhline(0.0, color="black", linewidth=0.8)
    delta_ax.set_xlim(-0.5, max(len(others), 1) - 0.5)
    delta_ax.set_xticks(list(positions), [r["variant"] for r in others], rotation=30, fontsize=8)
    delta_ax.set_ylabel(f"Δ dev {rows[0]['metric']} vs full")
    delta_ax.set_title("Δ vs full, 95 % bootstrap interval (grey: within noise)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def gather_tensorboard(runs: Mapping[str, Path], tb_dir: Path) -> int:
    """Copy each run's TensorBoard event files (``<output>/tb``) to ``tb_dir/<name>``.

    ``runs`` maps a run name (``<variant>/seed<k>/stage2``…) to a training stage's output;
    the grid's own ``tb/`` then holds one TensorBoard run per variant and seed, so
    ``tensorboard --logdir <ablations output>/tb`` (or the whole workdir) compares them by
    name. Event files are small (a few scalars per logged step); an output without ``tb/``
    (written before TensorBoard logs existed) is skipped. Returns the files copied.
    """
    import shutil

    copied = 0
    for name, output in runs.items():
        for event_file in sorted((Path(output) / "tb").glob("events.out.tfevents.*")):
            target = Path(tb_dir) / name
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(event_file, target / event_file.name)
            copied += 1
    return copied
