"""The synthetic set: determinism, counts, kind mix, modality ceilings, and learnable cues."""

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from typer.testing import CliRunner

from sentilens.cli import app
from sentilens.data import synth
from sentilens.data.images import load_image
from sentilens.data.records import SPLITS, read_manifest, read_stats
from sentilens.data.synth import KIND_FRACTIONS, LABELS, cell_counts, make_synthetic, modality_ceilings
from sentilens.errors import SentilensError

N = 600


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    stats = make_synthetic(out, n=N, seed=0)
    return out, stats, read_manifest(out)


def all_posts(manifest):
    return [post for split in SPLITS for post in manifest[split]]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def label_by_rule(text: str, image: str) -> str:
    """The labelling rule written out independently: a polar image wins over the text
    (sarcasm and image_only), else the text's sentiment (neutral when both are neutral)."""
    return image if image != "neutral" else text


def majority_accuracy(rows: list[dict], key: str) -> float:
    groups = defaultdict(Counter)
    for row in rows:
        groups[row[key]][row["label"]] += 1
    return sum(max(c.values()) for c in groups.values()) / len(rows)


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    make_synthetic(tmp_path / "a", n=60, seed=3)
    make_synthetic(tmp_path / "b", n=60, seed=3)
    make_synthetic(tmp_path / "c", n=60, seed=4)
    a, b, c = (files_of(tmp_path / name) for name in "abc")
    assert len(a) == 60 + 4
    assert a == b
    assert a["train.jsonl"] != c["train.jsonl"]
    assert sum(a[name] != c.get(name) for name in a if name.startswith("images/")) >= 50


def test_counts_per_split_and_label_match_stats_and_are_split_8_1_1(synthetic):
    out, stats, manifest = synthetic
    assert read_stats(out) == stats
    assert stats["labels"] == LABELS
    for split in SPLITS:
        assert stats["counts"][split] == {label: sum(p.label == label for p in manifest[split]) for label in LABELS}
    # 35 % positive, 15 % neutral, 50 % negative of 600, each split 8:1:1.
    assert stats["counts"]["train"] == {"positive": 168, "neutral": 72, "negative": 240}
    assert stats["counts"]["val"] == stats["counts"]["test"] == {"positive": 21, "neutral": 9, "negative": 30}
    ids = [p.id for p in all_posts(manifest)]
    assert len(set(ids)) == N


def test_kind_fractions_and_labels_follow_the_documented_rule(synthetic):
    _, stats, manifest = synthetic
    posts = all_posts(manifest)
    kinds = Counter(p.meta["kind"] for p in posts)
    assert {kind: count / N for kind, count in kinds.items()} == pytest.approx(KIND_FRACTIONS)
    assert KIND_FRACTIONS == {"text_only": 0.30, "image_only": 0.30, "sarcasm": 0.15, "agree": 0.10, "neutral": 0.15}
    for split in SPLITS:
        assert stats["source"]["kind_counts"][split] == dict(Counter(p.meta["kind"] for p in manifest[split]))
    allowed = {
        "text_only": {("positive", "neutral"), ("negative", "neutral")},
        "image_only": {("neutral", "positive"), ("neutral", "negative")},
        "sarcasm": {("positive", "negative")},
        "agree": {("positive", "positive"), ("negative", "negative")},
        "neutral": {("neutral", "neutral")},
    }
    for p in posts:
        pair = (p.meta["text_sentiment"], p.meta["image_sentiment"])
        assert pair in allowed[p.meta["kind"]]
        assert p.label == label_by_rule(*pair)
    polar = Counter((p.meta["kind"], p.label) for p in posts if p.meta["kind"] in ("text_only", "image_only", "agree"))
    for kind in ("text_only", "image_only", "agree"):
        assert polar[(kind, "positive")] == polar[(kind, "negative")]


def test_documented_ceilings_match_the_generated_rows(synthetic):
    _, stats, manifest = synthetic
    rows = [{"label": p.label, **p.meta} for p in all_posts(manifest)]
    ceilings = modality_ceilings()
    assert ceilings["text_only"] == pytest.approx(majority_accuracy(rows, "text_sentiment"))
    assert ceilings["image_only"] == pytest.approx(majority_accuracy(rows, "image_sentiment"))
    for row in rows:
        row["pair"] = (row["text_sentiment"], row["image_sentiment"])
    assert ceilings["both"] == majority_accuracy(rows, "pair") == 1.0
    assert stats["source"]["ceilings"] == ceilings
    # The numbers the module docstring states.
    assert ceilings == pytest.approx({"text_only": 0.55, "image_only": 0.70, "both": 1.0})
    assert "**55 %**" in synth.__doc__ and "**70 %**" in synth.__doc__


def test_ceilings_follow_another_kind_mix(tmp_path):
    mix = {"text_only": 0.2, "image_only": 0.2, "sarcasm": 0.4, "agree": 0.2}
    make_synthetic(tmp_path, n=100, seed=1, image_size=32, fractions=mix)
    rows = [{"label": p.label, **p.meta} for p in all_posts(read_manifest(tmp_path))]
    assert Counter(r["kind"] for r in rows) == {"text_only": 20, "image_only": 20, "sarcasm": 40, "agree": 20}
    ceilings = modality_ceilings(mix)
    assert ceilings["text_only"] == pytest.approx(majority_accuracy(rows, "text_sentiment"))
    assert ceilings["image_only"] == pytest.approx(majority_accuracy(rows, "image_sentiment"))
    # By hand: text positive surface = 10 pos + 10 pos + 40 neg -> 40; negative 20; neutral 20 split -> 10.
    assert ceilings["text_only"] == pytest.approx(0.70)


@pytest.mark.parametrize("n", [1, 7, 37, 601])
def test_cell_counts_round_to_n(n):
    counts = cell_counts(n)
    assert sum(count for _, count in counts) == n
    for cell, count in counts:
        assert abs(count - float(cell.share) * n) < 1


def test_a_smaller_cue_side_draws_smaller_boxes(tmp_path):
    stats = make_synthetic(tmp_path, n=40, seed=2, cue_side=(0.2, 0.25))
    assert stats["source"]["cue_side"] == [0.2, 0.25]
    for post in all_posts(read_manifest(tmp_path)):
        x0, _, x1, _ = post.meta["cue_box"]
        assert round(128 * 0.2) <= x1 - x0 <= round(128 * 0.25)


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(SentilensError, match="at least 1"):
        make_synthetic(tmp_path, n=0)
    for side in ((0.0, 0.3), (0.4, 0.3), (0.5, 1.2)):
        with pytest.raises(SentilensError, match="cue box side"):
            make_synthetic(tmp_path, n=3, cue_side=side)
    with pytest.raises(SentilensError, match="sum to 1"):
        modality_ceilings({"text_only": 0.5, "neutral": 0.2})
    with pytest.raises(SentilensError, match="unknown kinds"):
        modality_ceilings({"irony": 1.0})


def test_every_image_loads_and_no_two_are_the_same(synthetic):
    out, _, manifest = synthetic
    posts = all_posts(manifest)
    for p in posts:
        assert Path(p.image).is_relative_to(out)
        img = load_image(p.image)
        assert img.mode == "RGB" and img.size == (128, 128)
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert all(row["image"].startswith("images/") for row in rows)
    assert len({Path(p.image).read_bytes() for p in posts}) == N


def test_every_image_records_its_cue_box_and_backdrop(synthetic):
    _, _, manifest = synthetic
    posts = all_posts(manifest)
    paddings = Counter()
    for p in posts:
        x0, y0, x1, y1 = p.meta["cue_box"]
        side = x1 - x0
        assert y1 - y0 == side and 0 <= x0 and 0 <= y0 and x1 <= 128 and y1 <= 128
        assert round(128 * 0.36) <= side <= round(128 * 0.58)  # 13-34 % of the frame
        layout = p.meta["layout"]
        paddings[layout["padding"]] += 1
        width = layout["padding_px"]
        if layout["padding"] in ("bars_horizontal", "border"):  # the box never overlaps the bars
            assert width <= y0 and y1 <= 128 - width
        if layout["padding"] in ("bars_vertical", "border"):
            assert width <= x0 and x1 <= 128 - width
        assert layout["backdrop"] in synth.BACKDROPS
    assert set(paddings) == set(synth.PADDINGS) and min(paddings.values()) >= N / 8


def thumbnails(posts, crop: bool):
    """8 x 8 thumbnails of the cue box alone (``crop``) or of the frame with the box blacked out."""
    rows = []
    for p in posts:
        image = load_image(p.image)
        box = tuple(p.meta["cue_box"])
        if crop:
            image = image.crop(box)
        else:
            image = image.copy()
            image.paste((0, 0, 0), box)
        rows.append(np.asarray(image.resize((8, 8)), dtype=float).ravel() / 255)
    return np.stack(rows)


def test_the_image_cue_lies_in_the_box_and_the_background_says_nothing(synthetic):
    """Independent checks with a linear model on 8x8 thumbnails: the box alone shows the image sentiment,
    the frame around it (box blacked out) does no better than answering the most frequent sentiment."""
    _, _, manifest = synthetic
    train, held_out = manifest["train"], manifest["val"] + manifest["test"]
    target = [p.meta["image_sentiment"] for p in train]
    truth = [p.meta["image_sentiment"] for p in held_out]
    box = LogisticRegression(max_iter=2000).fit(thumbnails(train, crop=True), target)
    assert box.score(thumbnails(held_out, crop=True), truth) >= 0.9
    majority = max(Counter(truth).values()) / len(truth)
    frame = LogisticRegression(max_iter=2000).fit(thumbnails(train, crop=False), target)
    assert frame.score(thumbnails(held_out, crop=False), truth) <= majority + 0.08


def test_text_sentiment_is_learnable_but_sarcasm_is_not_visible_in_text(synthetic):
    _, _, manifest = synthetic
    train, held_out = manifest["train"], manifest["val"] + manifest["test"]
    vectorizer = CountVectorizer().fit([p.text for p in train])
    clf = LogisticRegression(max_iter=2000).fit(vectorizer.transform([p.text for p in train]),
                                                [p.meta["text_sentiment"] for p in train])
    assert clf.score(vectorizer.transform([p.text for p in held_out]),
                     [p.meta["text_sentiment"] for p in held_out]) >= 0.9
    # Positive-surface texts: telling sarcasm from sincere praise should be no better than the majority.
    surface = [p for p in all_posts(manifest) if p.meta["text_sentiment"] == "positive"]
    is_sarcasm = [p.meta["kind"] == "sarcasm" for p in surface]
    majority = max(np.mean(is_sarcasm), 1 - np.mean(is_sarcasm))
    bags = CountVectorizer().fit_transform([p.text for p in surface])
    scores = cross_val_score(LogisticRegression(max_iter=2000), bags, is_sarcasm, cv=5)
    assert scores.mean() <= majority + 0.1


def test_cli_synth_prints_tables_and_json(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "t"), "--n", "40", "--seed", "2"])
    assert result.exit_code == 0, result.output
    for word in ("positive", "neutral", "negative", "text_only", "sarcasm", "55%", "70%"):
        assert word in result.output
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "j"), "--n", "40", "--seed", "2", "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    assert stats == read_stats(tmp_path / "j")
    assert sum(stats["totals"].values()) == 40
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "c"), "--n", "6", "--cue-side", "0.2,0.25",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["source"]["cue_side"] == [0.2, 0.25]
    for bad in ("0.2", "a,b", "0.3,0.2"):
        result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "d"), "--n", "6", "--cue-side", bad])
        assert isinstance(result.exception, SentilensError) and "cue" in str(result.exception), bad
