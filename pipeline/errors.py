"""The one exception type for bad user input (files, rows, checkpoints, configurations), and
the one rule for names that become file names or table cells (:func:`check_plain_name`)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence


class InputError(ValueError):
    """Bad input, with enough context to fix it: ``<file>:<line>: <problem>``.

    Raised before any output is published; the stage contract removes the partial output.
    """

    def __init__(self, problem: str, path: str | Path | None = None, line: int | None = None):
        self.problem = problem
        self.path = str(path) if path is not None else None
        self.line = line
        where = self.path or ""
        if line is not None:
            where = f"{where}:{line}" if where else f"line {line}"
        super().__init__(f"{where}: {problem}" if where else problem)


class InputErrors(InputError):
    """Several problems found by a check that looks at everything before it fails (the GLUE
    pre-flight over every task): one error whose message lists each problem, with its file, on
    a line of its own, so that a user fixes them all in one pass instead of one per rerun.
    ``problems`` holds them as :class:`InputError` objects."""

    def __init__(self, problems: Sequence[InputError], what: str = ""):
        flat = [p for e in problems for p in (e.problems if isinstance(e, InputErrors) else [e])]
        self.problems = flat
        header = f"{len(flat)} problems" + (f" {what}" if what else "") + ":"
        super().__init__(header + "".join(f"\n- {problem}" for problem in flat))


def raise_problems(problems: Sequence[InputError], what: str = "") -> None:
    """Raise nothing for no problem, the one problem as it is, several as :class:`InputErrors`."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise InputErrors(problems, what)


#: A plain name: letters, digits, ``_`` and ``-``, starting with a letter or digit, at most 64
#: characters. GLUE's own names (``SST-2``, ``STS-B``) qualify; ``../x``, ``a/b``, names with
#: ``|`` or a newline (which would break a Markdown table row) do not.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_plain_name(name: object, what: str, path: str | Path | None = None) -> str:
    """Return ``name`` if it is a plain name (:data:`PLAIN_NAME`), else raise :class:`InputError`.

    Task and ablation-variant names end up in file names (``reports/<task>.md``) and in
    Markdown tables, so they must never be paths or carry markup.
    """
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise InputError(f"{what} {name!r} is not a plain name: use letters, digits, '_' and "
                         "'-' (at most 64, starting with a letter or digit)", path)
    return name
