"""Ablation grids and their report: what each loss, the augmentation and the layer map buy.

An ablation grid is a small TOML file (default ``ablations.toml`` at the project root): a
``[variants.<name>]`` table per variant, holding the trainer settings that differ from the
full recipe. Every variant re-reads the same teacher cache, so only trainer stages run --
except a variant that changes the augmentation's sampling (``num_aug``, ``replace_prob``,
``aug_seed``): its examples differ, so it gets its own Augment output (sampled over the same
Candidates, in seconds) and its own teacher cache, shared by the variants that ask for the
same augmentation. The
report lists each variant's dev metric, its difference from the ``full`` variant and its
training time, as Markdown, CSV and a PNG bar chart with the teacher's score as a reference.
"""
from __future__ import annotations

import csv
import io
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

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


@dataclass
class VariantResult:
    """One variant's outcome: its stage-2 student's best dev metrics and what training cost."""

    name: str
    metric_name: str                 # the task's primary metric (accuracy, f1, mcc, corr)
    metric: float
    train_seconds: float             # stage 1 + stage 2 training loops
    output_dir: str                  # the stage-2 output, relative to the workdir
    settings: str = ""               # Variant.describe()
    examples: int = 0                # training examples per epoch (augmented or originals)
    extra_metrics: Mapping[str, float] | None = None   # e.g. MRPC's accuracy beside its F1


def report_rows(results: list[VariantResult]) -> list[dict]:
    full = next((r for r in results if r.name == REFERENCE_VARIANT), None)
    rows = []
    for result in results:
        delta = result.metric - full.metric if full else float("nan")
        rows.append({
            "variant": result.name,
            "settings": result.settings,
            "metric": result.metric_name,
            "dev": round(result.metric, 4),
            "delta_vs_full": round(delta, 4),
            **{f"dev_{k}": round(v, 4) for k, v in sorted((result.extra_metrics or {}).items())},
            "train_examples": result.examples,
            "train_seconds": round(result.train_seconds, 1),
            "output": result.output_dir,
        })
    return rows


def write_report(results: list[VariantResult], out_dir: Path, title: str,
                 teacher_metric: float | None = None, notes: list[str] | None = None) -> dict[str, Path]:
    """Write ``ablations.md``, ``ablations.csv`` and ``ablations.png`` into ``out_dir``.

    ``notes``: lines printed under the title (what was run, on which data).
    """
    rows = report_rows(results)
    csv_buffer = io.StringIO()
    writer = csv.DictWriter(csv_buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    paths = {"csv": out_dir / "ablations.csv", "md": out_dir / "ablations.md",
             "png": out_dir / "ablations.png"}
    paths["csv"].write_text(csv_buffer.getvalue())

    metric = rows[0]["metric"]
    extra = [k for k in rows[0] if k.startswith("dev_")]
    lines = [f"# {title}", ""]
    if notes:
        lines += [*notes, ""]
    if teacher_metric is not None:
        lines += [f"Teacher dev {metric}: {teacher_metric:.4f}", ""]
    lines += ["| variant | dev " + metric + " | Δ vs full | % of teacher | "
              + "".join(f"dev {k[4:]} | " for k in extra)
              + "train examples | training time (s) | settings |",
              "|---|---:|---:|---:|" + "---:|" * len(extra) + "---:|---:|---|"]
    for row in rows:
        share = f"{100 * row['dev'] / teacher_metric:.1f}%" if teacher_metric else "–"
        lines.append(f"| {row['variant']} | {row['dev']:.4f} | {row['delta_vs_full']:+.4f} | {share} | "
                     + "".join(f"{row[k]:.4f} | " for k in extra)
                     + f"{row['train_examples']} | {row['train_seconds']:.0f} | {row['settings']} |")
    paths["md"].write_text("\n".join(lines) + "\n")
    _plot(rows, paths["png"], title, teacher_metric)
    return paths


def _plot(rows: list[dict], path: Path, title: str, teacher_metric: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on workstations run over ssh or in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(rows) + 2), 3.6), dpi=120)
    names = [r["variant"] for r in rows]
    values = [r["dev"] for r in rows]
    bars = ax.bar(names, values, color=["#3b6ea8" if n == REFERENCE_VARIANT else "#8fb3d9" for n in names])
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.3f}", (bar.get_x() + bar.get_width() / 2, value), ha="center",
                    va="bottom", fontsize=8)
    if teacher_metric is not None:
        ax.axhline(teacher_metric, color="#c0392b", linestyle="--", linewidth=1,
                   label=f"teacher {teacher_metric:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    low = min(values + ([teacher_metric] if teacher_metric is not None else []))
    ax.set_ylim(max(0.0, low - 0.1), 1.0 if max(values) <= 1.0 else None)
    ax.set_ylabel(f"dev {rows[0]['metric']}")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
