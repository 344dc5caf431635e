"""The one JSON reader and writer of the files sentilens makes and reads back: strict both ways.

Writing (:func:`dumps`): strict JSON only. Python's ``json`` writes ``NaN`` and ``Infinity`` bare,
which no other JSON parser accepts, and a string holding a lone surrogate (a ``--text`` argument
of bytes that are not UTF-8 becomes one) cannot be encoded at all, failing mid-file; both are a
one-line :class:`SentilensError` before a byte is written.

Reading (:func:`loads`): what :func:`dumps` could not have written is refused with the line
number: ``NaN`` / ``Infinity``, numbers too large for a float (``1e999`` would read as infinity),
lone surrogates (``"\\ud800"``, valid JSON syntax but no character), nesting deep enough to
exhaust the parser's recursion.

JSON Lines (:func:`jsonl_lines`) split on ``"\\n"`` only: ``str.splitlines`` also splits on U+2028,
U+0085 and eight other characters that JSON strings may hold unescaped, which cut one row in two.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

from sentilens.errors import SentilensError

_SURROGATE = re.compile("[\ud800-\udfff]")


def dumps(obj: object, indent: int | None = None, path: str | Path | None = None) -> str:
    """``obj`` as strict JSON text (UTF-8 characters kept as they are); NaN, infinity or a lone surrogate is a
    :class:`SentilensError` naming ``path`` (the file it was meant for), never a file sentilens cannot read."""
    try:
        text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)
    except ValueError as err:  # allow_nan=False: "Out of range float values are not JSON compliant"
        raise SentilensError(f"not written: a value is NaN or infinite, which JSON cannot hold ({err})", path) from None
    found = _SURROGATE.search(text)
    if found:
        raise SentilensError(f"not written: a string holds the lone surrogate U+{ord(found.group()):04X}, which is "
                             "not a character (text that was not valid UTF-8?)", path)
    return text


class _Refused(ValueError):
    """A value the parser hooks refuse; its message is the reason."""


def _no_constant(name: str) -> object:
    raise _Refused(f"{name} is not a JSON number")


def _finite(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise _Refused(f"the number {literal[:40]} is too large for a float")
    return value


def loads(text: str) -> object:
    """Parse strict JSON; raises ``ValueError`` with a short reason (:func:`parse_row` adds the file and line)."""
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg})") from None
    except RecursionError:
        raise ValueError("not valid JSON (nested too deeply)") from None
    except _Refused:
        raise
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise ValueError("a number has too many digits") from None
    if ("\\u" in text or _SURROGATE.search(text)) and _has_surrogate(value):
        raise ValueError("a string holds a lone surrogate (\\ud800-\\udfff), which is not a character")
    return value


def _has_surrogate(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_row(line: str, path: str | Path, line_no: int) -> object:
    """One JSON Lines row, or a :class:`SentilensError` naming the file and line."""
    try:
        return loads(line)
    except ValueError as err:
        raise SentilensError(str(err), path, line_no) from None


def jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of each non-blank line of JSON Lines text, split on ``"\\n"`` only."""
    for line_no, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield line_no, line
