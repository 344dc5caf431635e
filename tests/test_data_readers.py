"""Raw-dataset readers and `sentilens data prepare` on small trees written in the real raw formats."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sentilens.cli import app
from sentilens.data.crisismmd import read_crisismmd
from sentilens.data.mvsa import majority_label, merge_labels, read_mvsa_multiple, read_mvsa_single
from sentilens.data.prepare import prepare, reason_counts
from sentilens.data.records import SPLITS, read_manifest, read_stats
from sentilens.data.table import label_order, read_table
from sentilens.data.text import decode_text
from sentilens.errors import SentilensError

# ---------------------------------------------------------------- image and text fixtures


def jpeg_bytes(color=(200, 30, 30), size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


def truncated_jpeg_bytes() -> bytes:
    noise = np.random.default_rng(1).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def cmyk_jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buffer, "JPEG")
    return buffer.getvalue()


def palette_png_bytes() -> bytes:
    img = Image.new("P", (4, 4))
    img.putpalette([10, 200, 10, 0, 0, 255] + [0, 0, 0] * 254)
    img.putdata([0, 1] * 8)
    buffer = io.BytesIO()
    img.save(buffer, "PNG", transparency=1)
    return buffer.getvalue()


CP1252_TEXT = "caf\xe9 \u201cgreat\u201d \u2013 day".encode("cp1252")  # é, curly quotes, en dash
CP1252_DECODED = "café \u201cgreat\u201d \u2013 day"


def drops_by_id(stats: dict) -> dict[str, str]:
    return {d["id"]: d["reason"] for d in stats["dropped"]}


def labels_by_id(manifest_dir: Path) -> dict[str, str]:
    return {p.id: p.label for split in read_manifest(manifest_dir).values() for p in split}


# ---------------------------------------------------------------- text decoding


def test_decode_text_utf8_cp1252_latin1_never_crashes():
    assert decode_text("naïve 😀\n".encode()) == "naïve 😀\n"
    assert decode_text(b"\xef\xbb\xbfbom") == "bom"
    assert decode_text(CP1252_TEXT) == CP1252_DECODED
    assert decode_text(b"\x81\x8d odd") == "\x81\x8d odd"  # undefined in cp1252: latin-1
    mixed = "ok \u00e9".encode() + b"\n" + "\u201cq\u201d".encode("cp1252")
    assert decode_text(mixed) == "ok \u00e9\n\u201cq\u201d"  # each line in its own encoding
    assert isinstance(decode_text(bytes(range(256))), str)


# ---------------------------------------------------------------- MVSA-Single


def test_merge_and_majority_rules():
    assert merge_labels("positive", "positive") == "positive"
    assert merge_labels("neutral", "negative") == "negative"
    assert merge_labels("positive", "neutral") == "positive"
    assert merge_labels("positive", "negative") is None
    assert majority_label(["neutral", "positive", "neutral"]) == "neutral"
    assert majority_label(["neutral", "positive", "negative"]) is None
    assert majority_label(["negative"]) == "negative"


def write_mvsa_single(root: Path) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    lines = [
        "ID\ttext,image",
        "1\tpositive,positive",   # kept, cp1252 text
        "2\tneutral,negative",    # kept -> negative
        "3\tpositive,negative",   # conflict
        "4\tneutral,neutral",     # kept, CMYK JPEG
        "5\tnegative,neutral",    # kept -> negative, palette PNG saved as .jpg
        "6\tpositive,neutral",    # image missing
        "7\tpositive,positive",   # truncated JPEG
        "8\thappy,positive",      # unknown label word
        "9\tneutral,positive",    # no text file
        "1\tnegative,negative",   # repeated id
        "10\tnegative",           # malformed: no pair
    ]
    (root / "labelResultAll.txt").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    texts = {"1": CP1252_TEXT, "2": b"  rainy monday  \n", "3": b"x", "4": b"a cup", "5": b"meh",
             "6": b"sunny", "7": b"wow", "8": b"?", "10": b"n"}
    for post_id, text in texts.items():
        (data / f"{post_id}.txt").write_bytes(text)
    images = {"1": jpeg_bytes(), "2": jpeg_bytes(), "3": jpeg_bytes(), "4": cmyk_jpeg_bytes(),
              "5": palette_png_bytes(), "7": truncated_jpeg_bytes(), "8": jpeg_bytes(), "9": jpeg_bytes(),
              "10": jpeg_bytes()}
    for post_id, image in images.items():
        (data / f"{post_id}.jpg").write_bytes(image)
    return root


def test_mvsa_single_reader_and_prepare(tmp_path):
    root = write_mvsa_single(tmp_path / "MVSA_Single")
    raw = read_mvsa_single(root)
    assert raw.labels == ["positive", "neutral", "negative"]
    assert {p.id: p.label for p in raw.posts} == {"1": "positive", "2": "negative", "4": "neutral",
                                                  "5": "negative", "6": "positive", "7": "positive"}

    stats = prepare("mvsa-single", root, tmp_path / "out", seed=3, show_progress=False)
    assert stats["labels"] == ["positive", "neutral", "negative"]
    assert labels_by_id(tmp_path / "out") == {"1": "positive", "2": "negative", "4": "neutral", "5": "negative"}
    assert sum(stats["totals"].values()) == 4
    assert {label: sum(stats["counts"][s][label] for s in SPLITS) for label in stats["labels"]} == {
        "positive": 1, "neutral": 1, "negative": 2}
    drops = drops_by_id(stats)
    assert set(drops) == {"3", "6", "7", "8", "9", "1", "10"}
    assert drops["3"] == "label conflict: text positive, image negative"
    assert drops["6"] == "image missing: file not found"
    assert drops["7"].startswith("image unreadable: corrupt or truncated image")
    assert drops["8"] == "malformed row: unknown label 'happy' (expected one of positive, neutral, negative)"
    assert drops["9"] == "text missing: no data/9.txt"
    assert drops["1"] == "duplicate id: first listed on line 2"
    assert drops["10"] == "malformed row: 'negative' is not a text,image label pair"
    sources = {d["id"]: d["source"] for d in stats["dropped"]}
    assert sources["3"].endswith("labelResultAll.txt:4") and sources["7"].endswith("7.jpg")
    assert reason_counts(stats["dropped"]) == {"malformed row": 2, "label conflict": 1, "duplicate id": 1,
                                               "text missing": 1, "image missing": 1, "image unreadable": 1}
    assert stats["source"]["read"] == 11 and stats["source"]["kept"] == 4

    posts = {p.id: p for split in read_manifest(tmp_path / "out").values() for p in split}
    assert posts["1"].text == CP1252_DECODED
    assert posts["2"].text == "rainy monday"
    assert posts["4"].meta == {"text_label": "neutral", "image_label": "neutral"}
    assert Path(posts["5"].image).resolve() == (root / "data" / "5.jpg").resolve()


def test_mvsa_errors_that_make_the_input_unusable(tmp_path):
    with pytest.raises(SentilensError, match="no such folder"):
        read_mvsa_single(tmp_path / "nowhere")
    (tmp_path / "data").mkdir()
    with pytest.raises(SentilensError, match="missing labelResultAll.txt") as err:
        read_mvsa_single(tmp_path)
    assert err.value.path == str(tmp_path / "labelResultAll.txt")
    (tmp_path / "labelResultAll.txt").write_bytes(b"ID\ttext,image\ttext,image\ttext,image\n1\tneutral,neutral\n")
    with pytest.raises(SentilensError, match="did you mean --format mvsa-multiple") as err:
        read_mvsa_single(tmp_path)
    assert err.value.line == 1
    (tmp_path / "labelResultAll.txt").write_bytes(b"ID\ttext,image\n\x89PNG\x00\x01\n1\tgood;bad\n")
    with pytest.raises(SentilensError, match="no usable row; first problem") as err:
        read_mvsa_single(tmp_path)
    assert err.value.line == 2


# ---------------------------------------------------------------- MVSA-Multiple


def test_mvsa_multiple_majority_per_modality(tmp_path):
    root = tmp_path / "MVSA"
    (root / "data").mkdir(parents=True)
    lines = [
        "ID\ttext,image\ttext,image\ttext,image",
        "1\tpositive,positive\tpositive,neutral\tnegative,positive",  # text 2/3 pos, image 2/3 pos
        "2\tpositive,neutral\tneutral,neutral\tnegative,neutral",     # text 1-of-3 each: no majority
        "3\tneutral,negative\tneutral,negative\tpositive,neutral",    # text neutral, image negative
        "4\tpositive,negative\tpositive,negative\tneutral,negative",  # conflict after majority
        "5\tneutral,neutral\tneutral,positive\tneutral,negative",     # image 1-of-3 each: no majority
        "6\tneutral,neutral\tneutral,neutral",                        # two annotators only
    ]
    (root / "labelResultAll.txt").write_text("\n".join(lines) + "\n")
    for post_id in "123456":
        (root / "data" / f"{post_id}.txt").write_bytes(b"text " + post_id.encode())
        (root / "data" / f"{post_id}.jpg").write_bytes(jpeg_bytes())
    raw = read_mvsa_multiple(root)
    assert {p.id: p.label for p in raw.posts} == {"1": "positive", "3": "negative"}
    assert raw.posts[0].meta == {"text_votes": ["positive", "positive", "negative"],
                                 "image_votes": ["positive", "neutral", "positive"]}
    drops = {d.id: d.reason for d in raw.dropped}
    assert drops == {
        "2": "no majority: text labels positive, neutral, negative",
        "4": "label conflict: text positive, image negative",
        "5": "no majority: image labels neutral, positive, negative",
        "6": "malformed row: expected 3 text,image pair(s) after the ID, found 2",
    }
    (tmp_path / "single" / "data").mkdir(parents=True)
    (tmp_path / "single" / "labelResultAll.txt").write_text("ID\ttext,image\n1\tneutral,neutral\n")
    with pytest.raises(SentilensError, match="did you mean --format mvsa-single"):
        read_mvsa_multiple(tmp_path / "single")


# ---------------------------------------------------------------- CrisisMMD

SPLIT_HEADER = "event_name\ttweet_id\timage_id\ttweet_text\timage\tlabel\tlabel_text\tlabel_image\tlabel_text_image"


def crisis_image(root: Path, event: str, image_id: str, data: bytes | None = None) -> str:
    relative = f"data_image/{event}/10_9_2017/{image_id}.jpg"
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if data is not None else jpeg_bytes())
    return relative


def split_row(root: Path, event: str, tweet: str, image_id: str, text: str, label: str, text_label: str,
              image_label: str, write_image: bool = True) -> str:
    image = crisis_image(root, event, image_id) if write_image else f"data_image/{event}/10_9_2017/{image_id}.jpg"
    agree = "Positive" if text_label == image_label else "Negative"
    return "\t".join([event, tweet, image_id, text, image, label, text_label, image_label, agree])


def write_crisis_splits(root: Path, folder: str = "crisismmd_datasplit_all", task: str = "informative") -> Path:
    info, noinfo = "informative", "not_informative"
    rows = {
        "train": [
            split_row(root, "hurricane_harvey", "100", "100_0", "Flooded street #Harvey", info, info, info),
            split_row(root, "hurricane_harvey", "100", "100_1", "Flooded street #Harvey", info, info, noinfo),
            split_row(root, "hurricane_harvey", "101", "101_0", "my cat, unbothered", noinfo, noinfo, noinfo),
            split_row(root, "hurricane_harvey", "102", "102_0", "hmm", "maybe", info, info),
            split_row(root, "hurricane_harvey", "103", "103_0", "a\textra tab", info, info, info),
            # a field over the csv module's 131,072-character limit: that record is dropped, the next one read
            split_row(root, "hurricane_harvey", "104", "104_0", "x" * 140_000, info, info, info),
            split_row(root, "hurricane_harvey", "105", "105_0", "after the long one", info, info, info),
        ],
        "dev": [
            split_row(root, "hurricane_irma", "200", "200_0", "Shelter open at 5th St", info, info, info),
            split_row(root, "hurricane_irma", "201", "201_0", "roof gone", info, info, info, write_image=False),
        ],
        "test": [
            split_row(root, "hurricane_maria", "300", "300_0", "sunset pic", noinfo, noinfo, noinfo),
            split_row(root, "hurricane_maria", "100", "100_0", "repeated image id", info, info, info),
        ],
    }
    split_dir = root / folder
    split_dir.mkdir(parents=True, exist_ok=True)
    for name, lines in rows.items():
        (split_dir / f"task_{task}_text_img_{name}.tsv").write_text("\n".join([SPLIT_HEADER, *lines]) + "\n")
    return root


def test_crisismmd_official_splits_keep_the_given_split(tmp_path):
    root = write_crisis_splits(tmp_path / "CrisisMMD_v2.0")
    stats = prepare("crisismmd", root, tmp_path / "out", show_progress=False)
    assert stats["labels"] == ["informative", "not_informative"]
    manifest = read_manifest(tmp_path / "out")
    assert {s: sorted(p.id for p in manifest[s]) for s in SPLITS} == {
        "train": ["100_0", "100_1", "101_0", "105_0"], "val": ["200_0"], "test": ["300_0"]}
    assert labels_by_id(tmp_path / "out") == {"100_0": "informative", "100_1": "informative",
                                              "101_0": "not_informative", "105_0": "informative",
                                              "200_0": "informative", "300_0": "not_informative"}
    post = next(p for p in manifest["train"] if p.id == "100_1")
    assert post.text == "Flooded street #Harvey"
    assert post.meta == {"tweet_id": "100", "event": "hurricane_harvey", "label_text": "informative",
                         "label_image": "not_informative"}
    drops = drops_by_id(stats)
    assert drops == {
        "102_0": "unknown label: 'maybe' in 'label' is not a label of the informative task",
        "103_0": "malformed row: 10 fields, header has 9",
        "line 7": "malformed row: unreadable record (field larger than field limit (131072))",
        "201_0": "image missing: file not found",
        "100_0": "duplicate id: first listed at " + str(root / "crisismmd_datasplit_all" /
                                                        "task_informative_text_img_train.tsv") + ":2",
    }
    assert stats["source"]["form"] == "official split files"

    agreed = prepare("crisismmd", root, tmp_path / "agreed", agreed_only=True, show_progress=False)
    assert drops_by_id(agreed)["100_1"] == "annotations disagree: text informative, image not_informative " \
                                           "(--agreed-only)"
    assert "100_1" not in labels_by_id(tmp_path / "agreed")


def test_crisismmd_humanitarian_task_in_nested_split_folder(tmp_path):
    root = tmp_path / "CrisisMMD_v2.0"
    write_crisis_splits(root, "crisismmd_datasplit_all/crisismmd_datasplit_all", task="humanitarian")
    for name in ("train", "dev", "test"):  # relabel the rows with humanitarian categories
        path = root / "crisismmd_datasplit_all/crisismmd_datasplit_all" / f"task_humanitarian_text_img_{name}.tsv"
        text = path.read_text().replace("not_informative", "not_humanitarian")
        path.write_text(text.replace("\tinformative", "\trescue_volunteering_or_donation_effort"))
    raw = read_crisismmd(root, task="humanitarian")
    assert raw.labels == ["not_humanitarian", "rescue_volunteering_or_donation_effort"]
    assert {p.id: p.label for p in raw.posts}["101_0"] == "not_humanitarian"
    with pytest.raises(SentilensError, match="found neither"):
        read_crisismmd(root, task="informative")
    with pytest.raises(SentilensError, match="unknown CrisisMMD task 'damage'"):
        read_crisismmd(root, task="damage")
    (root / "crisismmd_datasplit_all/crisismmd_datasplit_all/task_humanitarian_text_img_dev.tsv").unlink()
    with pytest.raises(SentilensError, match="missing split file") as err:
        read_crisismmd(root, task="humanitarian")
    assert err.value.path.endswith("task_humanitarian_text_img_dev.tsv")


ANNOTATION_HEADER = ["image_path", "tweet_text", "image_id", "text_human", "image_human", "tweet_id", "text_info",
                     "image_info", "text_info_conf", "image_info_conf", "image_url"]  # not the file's usual order


def write_crisis_annotations(root: Path) -> Path:
    rows = [
        # image_id, tweet_id, text_info, image_info, text_human, image_human, image bytes
        ("500_0", "500", "informative", "informative", "infrastructure_and_utility_damage",
         "infrastructure_and_utility_damage", jpeg_bytes()),
        ("500_1", "500", "informative", "informative", "infrastructure_and_utility_damage", "not_humanitarian",
         cmyk_jpeg_bytes()),
        ("501_0", "501", "informative", "not_informative", "rescue_volunteering_or_donation_effort",
         "not_humanitarian", palette_png_bytes()),
        ("502_0", "502", "not_informative", "not_informative", "not_humanitarian", "not_humanitarian",
         jpeg_bytes()),
        ("503_0", "503", "", "informative", "not_humanitarian", "not_humanitarian", jpeg_bytes()),
        ("504_0", "504", "informative", "informative", "infrastructure_and_utility_damage",
         "rescue_volunteering_or_donation_effort", truncated_jpeg_bytes()),
    ]
    lines = ["\t".join(ANNOTATION_HEADER)]
    for image_id, tweet, text_info, image_info, text_human, image_human, data in rows:
        image = crisis_image(root, "hurricane_irma", image_id, data)
        values = {"image_path": image, "tweet_text": f"tweet {tweet}", "image_id": image_id, "text_human": text_human,
                  "image_human": image_human, "tweet_id": tweet, "text_info": text_info, "image_info": image_info,
                  "text_info_conf": "1.0", "image_info_conf": "0.66", "image_url": "http://example.org/x.jpg"}
        lines.append("\t".join(values[name] for name in ANNOTATION_HEADER))
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "hurricane_irma_final_data.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_crisismmd_raw_annotations_label_rule_and_tweet_groups(tmp_path):
    root = write_crisis_annotations(tmp_path / "CrisisMMD_v2.0")
    stats = prepare("crisismmd", root, tmp_path / "info", seed=1, show_progress=False)
    assert stats["labels"] == ["informative", "not_informative"]
    assert labels_by_id(tmp_path / "info") == {"500_0": "informative", "500_1": "informative",
                                               "501_0": "informative", "502_0": "not_informative"}
    drops = drops_by_id(stats)
    assert set(drops) == {"503_0", "504_0"}
    assert drops["503_0"] == "missing label: 'text_info' is empty"
    assert drops["504_0"].startswith("image unreadable: corrupt or truncated image")
    assert stats["source"]["form"] == "raw annotations"
    assert stats["source"]["split"] == "seeded 8:1:1 per class (groups kept together)"
    raw = read_crisismmd(root)
    assert {raw.group_of(p) for p in raw.posts if p.id.startswith("500")} == {"500"}
    assert {p.meta["event"] for p in raw.posts} == {"hurricane_irma"}

    human = read_crisismmd(root, task="humanitarian")
    assert {p.id: p.label for p in human.posts} == {
        "500_0": "infrastructure_and_utility_damage", "500_1": "infrastructure_and_utility_damage",
        "501_0": "rescue_volunteering_or_donation_effort", "502_0": "not_humanitarian",
        "503_0": "not_humanitarian"}
    assert {d.id: d.reason for d in human.dropped} == {
        "504_0": "label conflict: text infrastructure_and_utility_damage, image rescue_volunteering_or_donation_effort"}

    agreed = read_crisismmd(root, agreed_only=True)
    assert sorted(p.id for p in agreed.posts) == ["500_0", "500_1", "502_0", "504_0"]
    assert {d.id: d.reason for d in agreed.dropped}["501_0"] == ("annotations disagree: text informative, image "
                                                                 "not_informative (--agreed-only)")


def test_crisismmd_missing_column_is_an_error_naming_the_file(tmp_path):
    root = tmp_path / "CrisisMMD_v2.0"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "x_final_data.tsv").write_text("tweet_id\timage_id\ttweet_text\n1\t1_0\thi\n")
    with pytest.raises(SentilensError, match="missing column.s. image_path, text_info, image_info") as err:
        read_crisismmd(root)
    assert err.value.line == 1 and err.value.path.endswith("x_final_data.tsv")


# ---------------------------------------------------------------- user tables


def test_table_csv_keeps_split_column_and_text_only_posts(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a1.jpg").write_bytes(jpeg_bytes())
    lines = [
        b"ID,Text,Image,Label,Split,Source",
        b'a1,"Great, day",imgs/a1.jpg,positive,train,web',
        b"a2,meh,,neutral,dev,web",
        b"a3,bad,imgs/missing.jpg,negative,test,web",
        b"a4,ok,,positive,holdout,web",
        b",no id,,positive,train,web",
        b"a1,again,,negative,train,web",
        b"a6,short,,positive",
        b"a7,caf\xe9 \x93ok\x94,,negative,test,forum",
    ]
    path = tmp_path / "posts.csv"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    stats = prepare("table", path, tmp_path / "out", show_progress=False)
    assert stats["labels"] == ["positive", "neutral", "negative"]
    manifest = read_manifest(tmp_path / "out")
    assert {s: [p.id for p in manifest[s]] for s in SPLITS} == {"train": ["a1"], "val": ["a2"], "test": ["a7"]}
    a1, a2, a7 = manifest["train"][0], manifest["val"][0], manifest["test"][0]
    assert a1.text == "Great, day" and a1.meta == {"source": "web"}
    assert Path(a1.image).resolve() == (tmp_path / "imgs" / "a1.jpg").resolve()
    assert a2.image is None
    assert a7.text == "café \u201cok\u201d"
    assert drops_by_id(stats) == {
        "a3": "image missing: file not found",
        "a4": "malformed row: split 'holdout' is not train, val, dev or test",
        "line 6": "malformed row: missing id",
        "a1": "duplicate id: first listed on line 2",
        "line 8": "malformed row: 4 fields, header has 6",
    }


def test_table_jsonl_without_split_is_split_per_class(tmp_path):
    rows = [{"id": str(i), "text": f"post {i}", "label": "urgent" if i % 2 else "calm", "meta": {"k": i}}
            for i in range(20)]
    lines = [json.dumps(row) for row in rows]
    lines.insert(3, "{not json")
    lines.insert(5, json.dumps({"id": "x", "text": 3, "label": "calm"}))
    path = tmp_path / "posts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    stats = prepare("table", path, tmp_path / "out", seed=5, show_progress=False)
    assert stats["labels"] == ["calm", "urgent"]  # order of first appearance
    assert stats["counts"] == {"train": {"calm": 8, "urgent": 8}, "val": {"calm": 1, "urgent": 1},
                               "test": {"calm": 1, "urgent": 1}}
    assert drops_by_id(stats) == {"line 4": "malformed row: not valid JSON (Expecting property name enclosed in "
                                            "double quotes)", "x": "malformed row: 'text' must be a string"}
    posts = {p.id: p for split in read_manifest(tmp_path / "out").values() for p in split}
    assert posts["0"].meta == {"k": 0} and posts["0"].image is None and posts["0"].text == "post 0"


def test_label_order_rule():
    assert label_order(["negative", "positive", "negative"]) == ["positive", "negative"]
    assert label_order(["neutral", "negative", "positive"]) == ["positive", "neutral", "negative"]
    assert label_order(["b", "a", "positive", "b"]) == ["b", "a", "positive"]


def test_table_errors(tmp_path):
    with pytest.raises(SentilensError, match="no such file"):
        read_table(tmp_path / "absent.csv")
    (tmp_path / "t.xlsx").write_bytes(b"PK")
    with pytest.raises(SentilensError, match="unknown table type '.xlsx'"):
        read_table(tmp_path / "t.xlsx")
    (tmp_path / "t.csv").write_text("id,body,label\n1,hi,positive\n")
    with pytest.raises(SentilensError, match="missing column.s. text") as err:
        read_table(tmp_path / "t.csv")
    assert err.value.line == 1


# ---------------------------------------------------------------- Table 2 end to end, and the CLI

# MVSA-Single's 4,869 label pairs, composed so that the merge rule leaves the paper's 2,683 positive,
# 470 neutral and 1,358 negative posts and drops 358 positive/negative conflicts
MVSA_SINGLE_PAIRS = {("positive", "positive"): 1200, ("positive", "neutral"): 800, ("neutral", "positive"): 683,
                     ("neutral", "neutral"): 470, ("negative", "negative"): 600, ("negative", "neutral"): 400,
                     ("neutral", "negative"): 358, ("positive", "negative"): 200, ("negative", "positive"): 158}


@pytest.fixture(scope="module")
def mvsa_single_full(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvsa_full")
    (root / "data").mkdir()
    image = jpeg_bytes(size=(4, 4))
    lines = ["ID\ttext,image"]
    post_id = 0
    for (text_label, image_label), n in MVSA_SINGLE_PAIRS.items():
        for _ in range(n):
            post_id += 1
            lines.append(f"{post_id}\t{text_label},{image_label}")
            # every post its own text and image bytes (bytes after the JPEG's end marker): no near-duplicates,
            # so the split is the plain per-post one that gives Table 2
            (root / "data" / f"{post_id}.txt").write_bytes(f"tweet number {post_id}".encode())
            (root / "data" / f"{post_id}.jpg").write_bytes(image + post_id.to_bytes(4, "big"))
    (root / "labelResultAll.txt").write_text("\n".join(lines) + "\n")
    return root


def test_prepare_mvsa_single_gives_table_2(mvsa_single_full, tmp_path):
    assert sum(MVSA_SINGLE_PAIRS.values()) == 4869
    stats = prepare("mvsa-single", mvsa_single_full, tmp_path / "out", seed=0, show_progress=False)
    assert stats["counts"] == {
        "train": {"positive": 2146, "neutral": 376, "negative": 1086},
        "val": {"positive": 268, "neutral": 47, "negative": 136},
        "test": {"positive": 269, "neutral": 47, "negative": 136},
    }
    assert sum(stats["totals"].values()) == 4511
    assert stats["source"]["duplicates"]["groups"] == 0
    assert reason_counts(stats["dropped"]) == {"label conflict": 358}


def test_cli_prepare_prints_counts_reasons_and_skipped_items(tmp_path):
    root = write_mvsa_single(tmp_path / "MVSA_Single")
    runner = CliRunner()
    result = runner.invoke(app, ["data", "prepare", "--format", "mvsa-single", "--root", str(root),
                                 "--out", str(tmp_path / "out"), "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert "skipped 3: label conflict: text positive, image negative" in result.output
    assert "skipped 7: image unreadable: corrupt or truncated image" in result.output
    for word in ("positive", "neutral", "negative", "train", "val", "test", "dropped per reason", "label conflict",
                 "4 posts kept, 7 dropped"):
        assert word in result.output
    result = runner.invoke(app, ["data", "prepare", "--format", "mvsa-single", "--root", str(root),
                                 "--out", str(tmp_path / "json"), "--seed", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == read_stats(tmp_path / "json")


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "mvsa-single", "--root", "{tmp}/nowhere"], "{tmp}/nowhere: no such folder"),
    (["--format", "mvsa-double", "--root", "{tmp}"], "unknown format 'mvsa-double'"),
    (["--format", "table", "--root", "{tmp}/p.csv", "--task", "humanitarian"], "--task and --agreed-only apply"),
    (["--format", "crisismmd", "--root", "{tmp}", "--task", "damage"], "unknown CrisisMMD task 'damage'"),
    (["--format", "mvsa-single", "--root", "{tmp}"], "{tmp}/labelResultAll.txt: missing labelResultAll.txt"),
])
def test_cli_prepare_user_errors_exit_2_with_one_line(tmp_path, args, message):
    args = [arg.format(tmp=tmp_path) for arg in args]
    (tmp_path / "data").mkdir()
    result = subprocess.run([sys.executable, "-m", "sentilens", "data", "prepare", *args, "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert message.format(tmp=tmp_path) in lines[0]
