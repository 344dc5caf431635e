"""Input text and paths are taken as they are and trusted no further: rows split on "\\n" only, CSV characters
kept, ids strings, numbers finite, data-set paths inside the data set, odd files named for what they are,
escape sequences shown escaped, and long texts cut before they are tokenized."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cli_helpers import cli, one_line_error, use_length_predictor
from sentilens.data.images import ImageError, load_image
from sentilens.data.mvsa import read_mvsa_single
from sentilens.data.prepare import prepare
from sentilens.data.records import read_manifest, read_posts
from sentilens.data.table import read_table
from sentilens.data.text import CHARS_PER_TOKEN, clip_text
from sentilens.errors import SentilensError
from sentilens.jsonio import dumps, jsonl_lines
from sentilens.tables import markdown_table, printable
from sentilens.validation import parse_json

SEPARATORS = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]
"""Characters str.splitlines splits on that JSON strings may hold unescaped (with ensure_ascii=False)."""


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("SENTILENS_QUIET", "1")


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- line separators


def test_ids_with_line_separators_survive_predict_and_resume(tmp_path, monkeypatch, capsys):
    predictor = use_length_predictor(monkeypatch)
    rows = [{"id": f"a{sep}b{i}", "text": "t" * i} for i, sep in enumerate(SEPARATORS)]
    source = write_rows(tmp_path / "posts.jsonl", rows)
    assert [post.id for post in read_posts(source)] == [row["id"] for row in rows]
    output = tmp_path / "preds.jsonl"
    args = ["predict", "--run", "unused-run", "--input", str(source), "--output", str(output), "--json"]
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    predictor.seen.clear()
    code, out, err = cli(monkeypatch, capsys, *args, "--resume")
    assert code == 0, err
    assert json.loads(out)["skipped"] == len(rows) and predictor.seen == []  # its own file read back whole
    assert [json.loads(line)["id"] for line in output.read_text(encoding="utf-8").split("\n") if line] == \
        [row["id"] for row in rows]


def test_a_jsonl_table_keeps_rows_holding_separators_and_their_line_numbers(tmp_path):
    labels = ("positive", "negative")
    rows = [{"id": f"p{i}", "text": f"line{SEPARATORS[i % len(SEPARATORS)]}break {i}", "label": labels[i % 2]}
            for i in range(12)]
    path = write_rows(tmp_path / "posts.jsonl", rows)
    with path.open("a", encoding="utf-8") as f:
        f.write("{broken\n")
    raw = read_table(path)
    assert [post.text for post in raw.posts] == [row["text"] for row in rows]
    assert [(d.id, d.source) for d in raw.dropped] == [("line 13", f"{path}:13")]
    stats = prepare("table", path, tmp_path / "out", show_progress=False)
    kept = {post.id: post.text for posts in read_manifest(tmp_path / "out").values() for post in posts}
    assert kept == {row["id"]: row["text"] for row in rows} and len(stats["dropped"]) == 1


@pytest.mark.parametrize("quoted", [True, False])
def test_csv_keeps_line_separators_quoted_and_unquoted(tmp_path, quoted):
    lines = ["id,text,label"]
    for i, sep in enumerate(["\u2028", "\x85", "\u2029"]):
        text = f"before{sep}after"
        lines.append(f'c{i},"{text}",positive' if quoted else f"c{i},{text},positive")
    lines.append('c9,"two\nlines",negative')
    path = tmp_path / "posts.csv"
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8", newline="")
    raw = read_table(path)
    assert raw.dropped == []
    assert [post.text for post in raw.posts] == ["before\u2028after", "before\x85after", "before\u2029after",
                                                 "two\nlines"]


# ----------------------------------------------------------------------------- values a row may hold


@pytest.mark.parametrize(("value", "shown"), [("null", "null"), ("1", "1"), ("1.0", "1.0"), ('""', '""'),
                                              ('["a"]', '["a"]')])
def test_post_ids_must_be_strings(tmp_path, value, shown):
    path = tmp_path / "posts.jsonl"
    path.write_text('{"id": "ok", "text": "a"}\n\n{"id": ' + value + ', "text": "b"}\n', encoding="utf-8")
    with pytest.raises(SentilensError) as caught:
        read_posts(path)
    assert str(caught.value) == f"{path}:3: 'id' must be a non-empty string, got {shown}"


def test_table_ids_must_be_strings_and_one_and_one_point_oh_are_not_merged(tmp_path):
    path = tmp_path / "posts.jsonl"
    path.write_text('{"id": 1, "text": "a", "label": "positive"}\n{"id": 1.0, "text": "b", "label": "positive"}\n'
                    '{"id": "1", "text": "c", "label": "negative"}\n', encoding="utf-8")
    raw = read_table(path)
    assert [post.id for post in raw.posts] == ["1"]
    assert [(d.id, d.reason) for d in raw.dropped] == [
        ("1", "malformed row: 'id' must be a string, got int 1"),
        ("1.0", "malformed row: 'id' must be a string, got float 1.0")]


@pytest.mark.parametrize(("literal", "reason"), [
    ("NaN", "NaN is not a JSON number"), ("Infinity", "Infinity is not a JSON number"),
    ("-Infinity", "-Infinity is not a JSON number"), ("1e999", "the number 1e999 is too large for a float"),
    ('"\\ud800"', "lone surrogate"), ("[" * 50_000 + "]" * 50_000, "nested more than 64 levels deep"),
    ("[" * 100 + "]" * 100, "nested more than 64 levels deep")])
def test_numbers_json_cannot_hold_and_lone_surrogates_are_refused_with_the_line(tmp_path, literal, reason):
    path = tmp_path / "posts.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "y", "meta": {"v": ' + literal + "}}\n",
                    encoding="utf-8")
    with pytest.raises(SentilensError, match=f"posts.jsonl:2: .*{reason}"):
        read_posts(path)
    table = tmp_path / "table.jsonl"
    table.write_text('{"id": "a", "text": "x", "label": "positive"}\n{"id": "b", "text": "y", "label": "positive", '
                     '"score": ' + literal + "}\n", encoding="utf-8")
    raw = read_table(table)
    assert [post.id for post in raw.posts] == ["a"] and reason in raw.dropped[0].reason
    stats = prepare("table", table, tmp_path / "out", show_progress=False)
    assert "Infinity" not in (tmp_path / "out" / "train.jsonl").read_text() and stats["totals"]["train"] == 1


def test_resume_refuses_a_file_of_other_rows_with_the_line(tmp_path):
    from sentilens.predict import done_ids

    path = tmp_path / "preds.jsonl"
    path.write_text('{"id": "a"}\n{"id": 3}\n', encoding="utf-8")
    with pytest.raises(SentilensError, match=r"preds.jsonl:2: not a predictions row"):
        done_ids(path)
    path.write_text('{"id": "a", "p": NaN}\n', encoding="utf-8")
    with pytest.raises(SentilensError, match=r"preds.jsonl:1: not strict JSON \(NaN is not a JSON number\)"):
        done_ids(path)


# ----------------------------------------------------------------------------- data-set paths


def test_mvsa_ids_that_leave_the_data_folder_are_dropped(tmp_path):
    root = tmp_path / "MVSA_Single"
    (root / "data").mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "passwords.txt").write_text("hunter2")
    Image.new("RGB", (8, 8)).save(secret / "passwords.jpg")
    (root / "data" / "1.txt").write_text("a good day")
    Image.new("RGB", (8, 8)).save(root / "data" / "1.jpg")
    lines = ["ID\ttext,image", "1\tpositive,positive", "../../secret/passwords\tpositive,positive",
             f"{secret}/passwords\tnegative,negative", "..\tneutral,neutral", "a\\..\\b\tneutral,neutral"]
    (root / "labelResultAll.txt").write_text("\n".join(lines) + "\n")
    raw = read_mvsa_single(root)
    assert [post.id for post in raw.posts] == ["1"]
    assert {d.id: d.reason for d in raw.dropped} == {
        "../../secret/passwords": "unsafe id: '../../secret/passwords' climbs out of the data set's folder with '..'",
        f"{secret}/passwords": f"unsafe id: '{secret}/passwords' is an absolute path",
        "..": "unsafe id: '..' climbs out of the data set's folder with '..'",
        "a\\..\\b": "unsafe id: 'a\\..\\b' climbs out of the data set's folder with '..'"}
    stats = prepare("mvsa-single", root, tmp_path / "out", show_progress=False)
    assert stats["source"]["dropped_by_reason"] == {"unsafe id": 4}
    assert "hunter2" not in (tmp_path / "out" / "train.jsonl").read_text()


def test_crisismmd_image_paths_that_leave_the_root_are_dropped(tmp_path):
    root = tmp_path / "CrisisMMD_v2.0"
    split_dir = root / "crisismmd_datasplit_all"
    split_dir.mkdir(parents=True)
    (root / "data_image").mkdir()
    Image.new("RGB", (8, 8)).save(root / "data_image" / "ok.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.jpg")
    header = "event_name\ttweet_id\timage_id\ttweet_text\timage\tlabel\tlabel_text\tlabel_image\tlabel_text_image"

    def row(image_id: str, image: str) -> str:
        return "\t".join(["e", image_id, image_id, "flood", image, "informative", "informative", "informative",
                          "Positive"])

    rows = {"train": [row("ok", "data_image/ok.jpg"), row("up", "../outside.jpg"),
                      row("abs", str(tmp_path / "outside.jpg"))], "dev": [], "test": []}
    for name, lines in rows.items():
        (split_dir / f"task_informative_text_img_{name}.tsv").write_text("\n".join([header, *lines]) + "\n")
    stats = prepare("crisismmd", root, tmp_path / "out", show_progress=False)
    reasons = {d["id"]: d["reason"] for d in stats["dropped"]}
    assert reasons == {"up": "unsafe path: '../outside.jpg' climbs out of the data set's folder with '..' in "
                             "'image'",
                       "abs": f"unsafe path: '{tmp_path / 'outside.jpg'}' is an absolute path in 'image'"}
    assert stats["totals"]["train"] == 1


def test_a_folder_fifo_or_device_given_as_an_image_is_named_so(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    cases = [(tmp_path, "is a folder, not an image file"), (fifo, "is a named pipe (FIFO), not an image file"),
             (tmp_path / "gone.jpg", "image file not found"), (tmp_path / ("n" * 300 + ".jpg"), "over the file")]
    if Path("/dev/null").exists():
        cases.append((Path("/dev/null"), "is a device, not an image file"))
    for path, reason in cases:
        done = threading.Event()
        outcome: dict = {}

        def load(target=path, outcome=outcome, done=done):
            try:
                load_image(target)
            except ImageError as err:
                outcome["err"] = err
            done.set()

        threading.Thread(target=load, daemon=True).start()
        assert done.wait(timeout=30), f"loading {path} blocked"
        assert reason in outcome["err"].problem, outcome["err"]
        assert outcome["err"].kind == ("missing" if reason == "image file not found" else "unsupported")


# ----------------------------------------------------------------------------- escape sequences


HOSTILE = "evil\x1b]0;owned\x07\x1b[31mred\u202e\r"


def test_escape_sequences_in_ids_are_shown_escaped_in_the_predict_table(tmp_path, monkeypatch, capsys):
    use_length_predictor(monkeypatch)
    source = write_rows(tmp_path / "posts.jsonl", [{"id": HOSTILE, "text": "hello"}, {"id": "plain", "text": "a"}])
    code, out, err = cli(monkeypatch, capsys, "predict", "--run", "unused-run", "--input", str(source), "--output",
                         str(tmp_path / "preds.jsonl"))
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\r" not in out
    assert "evil\\x1b]0;owned\\x07\\x1b[31mred\\u202e" in out  # the cell may fold before the last escape
    assert json.loads((tmp_path / "preds.jsonl").read_text().split("\n")[0])["id"] == HOSTILE  # the data as it was


def test_escape_sequences_in_error_messages_and_markdown_tables_are_escaped(tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "data", "prepare", "--format", "table", "--root",
                         str(tmp_path / f"bad{HOSTILE}.csv"), "--out", str(tmp_path / "out"))
    one_line_error(code, err, "badevil\\x1b]0;owned\\x07\\x1b[31mred\\u202e\\r.csv: no such file")
    assert "\x1b" not in err
    table = markdown_table(["id", "score"], [[HOSTILE, 0.5], ["a|b", 1.0]])
    assert "\x1b" not in table and "a\\|b" in table and len(table.splitlines()) == 4
    assert printable("tab\there é 😀") == "tab\\there é 😀"


# ----------------------------------------------------------------------------- long texts


def test_clip_text_keeps_the_side_the_tokenizer_keeps():
    text = "".join(chr(ord("a") + i % 26) for i in range(10_000))
    assert clip_text(text, 4) == text[: 4 * CHARS_PER_TOKEN]
    assert clip_text(text, 4, keep="end") == text[-4 * CHARS_PER_TOKEN:]
    assert clip_text("short", 4) == "short" and clip_text(text, -3) == ""


def test_a_20_mb_text_is_never_tokenized_whole_and_gives_the_same_tokens(monkeypatch):
    from sentilens.fusion.encoders import TextEncoder

    encoder = TextEncoder(max_tokens=64)
    seen: list[int] = []
    tokenizer = encoder.tokenizer
    real_call = type(tokenizer).__call__

    def measured(self, text, *args, **kwargs):
        seen.extend(len(t) for t in ([text] if isinstance(text, str) else text))
        return real_call(self, text, *args, **kwargs)

    words = " ".join(f"word{i % 97} and more" for i in range(2_000))  # ~35,000 characters, thousands of tokens
    expected = encoder.tokenize([words])
    monkeypatch.setattr(type(tokenizer), "__call__", measured)
    huge = words + " tail" * 4_000_000  # 20 MB
    assert encoder.tokenize([huge]) == expected  # the first 64 tokens are the same with or without the tail
    assert max(seen) <= 64 * CHARS_PER_TOKEN + len(encoder.template)


def test_a_long_mllm_post_is_cut_before_the_prompt_is_tokenized(tmp_path_factory, monkeypatch):
    from mllm_helpers import tiny_model
    from sentilens.mllm.prompt import PromptBuilder, PromptSettings

    model, sentiment = tiny_model(tmp_path_factory.mktemp("tiny") / "ckpt")
    builder = PromptBuilder(model.processor, PromptSettings(max_length=160), sentiment.labels,
                            sentiment.num_image_tokens)
    words = " ".join(f"storm {i} rain" for i in range(400))
    expected = builder.prompt_ids(words, True)
    seen: list[int] = []
    tokenizer = builder.tokenizer
    real_call = type(tokenizer).__call__

    def measured(self, text, *args, **kwargs):
        seen.extend(len(t) for t in ([text] if isinstance(text, str) else text))
        return real_call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", measured)
    assert builder.prompt_ids(words + " tail" * 4_000_000, True) == expected
    assert max(seen) < 160 * CHARS_PER_TOKEN + 2_000  # the budget, plus the instruction around the text


def test_prepare_names_a_folder_given_as_an_image(tmp_path):
    (tmp_path / "pics").mkdir()
    path = write_rows(tmp_path / "posts.jsonl", [{"id": f"p{i}", "text": "t", "label": "positive",
                                                  "image": "pics" if i == 0 else None} for i in range(6)])
    stats = prepare("table", path, tmp_path / "out", show_progress=False)
    assert [(d["id"], d["reason"]) for d in stats["dropped"]] == [
        ("p0", "image unreadable: is a folder, not an image file")]


# ----------------------------------------------------------------------------- properties

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True)
any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@PROPERTY
@given(text=st.text(max_size=60))
def test_printable_leaves_nothing_a_terminal_would_act_on(text):
    shown = printable(text)
    assert shown.isprintable()
    assert printable(shown) == shown  # escaping twice changes nothing
    if text.isprintable():
        assert shown == text


@PROPERTY
@given(rows=st.lists(st.dictionaries(any_text, any_text, max_size=3), max_size=5))
def test_rows_of_any_characters_come_back_from_jsonl_as_written(rows):
    text = "".join(dumps(row) + "\n" for row in rows)
    assert [parse_json(line, "rows.jsonl", n) for n, line in jsonl_lines(text)] == rows


def test_a_folder_or_fifo_given_as_a_posts_file_is_named_so(tmp_path, monkeypatch, capsys):
    fifo = tmp_path / "posts.jsonl"
    os.mkfifo(fifo)
    for path, kind in ((tmp_path, "a folder"), (fifo, "a named pipe (FIFO)")):
        with pytest.raises(SentilensError, match=re.escape(f"is {kind}, not a JSONL file of posts")):
            read_posts(path)
        with pytest.raises(SentilensError, match=re.escape(f"is {kind}, not a CSV, TSV or JSONL file")):
            read_table(path)
