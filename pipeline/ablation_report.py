"""Ablation grids and their report: what each loss, the augmentation and the layer map buy.

An ablation grid is a small TOML file (default ``ablations.toml`` at the project root): a
``[variants.<name>]`` table per variant, holding the trainer settings that differ from the
full recipe. Every variant re-reads the same teacher cache, so only trainer stages run. The
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

from pipeline.errors import InputError

#: Settings a variant may change. Values are passed to the distillation tasks as parameters.
TRAINER_SETTINGS = {
    "attention_weight", "hidden_weight", "embedding_weight", "prediction_weight",
    "layer_map", "temperature", "alpha", "augmentation", "stage1_epochs", "stage2_epochs",
}
REFERENCE_VARIANT = "full"


@dataclass(frozen=True)
class Variant:
    name: str
    settings: Mapping[str, Any]


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
        if not isinstance(settings, dict):
            raise InputError(f"variant {name!r} must be a table of settings", path)
        unknown = sorted(set(settings) - TRAINER_SETTINGS)
        if unknown:
            raise InputError(f"variant {name!r}: unknown setting(s) {unknown}; "
                             f"allowed: {sorted(TRAINER_SETTINGS)}", path)
        if name == REFERENCE_VARIANT:
            if settings:
                raise InputError(f"variant {REFERENCE_VARIANT!r} is the unmodified recipe; "
                                 "it cannot override settings", path)
            continue
        variants.append(Variant(name, dict(settings)))
    return variants


@dataclass
class VariantResult:
    name: str
    metric_name: str
    metric: float
    train_seconds: float
    output_dir: str


def report_rows(results: list[VariantResult]) -> list[dict]:
    full = next((r for r in results if r.name == REFERENCE_VARIANT), None)
    rows = []
    for result in results:
        delta = result.metric - full.metric if full else float("nan")
        rows.append({
            "variant": result.name,
            "metric": result.metric_name,
            "dev": round(result.metric, 4),
            "delta_vs_full": round(delta, 4),
            "train_seconds": round(result.train_seconds, 1),
            "output": result.output_dir,
        })
    return rows


def write_report(results: list[VariantResult], out_dir: Path, title: str,
                 teacher_metric: float | None = None) -> dict[str, Path]:
    """Write ``ablations.md``, ``ablations.csv`` and ``ablations.png`` into ``out_dir``."""
    rows = report_rows(results)
    csv_buffer = io.StringIO()
    writer = csv.DictWriter(csv_buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    paths = {"csv": out_dir / "ablations.csv", "md": out_dir / "ablations.md",
             "png": out_dir / "ablations.png"}
    paths["csv"].write_text(csv_buffer.getvalue())

    lines = [f"# {title}", ""]
    if teacher_metric is not None:
        lines += [f"Teacher dev {rows[0]['metric']}: {teacher_metric:.4f}", ""]
    lines += ["| variant | dev " + rows[0]["metric"] + " | Δ vs full | % of teacher | training time (s) |",
              "|---|---:|---:|---:|---:|"]
    for row in rows:
        share = f"{100 * row['dev'] / teacher_metric:.1f}%" if teacher_metric else "–"
        lines.append(f"| {row['variant']} | {row['dev']:.4f} | {row['delta_vs_full']:+.4f} | {share} "
                     f"| {row['train_seconds']:.0f} |")
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
