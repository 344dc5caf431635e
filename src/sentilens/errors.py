"""User-facing errors: one line naming the file (and line) and the problem; the CLI exits 2."""

from __future__ import annotations

from pathlib import Path


class SentilensError(Exception):
    """A mistake in the user's input (a file, a row, an option), never a bug in sentilens.

    ``str(err)`` is the whole message the user sees: ``path:line: problem``.
    """

    def __init__(self, problem: str, path: str | Path | None = None, line: int | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        self.line = line
        where = self.path or ""
        if where and line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {problem}" if where else problem)
