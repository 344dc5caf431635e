"""The one markdown-table helper (the report, the fusion ablation and the benchmarks print their tables with
it) and :func:`printable`, which every table and message quoting a user's value passes it through."""

from __future__ import annotations

from collections.abc import Sequence

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(value: object) -> str:
    """``str(value)`` with every character a terminal would not print as itself written as an escape.

    Control characters (ESC starts colour and window-title sequences, CR rewrites a line), format
    characters (right-to-left overrides reorder what follows, zero-width ones hide), line and paragraph
    separators, unassigned code points and lone surrogates become ``\\n``, ``\\x1b``, ``\\u202e``...: an id
    or a label is shown as what it holds, and cannot restyle the terminal or break a table's row.
    Backslashes stay as they are (Windows paths read as written).
    """
    text = str(value)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _NAMED.get(char) or _escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def cell(value: object) -> str:
    """A table cell: floats with 4 decimals (fractions in [0, 1] read alike everywhere), None empty; other values
    :func:`printable`, with ``|`` escaped so that it cannot end the cell."""
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else printable(value).replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; columns holding only numbers are right-aligned."""
    def numeric(column: int) -> bool:
        values = [row[column] for row in rows if row[column] is not None and row[column] != ""]
        return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)

    rule = ["---:" if numeric(i) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
