"""Decoding the text files of raw datasets, whose bytes come in mixed encodings (issue 2).

MVSA and CrisisMMD were scraped from Twitter and saved by different tools: most files are
UTF-8, but many MVSA ``ID.txt`` files are Windows-1252 (curly quotes, emoji lost to ``?``) and
a few hold bytes that are valid in no common encoding. A reader must never crash on them.

A UTF-16 file with a byte-order mark is decoded as UTF-16. Else the rule, per file and then per
line: UTF-8 (a leading byte-order mark is dropped); where the bytes are not valid UTF-8,
Windows-1252, the encoding such tweets were re-saved in; where even that fails (five byte values are
undefined in it), Latin-1, which maps every byte to a character. Decoding line by line keeps a file
whose lines were appended by different tools readable in full: a newline byte is the same in all
three encodings, so splitting on it first is safe.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

from sentilens.errors import SentilensError


def decode_line(data: bytes) -> str:
    """Decode one line's bytes: UTF-8, else Windows-1252, else Latin-1 (which never fails)."""
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")


UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def decode_text(data: bytes, path: str | Path = "") -> str:
    """Decode a whole file's bytes; lines that are not UTF-8 fall back one by one (see module doc).

    A UTF-16 file with its byte-order mark (as Windows tools save "Unicode" text) is decoded as
    such: read byte by byte it gave a garbled "missing column" message.
    """
    if data.startswith(UTF16_BOMS):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as err:
            raise SentilensError(f"starts like UTF-16 but is not valid UTF-16 ({err.reason})", path) from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\n".join(decode_line(line) for line in data.split(b"\n"))


def read_text(path: str | Path) -> str:
    """The decoded contents of a text file; :class:`SentilensError` naming it if it cannot be read."""
    path = Path(path)
    try:
        return decode_text(path.read_bytes(), path)
    except FileNotFoundError:
        raise SentilensError("no such file", path) from None
    except OSError as err:
        raise SentilensError(f"cannot read file ({err.strerror or err})", path) from None


def read_table_text(path: str | Path) -> str:
    """:func:`read_text` for a file of rows (a table, a JSONL of posts): text with NUL characters is refused by
    name, as UTF-16 without a byte-order mark or a binary file (no row could be read from it)."""
    text = read_text(path)
    if "\x00" in text[:4096]:
        raise SentilensError("holds NUL bytes: UTF-16 without a byte-order mark, or not a text file; save it as "
                             "UTF-8", path)
    return text


def csv_records(text: str, delimiter: str) -> Iterator[tuple[int, list[str] | str]]:
    """``(line number, fields)`` of each CSV/TSV record, or ``(line number, problem)`` for a record the csv
    module refuses (a field over its 131,072-character limit, a stray NUL): one bad record is one bad row,
    and the records after it are still read."""
    # A text stream with newline="" splits records on \n, \r and \r\n only and hands the csv module each line
    # ending as it is: str.splitlines also split on U+2028 and U+0085 (cutting an unquoted row in two) and
    # dropped the line endings, so a quoted field lost the characters it held.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield reader.line_num, f"unreadable record ({err})"
            continue
        yield reader.line_num, fields


CHARS_PER_TOKEN = 128
"""Characters one token may stand for, at most, in the budget :func:`clip_text` cuts a text to. It is above
the longest piece of every vocabulary sentilens runs: 18 characters in all-MiniLM-L6-v2's WordPiece, 16 in
LLaVA-1.5's and LLaVA-NeXT's SentencePiece, 81 in SmolVLM's byte-level BPE (runs of ``#`` and of spaces
after a newline, learnt from code), and above the 100 characters past which WordPiece turns a whole word
into one unknown token. So a post's first (or last) ``max_tokens`` tokens lie inside the cut and the model
reads the tokens it read before; only text made to defeat it (runs of thousands of spaces, which tokenizers
drop) gives other tokens, and it is cut all the same."""


def clip_text(text: str, max_tokens: int, keep: str = "start") -> str:
    """``text`` cut to ``max_tokens`` x :data:`CHARS_PER_TOKEN` characters before it is tokenized, keeping its
    ``start`` (tokenizers truncating on the right) or its ``end`` (on the left). Tokenizing costs memory and
    time in the length of the whole text, before any truncation to ``max_tokens`` happens."""
    budget = max(max_tokens, 0) * CHARS_PER_TOKEN
    if len(text) <= budget:
        return text
    return text[:budget] if keep == "start" else text[len(text) - budget:]
