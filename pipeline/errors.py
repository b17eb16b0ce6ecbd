"""The one exception type for bad user input (files, rows, checkpoints, configurations)."""
from __future__ import annotations

from pathlib import Path


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
