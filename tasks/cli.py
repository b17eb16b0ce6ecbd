"""``tinykd``: run the DAG, explain what is stale, collect garbage, inspect a teacher cache.

    tinykd [--config FILE ...] COMMAND ...

    tinykd run TASK [--PARAM VALUE ...] [--workers N] [--scheduler-host HOST]
    tinykd explain TASK [--PARAM VALUE ...]
    tinykd gc [--delete] [TASK [--PARAM VALUE ...]]
    tinykd inspect CACHE_DIR [--verify]
    tinykd demo [--PARAM VALUE ...]

``run`` is Luigi's own command line (``luigi --module tasks TASK``) with the local scheduler
as default; pass ``--scheduler-host`` to use a central ``luigid``. Task parameters come from
the command line, then ``luigi.cfg`` (Luigi's configuration mechanism), then defaults.
``--config FILE`` adds a configuration file read after luigi.cfg (a profile such as
``configs/sst2.cfg``). ``explain`` and ``gc`` walk the same DAG without running anything.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import luigi
import luigi.cmdline_parser
from luigi.execution_summary import LuigiStatusCode
from luigi.task import flatten

from pipeline.stage import PARTIAL_SUFFIX, directory_bytes
from tasks.base import PROJECT_ROOT, StageTask, walk_dag, workdir

#: Tasks that ``gc`` keeps (with their whole DAG) when none is named: the ablation grid,
#: whose ``full`` variant is the main job (DistillPrediction) itself.
DEFAULT_GC_ROOTS = ("Ablations",)
#: The offline demo's configuration profile (read after luigi.cfg).
DEMO_CONFIG = PROJECT_ROOT / "configs" / "demo.cfg"
#: Where ``tinykd demo`` writes its generated GLUE-layout task (pipeline.prepare.demo_task; git-ignored).
DEMO_DATA = PROJECT_ROOT / "data" / "demo"


def _load_project_config(extra: list[str]) -> None:
    """Read the project's luigi.cfg (also when run from elsewhere), then ``--config`` files."""
    if not Path("luigi.cfg").exists() and (PROJECT_ROOT / "luigi.cfg").exists():
        luigi.configuration.add_config_path(str(PROJECT_ROOT / "luigi.cfg"))
    for path in extra:
        if not Path(path).is_file():
            raise SystemExit(f"tinykd: --config {path}: no such file")
        luigi.configuration.add_config_path(str(Path(path).resolve()))


@contextlib.contextmanager
def task_from_argv(argv: list[str]) -> Iterator[luigi.Task]:
    """The task a Luigi command line names, with the line's ``--Task-param`` values in force.

    Luigi applies command-line values only to tasks instantiated while its parser is the
    global instance, and ``requires()`` instantiates upstream tasks lazily: walk the DAG
    inside the ``with`` block, or an upstream task silently falls back to its configured
    value (``explain Ablations --PrepareData-glue-dir X`` would explain another DAG).
    """
    import tasks  # noqa: F401  - registers every task class with Luigi

    with luigi.cmdline_parser.CmdlineParser.global_instance(argv) as parser:
        yield parser.get_task_obj()


class _HoldSummary(logging.Filter):
    """Keep Luigi's execution summary out of its log: tinykd prints it last, after any report."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "===== Luigi Execution Summary =====" not in str(record.msg)


#: Seconds between re-checks while tasks of this DAG run on other workers (central scheduler).
OTHER_WORKERS_POLL_S = 2.0


def cmd_run(argv: list[str]) -> int:
    result = _run_luigi(argv)
    if "--scheduler-host" in argv:
        result = _until_other_workers_finish(argv, result)
    print(result.summary_text)
    return 0 if _succeeded(result) else 1


def _until_other_workers_finish(argv: list[str], result):
    """Under luigid, wait while other workers still run tasks of this DAG; the final result.

    A worker's own summary cannot tell whether the DAG completed: a task another worker ran
    while this one was not asking counts as "not granted run permission" (NOT_RUN, so every
    worker but the one that ran the last task would exit 1 although the DAG completed), and a
    worker that finds everything else running elsewhere ends "successfully" before the DAG is
    done. So while no task failed and the requested task is not complete, schedule the DAG
    again after a pause: tasks done meanwhile are "already done", and a task whose worker died
    goes back to the pool and runs here.
    """
    while result.status in _NO_FAILURE and not _requested_task_complete(argv):
        time.sleep(OTHER_WORKERS_POLL_S)
        result = _run_luigi(argv)
    return result


def _requested_task_complete(argv: list[str]) -> bool:
    with task_from_argv(argv) as root:
        return root.complete()


_NO_FAILURE = (LuigiStatusCode.SUCCESS, LuigiStatusCode.SUCCESS_WITH_RETRY, LuigiStatusCode.NOT_RUN)


def _succeeded(result) -> bool:
    # scheduling_succeeded stays True when a task fails; the status says what happened.
    # NOT_RUN only means that other workers ran some tasks (luigid): cmd_run has waited for
    # them and checked the requested task itself.
    return result.status in _NO_FAILURE


def _run_luigi(argv: list[str]):
    """Luigi's own command line (local scheduler unless one is named); the run's result."""
    import tasks  # noqa: F401

    args = list(argv)
    if "--scheduler-host" not in args and "--local-scheduler" not in args:
        args.append("--local-scheduler")
    # Luigi's pid lock would make a second identical command exit 0 having done nothing,
    # even on another workdir. Stage builds lock per output instead (pipeline.locks): runs
    # on one workdir share the work stage by stage, runs on different workdirs are independent.
    if "--no-lock" not in args:
        args.append("--no-lock")
    if not any(a.startswith("--log-level") for a in args):
        args += ["--log-level", "INFO"]   # Luigi's default, DEBUG, logs every completeness check
    hold = _HoldSummary()
    interface_logger = logging.getLogger("luigi-interface")
    interface_logger.addFilter(hold)
    try:
        return luigi.run(cmdline_args=args, detailed_summary=True)
    finally:
        interface_logger.removeFilter(hold)


def _human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"


def explain_lines(root: luigi.Task) -> list[str]:
    """One line per stage of ``root``'s DAG (upstream first), plus indented reasons."""
    lines = []
    stale: set[str] = set()
    for task in walk_dag(root):
        if not isinstance(task, StageTask):
            state = "up to date" if task.complete() else "will run"
            lines.append(f"{state:<11} {task.task_family}")
            continue
        status = task.explain()
        upstream_stale = [t for t in flatten(task.requires()) if t.task_id in stale]
        if status.up_to_date:
            lines.append(f"up to date  {task.task_family:<22} {status.output_dir}")
            continue
        if status.broken:   # exists, so Luigi will not rebuild it; its readers will refuse it
            stale.add(task.task_id)
            lines.append(f"broken      {task.task_family:<22} {status.output_dir}")
            lines.extend(f"              {reason}" for reason in status.reasons)
            continue
        stale.add(task.task_id)
        lines.append(f"will run    {task.task_family:<22} -> {status.output_dir}")
        for reason in status.reasons:
            lines.append(f"              {reason}")
        for dep in upstream_stale:
            lines.append(f"              upstream {dep.task_family} will run first")
    return lines


def cmd_explain(argv: list[str]) -> int:
    started = time.perf_counter()
    with task_from_argv(argv) as root:
        print("\n".join(explain_lines(root)))
    print(f"(checked in {time.perf_counter() - started:.2f} s; workdir {workdir()})")
    return 0


def referenced_outputs(root: luigi.Task) -> set[Path]:
    """The output directories of every stage in ``root``'s DAG."""
    return {task.output_dir() for task in walk_dag(root) if isinstance(task, StageTask)}


def unreferenced_outputs(referenced: set[Path]) -> list[Path]:
    """Stage directories under the workdir that are not in ``referenced``.

    Partial directories of referenced fingerprints are kept (a resumable stage continues
    from them); partial directories of anything else are garbage.
    """
    garbage = []
    base = workdir()
    if not base.is_dir():
        return []
    for stage_dir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for entry in sorted(stage_dir.iterdir()):
            if not entry.is_dir():
                continue
            name = entry.name
            if name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
                target = stage_dir / name[1:-len(PARTIAL_SUFFIX)]
            else:
                target = entry
            if target not in referenced:
                garbage.append(entry)
    return garbage


def cmd_gc(argv: list[str]) -> int:
    """``gc [--delete] [TASK [--PARAM VALUE ...]]``: dry run unless ``--delete``.

    Outputs referenced by TASK's DAG (default: the roots in DEFAULT_GC_ROOTS, with their
    luigi.cfg parameters) are kept; everything else under the workdir is listed with sizes.
    """
    delete = "--delete" in argv
    task_argv = [a for a in argv if a != "--delete"]
    if task_argv and task_argv[0] in ("-h", "--help"):
        print(cmd_gc.__doc__)
        return 0
    referenced: set[Path] = set()
    for root_argv in [task_argv] if task_argv else [[name] for name in DEFAULT_GC_ROOTS]:
        with task_from_argv(root_argv) as root:
            referenced |= referenced_outputs(root)
    garbage = unreferenced_outputs(referenced)
    total = 0
    for path in garbage:
        size = directory_bytes(path)
        total += size
        print(f"{'deleted' if delete else 'would delete'}  {_human_bytes(size):>10}  {path}")
        if delete:
            shutil.rmtree(path)
    verb = "freed" if delete else "would be freed (dry run; pass --delete)"
    print(f"{len(garbage)} unreferenced output(s), {_human_bytes(total)} {verb}")
    return 0


def cmd_inspect(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tinykd inspect", description="Summarise a teacher cache.")
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("--verify", action="store_true", help="re-checksum and re-read every shard")
    args = parser.parse_args(argv)
    from pipeline.cache.inspect_cache import inspect_cache

    report, ok = inspect_cache(args.cache_dir, verify=args.verify)
    print(report)
    return 0 if ok else 1


def cmd_demo(argv: list[str]) -> int:
    """Run the whole DAG offline on the demo task (configs/demo.cfg) and print its report.

    The demo is the ablation grid over data/demo/SST-2 (generated on first use) with the packaged MiniLM teacher and
    GloVe vectors; Luigi's execution summary comes first, then the report and its files.
    """
    args = ["Ablations", *argv]
    if not any(a.startswith("--PrepareData-glue-dir") for a in argv):
        from pipeline.prepare.demo_task import ensure_demo_task

        ensure_demo_task(DEMO_DATA)
        args += ["--PrepareData-glue-dir", str(DEMO_DATA)]
    result = _run_luigi(args)
    if _succeeded(result):
        with task_from_argv(args) as root:
            print(report_summary(root))
    print(result.summary_text)
    return 0 if _succeeded(result) else 1


def report_summary(task: luigi.Task) -> str:
    """The ablation report's Markdown, the teacher-vs-student line and the files' paths."""
    import json

    from tasks.ablations import teacher_and_student

    out = task.output_dir()
    summary = json.loads((out / "summary.json").read_text())
    files = "\n".join(f"  {out / name}" for name in sorted(summary["files"].values()))
    return (f"\n{(out / 'ablations.md').read_text()}\n{teacher_and_student(summary)}\n"
            f"Report files:\n{files}\n  {out / 'summary.json'}")


COMMANDS = {"run": cmd_run, "explain": cmd_explain, "gc": cmd_gc, "inspect": cmd_inspect,
            "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    configs = []
    while len(argv) >= 2 and argv[0] == "--config":
        configs.append(argv[1])
        argv = argv[2:]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Loading and saving a checkpoint draws two progress bars each time (huggingface_hub's
    # switch also governs transformers'); the stages' own bars (tqdm) stay.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if argv[0] == "demo":  # the demo profile first, so that --config files can still adjust it
        configs.insert(0, str(DEMO_CONFIG))
    _load_project_config(configs)
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
