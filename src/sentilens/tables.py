"""The one markdown-table helper: the report, the fusion ablation and the benchmarks print their tables with it."""

from __future__ import annotations

from collections.abc import Sequence


def cell(value: object) -> str:
    """A table cell: floats with 4 decimals (fractions in [0, 1] read alike everywhere), None empty."""
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; columns holding only numbers are right-aligned."""
    def numeric(column: int) -> bool:
        values = [row[column] for row in rows if row[column] is not None and row[column] != ""]
        return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)

    rule = ["---:" if numeric(i) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
