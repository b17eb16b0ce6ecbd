"""Does the cache format change what the student learns? Train from two caches and compare.

    python scripts/cache_quality.py --config configs/mrpc.cfg --glue-dir ../shared/data/glue

runs ``tinykd --config CONFIG run DistillPrediction`` twice, with ``[TeacherCache]`` set to the
baseline (default ``fp16/full``: the previous default, format-1 columns) and to the candidate
(default ``int8/compact``); everything upstream of the cache (data, teacher, augmentation) is
shared, and the two distillations use the same seed, so the only difference is the cache
format. It then compares, from the stage outputs:

* the kept student's dev metric (the stage-2 evaluation best on dev or on the held-out train
  rows, as the profile's ``selection`` says), and the last evaluation's, per cache;
* the per-step training losses of stage 1 and stage 2: max and mean relative difference;
* the caches' bytes per token and per example.

It prints one JSON line and one human line and writes ``reports/<TASK>-cache.md``. Only stale
stages run, so a rerun after both trainings finished just rewrites the report.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))


from pipeline.stage import RUN_HISTORY_INFO_KEYS  # noqa: E402  (after the path insert)

#: Logged numbers that are not losses: the optimiser's state, and the run history logged per
#: step (timings ``*_s``, throughput, the loader-wait share).
NOT_LOSSES = {"step", "epoch", "lr", "grad_norm", *RUN_HISTORY_INFO_KEYS}


def step_losses(out_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if "eval" not in row and "step" in row}


def dev_of(evaluation: dict) -> dict:
    """An evaluation's dev metrics (under held-out selection dev is scored beside the rows that
    choose, as ``evaluation["dev"]``)."""
    return evaluation.get("dev", evaluation)


def evaluations(out_dir: Path) -> dict[int, dict]:
    """Stage 2's dev evaluations by step."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: dev_of(row["eval"]) for row in rows if "eval" in row}


def loss_difference(a: dict[int, dict], b: dict[int, dict]) -> dict:
    """Per loss term and over all terms: max and mean relative difference over the common steps.

    Only losses: the gradient norm and the learning rate are not what the student is taught
    (the gradient norm of a clipped step is the noisiest number in the log)."""
    terms: dict[str, list[float]] = {}
    for step in sorted(set(a) & set(b)):
        for name, value in a[step].items():
            if name in NOT_LOSSES or not isinstance(value, float) or name.endswith("_s"):
                continue
            other = b[step].get(name)
            if isinstance(other, float) and abs(value) > 1e-12:
                terms.setdefault(name, []).append(abs(other - value) / abs(value))
    everything = [d for values in terms.values() for d in values]
    if not everything:
        return {"steps": 0, "max": None, "mean": None, "terms": {}}
    return {"steps": len(set(a) & set(b)), "max": max(everything),
            "mean": sum(everything) / len(everything),
            "terms": {name: {"mean": sum(v) / len(v), "max": max(v)} for name, v in sorted(terms.items())}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="configuration profile (configs/*.cfg)")
    parser.add_argument("--glue-dir", required=True, type=Path, help="GLUE root (<TASK>/train.tsv)")
    parser.add_argument("--baseline", default="fp16/full", help="storage/layout of the reference cache")
    parser.add_argument("--candidate", default="int8/compact", help="storage/layout of the cache under test")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "reports")
    parser.add_argument("luigi_args", nargs="*", help="extra Luigi arguments")
    args = parser.parse_args()

    from tasks.cli import main as tinykd

    glue = str(args.glue_dir.resolve())
    runs = {}
    for label, setting in (("baseline", args.baseline), ("candidate", args.candidate)):
        storage, layout = setting.split("/")
        argv = ["DistillPrediction", "--PrepareData-glue-dir", glue, "--TeacherCache-storage", storage,
                "--TeacherCache-layout", layout, *args.luigi_args]
        if tinykd(["--config", str(args.config), "run", *argv]) != 0:
            print(f"the {setting} run did not complete; no report written", file=sys.stderr)
            return 1
        runs[label] = (setting, argv)

    from pipeline.common.selection import StudentSelection
    from pipeline.stage import load_manifest
    from tasks.cli import task_from_argv

    figures: dict = {"config": str(args.config), "runs": {}}
    outputs = {}
    for label, (setting, argv) in runs.items():
        with task_from_argv(argv) as stage2:
            stage1 = stage2.requires()["stage1"]
            cache = stage2.cache_task()
            outputs[label] = (stage1.output_dir(), stage2.output_dir())
            metrics = json.loads((stage2.output_dir() / "metrics.json").read_text())
            size = load_manifest(cache.output_dir())["info"]["size"]
            figures["task"] = metrics.get("task")
            # how stage 2 kept its student, from the manifests (the report's words for it)
            selection = StudentSelection.from_manifests(stage2.requires()["data"].manifest(),
                                                        [stage2.manifest()], stage2.output_dir())
            figures["runs"][label] = {
                "cache": setting, "best": metrics["best"], "final_eval": metrics["final_eval"],
                "bytes_per_token": size["bytes_per_token"], "bytes_per_example": size["bytes_per_example"],
                "parts_bytes": size["parts_bytes"]}
    base, cand = figures["runs"]["baseline"], figures["runs"]["candidate"]
    for run in (base, cand):   # best = {"step", "epoch", "metrics"}; final_eval = the metrics
        run["best"] = {**dev_of(run["best"]["metrics"]), "step": run["best"]["step"]}
        run["final_eval"] = dev_of(run["final_eval"])
    figures["selection"] = selection.rule
    figures["metric"] = base["best"].get("primary_metric")
    figures["dev_difference_points"] = round(100 * (cand["best"]["primary"] - base["best"]["primary"]), 2)
    figures["last_eval_difference_points"] = round(
        100 * (cand["final_eval"]["primary"] - base["final_eval"]["primary"]), 2)
    figures["size_ratio"] = round(cand["bytes_per_example"] / base["bytes_per_example"], 3)
    figures["evaluations"] = {label: {str(k): v for k, v in evaluations(outputs[label][1]).items()}
                              for label in outputs}
    for label in outputs:
        figures["runs"][label]["train_seconds"] = sum(
            load_manifest(d)["info"].get("train_seconds", 0.0) for d in outputs[label])
    figures["loss_difference"] = {
        stage: loss_difference(step_losses(outputs["baseline"][i]), step_losses(outputs["candidate"][i]))
        for i, stage in enumerate(("stage1", "stage2"))}

    task = figures["task"] or "task"
    lines = [f"# {task}: does the cache format change what the student learns?", "",
             f"Regenerate: `python scripts/cache_quality.py --config {args.config} --glue-dir <GLUE>` "
             "(the same DAG, teacher and seed; only `[TeacherCache] storage/layout` differ).", "",
             selection.sentence(), "",
             f"| cache | bytes/token | bytes/example | {selection.column(base['best'].get('primary_metric') or 'metric')} | dev (last evaluation) |",
             "|---|---:|---:|---:|---:|"]
    for label in ("baseline", "candidate"):
        run = figures["runs"][label]
        lines.append(f"| {run['cache']} | {run['bytes_per_token']:.0f} | {run['bytes_per_example']:.0f} | "
                     f"{run['best']['primary']:.4f} | {run['final_eval']['primary']:.4f} |")
    lines += ["", f"Student dev difference (candidate − baseline): **{figures['dev_difference_points']:+.2f} "
                  f"points** (kept student), {figures['last_eval_difference_points']:+.2f} (last evaluation); "
                  f"the candidate cache is **{figures['size_ratio']:.2f}x** the baseline's size "
                  f"(teacher parts, {cand['parts_bytes'] / 1e6:.0f} MB once per cache, not included).", ""]
    for stage, diff in figures["loss_difference"].items():
        if diff["steps"]:
            per_term = ", ".join(f"{name} {t['mean']:.1e} / {t['max']:.1e}" for name, t in diff["terms"].items())
            lines.append(f"- {stage}: per-step losses over {diff['steps']} logged steps differ by "
                         f"{diff['mean']:.2e} on average, {diff['max']:.2e} at most (relative; per "
                         f"term, mean / max: {per_term}).")
    steps = sorted(set(figures["evaluations"]["baseline"]) & set(figures["evaluations"]["candidate"]), key=int)
    metric = figures["metric"] or "primary"
    lines += ["", f"Stage-2 dev {metric} at every evaluation:", "",
              "| step | " + " | ".join(str(s) for s in steps) + " |",
              "|---|" + "---:|" * len(steps)]
    for label in ("baseline", "candidate"):
        evals = figures["evaluations"][label]
        lines.append(f"| {figures['runs'][label]['cache']} | " +
                     " | ".join(f"{evals[s]['primary']:.4f}" for s in steps) + " |")
    same = sum(figures["evaluations"]["baseline"][s]["primary"] == figures["evaluations"]["candidate"][s]["primary"]
               for s in steps)
    lines += ["", f"{same} of {len(steps)} evaluations are equal. Training seconds (stage 1 + stage 2): "
              + ", ".join(f"{figures['runs'][label]['cache']} {figures['runs'][label]['train_seconds']:.0f}"
                          for label in ("baseline", "candidate")) + "."]
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / f"{task}-cache.md"
    report.write_text("\n".join(lines) + "\n")
    print(json.dumps(figures, default=str))
    print(f"{task}: {cand['cache']} vs {base['cache']}: dev {figures['dev_difference_points']:+.2f} points, "
          f"size {figures['size_ratio']:.2f}x, stage-1 loss diff max "
          f"{figures['loss_difference']['stage1']['max']}; report {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
