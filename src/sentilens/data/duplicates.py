"""Near-duplicate posts kept in one split (issue 16): retweets and reused images never straddle
train and test.

Social-media sets repeat themselves: a retweet carries its source's text behind ``RT @user:``,
the same photo is posted by several accounts, a URL differs only by its shortener. Split by
post id alone, such copies land in train and test at once and the test score measures memory.
Two posts are *duplicates* when

- their texts are equal after :func:`normalise_text` (Unicode NFKC, lower case, URLs, @mentions,
  a leading ``RT`` and the ``#`` of hashtags dropped, punctuation and spaces collapsed), or
- their image files have the same bytes (SHA-256 of the file).

Duplicates are grouped transitively (union-find over text and image keys, on top of any
grouping the reader already gives, e.g. one CrisisMMD tweet's images), and
:func:`sentilens.data.splits.stratified_split` then moves each group as one unit. A text that
normalises to nothing (only a URL or a mention) groups nothing: it says nothing about the post.
A group's key is the smallest key of its members, so a post without duplicates keeps its own
key and, where a set has no duplicates at all, the split is exactly the plain per-post split
(for MVSA-Single, the paper's Table 2).

Choices where nothing is prescribed: byte-identical images only (a re-encoded or resized copy
is not caught; perceptual hashing would need a tolerance to tune on the data, which we avoid);
exact normalised text (no fuzzy matching, which would merge short generic tweets).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sentilens.data.records import Post

URL = re.compile(r"(https?://|www\.)\S+", re.IGNORECASE)
MENTION = re.compile(r"@\w+")
RETWEET = re.compile(r"^\s*rt\b[\s:]*", re.IGNORECASE)
NOT_WORD = re.compile(r"[\W_]+")


def normalise_text(text: str) -> str:
    """The text two copies of a post share: "RT @bob: Sunny DAY!! http://t.co/x #happy" -> "sunny day happy"."""
    text = unicodedata.normalize("NFKC", text)
    text = URL.sub(" ", text)
    text = RETWEET.sub("", text)
    text = MENTION.sub(" ", text)
    return " ".join(NOT_WORD.sub(" ", text.lower()).split())


def image_digest(path: str | Path) -> str:
    """SHA-256 of an image file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class DuplicateGroups:
    """The group key of every post, and counts for ``stats.json``."""

    key_of: dict[str, str]
    """post id -> group key (the smallest base key in its group)."""
    groups: int
    """groups that duplicates joined: two or more units (posts, or the reader's groups) in one."""
    posts: int
    """posts in those groups."""
    by_text: int
    """posts whose normalised text an earlier post already had."""
    by_image: int
    """posts whose image bytes an earlier post already had."""

    def stats(self) -> dict:
        return {"groups": self.groups, "posts_in_groups": self.posts, "same_text": self.by_text,
                "same_image": self.by_image,
                "rule": "same normalised text or same image bytes (SHA-256), grouped transitively"}


def group_duplicates(posts: Sequence[Post], group_of: Callable[[Post], str] | None = None) -> DuplicateGroups:
    """Group ``posts`` whose normalised text or image bytes coincide (on top of ``group_of``'s groups)."""
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        root = key
        while parent[root] != root:
            root = parent[root]
        while parent[key] != root:
            parent[key], key = root, parent[key]
        return root

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            low, high = sorted((ra, rb))
            parent[high] = low

    base = {p.id: (group_of(p) if group_of else p.id) for p in posts}
    for key in base.values():
        parent.setdefault(key, key)
    first_text: dict[str, str] = {}
    first_image: dict[str, str] = {}
    by_text = by_image = 0
    for post in sorted(posts, key=lambda p: p.id):
        unit = base[post.id]
        text = normalise_text(post.text)
        if text:
            if text in first_text:
                by_text += 1
                union(first_text[text], unit)
            else:
                first_text[text] = unit
        if post.image is not None:
            digest = image_digest(post.image)
            if digest in first_image:
                by_image += 1
                union(first_image[digest], unit)
            else:
                first_image[digest] = unit
    key_of = {pid: find(unit) for pid, unit in base.items()}
    units: dict[str, set[str]] = {}
    members: dict[str, int] = {}
    for pid, unit in base.items():
        root = key_of[pid]
        units.setdefault(root, set()).add(unit)
        members[root] = members.get(root, 0) + 1
    joined = [root for root, found in units.items() if len(found) > 1]
    return DuplicateGroups(key_of=key_of, groups=len(joined), posts=sum(members[r] for r in joined),
                           by_text=by_text, by_image=by_image)
