"""Post records and the manifest folder (design.md, "Manifest").

A manifest folder holds ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` and ``stats.json``.
A row is ``{"id", "text", "image", "label", "meta"}``; ``image`` is a path, absolute or
relative to the manifest folder, or null for a text-only post; labels are words.
``stats.json`` holds the label order, counts per split x label, and every dropped item
with its reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from sentilens.errors import SentilensError
from sentilens.jsonio import jsonl_lines
from sentilens.outputs import input_problem, write_json, write_jsonl
from sentilens.validation import parse_json

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Post:
    """One social-media post: a text, an optional image path, and (for labelled data) a label."""

    id: str
    text: str
    image: str | None = None
    label: str | None = None
    meta: dict = field(default_factory=dict)

    def to_row(self, relative_to: Path | None = None) -> dict:
        image = self.image
        if image is not None and relative_to is not None:
            try:
                image = str(Path(image).resolve().relative_to(relative_to.resolve()))
            except ValueError:
                image = str(Path(image).resolve())
        return {"id": self.id, "text": self.text, "image": image, "label": self.label, "meta": self.meta}


@dataclass(frozen=True)
class Dropped:
    """An item a reader skipped, and why (kept in ``stats.json``)."""

    id: str
    reason: str
    source: str = ""


@dataclass
class RawDataset:
    """What a reader returns: labelled posts (images not yet opened), what it dropped, the label order.

    ``fixed_split`` maps a post id to its split where the source fixes it (CrisisMMD's official
    files, a table's ``split`` column); ``group_of`` keeps posts of one group (one tweet's
    images) in the same split when sentilens splits; ``source`` is provenance for ``stats.json``.
    """

    labels: list[str]
    posts: list[Post]
    dropped: list[Dropped]
    fixed_split: dict[str, str] | None = None
    group_of: Callable[[Post], str] | None = None
    source: dict = field(default_factory=dict)


def path_escapes(relative: str) -> str | None:
    """Why ``relative``, a path a data set names inside its own folder, would lead out of it (absolute, or
    climbing with ``..``), else None. Readers drop such rows: a tampered label file must not pull files from
    elsewhere on the machine into a manifest."""
    if not relative:
        return None
    if relative.startswith(("/", "\\")) or PureWindowsPath(relative).drive or Path(relative).is_absolute():
        return f"'{relative}' is an absolute path"
    if ".." in PurePosixPath(relative.replace("\\", "/")).parts:
        return f"'{relative}' climbs out of the data set's folder with '..'"
    return None


def post_from_row(row: object, path: Path, line: int, base: Path) -> Post:
    """Validate one JSON row; image paths are resolved against ``base``."""
    if not isinstance(row, dict):
        raise SentilensError("a row must be a JSON object", path, line)
    for key in ("id", "text"):
        if key not in row:
            raise SentilensError(f"missing field '{key}'", path, line)
    if not isinstance(row["id"], str) or not row["id"]:
        # Coerced, null became "None" and 1 and 1.0 the same "1": a predictions file could not be matched back.
        raise SentilensError(f"'id' must be a non-empty string, got {json.dumps(row['id'])[:40]}", path, line)
    text, image, label = row["text"], row.get("image"), row.get("label")
    if not isinstance(text, str):
        raise SentilensError("'text' must be a string", path, line)
    if image is not None and not isinstance(image, str):
        raise SentilensError("'image' must be a path string or null", path, line)
    if label is not None and not isinstance(label, str):
        raise SentilensError("'label' must be a word or null", path, line)
    meta = row.get("meta") or {}
    if not isinstance(meta, dict):
        raise SentilensError("'meta' must be an object", path, line)
    if image:
        image = str(Path(image) if Path(image).is_absolute() else (base / image))
    return Post(id=row["id"], text=text, image=image or None, label=label, meta=meta)


def read_posts(path: str | Path) -> list[Post]:
    """Read a JSONL file of posts (a manifest split or a user's ``posts.jsonl``)."""
    path = Path(path)
    problem = input_problem(path, "a JSONL file of posts")  # a FIFO would block the read, a folder fail it
    if problem:
        raise SentilensError(problem, path)
    return [post_from_row(parse_json(line, path, line_no), path, line_no, path.parent)
            for line_no, line in jsonl_lines(_jsonl_text(path))]


def _jsonl_text(path: Path) -> str:
    """A JSONL file's text: UTF-8 (JSON's encoding), or UTF-16 with its byte-order mark; anything else is a
    one-line error naming the file, not a decoding traceback."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-16") if data.startswith((b"\xff\xfe", b"\xfe\xff")) else data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SentilensError(f"not UTF-8 text (byte {err.start} cannot be decoded); save it as UTF-8", path) from None
    if "\x00" in text[:4096]:
        raise SentilensError("holds NUL bytes: UTF-16 without a byte-order mark, or not a text file", path)
    return text


def read_split(manifest_dir: str | Path, split: str) -> list[Post]:
    """Read one split of a manifest folder; every label must be in ``stats.json``'s label list."""
    manifest_dir = Path(manifest_dir)
    if split not in SPLITS:
        raise SentilensError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    labels = read_labels(manifest_dir)
    path = manifest_dir / f"{split}.jsonl"
    posts = read_posts(path)
    for i, post in enumerate(posts, start=1):
        if post.label is not None and post.label not in labels:
            raise SentilensError(f"label '{post.label}' is not one of {labels}", path, i)
    return posts


def read_manifest(manifest_dir: str | Path) -> dict[str, list[Post]]:
    """All three splits of a manifest folder."""
    return {split: read_split(manifest_dir, split) for split in SPLITS}


def read_stats(manifest_dir: str | Path) -> dict:
    path = Path(manifest_dir) / "stats.json"
    if not path.is_file():
        raise SentilensError("no stats.json here: is this a manifest folder made by 'sentilens data prepare'?",
                             Path(manifest_dir))
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SentilensError(f"not valid JSON ({err.msg})", path, err.lineno) from None
    if not isinstance(stats, dict) or not isinstance(stats.get("labels"), list):
        raise SentilensError("missing the 'labels' list", path)
    return stats


def read_labels(manifest_dir: str | Path) -> list[str]:
    """The fixed label order of a manifest folder."""
    return list(read_stats(manifest_dir)["labels"])


def write_manifest(
    out_dir: str | Path,
    splits: dict[str, Sequence[Post]],
    labels: Sequence[str],
    dropped: Iterable[Dropped] = (),
    source: dict | None = None,
) -> dict:
    """Write the three split files and ``stats.json``; returns the stats written.

    Image paths are stored relative to ``out_dir`` where they lie below it, else absolute.
    """
    out_dir = Path(out_dir)
    labels = list(labels)
    counts = {}
    for split in SPLITS:
        posts = splits.get(split, [])
        write_jsonl(out_dir / f"{split}.jsonl", (post.to_row(out_dir) for post in posts))
        counts[split] = {label: sum(p.label == label for p in posts) for label in labels}
    dropped = list(dropped)
    stats = {
        "labels": labels,
        "counts": counts,
        "totals": {split: sum(c.values()) for split, c in counts.items()},
        "dropped": [{"id": d.id, "reason": d.reason, "source": d.source} for d in dropped],
        "source": source or {},
    }
    write_json(out_dir / "stats.json", stats)
    return stats
