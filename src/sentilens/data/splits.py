"""Seeded, per-class 8:1:1 split into train / val / test (llava paper, "Dataset and Preprocessing").

The paper shuffles MVSA-Single and splits it 8:1:1, reporting the per-class counts of its
Table 2 (positive 2146/268/269, neutral 376/47/47, negative 1086/136/136 from 2683, 470 and
1358 posts). It does not say how a class whose size is not a multiple of ten is rounded; the
one rule that reproduces all three rows is :func:`split_sizes`: train takes 0.8 n rounded
half up, and the rest is halved, the odd one going to test.

Posts are split class by class, so every split keeps the class mix. Each class is shuffled
by its own generator, seeded from the seed and the class name, after sorting by id: the same
seed gives the same split whatever order the reader produced, and adding a class does not
move the posts of another. Optionally posts are split in *groups* (e.g. the several images
of one tweet in CrisisMMD) that must land in the same split, so no text is shared between
train and test; a group then counts as one unit of its most frequent label.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

from sentilens.data.records import SPLITS, Post


def split_sizes(n: int) -> tuple[int, int, int]:
    """Sizes (train, val, test) of an 8:1:1 split of ``n`` items: train = round-half-up(0.8 n),
    val = floor of half the rest, test = the remainder (2683 -> 2146, 268, 269)."""
    if n < 0:
        raise ValueError(f"cannot split {n} items")
    n_train = (8 * n + 5) // 10
    n_val = (n - n_train) // 2
    return n_train, n_val, n - n_train - n_val


def stratified_split(
    posts: Sequence[Post],
    seed: int,
    group_of: Callable[[Post], str] | None = None,
) -> dict[str, list[Post]]:
    """Split labelled ``posts`` 8:1:1 within each label; deterministic by ``seed``.

    ``group_of`` maps a post to a group key; posts of one group go to the same split and the
    group is counted once, under its most frequent label (ties: the label first in sort order).
    Within a split, posts come in a seeded shuffled order.
    """
    groups: dict[str, list[Post]] = defaultdict(list)
    for post in posts:
        if post.label is None:
            raise ValueError(f"post {post.id} has no label to stratify on")
        groups[group_of(post) if group_of else post.id].append(post)

    units_by_label: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        counts = Counter(p.label for p in members)
        label = min(counts, key=lambda lab: (-counts[lab], lab))
        units_by_label[label].append(key)

    splits: dict[str, list[Post]] = {split: [] for split in SPLITS}
    for label in sorted(units_by_label):
        keys = sorted(units_by_label[label])
        random.Random(f"sentilens-split:{seed}:{label}").shuffle(keys)
        n_train, n_val, _ = split_sizes(len(keys))
        bounds = {"train": keys[:n_train], "val": keys[n_train:n_train + n_val], "test": keys[n_train + n_val:]}
        for split, chosen in bounds.items():
            for key in chosen:
                splits[split].extend(sorted(groups[key], key=lambda p: p.id))
    for split in SPLITS:
        splits[split].sort(key=lambda p: p.id)
        random.Random(f"sentilens-order:{seed}:{split}").shuffle(splits[split])
    return splits
