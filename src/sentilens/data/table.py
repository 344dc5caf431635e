"""Reader of a user's own labelled table: CSV, TSV or JSONL with ``id, text, image, label`` (issue 2).

- ``.csv`` / ``.tsv``: a header row naming the columns (any order, any case); ``id``, ``text``
  and ``label`` are required, ``image`` and ``split`` optional, other columns go to ``meta``.
- ``.jsonl``: one JSON object per line with the same keys (a ``meta`` object is merged in).

``image`` is a path, absolute or relative to the table's folder; empty or absent means a
text-only post (``image: null``). If the table has a ``split`` column its values
(``train``, ``val`` or ``dev``, ``test``) are kept, else sentilens splits 8:1:1 per class,
seeded. Label order: the sentiment trio's order (positive, neutral, negative) when every
label is one of those, else the order of first appearance in the file.

A bad row (missing id or label, unknown split, invalid JSON, wrong field count, repeated id)
is dropped with a reason; only a file with no usable row is an error.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from sentilens.data.records import Dropped, Post, RawDataset
from sentilens.data.text import read_text
from sentilens.errors import SentilensError

SENTIMENTS = ("positive", "neutral", "negative")
REQUIRED = ("id", "text", "label")
SPLIT_NAMES = {"train": "train", "val": "val", "dev": "val", "valid": "val", "validation": "val", "test": "test"}


class _BadRow(ValueError):
    """A table row this reader cannot use; its message is the drop reason."""


def read_table(path: str | Path) -> RawDataset:
    """Posts of a CSV, TSV or JSONL table (see module doc)."""
    path = Path(path)
    if not path.is_file():
        raise SentilensError("no such file (for --format table, --root is the CSV/TSV/JSONL file)", path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        rows, has_split = _csv_rows(path, "\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".ndjson"):
        rows, has_split = _jsonl_rows(path)
    else:
        raise SentilensError(f"unknown table type '{suffix}' (use .csv, .tsv or .jsonl)", path)

    posts: list[Post] = []
    dropped: list[Dropped] = []
    fixed_split: dict[str, str] = {}
    seen: dict[str, int] = {}
    first_error: tuple[int, str] | None = None
    for line_no, row in rows:
        where = f"{path}:{line_no}"
        try:
            post, split = _post(row, path.parent, has_split)
        except _BadRow as err:
            first_error = first_error or (line_no, str(err))
            row_id = row.get("id") if isinstance(row, dict) else None
            dropped.append(Dropped(str(row_id) if row_id not in (None, "") else f"line {line_no}",
                                   f"malformed row: {err}", where))
            continue
        if post.id in seen:
            dropped.append(Dropped(post.id, f"duplicate id: first listed on line {seen[post.id]}", where))
            continue
        seen[post.id] = line_no
        posts.append(post)
        if split is not None:
            fixed_split[post.id] = split
    if not posts:
        if first_error is None:
            raise SentilensError("no rows", path)
        raise SentilensError(f"no usable row; first problem: {first_error[1]}", path, first_error[0])
    source = {"table": str(path), "split_column": has_split}
    return RawDataset(labels=label_order([p.label for p in posts]), posts=posts, dropped=dropped,
                      fixed_split=fixed_split if has_split else None, source=source)


def label_order(labels: list[str]) -> list[str]:
    """The trio's order if every label is a sentiment word, else the order of first appearance."""
    present = list(dict.fromkeys(labels))
    if set(present) <= set(SENTIMENTS):
        return [label for label in SENTIMENTS if label in present]
    return present


def _csv_rows(path: Path, delimiter: str) -> tuple[list[tuple[int, dict | str]], bool]:
    reader = csv.reader(read_text(path).splitlines(), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        raise SentilensError("empty file (expected a header row with id, text, label)", path, 1)
    names = [name.strip().lower() for name in header]
    missing = [name for name in REQUIRED if name not in names]
    if missing:
        raise SentilensError(f"missing column(s) {', '.join(missing)} in the header (found: {', '.join(names)})",
                             path, 1)
    rows: list[tuple[int, dict | str]] = []
    for fields in reader:
        if not any(field.strip() for field in fields):
            continue
        if len(fields) != len(names):
            rows.append((reader.line_num, f"{len(fields)} fields, header has {len(names)}"))
        else:
            rows.append((reader.line_num, dict(zip(names, fields, strict=True))))
    return rows, "split" in names


def _jsonl_rows(path: Path) -> tuple[list[tuple[int, dict | str]], bool]:
    rows: list[tuple[int, dict | str]] = []
    for line_no, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            rows.append((line_no, f"not valid JSON ({err.msg})"))
            continue
        rows.append((line_no, row if isinstance(row, dict) else "not a JSON object"))
    has_split = any(isinstance(row, dict) and "split" in row for _, row in rows)
    return rows, has_split


def _post(row: dict | str, base: Path, has_split: bool) -> tuple[Post, str | None]:
    if isinstance(row, str):
        raise _BadRow(row)
    values = {key: _word(row.get(key), key) for key in ("id", "label", "split")}
    for key in ("id", "label"):
        if not values[key]:
            raise _BadRow(f"missing {key}")
    text = row.get("text")
    if not isinstance(text, str):
        raise _BadRow("missing text" if text is None else "'text' must be a string")
    image = row.get("image")
    if image is not None and not isinstance(image, str):
        raise _BadRow("'image' must be a path or empty")
    split = None
    if has_split:
        split = SPLIT_NAMES.get(values["split"].lower())
        if split is None:
            raise _BadRow(f"split '{values['split']}' is not train, val, dev or test")
    meta = dict(row["meta"]) if isinstance(row.get("meta"), dict) else {}
    meta.update({key: value for key, value in row.items() if key not in ("id", "text", "image", "label", "split",
                                                                          "meta")})
    image = image.strip() if image else ""
    return Post(id=values["id"], text=text.strip(), image=str(base / image) if image else None,
                label=values["label"], meta=meta), split


def _word(value: object, key: str) -> str:
    """A string or integer cell as a stripped string ('' when absent)."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _BadRow(f"'{key}' must be a string")
    return str(value).strip()
