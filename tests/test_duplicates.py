"""Near-duplicate control in `data prepare`: retweets (same normalised text) and reused images (same bytes)
are grouped and never straddle splits; a set without duplicates keeps the plain per-post split."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from PIL import Image

from sentilens.data.duplicates import group_duplicates, normalise_text
from sentilens.data.prepare import prepare
from sentilens.data.records import Post, read_manifest
from sentilens.data.splits import stratified_split

LABELS = ("positive", "neutral", "negative")


@pytest.mark.parametrize(("a", "b"), [
    ("RT @bob: Sunny DAY!! http://t.co/xYz #happy", "sunny day happy"),
    ("Sunny   day... #Happy https://bit.ly/q", "sunny day happy"),
    ("rt  @a @b what a game", "what a game"),
    ("Ｆｕｌｌ width", "full width"),
])
def test_normalised_texts_of_copies_coincide(a, b):
    assert normalise_text(a) == b


def test_a_text_that_normalises_to_nothing_groups_nothing():
    posts = [Post("a", "http://t.co/1", None, "positive"), Post("b", "@x https://t.co/2", None, "negative")]
    found = group_duplicates(posts)
    assert found.key_of == {"a": "a", "b": "b"} and found.groups == 0


def write_table(folder, n=60, text_copies=(), image_copies=()):
    """A CSV of ``n`` distinct posts (own text, own image), plus copies: retweets of post i's text
    (``text_copies``) and posts reusing post i's image file bytes (``image_copies``)."""
    images = folder / "img"
    images.mkdir(parents=True)
    rows = []
    for i in range(n):
        path = images / f"{i}.png"
        Image.new("RGB", (8, 8), (i * 4 % 256, i * 7 % 256, i * 11 % 256)).save(path)
        rows.append({"id": f"p{i:03d}", "text": f"post number {i} about thing {i * 13}", "image": str(path),
                     "label": LABELS[i % 3]})
    for j, i in enumerate(text_copies):
        path = images / f"rt{j}.png"
        Image.new("RGB", (8, 8), (250, j, 3)).save(path)
        rows.append({"id": f"rt{j}", "text": f"RT @someone: {rows[i]['text'].upper()} http://t.co/{j}",
                     "image": str(path), "label": rows[i]["label"]})
    for j, i in enumerate(image_copies):
        path = images / f"copy{j}.png"
        shutil.copyfile(images / f"{i}.png", path)
        rows.append({"id": f"img{j}", "text": f"a different caption {j}", "image": str(path),
                     "label": LABELS[(i + 1) % 3]})
    table = folder / "posts.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "text", "image", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return table


def split_of(out):
    return {post.id: split for split, posts in read_manifest(out).items() for post in posts}


def test_duplicates_never_straddle_splits_and_stats_count_the_groups(tmp_path):
    pairs = [(5, "rt0"), (17, "rt1"), (8, "img0"), (40, "img1")]
    table = write_table(tmp_path / "raw", text_copies=(5, 17), image_copies=(8, 40))
    straddled_without = 0
    for seed in range(6):
        grouped = prepare("table", table, tmp_path / f"g{seed}", seed=seed, show_progress=False)
        where = split_of(tmp_path / f"g{seed}")
        assert all(where[f"p{i:03d}"] == where[copy] for i, copy in pairs), seed
        assert grouped["source"]["duplicates"] == {
            "groups": 4, "posts_in_groups": 8, "same_text": 2, "same_image": 2, "handling": "group",
            "rule": "same normalised text or same image bytes (SHA-256), grouped transitively"}
        prepare("table", table, tmp_path / f"i{seed}", seed=seed, duplicates="ignore", show_progress=False)
        where = split_of(tmp_path / f"i{seed}")
        straddled_without += sum(where[f"p{i:03d}"] != where[copy] for i, copy in pairs)
    assert straddled_without > 0, "without grouping, some copies land in another split (the test can fail)"
    stats = json.loads((tmp_path / "g0" / "stats.json").read_text())
    assert stats["source"]["duplicates"]["groups"] == 4


def test_without_duplicates_the_split_is_the_plain_per_post_split(tmp_path):
    table = write_table(tmp_path / "raw")
    prepare("table", table, tmp_path / "out", seed=3, show_progress=False)
    posts = [p for split in read_manifest(tmp_path / "out").values() for p in split]
    plain = stratified_split(posts, seed=3)
    assert split_of(tmp_path / "out") == {p.id: split for split, chosen in plain.items() for p in chosen}
