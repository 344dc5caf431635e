"""Issue 15, the command line's share: hostile or unlucky input gives one line naming the file and the problem,
exit code 2, no traceback; bad rows are dropped with a reason and the rest are kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cli_helpers import cli, one_line_error
from serve_helpers import train_tiny_fusion

pytestmark = pytest.mark.slow  # trains a real tiny model


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def sentiment_rows(n: int, prefix: str = "p") -> list[dict]:
    labels = ("positive", "neutral", "negative")
    return [{"id": f"{prefix}{i}", "text": f"post number {i}", "label": labels[i % 3]} for i in range(n)]


def prepare(monkeypatch, capsys, table: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return cli(monkeypatch, capsys, "data", "prepare", "--format", "table", "--root", str(table), "--out", str(out),
               *extra)


def manifest_ids(out: Path) -> dict[str, set[str]]:
    return {split: {json.loads(line)["id"] for line in (out / f"{split}.jsonl").read_text().splitlines()}
            for split in ("train", "val", "test")}


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory):
    return train_tiny_fusion(tmp_path_factory.mktemp("cli-hardening"))


# ----------------------------------------------------------------------------- defect 4: extreme images


def test_prepare_drops_a_thin_strip_and_predict_refuses_it_in_one_line(tmp_path, monkeypatch, capsys, fusion_run):
    strip = tmp_path / "strip.png"
    Image.new("L", (20000, 1)).save(strip, optimize=True)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "fine.png")
    rows = sentiment_rows(30)
    rows[0]["image"], rows[1]["image"] = "strip.png", "fine.png"
    code, out, err = prepare(monkeypatch, capsys, write_jsonl(tmp_path / "posts.jsonl", rows), tmp_path / "out")
    assert code == 0, err
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert [d["id"] for d in stats["dropped"]] == ["p0"]
    assert "the long side may be at most 20 times the short side" in stats["dropped"][0]["reason"]
    code, out, err = cli(monkeypatch, capsys, "predict", "--run", str(fusion_run), "--image", str(strip),
                         "--text", "hello")
    one_line_error(code, err, str(strip), "20000x1 image")


def test_train_fusion_refuses_an_absurd_image_size(tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "train", "fusion", "--data", str(tmp_path), "--out",
                         str(tmp_path / "run"), "--image-size", "100000")
    one_line_error(code, err, "image_size", "less than or equal to 1024")


# ----------------------------------------------------------------------------- defect 5: split column


def test_one_row_with_a_split_keeps_every_other_row(tmp_path, monkeypatch, capsys):
    rows = sentiment_rows(30)
    rows[4]["split"] = "test"
    code, _, err = prepare(monkeypatch, capsys, write_jsonl(tmp_path / "posts.jsonl", rows), tmp_path / "out")
    assert code == 0, err
    ids = manifest_ids(tmp_path / "out")
    assert set().union(*ids.values()) == {row["id"] for row in rows}  # nothing dropped
    assert "p4" in ids["test"]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["source"]["split"] == ("given by the source for 1 posts, seeded 8:1:1 per class "
                                        "(groups kept together) for the other 29")


def test_a_bad_split_value_drops_only_its_row(tmp_path, monkeypatch, capsys):
    rows = sentiment_rows(30)
    rows[7]["split"] = "training-ish"
    code, _, err = prepare(monkeypatch, capsys, write_jsonl(tmp_path / "posts.jsonl", rows), tmp_path / "out")
    assert code == 0, err
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert [(d["id"], d["reason"]) for d in stats["dropped"]] == [
        ("p7", "malformed row: split 'training-ish' is not train, val, dev or test")]
    assert sum(stats["totals"].values()) == 29


# ----------------------------------------------------------------------------- defect 6: rich markup in data


def test_markup_in_user_data_is_printed_as_written(tmp_path, monkeypatch, capsys):
    rows = sentiment_rows(30)
    rows[0]["id"], rows[1]["id"] = "[/x]", "[bold]loud[/bold]"
    rows[2]["image"] = "[/nothing].png"
    code, out, err = prepare(monkeypatch, capsys, write_jsonl(tmp_path / "posts.jsonl", rows), tmp_path / "out")
    assert code == 0, err
    assert "skipped [/x]" not in out  # kept, not skipped
    assert "skipped p2: image missing" in out and "[/nothing].png" in out
    missing = tmp_path / "[/x]" / "[bold]posts.jsonl"
    code, out, err = prepare(monkeypatch, capsys, missing, tmp_path / "out2")
    one_line_error(code, err, f"{missing}: no such file")


def test_markup_in_labels_and_ids_survives_predict(tmp_path, monkeypatch, capsys, fusion_run):
    posts = write_jsonl(tmp_path / "posts.jsonl", [{"id": "[/x]", "text": "a"}, {"id": "[bold]b", "text": "b"}])
    code, out, err = cli(monkeypatch, capsys, "predict", "--run", str(fusion_run), "--input", str(posts),
                         "--output", str(tmp_path / "preds.jsonl"))
    assert code == 0, err
    assert "[/x]" in out and "[bold]b" in out


# ----------------------------------------------------------------------------- defect 7: huge CSV field


def test_a_csv_field_over_the_csv_limit_drops_its_row(tmp_path, monkeypatch, capsys):
    rows = sentiment_rows(30)
    lines = ["id,text,label"] + [f"{r['id']},{r['text']},{r['label']}" for r in rows]
    lines[5] = f'p4,"{"x" * 140_000}",neutral'
    table = tmp_path / "posts.csv"
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, _, err = prepare(monkeypatch, capsys, table, tmp_path / "out")
    assert code == 0, err
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert len(stats["dropped"]) == 1 and "field larger than field limit" in stats["dropped"][0]["reason"]
    assert stats["dropped"][0]["source"].endswith("posts.csv:6")
    assert sum(stats["totals"].values()) == 29


# ----------------------------------------------------------------------------- defect 11: files vs folders


def test_out_naming_a_file_and_output_naming_a_folder(tmp_path, monkeypatch, capsys, fusion_run):
    table = write_jsonl(tmp_path / "posts.jsonl", sentiment_rows(30))
    a_file = tmp_path / "taken.txt"
    a_file.write_text("keep me")
    code, _, err = prepare(monkeypatch, capsys, table, a_file)
    one_line_error(code, err, str(a_file), "--out must name a folder")
    code, _, err = prepare(monkeypatch, capsys, table, a_file / "sub")
    one_line_error(code, err, str(a_file), "--out must name a folder")
    assert a_file.read_text() == "keep me"
    posts = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "hello"}])
    code, _, err = cli(monkeypatch, capsys, "predict", "--run", str(fusion_run), "--input", str(posts),
                       "--output", str(tmp_path))
    one_line_error(code, err, str(tmp_path), "names a folder")


# ----------------------------------------------------------------------------- defect 15: label typos


def test_label_case_variants_merge_and_rare_misspellings_are_dropped(tmp_path, monkeypatch, capsys):
    rows = sentiment_rows(60)
    rows[0]["label"] = "Positive"
    rows[3]["label"] = "postive"
    rows[6]["label"] = " POSITIVE "
    code, out, err = prepare(monkeypatch, capsys, write_jsonl(tmp_path / "posts.jsonl", rows), tmp_path / "out")
    assert code == 0, err
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["labels"] == ["positive", "neutral", "negative"]
    assert stats["source"]["labels_merged"] == {"Positive": "positive", "POSITIVE": "positive"}
    assert [(d["id"], d["reason"]) for d in stats["dropped"]] == [
        ("p3", "suspect label: 'postive' looks like a misspelling of 'positive' (fix the row to keep it)")]
    assert "skipped p3: suspect label" in out
    assert sum(stats["counts"][split]["positive"] for split in stats["counts"]) == 19


def test_distinct_labels_of_similar_frequency_are_kept(tmp_path, monkeypatch, capsys):
    rows = [{"id": f"r{i}", "text": f"t{i}", "label": ("sad", "mad", "glad")[i % 3]} for i in range(30)]
    code, _, err = prepare(monkeypatch, capsys, write_jsonl(tmp_path / "posts.jsonl", rows), tmp_path / "out")
    assert code == 0, err
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["labels"] == ["sad", "mad", "glad"] and stats["dropped"] == []


# ----------------------------------------------------------------------------- defect 16: UTF-16


def test_a_utf16_table_reads_like_utf8_and_one_without_a_mark_is_named(tmp_path, monkeypatch, capsys):
    rows = sentiment_rows(30)
    text = "id,text,label\n" + "".join(f"{r['id']},café {r['text']},{r['label']}\n" for r in rows)
    table = tmp_path / "posts.csv"
    table.write_bytes(text.encode("utf-16"))  # with its byte-order mark, as Windows saves "Unicode" text
    code, _, err = prepare(monkeypatch, capsys, table, tmp_path / "out")
    assert code == 0, err
    train = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert all(row["text"].startswith("café post number") for row in train)
    table.write_bytes(text.encode("utf-16-le"))
    code, _, err = prepare(monkeypatch, capsys, table, tmp_path / "out2")
    one_line_error(code, err, str(table), "UTF-16 without a byte-order mark")
