"""``tinykd``: run the DAG, explain what is stale, collect garbage, inspect a teacher cache.

    tinykd [--config FILE ...] COMMAND ...

    tinykd run TASK [--PARAM VALUE ...] [--workers N] [--scheduler-host HOST] [--verbose]
    tinykd explain TASK [--PARAM VALUE ...]
    tinykd gc [--delete] [--config FILE ...] [--older-than AGE] [TASK [--PARAM VALUE ...]]
    tinykd inspect CACHE_DIR [--verify]
    tinykd speed STUDENT_DIR [--against TEACHER_DIR] [--dev PATH | --length N] [--runs N] [--json]
    tinykd demo [--PARAM VALUE ...]

``run`` is Luigi's own command line (``luigi --module tasks TASK``) with the local scheduler
as default; pass ``--scheduler-host`` to use a central ``luigid``. Task parameters come from
the command line, then ``luigi.cfg`` (Luigi's configuration mechanism), then defaults.
``--config FILE`` adds a configuration file read after luigi.cfg (a profile such as
``configs/sst2.cfg``). ``explain`` and ``gc`` walk the same DAG without running anything.
``speed`` measures any exported model's size and speed, against its teacher with ``--against``
(:mod:`distill.speed`).

A failed ``run`` ends, after Luigi's summary, with one line per failed task and its error (an
InputError's ``file:line: problem``; several problems found at once, one line each); tracebacks
go to ``<workdir>/logs/run-*.log``, or to the console with ``--verbose``, which also shows
Luigi's full per-task lines (by default a task is named by its family and output fingerprint).
A successful ``run`` or ``demo`` of a task that writes a report prints the report's paths last.
Python warnings raised during a run go to the run log, and to the console once, as one line.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import luigi
import luigi.cmdline_parser
from luigi.execution_summary import LuigiStatusCode
from luigi.task import flatten

from pipeline.errors import InputError, InputErrors
from pipeline.stage import delete_entry, gc_plan, human_age
from tasks.base import PROJECT_ROOT, StageTask, walk_dag, workdir, workdir_location, workdir_store

#: Tasks that ``gc`` keeps (with their whole DAG) when none is named: the ablation grid,
#: whose ``full`` variant is the main job (DistillPrediction) itself, and that job's
#: deployable export (what ``tinykd demo`` builds beside the grid).
DEFAULT_GC_ROOTS = ("Ablations", "ExportStudent")
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
    from luigi.task_register import Register

    # Luigi caches task instances by their *own* parameters: a task made under an earlier
    # command line that differed only upstream would be handed back, with that line's DAG.
    Register.clear_instance_cache()
    try:
        with luigi.cmdline_parser.CmdlineParser.global_instance(argv) as parser:
            yield parser.get_task_obj()
    finally:
        Register.clear_instance_cache()


class _HoldSummary(logging.Filter):
    """Keep Luigi's execution summary out of its log: tinykd prints it itself, after the run and
    before the report paths (which come last)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "===== Luigi Execution Summary =====" not in str(record.msg)


#: Seconds between re-checks while tasks of this DAG run on other workers (central scheduler).
OTHER_WORKERS_POLL_S = 2.0


def cmd_run(argv: list[str]) -> int:
    result, failures = _run_luigi(argv)
    if "--scheduler-host" in argv:
        result, failures = _until_other_workers_finish(argv, result, failures)
    print(result.summary_text)
    _print_failures(failures)
    if _succeeded(result):   # a task that writes a report: where it is, last
        with task_from_argv([a for a in argv if a != "--verbose"]) as root:
            # a wrapper (tasks.deploy.Demo) writes nothing itself: its requirements' reports
            lines = report_lines(root) or [line for task in flatten(root.requires())
                                           for line in report_lines(task)]
        if lines:
            print("\n".join(lines))
    return 0 if _succeeded(result) else 1


def _until_other_workers_finish(argv: list[str], result, failures):
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
        result, failures = _run_luigi(argv)
    return result, failures


def _requested_task_complete(argv: list[str]) -> bool:
    with task_from_argv([a for a in argv if a != "--verbose"]) as root:
        return root.complete()


_NO_FAILURE = (LuigiStatusCode.SUCCESS, LuigiStatusCode.SUCCESS_WITH_RETRY, LuigiStatusCode.NOT_RUN)


def _succeeded(result) -> bool:
    # scheduling_succeeded stays True when a task fails; the status says what happened.
    # NOT_RUN only means that other workers ran some tasks (luigid): cmd_run has waited for
    # them and checked the requested task itself.
    return result.status in _NO_FAILURE


def _print_failures(failures: "RunLog") -> None:
    """After Luigi's summary: one line per failed task, with its error and not its traceback."""
    errors = failures.errors()
    for label, error in errors.items():
        print(f"FAILED {label}: {error}")
    if errors:
        where = "above" if failures.verbose else f"in {failures.path}"
        print(f"(tracebacks {where}; tinykd run --verbose prints them)")


def short_task(task: luigi.Task) -> str:
    """A task as its family and output fingerprint: ``PrepareData[3f2a...]`` (Luigi's repr lists
    every parameter, hundreds of characters for a distillation stage)."""
    if isinstance(task, StageTask):
        try:
            return f"{task.task_family}[{task.fingerprint()}]"
        except Exception:   # its key cannot be computed (a missing input): the family says enough
            return task.task_family
    return task.task_family


def _error_line(text: str) -> str:
    """The exception of a formatted traceback as ``Type: message``, an InputError as its message.

    The exception is what follows the last frame (the last indented line): one line, or for an
    :class:`~pipeline.errors.InputErrors` its header and one line per problem."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    frames = [i for i, line in enumerate(lines) if line[:1].isspace()]
    exception = lines[frames[-1] + 1:] if frames and frames[-1] + 1 < len(lines) else lines[-1:]
    first = exception[0].strip() if exception else text.strip()
    match = re.match(r"^([A-Za-z_][\w.]*): (.*)$", first)
    if match and match.group(1).endswith(("InputError", "InputErrors")):
        return "\n".join([match.group(2), *exception[1:]])
    return "\n".join([first, *exception[1:]])


def console_text(message: str) -> str:
    """The one line of a log message the console shows: its first line with a letter or digit
    (a banner's text, not the row of ``!`` above it)."""
    for line in message.splitlines():
        if any(character.isalnum() for character in line):
            return line.strip()
    return message.strip()


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` during a run: a Python warning becomes a log record of
    ``tinykd.warnings`` (run log and console), carrying its text for :class:`_OnceOnConsole`."""
    logging.getLogger("tinykd.warnings").warning("%s: %s (%s:%s)", category.__name__, message, filename,
                                                 lineno, extra={"warning_text": str(message)})


class _OnceOnConsole(logging.Filter):
    """Each warning's text once on the console. A stage that warns loudly logs a banner and also
    raises a Python warning with the same text (for callers of the library without tinykd's
    logging): the console shows the banner's line, the run log keeps both."""

    def __init__(self):
        super().__init__()
        self.shown: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        text = getattr(record, "warning_text", None) or console_text(record.getMessage())
        if text in self.shown:
            return False
        self.shown.add(text)
        return True


class _ShortFormatter(logging.Formatter):
    """Luigi's console lines with tasks as family + fingerprint and tracebacks left out: a
    record that carries one (an exception, a formatted traceback) is its first line and where
    the traceback is; any other multi-line message is its one line of text (:func:`console_text`)."""

    def __init__(self, log_path: Path):
        super().__init__("%(levelname)s: %(message)s")
        self.log_path = log_path

    def format(self, record: logging.LogRecord) -> str:
        args = record.args
        if isinstance(args, tuple):
            args = tuple(short_task(a) if isinstance(a, luigi.Task)
                         else "worker" if isinstance(a, str) and a.startswith("Worker(") else a
                         for a in args)
        try:
            message = record.msg % args if args else str(record.msg)
        except (TypeError, ValueError):
            message = record.getMessage()
        message = re.sub(r"Will not run (\w+)\(.*?\) or any", r"Will not run \1 or any", message,
                         count=1, flags=re.S)
        message = re.sub(r"Worker\(salt=[^)]*\)", "worker", message)
        if record.exc_info or "Traceback (most recent call last)" in message:
            message = console_text(message) + f" (traceback in {self.log_path})"
        elif "\n" in message:
            message = console_text(message)
        return f"{record.levelname}: {message}"


class _SchedulingDigest(logging.Filter):
    """The console's view of scheduling: one line instead of Luigi's one per task.

    Luigi logs ``Informed scheduler that task <id> has status <STATUS>`` for every task of the
    DAG (and again for the dependencies of every dynamic requirement), with the task ids that
    name parameters by position. The run log keeps them; the console gets, at ``Done
    scheduling tasks``, one line that says what is known then (:func:`scheduling_digest`).
    Attached to the console handler only, and only without ``--verbose``.
    """

    _STATUS = re.compile(r"Informed scheduler that task\s+(\S+)\s+has status\s+(\w+)")

    def __init__(self):
        super().__init__()
        self.status: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if "Informed scheduler that task" in message:
            found = self._STATUS.search(record.getMessage())
            if found:
                self.status.setdefault(found.group(1), found.group(2))
            return False
        if message.startswith("Done scheduling tasks") and self.status:
            record.msg, record.args = scheduling_digest(self.status), ()
            self.status = {}
        return True


def _family_of(task_id: str) -> str:
    """The task family a Luigi task id starts with (``<family>_<parameters>_<hash>``)."""
    families = [name for name in luigi.task_register.Register.task_names() if task_id.startswith(f"{name}_")]
    return max(families, key=len) if families else task_id.split("_", 1)[0]


def scheduling_digest(status: dict[str, str]) -> str:
    """``scheduled N tasks: K to run, M up to date`` from Luigi's status per task id, saying no
    more than scheduling knows: a task whose ``complete()`` or ``requires()`` raised (status
    UNKNOWN) failed before it could run, never "up to date"; and a pending task that will yield
    dynamic dependencies it could not list yet (:attr:`tasks.base.StageTask.dynamic_requirements`:
    the teacher cache's shards, before its examples exist) adds tasks that are not counted yet."""
    families = {task_id: _family_of(task_id) for task_id in status}
    count = {name: sum(1 for s in status.values() if s == name) for name in set(status.values())}
    n = len(status)
    parts = [f"{count.get('PENDING', 0)} to run", f"{count.get('DONE', 0)} up to date"]
    if count.get("UNKNOWN"):
        parts.append(f"{count['UNKNOWN']} failed before running (the error follows Luigi's summary)")
    parts += [f"{c} {name.lower()}" for name, c in sorted(count.items())
              if name not in ("PENDING", "DONE", "UNKNOWN")]
    scheduled = set(families.values())
    yielding: dict[tuple[str, str], int] = {}
    for task_id, state in status.items():
        try:
            cls = luigi.task_register.Register.get_task_cls(families[task_id])
        except luigi.task_register.TaskClassException:
            cls = None
        dynamic = getattr(cls, "dynamic_requirements", "")
        if state == "PENDING" and dynamic and dynamic not in scheduled:
            yielding[families[task_id], dynamic] = yielding.get((families[task_id], dynamic), 0) + 1
    extra = (" + the dynamic dependencies of " + " and ".join(
        f"{c} {family} ({dynamic})" for (family, dynamic), c in sorted(yielding.items())) + " as they appear"
             if yielding else "")
    return f"scheduled {n} task{'' if n == 1 else 's'}{extra}: {', '.join(parts)}"


class RunLog:
    """Where a ``tinykd run`` sends Luigi's log: the full log (tracebacks included) to a file,
    short lines to the console (unless verbose), and each failed task's error to a side file
    that worker processes append to, read back after the run."""

    def __init__(self, root: Path, verbose: bool):
        root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self.path = root / f"run-{stamp}-{os.getpid()}.log"
        self.errors_path = self.path.with_suffix(".errors.jsonl")
        self.verbose = verbose
        self.file_handler = logging.FileHandler(self.path)
        self.file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.console_handler = logging.StreamHandler(sys.stderr)
        if not verbose:
            self.console_handler.setFormatter(_ShortFormatter(self.path))
            self.console_handler.addFilter(_SchedulingDigest())
        else:
            self.console_handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        self.console_handler.addFilter(_OnceOnConsole())
        self.collector = _FailureCollector(self.errors_path)

    def handlers(self) -> list[logging.Handler]:
        return [self.file_handler, self.console_handler, self.collector]

    def errors(self) -> dict[str, str]:
        import json

        found: dict[str, str] = {}
        if self.errors_path.exists():
            for line in self.errors_path.read_text().splitlines():
                record = json.loads(line)
                found.setdefault(record["task"], record["error"])
        return found

    def close(self) -> None:
        for handler in self.handlers():
            handler.close()


class _FailureCollector(logging.Handler):
    """Records the error of every task Luigi reports as failed (run, complete() or requires())."""

    def __init__(self, path: Path):
        super().__init__(logging.WARNING)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        import json

        exc = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        task = next((a for a in (record.args if isinstance(record.args, tuple) else ())
                     if isinstance(a, luigi.Task)), None)
        if exc is not None and task is not None:        # run() raised (any worker process)
            label, error = short_task(task), error_text(exc)
        elif "Traceback (most recent call last)" in message:   # complete() / requires() raised
            match = re.match(r"Will not run (\w+)", message)
            label, error = (match.group(1) if match else "scheduling"), _error_line(message)
        else:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"task": label, "error": error}) + "\n")


def check_workdir(args: list[str]) -> None:
    """A URL workdir is opened and checked before anything is scheduled: an unknown protocol, a
    missing bucket, missing credentials or an unreachable endpoint is one InputError naming the
    (redacted) URL, and nothing is written anywhere."""
    if any(a in ("-h", "--help", "--help-all") for a in args):
        return
    with contextlib.ExitStack() as stack:
        try:   # the command line's --pipeline-workdir, if any, in force
            stack.enter_context(luigi.cmdline_parser.CmdlineParser.global_instance(args))
        except (Exception, SystemExit):   # a bad command line: luigi.run reports it in its words
            return
        store = workdir_store()
        if store is not None:
            store.check()


def _run_luigi(argv: list[str]):
    """Luigi's own command line (local scheduler unless one is named); ``(result, RunLog)``.

    tinykd owns the console: Luigi's log goes to ``<workdir>/logs/run-*.log`` in full and to the
    console in short lines (tasks as family and fingerprint, no tracebacks) unless ``--verbose``.
    """
    import luigi.setup_logging

    import tasks  # noqa: F401

    args = list(argv)
    verbose = "--verbose" in args
    args = [a for a in args if a != "--verbose"]
    if "--scheduler-host" not in args and "--local-scheduler" not in args:
        args.append("--local-scheduler")
    # Luigi's pid lock would make a second identical command exit 0 having done nothing,
    # even on another workdir. Stage builds lock per output instead (pipeline.locks): runs
    # on one workdir share the work stage by stage, runs on different workdirs are independent.
    if "--no-lock" not in args:
        args.append("--no-lock")
    level = "INFO"   # Luigi's default, DEBUG, logs every completeness check
    for i, arg in enumerate(args):
        if arg == "--log-level" and i + 1 < len(args):
            level = args[i + 1]
        elif arg.startswith("--log-level="):
            level = arg.split("=", 1)[1]
    check_workdir(args)
    run_log = RunLog(workdir() / "logs", verbose)
    hold = _HoldSummary()
    interface_logger = logging.getLogger("luigi-interface")
    tinykd_logger = logging.getLogger("tinykd")
    saved = (list(interface_logger.handlers), interface_logger.level, interface_logger.propagate,
             list(tinykd_logger.handlers), tinykd_logger.level, luigi.setup_logging.InterfaceLogging._configured)
    # Luigi would add its own console handler (with tracebacks); ours replace it for this run.
    luigi.setup_logging.InterfaceLogging._configured = True
    interface_logger.handlers = run_log.handlers()
    interface_logger.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    interface_logger.propagate = False
    tinykd_logger.handlers = [run_log.file_handler, run_log.console_handler]
    tinykd_logger.setLevel(logging.INFO)
    interface_logger.addFilter(hold)
    try:
        with warnings.catch_warnings():   # Python warnings: to the run log, and once to the console
            warnings.showwarning = _log_warning
            return luigi.run(cmdline_args=args, detailed_summary=True), run_log
    finally:
        interface_logger.removeFilter(hold)
        (interface_logger.handlers, level_before, interface_logger.propagate, tinykd_logger.handlers,
         tinykd_level, luigi.setup_logging.InterfaceLogging._configured) = saved
        interface_logger.setLevel(level_before)
        tinykd_logger.setLevel(tinykd_level)
        run_log.close()


def one_line(exc: BaseException) -> str:
    """An exception as one line: an InputError's ``file:line: problem``, else ``Type: message``."""
    text = str(exc) if isinstance(exc, (InputError, luigi.parameter.ParameterException)) \
        else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ValueError) and "Error when parsing" in str(exc) and exc.__cause__ is not None:
        text = f"{exc} ({exc.__cause__})"   # which value, and what is wrong with it
    return " ".join(text.split()) or type(exc).__name__


def error_text(exc: BaseException) -> str:
    """What the console says of an error: :func:`one_line`, except that several input problems
    (:class:`~pipeline.errors.InputErrors`) keep one line each."""
    if isinstance(exc, InputErrors):
        return str(exc)
    return one_line(exc)


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
    store = workdir_store()
    where = store.display if store is not None else workdir()
    print(f"(checked in {time.perf_counter() - started:.2f} s; workdir {where})")
    return 0


def referenced_outputs(root: luigi.Task) -> set[Path]:
    """The output directories of every stage in ``root``'s DAG (``<stage>/<fingerprint>`` on a store)."""
    on_store = workdir_store() is not None
    return {task.store_rel() if on_store else task.output_dir()
            for task in walk_dag(root) if isinstance(task, StageTask)}


def unreferenced_outputs(referenced: set[Path]) -> list[Path]:
    """Entries under the workdir that ``gc --delete`` would remove, given the ``referenced`` outputs.

    Partial directories of referenced fingerprints are kept (a resumable stage continues from
    them); so is anything a live build holds (:func:`pipeline.stage.gc_plan`).
    """
    return [d.entry.path for d in gc_plan(workdir(), referenced, store=workdir_store()) if d.delete]


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
DAG (default: Ablations and ExportStudent) under ANY of them is kept. Without --config: the current configuration
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
    root_names = " and ".join(r[0] for r in roots)
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
                raise InputError(f"cannot walk the DAG of {root_names} {where}, so nothing is collected: "
                                 f"{exc}") from None
            workdirs.add(workdir_location())
    if len(workdirs) > 1:
        raise InputError(f"the configurations use different workdirs ({', '.join(map(str, sorted(workdirs)))}); "
                         "collect one workdir at a time")
    workdirs.pop()
    store = workdir_store()
    base = store.display if store is not None else workdir()
    scope = (f"any of {len(configs)} configurations ({', '.join(configs)})" if len(configs) > 1
             else f"--config {configs[0]}" if configs else "the current configuration")
    because = f"not referenced by {root_names} under {scope}"
    decisions = gc_plan(workdir(), referenced, older_than=older_than, unreferenced_because=because,
                        store=store)
    print(f"gc of {base}: keeping what {root_names} references under {scope}"
          + (f", and anything changed within {human_age(older_than)}" if older_than else ""))
    total = count = locks = 0
    for decision in decisions:
        entry = decision.entry
        if not decision.delete:
            print(f"{'kept':<12}  {_human_bytes(entry.bytes):>10}  {entry.path}  ({decision.reason})")
            continue
        if delete and not delete_entry(entry, store):
            print(f"{'kept':<12}  {_human_bytes(entry.bytes):>10}  {entry.path}  (kept: a build took "
                  "its lock just now)")
            continue
        total += entry.bytes
        if entry.kind == "lock":   # every build leaves one (pipeline/locks.py): counted apart
            locks += 1
        else:
            count += 1
        print(f"{'deleted' if delete else 'would delete':<12}  {_human_bytes(entry.bytes):>10}  "
              f"{entry.path}  ({decision.reason})")
    verb = "freed" if delete else "would be freed (dry run; pass --delete)"
    kept = sum(1 for d in decisions if not d.delete)
    print(f"{count} unreferenced output(s)" + (f" and {locks} build lock file(s)" if locks else "")
          + f", {_human_bytes(total)} {verb}"
          + (f"; {kept} unreferenced entr{'y' if kept == 1 else 'ies'} kept" if kept else ""))
    return 0


def cmd_inspect(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tinykd inspect", description="Summarise a teacher cache.")
    parser.add_argument("cache_dir", help="a teacher cache directory, or its URL on a store "
                                          "(s3://bucket/prefix/teacher_cache/FINGERPRINT)")
    parser.add_argument("--verify", action="store_true", help="re-checksum and re-read every shard")
    args = parser.parse_args(argv)
    from pipeline.cache.inspect_cache import inspect_cache

    from pipeline.store import is_url

    report, ok = inspect_cache(args.cache_dir if is_url(args.cache_dir) else Path(args.cache_dir),
                               verify=args.verify)
    print(report)
    return 0 if ok else 1


def cmd_speed(argv: list[str]) -> int:
    """``speed``: the deployment figures of an exported model (and its teacher): parameters,
    bytes, batch-1 latency (p50/p95, 1 thread and every core), batch-32 throughput, bf16 GPU
    throughput on CUDA, and the ratios teacher / student (:mod:`distill.speed`)."""
    parser = argparse.ArgumentParser(
        prog="tinykd speed", description="Size and speed of an exported model (save_pretrained "
                                         "directory, e.g. a distill_stage2 output's student/), "
                                         "against its teacher with --against.")
    parser.add_argument("student_dir", help="the model directory (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--against", metavar="TEACHER_DIR", help="the teacher to compare with, "
                                                                 "measured in the same run")
    parser.add_argument("--dev", metavar="PATH", help="sentences at their real lengths: a prepared "
                        "data output (its dev.parquet), a .parquet with text_a (and text_b), or a "
                        "text file with one sentence per line; default: --length")
    parser.add_argument("--length", type=int, default=64, help="without --dev: random token ids of "
                        "this fixed length (default 64, the paper's)")
    parser.add_argument("--max-seq-length", type=int, default=128, help="with --dev: truncation length")
    parser.add_argument("--sentences", type=int, default=32, help="sentences timed (default 32; "
                        "with --dev evenly spaced over the file, 0: all)")
    parser.add_argument("--runs", type=int, default=3, help="timed calls per sentence after warm-up")
    parser.add_argument("--device", default="auto", help="bf16 throughput device: auto (CUDA when "
                        "present), none, or a device such as cuda:1")
    parser.add_argument("--json", action="store_true", help="print the record as one JSON line too")
    args = parser.parse_args(argv)
    import json

    from distill.speed import (SpeedSettings, describe_deployment, fixed_length_sentences,
                               measure_deployment, sentences_from_path)

    settings = SpeedSettings(runs=args.runs, max_sentences=args.sentences, accelerator=args.device)
    if args.dev:
        def sentences(model):
            if model.tokenizer is None:
                raise InputError("--dev needs the model's tokenizer beside it", model.directory)
            return sentences_from_path(args.dev, model.tokenizer, args.max_seq_length, args.sentences)
    else:
        def sentences(model):
            return fixed_length_sentences(model.model.config.vocab_size, args.length, args.sentences or 32)
    record = measure_deployment(args.student_dir, args.against, sentences, settings)
    print("\n".join(describe_deployment(record)))
    if args.json:
        print(json.dumps(record, sort_keys=True))
    return 0


def cmd_demo(argv: list[str]) -> int:
    """Run the whole DAG offline on the demo task (configs/demo.cfg) and print its report.

    The demo is the ablation grid over data/demo/SST-2 (generated on first use) with the packaged
    MiniLM teacher and GloVe vectors, and the export of its headline student (``tasks.deploy.Demo``);
    Luigi's execution summary comes first, then the report, the deployable artifacts, and the
    paths of the report's files last.
    """
    args = list(argv)
    if not any(a.startswith("--PrepareData-glue-dir") for a in argv):
        from pipeline.prepare.demo_task import ensure_demo_task

        ensure_demo_task(DEMO_DATA)
        args += ["--PrepareData-glue-dir", str(DEMO_DATA)]
    result, failures = _run_luigi(["Demo", *args])
    print(result.summary_text)
    _print_failures(failures)
    if _succeeded(result):
        plain = [a for a in args if a != "--verbose"]
        with task_from_argv(["ExportStudent", *plain]) as export:
            deployable = export_summary(export)
        with task_from_argv(["Ablations", *plain]) as root:
            print(report_summary(root))
            print(deployable)
            print("\n".join(report_lines(root)))
    return 0 if _succeeded(result) else 1


def report_lines(task: luigi.Task) -> list[str]:
    """``Report files:`` and the path of each report file ``task``'s output holds
    (:attr:`~tasks.base.StageTask.report_files`, then a ``submission/`` directory's files); []
    for a task that writes no report."""
    names = getattr(task, "report_files", ())
    if not names:
        return []
    out = task.readable_dir()   # with a URL workdir: fetched once into scratch
    paths = [out / name for name in names if (out / name).exists()]
    if (out / "submission").is_dir():
        paths += sorted((out / "submission").iterdir())
    return ["Report files:", *(f"  {path}" for path in paths)] if paths else []


def report_summary(task: luigi.Task) -> str:
    """The ablation report's Markdown and the teacher-vs-student line (its files' paths:
    :func:`report_lines`)."""
    import json

    from tasks.ablations import teacher_and_student

    out = task.readable_dir()
    summary = json.loads((out / "summary.json").read_text())
    return "\n".join([f"\n{(out / 'ablations.md').read_text()}", teacher_and_student(summary)])


def export_summary(task: luigi.Task) -> str:
    """The deployable student: its artifacts' paths, parity, int8 and speed lines."""
    from pipeline.deploy.onnx_export import describe_export

    out = task.readable_dir()
    files = "\n".join(f"  {path}" for path in [task.requires()["student"].readable_dir() / "student"]
                      + sorted(out.glob("*.onnx")))
    lines = "\n".join(describe_export(task.manifest()["info"]))
    return f"\nDeployable student (README: Deploying the student):\n{files}\n{lines}"


COMMANDS = {"run": cmd_run, "explain": cmd_explain, "gc": cmd_gc, "inspect": cmd_inspect,
            "speed": cmd_speed, "demo": cmd_demo}


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
        print(f"tinykd {argv[0]}: {error_text(exc)}", file=sys.stderr)
        return 2
    except ValueError as exc:
        # Luigi wraps a configuration value it cannot parse in a ValueError whose cause says why
        if "--verbose" in argv or "Error when parsing" not in str(exc):
            raise
        print(f"tinykd {argv[0]}: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
