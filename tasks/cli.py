"""``tinykd``: run the DAG, explain what is stale, collect garbage, inspect a teacher cache.

    tinykd [--config FILE ...] COMMAND ...

    tinykd run TASK [--PARAM VALUE ...] [--workers N] [--scheduler-host HOST]
    tinykd explain TASK [--PARAM VALUE ...]
    tinykd gc [--delete] [--config FILE ...] [--older-than AGE] [TASK [--PARAM VALUE ...]]
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
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import luigi
import luigi.cmdline_parser
from luigi.execution_summary import LuigiStatusCode
from luigi.task import flatten

from pipeline.errors import InputError
from pipeline.stage import delete_entry, gc_plan, human_age
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


def cmd_run(argv: list[str]) -> int:
    result = _run_luigi(argv)
    print(result.summary_text)
    return 0 if _succeeded(result) else 1


def _succeeded(result) -> bool:
    # scheduling_succeeded stays True when a task fails; the status says what happened.
    return result.status in (LuigiStatusCode.SUCCESS, LuigiStatusCode.SUCCESS_WITH_RETRY)


def _run_luigi(argv: list[str]):
    """Luigi's own command line (local scheduler unless one is named); the run's result."""
    import tasks  # noqa: F401

    args = list(argv)
    if "--scheduler-host" not in args and "--local-scheduler" not in args:
        args.append("--local-scheduler")
    if not any(a.startswith("--log-level") for a in args):
        args += ["--log-level", "INFO"]   # Luigi's default, DEBUG, logs every completeness check
    hold = _HoldSummary()
    interface_logger = logging.getLogger("luigi-interface")
    interface_logger.addFilter(hold)
    try:
        return luigi.run(cmdline_args=args, detailed_summary=True)
    finally:
        interface_logger.removeFilter(hold)


def one_line(exc: BaseException) -> str:
    """An exception as one line: an InputError's ``file:line: problem``, else ``Type: message``."""
    text = str(exc) if isinstance(exc, (InputError, luigi.parameter.ParameterException)) \
        else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


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
    """Entries under the workdir that ``gc --delete`` would remove, given the ``referenced`` outputs.

    Partial directories of referenced fingerprints are kept (a resumable stage continues from
    them); so is anything a live build holds (:func:`pipeline.stage.gc_plan`).
    """
    return [d.entry.path for d in gc_plan(workdir(), referenced) if d.delete]


_AGE_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """``7d``, ``12h``, ``30min``/``30m``, ``90s``, ``2w`` -> seconds."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]+)\s*", text.lower())
    if not match or match.group(2) not in _AGE_UNITS:
        raise InputError(f"--older-than {text!r}: give a number and a unit, e.g. 7d, 12h, 30min "
                         f"(units: {', '.join(_AGE_UNITS)})")
    return float(match.group(1)) * _AGE_UNITS[match.group(2)]


@contextlib.contextmanager
def configuration(extra: str | None) -> Iterator[None]:
    """Luigi's configuration as now, plus ``extra`` (a profile) read last; restored afterwards.

    Task instances are cached by Luigi with the parameters of the configuration in force when
    they were made, so the cache is cleared on the way in and out.
    """
    from luigi.configuration import LuigiConfigParser
    from luigi.task_register import Register

    saved_paths, saved_instance = list(LuigiConfigParser._config_paths), LuigiConfigParser._instance
    try:
        if extra:
            LuigiConfigParser._config_paths = saved_paths + [str(Path(extra).resolve())]
            LuigiConfigParser._instance = None
        Register.clear_instance_cache()
        yield
    finally:
        LuigiConfigParser._config_paths = saved_paths
        LuigiConfigParser._instance = saved_instance
        Register.clear_instance_cache()


GC_USAGE = """tinykd gc [--delete] [--config FILE ...] [--older-than AGE] [TASK [--PARAM VALUE ...]]

Lists (or with --delete removes) what under the workdir no declared configuration references.
Each --config FILE is one configuration (luigi.cfg, then FILE); an output referenced by TASK's
DAG (default: Ablations) under ANY of them is kept. Without --config: the current configuration
only, so every other task's or profile's outputs count as garbage: declare every profile you
use. --older-than AGE (7d, 12h, 30min) keeps anything changed more recently than AGE. A partial
directory whose build lock a live process holds is never touched. Each line says why."""


def cmd_gc(argv: list[str]) -> int:
    """``gc``: see :data:`GC_USAGE`. Dry run unless ``--delete``."""
    if any(a in ("-h", "--help") for a in argv):
        print(GC_USAGE)
        return 0
    delete, configs, older_than, task_argv = False, [], None, []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--delete":
            delete = True
        elif arg in ("--config", "--older-than"):
            if not args:
                raise InputError(f"gc {arg} needs a value")
            value = args.pop(0)
            if arg == "--config":
                if not Path(value).is_file():
                    raise InputError(f"gc --config {value}: no such file")
                configs.append(value)
            else:
                older_than = parse_age(value)
        else:
            task_argv.append(arg)
    roots = [task_argv] if task_argv else [[name] for name in DEFAULT_GC_ROOTS]
    root_names = ", ".join(r[0] for r in roots)
    referenced: set[Path] = set()
    workdirs = set()
    for config in configs or [None]:
        with configuration(config):
            try:
                for root_argv in roots:
                    with task_from_argv(root_argv) as root:
                        referenced |= referenced_outputs(root)
            except InputError as exc:
                where = f"under --config {config}" if config else "under the current configuration"
                raise InputError(f"cannot walk {root_names}'s DAG {where}, so nothing is collected: "
                                 f"{exc}") from None
            workdirs.add(workdir())
    if len(workdirs) > 1:
        raise InputError(f"the configurations use different workdirs ({', '.join(map(str, sorted(workdirs)))}); "
                         "collect one workdir at a time")
    base = workdirs.pop()
    scope = (f"any of {len(configs)} configurations ({', '.join(configs)})" if len(configs) > 1
             else f"--config {configs[0]}" if configs else "the current configuration")
    because = f"not referenced by {root_names} under {scope}"
    decisions = gc_plan(base, referenced, older_than=older_than, unreferenced_because=because)
    print(f"gc of {base}: keeping what {root_names} references under {scope}"
          + (f", and anything changed within {human_age(older_than)}" if older_than else ""))
    total = count = 0
    for decision in decisions:
        entry = decision.entry
        if not decision.delete:
            print(f"{'kept':<12}  {_human_bytes(entry.bytes):>10}  {entry.path}  ({decision.reason})")
            continue
        if delete and not delete_entry(entry):
            print(f"{'kept':<12}  {_human_bytes(entry.bytes):>10}  {entry.path}  (kept: a build took "
                  "its lock just now)")
            continue
        total += entry.bytes
        count += 1
        print(f"{'deleted' if delete else 'would delete':<12}  {_human_bytes(entry.bytes):>10}  "
              f"{entry.path}  ({decision.reason})")
    verb = "freed" if delete else "would be freed (dry run; pass --delete)"
    kept = sum(1 for d in decisions if not d.delete)
    print(f"{count} unreferenced output(s), {_human_bytes(total)} {verb}"
          + (f"; {kept} unreferenced entr{'y' if kept == 1 else 'ies'} kept" if kept else ""))
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
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (InputError, luigi.parameter.ParameterException) as exc:
        # Bad input or a bad command line: one line that says what and where, no traceback
        # (the problem is the user's to fix, not a bug to debug).
        print(f"tinykd {argv[0]}: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
