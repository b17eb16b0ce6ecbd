"""Run the whole DAG with a configuration profile and write its report under reports/.

    python scripts/e2e_report.py --config configs/sst2.cfg --glue-dir ../shared/data/glue
    python scripts/e2e_report.py --config configs/sst2.cfg --config configs/sst2-seeds.cfg \
        --glue-dir ../shared/data/glue       # the grid with 3 seeds, sized for 2 CPU cores

runs ``tinykd --config CONFIG [--config CONFIG ...] run Ablations`` (only stale stages run: a
rerun after the DAG finished just rewrites the report) and writes ``reports/<TASK>.md`` --
teacher vs student, what each stage cost, the teacher cache's size, the ablation table with
its seeds and intervals, the comparison with the paper's ablations -- and
``reports/<TASK>-ablations.png``. The numbers come from the stage manifests and the stage-2
outputs' dev predictions, so the report says what that DAG's outputs hold, whenever they were
built. ``reports/<TASK>-discussion.md``, when it exists, is written by hand (what the numbers
mean) and is included under "Discussion".
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import defaultdict
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

STAGE_ORDER = ["prepare_data", "word_vectors", "candidates", "augment", "teacher",
               "teacher_cache_shard", "teacher_cache", "distill_stage1", "distill_stage2", "ablations"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=Path, action="append",
                        help="configuration profile (configs/*.cfg); repeat to layer one over another")
    parser.add_argument("--glue-dir", required=True, type=Path, help="GLUE root (<TASK>/train.tsv)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "reports")
    parser.add_argument("--name", default=None,
                        help="file stem of the report (default: the task, e.g. SST-2 -> SST-2.md); "
                             "e.g. SST-2-seeds for a seeded rerun beside the one-epoch report")
    parser.add_argument("luigi_args", nargs="*", help="extra Luigi arguments, e.g. --workers 2")
    args = parser.parse_args()

    from tasks.cli import main as tinykd, task_from_argv

    glue = str(args.glue_dir.resolve())
    configs = [item for config in args.config for item in ("--config", str(config))]
    run_args = [*configs, "run", "Ablations", "--PrepareData-glue-dir", glue,
                *args.luigi_args]
    if tinykd(run_args) != 0:
        print("the DAG did not complete; no report written", file=sys.stderr)
        return 1

    with task_from_argv(["Ablations", "--PrepareData-glue-dir", glue, *args.luigi_args]) as root:
        out_dir = root.output_dir()
        summary = json.loads((out_dir / "summary.json").read_text())
        from pipeline.errors import check_plain_name

        task = check_plain_name(summary["task"], "task name", out_dir / "summary.json")  # reports/<task>.md
        name = check_plain_name(args.name, "report name") if args.name else task
        command = ("python scripts/e2e_report.py "
                   + " ".join(f"--config {os.path.relpath(config.resolve(), PROJECT_ROOT)}" for config in args.config)
                   + f" --glue-dir {args.glue_dir}" + (f" --name {name}" if args.name else ""))
        discussion = args.out / f"{name}-discussion.md"
        text = report_text(root, command, name, discussion.read_text() if discussion.exists() else None)
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / f"{name}.md"
    # Paths inside the project are written relative to it: the report is committed.
    report.write_text(text.replace(f"{PROJECT_ROOT}/", ""))
    shutil.copy(out_dir / "ablations.png", args.out / f"{name}-ablations.png")
    print(f"wrote {report}")
    return 0


def report_text(root, command: str, name: str, discussion: str | None) -> str:
    """The report of the finished Ablations task ``root`` (Markdown). Every sentence that says
    how a number was chosen or where it was measured comes from the stage manifests: the
    teacher's source and how its checkpoint was kept, the student's selection rule
    (:mod:`pipeline.common.selection`), the machine the stages ran on."""
    from pipeline.cache.assemble import human_bytes
    from pipeline.common.selection import StudentSelection
    from pipeline.stage import load_manifest
    from tasks.base import StageTask, walk_dag, workdir

    seconds: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    manifests: dict[str, dict] = {}
    machines: set[tuple] = set()
    for stage in walk_dag(root):
        if isinstance(stage, StageTask):
            manifest = load_manifest(stage.output_dir())
            seconds[stage.stage_name] += float(manifest["timings"]["seconds"])
            count[stage.stage_name] += 1
            manifests.setdefault(stage.stage_name, manifest)
            host = manifest.get("host") or {}
            machines.add((host.get("cpu_count"), host.get("device", "cpu")))
    out_dir = root.output_dir()
    summary = json.loads((out_dir / "summary.json").read_text())
    task = summary["task"]
    cache = manifests["teacher_cache"]["info"]
    augment = manifests["augment"]["info"]["counts"] if "augment" in manifests else None
    teacher_dev = summary["teacher_dev"]
    selection = StudentSelection.from_manifests(
        manifests["prepare_data"], [t.manifest() for t in root.variant_tasks().values()], out_dir)
    lines = [
        f"# {task}: end-to-end distillation result",
        "",
        f"Regenerate: `{command}` (reads the stage outputs under `{workdir()}`; only stale stages run).",
        "",
        f"**Teacher** ({teacher_description(manifests['teacher']['info'])}) dev {summary['metric']}: "
        f"**{summary['teacher']:.4f}**  ",
        f"**Student** (full recipe; {selection.short()}) dev {summary['metric']}: "
        f"**{summary['student']:.4f}** = **{100 * summary['student_vs_teacher']:.1f}%** of the teacher",
        "",
        "Teacher dev metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(teacher_dev.items())
                                              if isinstance(v, float)),
        "",
        f"## What ran, and what it cost ({machine_description(machines)}, wall seconds from the stage manifests)",
        "",
        "| stage | outputs | seconds |",
        "|---|---:|---:|",
        *[f"| {stage} | {count[stage]} | {seconds[stage]:.0f} |" for stage in STAGE_ORDER if stage in count],
        f"| **total** | | **{sum(seconds.values()):.0f}** ({sum(seconds.values()) / 3600:.2f} h) |",
        "",
        (f"Augmentation: {augment.get('examples_in')} train examples -> {augment.get('examples_out')} "
         "(originals included)." if augment else "Augmentation: none (the cache holds the train split).")
        + f" Teacher cache: {cache['examples']} examples, {cache['tokens']} tokens, "
        f"{human_bytes(cache['bytes'])} ({cache['bytes'] / cache['examples'] / 1024:.1f} KiB/example, "
        f"{cache['dtype']}, hidden layers {cache['hidden_layers']}, attention layers "
        f"{cache['attention_layers']}).",
        "",
        (out_dir / "ablations.md").read_text().replace(f"# {task} ablations", "## Ablations", 1),
        f"![ablations]({name}-ablations.png)",
        "",
        "## Discussion", "",
        discussion.strip() if discussion else
        f"(Not written yet: `{name}-discussion.md` beside this report is included here -- which "
        "effects reproduce beyond noise, and what the sizing of the runs means for them.)", "",
    ]
    return "\n".join(lines)


def teacher_description(info: dict) -> str:
    """Where the teacher came from and how its checkpoint was kept, from its stage's manifest."""
    from pipeline.teacher.finetune import default_teacher_dir

    source = str(info.get("teacher", "?"))
    try:
        packaged = Path(source).resolve() == default_teacher_dir()
    except Exception:   # the packaged teacher not installed: then it is not this one
        packaged = False
    where = "the packaged MiniLM-L6" if packaged else f"`{source}`"
    if info.get("skipped_finetune"):
        return f"{where}, as given"
    kept = ("its checkpoint chosen on held-out train rows, dev scored once" if info.get("selection") == "holdout"
            else "its checkpoint best on dev")
    return f"{where}, fine-tuned by the pipeline: {kept}"


def machine_description(machines: set[tuple]) -> str:
    """``2-core CPU`` (or each machine the stages recorded, when they differ)."""
    names = sorted(f"{cores}-core {'CPU' if device == 'cpu' else f'CPU + {device}'}" if cores else
                   ("CPU" if device == "cpu" else str(device)) for cores, device in machines)
    return ", ".join(names) or "machine not recorded"


if __name__ == "__main__":
    sys.exit(main())
