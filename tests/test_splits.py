"""The seeded per-class 8:1:1 split: Table 2 of the llava paper, proportions, determinism, groups."""

from collections import Counter

import pytest

from sentilens.data.records import SPLITS, Post
from sentilens.data.splits import split_sizes, stratified_split

# llava paper, Table 2 (MVSA-Single after the merge rule): label -> (train, val, test)
TABLE_2 = {"positive": (2146, 268, 269), "neutral": (376, 47, 47), "negative": (1086, 136, 136)}


def make_posts(sizes: dict[str, int]) -> list[Post]:
    return [Post(id=f"{label}-{i:05d}", text="", label=label) for label, n in sizes.items() for i in range(n)]


def counts(splits: dict[str, list[Post]]) -> dict[str, tuple[int, int, int]]:
    per_split = {split: Counter(p.label for p in splits[split]) for split in SPLITS}
    labels = {p.label for posts in splits.values() for p in posts}
    return {label: tuple(per_split[split][label] for split in SPLITS) for label in labels}


def ids(splits: dict[str, list[Post]]) -> dict[str, list[str]]:
    return {split: [p.id for p in posts] for split, posts in splits.items()}


def test_split_sizes_reproduce_table_2():
    for train_val_test in TABLE_2.values():
        assert split_sizes(sum(train_val_test)) == train_val_test


def test_stratified_split_of_the_real_class_sizes_gives_table_2():
    posts = make_posts({label: sum(sizes) for label, sizes in TABLE_2.items()})  # 2683 / 470 / 1358 = 4511
    for seed in (0, 1):
        assert counts(stratified_split(posts, seed=seed)) == TABLE_2


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 9, 10, 11, 15, 99, 101, 1234])
def test_split_sizes_sum_and_proportions(n):
    train, val, test = split_sizes(n)
    assert train + val + test == n
    assert abs(train - 0.8 * n) <= 0.5
    assert abs(val - 0.1 * n) <= 1 and abs(test - 0.1 * n) <= 1
    assert 0 <= test - val <= 1


def test_split_is_a_partition_with_per_class_proportions():
    posts = make_posts({"a": 200, "b": 50, "c": 31})
    splits = stratified_split(posts, seed=7)
    assert sorted(p.id for s in SPLITS for p in splits[s]) == sorted(p.id for p in posts)
    assert counts(splits) == {"a": (160, 20, 20), "b": (40, 5, 5), "c": (25, 3, 3)}


def test_same_seed_same_split_other_seed_other_split_input_order_irrelevant():
    posts = make_posts({"pos": 120, "neg": 80})
    first = ids(stratified_split(posts, seed=11))
    assert ids(stratified_split(list(reversed(posts)), seed=11)) == first
    other = ids(stratified_split(posts, seed=12))
    assert {s: sorted(v) for s, v in other.items()} != {s: sorted(v) for s, v in first.items()}
    assert counts(stratified_split(posts, seed=12)) == counts(stratified_split(posts, seed=11))


def test_adding_a_class_does_not_move_the_others():
    base = make_posts({"pos": 60, "neg": 40})
    more = base + make_posts({"neutral": 30})
    for split in SPLITS:
        before = {p.id for p in stratified_split(base, seed=3)[split]}
        after = {p.id for p in stratified_split(more, seed=3)[split] if p.label != "neutral"}
        assert before == after


def test_groups_stay_in_one_split_and_count_once():
    # 60 tweets with 1-3 images each; a tweet's images share its label except every 10th tweet
    posts = []
    for tweet in range(60):
        label = "informative" if tweet % 3 else "not_informative"
        for image in range(1 + tweet % 3):
            odd = tweet % 10 == 0 and image == 1
            posts.append(Post(id=f"{tweet}_{image}", text="", label="not_informative" if odd else label,
                              meta={"tweet": str(tweet)}))
    splits = stratified_split(posts, seed=2, group_of=lambda p: p.meta["tweet"])
    split_of_tweet: dict[str, set[str]] = {}
    for split, members in splits.items():
        for post in members:
            split_of_tweet.setdefault(post.meta["tweet"], set()).add(split)
    assert all(len(found) == 1 for found in split_of_tweet.values())
    assert sum(len(v) for v in splits.values()) == len(posts)
    # units: 40 informative tweets (tweets 10 and 40 have two images that tie 1:1; a tie goes to
    # 'informative', first in sort order), 20 not_informative tweets -> 32/4/4 and 16/2/2 tweets
    tweets = {split: Counter(p.meta["tweet"] for p in splits[split]) for split in SPLITS}
    assert [len(tweets[split]) for split in SPLITS] == [32 + 16, 4 + 2, 4 + 2]


def test_posts_without_label_are_refused():
    with pytest.raises(ValueError, match="no label"):
        stratified_split([Post(id="1", text="")], seed=0)
