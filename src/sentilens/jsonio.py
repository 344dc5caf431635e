"""The strict JSON writer and the JSON Lines splitter; reading strictly is :func:`sentilens.validation.parse_json`.

Writing (:func:`dumps`): strict JSON only. Python's ``json`` writes ``NaN`` and ``Infinity`` bare,
which no other JSON parser accepts, and a string holding a lone surrogate (a ``--text`` argument
of bytes that are not UTF-8 becomes one) cannot be encoded at all, failing mid-file; both are a
one-line :class:`SentilensError` before a byte is written. What :func:`dumps` writes,
:func:`sentilens.validation.parse_json` reads back.

JSON Lines (:func:`jsonl_lines`) are split on ``"\\n"`` only: ``str.splitlines`` also splits on U+2028,
U+0085 and eight other characters that JSON strings may hold unescaped, which cut one row in two.
"""

from __future__ import annotations

import json
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


def jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of each non-blank line of JSON Lines text, split on ``"\\n"`` only."""
    for line_no, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield line_no, line
