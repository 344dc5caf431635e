"""``sentilens data prepare``: raw dataset -> manifest folder (issue 2; design.md, "Manifest").

Three steps, the same for every format:

1. the reader registered for the format in :data:`READERS` (``mvsa``, ``crisismmd``, ``table``)
   parses the raw files into a :class:`~sentilens.data.records.RawDataset` of labelled posts,
   dropping the items it cannot use (label conflicts, malformed rows, missing text) with a
   reason; it also gives the label order and, where the source fixes it, each post's split;
2. every referenced image is opened with :func:`sentilens.data.images.load_image`, the one
   image loader, so a missing, truncated or non-image file is found now, not mid-training:
   such a post is dropped with the loader's reason and the rest are kept;
3. the posts are split (the source's split, else :func:`sentilens.data.splits.stratified_split`,
   seeded 8:1:1 per class, near-duplicates grouped by :mod:`sentilens.data.duplicates` so that
   they never straddle splits) and written with :func:`sentilens.data.records.write_manifest`.

A dropped item's reason reads ``"<kind>: <detail>"`` (``"label conflict: text positive,
image negative"``); :func:`reason_counts` tallies the kinds for the summary table.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from sentilens.data.duplicates import group_duplicates
from sentilens.data.images import ImageError, load_image
from sentilens.data.labels import SENTIMENT_LABELS
from sentilens.data.records import SPLITS, Dropped, Post, RawDataset, write_manifest
from sentilens.data.splits import stratified_split
from sentilens.errors import SentilensError
from sentilens.outputs import check_output
from sentilens.progress import progress_bar
from sentilens.validation import clean_label, label_problem, label_skeleton

READERS: dict[str, str] = {
    "mvsa-single": "sentilens.data.mvsa:read_mvsa_single",
    "mvsa-multiple": "sentilens.data.mvsa:read_mvsa_multiple",
    "crisismmd": "sentilens.data.crisismmd:read_crisismmd",
    "table": "sentilens.data.table:read_table",
}
"""``--format`` name -> ``"module:function"`` reading a raw data set into a :class:`RawDataset`.

The function takes the root (folder, or file for ``table``) and, as keyword arguments, the
format's own options (``--task``, ``--agreed-only``): the ones its signature declares. A new
reader is one module and one line here (docs/architecture.md, "How to add a data-set reader")."""

FORMATS = tuple(READERS)


def reader_of(fmt: str) -> Callable[..., RawDataset]:
    """The reader function registered for ``fmt``."""
    if fmt not in READERS:
        raise SentilensError(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
    module_name, function = READERS[fmt].split(":")
    return getattr(importlib.import_module(module_name), function)


def reader_options(fmt: str) -> list[str]:
    """The keyword options the reader of ``fmt`` declares, in order."""
    return list(inspect.signature(reader_of(fmt)).parameters)[1:]


def read_raw(fmt: str, root: str | Path, **options: object) -> RawDataset:
    """Run the reader of ``fmt`` on ``root`` with the options given (``None`` / ``False``: not given)."""
    accepted = reader_options(fmt)
    given = {name: value for name, value in options.items() if value is not None and value is not False}
    if set(given) - set(accepted):
        lacking = list(dict.fromkeys(o for f in FORMATS for o in reader_options(f) if o not in accepted))
        takers = [f for f in FORMATS if set(given) <= set(reader_options(f))]
        flags = " and ".join("--" + name.replace("_", "-") for name in lacking)
        raise SentilensError(f"{flags} apply to --format {', '.join(takers)} only")
    return reader_of(fmt)(Path(root), **given)


def fold_labels(raw: RawDataset) -> RawDataset:
    """Labels as one class each: NFKC-normalised with invisible characters stripped (full-width or zero-width
    spellings join their label); a look-alike spelling (letters of two scripts, a stray combining mark, the
    same skeleton as a more frequent label, :mod:`sentilens.validation`) is dropped with its reason, never
    made a class of its own. ``source.labels_folded`` lists each spelling that was folded."""
    cleaned = [(post, clean_label(post.label or "")) for post in raw.posts]
    kept: list[tuple[Post, str]] = []
    dropped = list(raw.dropped)
    for post, label in cleaned:
        problem = label_problem(label)
        if problem and post.label is not None:
            dropped.append(Dropped(post.id, f"confusable label: {post.label!r} {problem}"))
        else:
            kept.append((post, label))
    counts = Counter(label for _, label in kept)
    usual: dict[str, str] = {}
    for label, _ in sorted(counts.items(), key=lambda item: -item[1]):  # the most frequent spelling wins
        usual.setdefault(label_skeleton(label), label)
    posts, folded = [], {}
    for post, label in kept:
        winner = usual[label_skeleton(label)]
        if post.label is not None and winner != label:
            dropped.append(Dropped(post.id, f"confusable label: {post.label!r} looks like {winner!r}"))
            continue
        if post.label is not None and label != post.label:
            folded[post.label] = label
            post = replace(post, label=label)
        posts.append(post)
    if not folded and len(posts) == len(raw.posts):
        return raw
    present, read = {post.label for post in posts}, {label for _, label in cleaned}
    # a label of the source's fixed list that no post uses stays; one whose every post was dropped goes
    labels = [label for label in dict.fromkeys(clean_label(label) for label in raw.labels)
              if label in present or (label not in read and not label_problem(label))]
    if set(labels) <= set(SENTIMENT_LABELS):
        labels = [label for label in SENTIMENT_LABELS if label in labels]
    source = {**raw.source, "labels_folded": folded} if folded else raw.source
    return replace(raw, labels=labels, posts=posts, dropped=dropped, source=source)


def image_problem(post: Post) -> Dropped | None:
    """Open the post's image with the one loader; a :class:`Dropped` saying why if it is unusable."""
    if post.image is None:
        return None
    try:
        load_image(post.image)
    except ImageError as err:
        if err.kind == "missing":
            return Dropped(post.id, "image missing: file not found", post.image)
        return Dropped(post.id, f"image unreadable: {err.problem}", post.image)
    return None


def check_images(posts: Sequence[Post], show_progress: bool = True) -> tuple[list[Post], list[Dropped]]:
    """Split ``posts`` into those whose image (if any) opens, and a :class:`Dropped` for each other.

    Images are decoded in a thread pool (Pillow releases the GIL while decoding); order is kept.
    """
    kept: list[Post] = []
    dropped: list[Dropped] = []
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool, progress_bar(quiet=not show_progress) as progress:
        task = progress.add_task("checking images", total=len(posts), unit="img", status="")
        for post, problem in zip(posts, pool.map(image_problem, posts), strict=True):
            if problem is None:
                kept.append(post)
            else:
                dropped.append(problem)
                progress.update(task, status=f"{len(dropped)} dropped")
            progress.advance(task)
    return kept, dropped


def prepare(
    fmt: str,
    root: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    task: str | None = None,
    agreed_only: bool = False,
    show_progress: bool = True,
    duplicates: str = "group",
) -> dict:
    """Read ``root`` in format ``fmt``, check its images, split, and write the manifest to ``out_dir``.

    ``duplicates="group"`` (default) keeps posts with the same normalised text or image bytes in one
    split (:mod:`sentilens.data.duplicates`); ``"ignore"`` splits post by post. Either way
    ``stats.json``'s ``source.duplicates`` counts the groups found.

    Returns the ``stats.json`` written. Raises :class:`SentilensError` only for problems that make
    the whole input unusable; bad single items are dropped and listed in the stats.
    """
    if duplicates not in ("group", "ignore"):
        raise SentilensError(f"--duplicates must be group or ignore, got '{duplicates}'")
    for name in (*(f"{split}.jsonl" for split in SPLITS), "stats.json"):  # before reading: fail at once
        check_output(Path(out_dir) / name, root)
    raw = fold_labels(read_raw(fmt, root, task=task, agreed_only=agreed_only))
    kept, image_dropped = check_images(raw.posts, show_progress=show_progress)
    dropped = [*raw.dropped, *image_dropped]
    if not kept:
        first = f" (first: {dropped[0].id}: {dropped[0].reason})" if dropped else ""
        raise SentilensError(f"no usable posts: all {len(dropped)} items were dropped{first}", root)
    found = group_duplicates(kept, raw.group_of)
    duplicate_stats = {**found.stats(), "handling": duplicates}
    fixed = raw.fixed_split or {}
    free = [p for p in kept if p.id not in fixed]  # posts the source gives no split: sentilens splits them
    group_of = (lambda post: found.key_of[post.id]) if duplicates == "group" else raw.group_of
    splits = stratified_split(free, seed=seed, group_of=group_of) if free else {split: [] for split in SPLITS}
    splits = {split: [p for p in kept if fixed.get(p.id) == split] + splits[split] for split in SPLITS}
    seeded = "seeded 8:1:1 per class" + (" (groups kept together)" if group_of else "")
    split_rule = ("given by the source" if not free else seeded if len(free) == len(kept)
                  else f"given by the source for {len(kept) - len(free)} posts, {seeded} for the other {len(free)}")
    if fixed:
        across: dict[str, set[str]] = {}
        for post in kept:
            if post.id in fixed:
                across.setdefault(found.key_of[post.id], set()).add(fixed[post.id])
        duplicate_stats["groups_across_given_splits"] = sum(len(s) > 1 for s in across.values())
    source = {
        "format": fmt,
        "root": str(Path(root).resolve()),
        "seed": seed,
        "split": split_rule,
        **raw.source,
        "read": len(raw.posts) + len(raw.dropped),
        "kept": len(kept),
        "dropped_by_reason": reason_counts(dropped),
        "duplicates": duplicate_stats,
    }
    return write_manifest(out_dir, splits, raw.labels, dropped, source)


def reason_kind(reason: str) -> str:
    """The kind of a drop reason: the part before the first ``": "``."""
    return reason.split(": ", 1)[0]


def reason_counts(dropped: Iterable[Dropped | dict]) -> dict[str, int]:
    """How many items were dropped for each reason kind (most frequent first)."""
    kinds = Counter(reason_kind(d["reason"] if isinstance(d, dict) else d.reason) for d in dropped)
    return dict(kinds.most_common())
