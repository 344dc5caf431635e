"""Decoding the text files of raw datasets, whose bytes come in mixed encodings (issue 2).

MVSA and CrisisMMD were scraped from Twitter and saved by different tools: most files are
UTF-8, but many MVSA ``ID.txt`` files are Windows-1252 (curly quotes, emoji lost to ``?``) and
a few hold bytes that are valid in no common encoding. A reader must never crash on them.

The rule, per file and then per line: UTF-8 (a leading byte-order mark is dropped); where the
bytes are not valid UTF-8, Windows-1252, the encoding such tweets were re-saved in; where even
that fails (five byte values are undefined in it), Latin-1, which maps every byte to a
character. Decoding line by line keeps a file whose lines were appended by different tools
readable in full: a newline byte is the same in all three encodings, so splitting on it first
is safe.
"""

from __future__ import annotations

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


def decode_text(data: bytes) -> str:
    """Decode a whole file's bytes; lines that are not UTF-8 fall back one by one (see module doc)."""
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
        return decode_text(path.read_bytes())
    except FileNotFoundError:
        raise SentilensError("no such file", path) from None
    except OSError as err:
        raise SentilensError(f"cannot read file ({err.strerror or err})", path) from None
