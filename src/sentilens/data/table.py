"""Reader of a user's own labelled table: CSV, TSV or JSONL with ``id, text, image, label`` (issue 2).

- ``.csv`` / ``.tsv``: a header row naming the columns (any order, any case); ``id``, ``text``
  and ``label`` are required, ``image`` and ``split`` optional, other columns go to ``meta``.
- ``.jsonl``: one JSON object per line with the same keys (a ``meta`` object is merged in).

``image`` is a path, absolute or relative to the table's folder; empty or absent means a
text-only post (``image: null``). A row's ``split`` value (``train``, ``val`` or ``dev``,
``test``) is kept; rows without one (no such column, an empty cell, a JSONL row without the
key) are split by sentilens, 8:1:1 per class, seeded. Label order: the sentiment trio's order
(positive, neutral, negative) when every label is one of those, else the order of first
appearance in the file. Labels differing only in case are one label; a rare near-spelling of a
frequent label is a suspected typo (see :func:`reconcile_labels`).

A bad row (missing id or label, unknown split, invalid JSON, wrong field count, a record the
csv module refuses, repeated id, suspected label typo) is dropped with a reason; only a file
with no usable row is an error.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

from sentilens.data.labels import SENTIMENT_LABELS
from sentilens.data.records import Dropped, Post, RawDataset
from sentilens.data.text import csv_records, read_table_text
from sentilens.errors import SentilensError
from sentilens.jsonio import jsonl_lines
from sentilens.outputs import input_problem
from sentilens.validation import clean_label, parse_json

REQUIRED = ("id", "text", "label")
SPLIT_NAMES = {"train": "train", "val": "val", "dev": "val", "valid": "val", "validation": "val", "test": "test"}


class _BadRow(ValueError):
    """A table row this reader cannot use; its message is the drop reason."""


def read_table(path: str | Path) -> RawDataset:
    """Posts of a CSV, TSV or JSONL table (see module doc)."""
    path = Path(path)
    problem = input_problem(path, "a CSV, TSV or JSONL file",
                            missing="no such file (for --format table, --root is the CSV/TSV/JSONL file)")
    if problem:
        raise SentilensError(problem, path)
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
            post, split = _post(row, path.parent)
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
    posts, merged, suspects = reconcile_labels(posts)
    for post, usual in suspects:
        dropped.append(Dropped(post.id, f"suspect label: '{post.label}' looks like a misspelling of '{usual}' (fix "
                                        "the row to keep it)", f"{path}:{seen[post.id]}"))
    if not posts:
        raise SentilensError("no usable row: every label looks like a misspelling of another", path)
    kept_ids = {post.id for post in posts}
    fixed_split = {post_id: split for post_id, split in fixed_split.items() if post_id in kept_ids}
    source = {"table": str(path), "split_column": has_split, "labels_merged": merged}
    return RawDataset(labels=label_order([p.label for p in posts]), posts=posts, dropped=dropped,
                      fixed_split=fixed_split or None, source=source)


def normal(label: str) -> str:
    """The spelling two labels share when they are one: NFKC, invisible characters gone, spaces and case folded."""
    return clean_label(label).casefold()


def reconcile_labels(posts: list[Post]) -> tuple[list[Post], dict[str, str], list[tuple[Post, str]]]:
    """Labels that differ only in case or spaces are one label, spelled as most rows spell it
    ("Positive" joins "positive"); a label one edit (two, for labels over five letters) from a label at
    least four times as frequent ("postive" beside "positive") is a suspected typo: its posts come back
    apart, with the label they probably meant, to be dropped with a reason instead of silently becoming a
    class of their own.

    Returns the kept posts (labels merged), ``{label as written: label used}`` for the merged spellings,
    and ``(post, probable label)`` for the suspects.
    """
    counts = Counter(post.label for post in posts)
    groups: dict[str, Counter] = {}
    for label, count in counts.items():
        groups.setdefault(normal(label), Counter())[label] = count
    usual = {label: group.most_common(1)[0][0] for group in groups.values() for label in group}
    totals: Counter = Counter()
    for label, count in counts.items():
        totals[usual[label]] += count
    typo_of = {}
    for label, count in totals.items():
        near = [other for other, n in totals.items() if other != label and n >= 4 * count
                and edit_distance(normal(label), normal(other)) <= (1 if len(other) <= 5 else 2)]
        if near:
            typo_of[label] = max(near, key=totals.__getitem__)
    kept, suspects = [], []
    for post in posts:
        label = usual[post.label]
        if label in typo_of:
            suspects.append((post, typo_of[label]))
        else:
            kept.append(post if label == post.label else replace(post, label=label))
    return kept, {written: used for written, used in usual.items() if written != used}, suspects


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance with adjacent transpositions (optimal string alignment): "postive" is 1 from
    "positive", "psoitive" 1 too."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            cost = 0 if char_a == char_b else 1
            value = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and char_a == b[j - 2] and a[i - 2] == char_b:
                value = min(value, previous2[j - 2] + 1)
            current.append(value)
        previous2, previous = previous, current
    return previous[-1]


def label_order(labels: list[str]) -> list[str]:
    """The trio's order if every label is a sentiment word, else the order of first appearance."""
    present = list(dict.fromkeys(labels))
    if set(present) <= set(SENTIMENT_LABELS):
        return [label for label in SENTIMENT_LABELS if label in present]
    return present


def _csv_rows(path: Path, delimiter: str) -> tuple[list[tuple[int, dict | str]], bool]:
    records = csv_records(read_table_text(path), delimiter)
    _, header = next(records, (1, None))
    if header is None:
        raise SentilensError("empty file (expected a header row with id, text, label)", path, 1)
    if isinstance(header, str):
        raise SentilensError(f"header row: {header}", path, 1)
    names = [name.strip().lower() for name in header]
    missing = [name for name in REQUIRED if name not in names]
    if missing:
        raise SentilensError(f"missing column(s) {', '.join(missing)} in the header (found: {', '.join(names)})",
                             path, 1)
    rows: list[tuple[int, dict | str]] = []
    for line_no, fields in records:
        if isinstance(fields, str):
            rows.append((line_no, fields))
        elif not any(field.strip() for field in fields):
            continue
        elif len(fields) != len(names):
            rows.append((line_no, f"{len(fields)} fields, header has {len(names)}"))
        else:
            rows.append((line_no, dict(zip(names, fields, strict=True))))
    return rows, "split" in names


def _jsonl_rows(path: Path) -> tuple[list[tuple[int, dict | str]], bool]:
    rows: list[tuple[int, dict | str]] = []
    for line_no, line in jsonl_lines(read_table_text(path)):  # "\n" only: U+2028 may sit inside a row
        try:
            row = parse_json(line)
        except SentilensError as err:
            rows.append((line_no, err.problem))
            continue
        rows.append((line_no, row if isinstance(row, dict) else "not a JSON object"))
    has_split = any(isinstance(row, dict) and "split" in row for _, row in rows)
    return rows, has_split


def _post(row: dict | str, base: Path) -> tuple[Post, str | None]:
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
    if values["split"]:  # a row without one is split by sentilens, whatever the other rows say
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
    """A string cell, stripped ('' when absent); a label may be an integer too. An id must be a string:
    coerced, 1 and "1" became one id (a predictions file could not be matched back to its rows)."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (key == "id" and not isinstance(value, str)):
        raise _BadRow(f"'{key}' must be a string, got {type(value).__name__} {str(value)[:40]}")
    return str(value).strip()
