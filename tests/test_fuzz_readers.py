"""Property-based fuzzing of everything that reads user bytes (issue 15): table rows, text encodings, JSONL posts,
images and request bodies. The invariant: a result, or the user error (:class:`SentilensError`, one line naming
the file), never another exception. Seeded (``derandomize``) and bounded in examples, so it runs in seconds."""

from __future__ import annotations

import io
import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sentilens.data.images import ImageError, ImageLimits, load_image
from sentilens.data.records import read_posts
from sentilens.data.table import read_table
from sentilens.errors import SentilensError
from sentilens.serve.body import json_budget, over_budget

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

cells = st.one_of(st.text(max_size=30), st.sampled_from(["", "positive", "Positive", "test", "val", "[/x]", "\x00",
                                                         '"', "\r\n", "a,b", "𝕏"]), st.integers(), st.none(),
                  st.booleans(), st.lists(st.integers(), max_size=2))
rows = st.dictionaries(st.sampled_from(["id", "text", "label", "image", "split", "meta", "extra"]), cells, max_size=7)


def read_or_user_error(read, path):
    try:
        return read(path)
    except SentilensError as err:
        assert str(err) and "\n" not in str(err)
        return None


@FUZZ
@given(lines=st.lists(st.one_of(rows.map(json.dumps), st.text(max_size=40)), max_size=12))
def test_jsonl_tables_give_posts_or_one_user_error(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("jsonl") / "posts.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8", errors="replace")
    raw = read_or_user_error(read_table, path)
    if raw is not None:
        assert raw.labels and all(post.label in raw.labels for post in raw.posts)
        assert len({post.id for post in raw.posts}) == len(raw.posts)


@FUZZ
@given(header=st.sampled_from(["id,text,label", "id,text,label,split,image", "ID,Text,Label", "text,label"]),
       body=st.text(alphabet=string.printable + "é𝕏\x00\"", max_size=300))
def test_csv_tables_give_posts_or_one_user_error(tmp_path_factory, header, body):
    path = tmp_path_factory.mktemp("csv") / "posts.csv"
    path.write_text(header + "\n" + body, encoding="utf-8")
    read_or_user_error(read_table, path)


@FUZZ
@given(data=st.binary(max_size=400), encoding=st.sampled_from(["raw", "utf-16", "utf-16-le", "cp1252", "utf-8-sig"]),
       suffix=st.sampled_from([".csv", ".tsv", ".jsonl"]))
def test_any_bytes_in_any_encoding_give_posts_or_one_user_error(tmp_path_factory, data, encoding, suffix):
    if encoding != "raw":
        data = data.decode("latin-1").encode(encoding, errors="replace")
    path = tmp_path_factory.mktemp("bytes") / f"posts{suffix}"
    path.write_bytes(data)
    read_or_user_error(read_table, path)
    read_or_user_error(read_posts, path)


def encoded(fmt: str, size: tuple[int, int], mode: str) -> bytes:
    buffer = io.BytesIO()
    image = Image.new(mode, size, 120)
    image.convert("RGB" if fmt == "JPEG" and mode not in ("L", "RGB", "CMYK") else mode).save(buffer, format=fmt)
    return buffer.getvalue()


@FUZZ
@given(fmt=st.sampled_from(["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"]),
       size=st.tuples(st.integers(1, 64), st.integers(1, 64)), mode=st.sampled_from(["RGB", "L", "RGBA", "P"]),
       cut=st.integers(0, 4000), flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6))
def test_damaged_images_decode_or_raise_image_error(fmt, size, mode, cut, flips):
    try:
        data = bytearray(encoded(fmt, size, mode))
    except (OSError, ValueError):  # a mode this format cannot store: nothing to fuzz
        return
    for position, value in flips:
        data[position % len(data)] = value
    data = bytes(data[: max(1, len(data) - cut % len(data))])
    try:
        image = load_image(data, ImageLimits(max_pixels=64 * 64))
    except ImageError as err:
        assert err.kind in ("corrupt", "unsupported", "too_many_pixels", "extreme_aspect_ratio", "too_large")
        return
    assert image.mode == "RGB" and image.width * image.height <= 64 * 64


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_never_escape_the_image_loader(data):
    try:
        assert load_image(data).mode == "RGB"
    except ImageError:
        pass


@FUZZ
@given(texts=st.lists(st.text(alphabet=st.sampled_from("{[,]}\"\\ ab𝕏"), max_size=50), min_size=1, max_size=4),
       ids=st.lists(st.text(alphabet="{[,x", max_size=200), min_size=4, max_size=4), image=st.booleans(),
       keep_ratio=st.one_of(st.none(), st.floats(0.01, 1.0)))
def test_the_json_budget_never_refuses_a_request_within_the_limits(texts, ids, image, keep_ratio):
    """The structural budget is sound: any valid batch of at most 4 posts of at most 50 characters passes it."""
    posts = [{"id": post_id, "text": text, **({"image": "iVBORw0KGgo="} if image else {})}
             for text, post_id in zip(texts, ids, strict=False)]
    body = json.dumps({"posts": posts, "keep_ratio": keep_ratio}, ensure_ascii=False).encode()
    assert not over_budget(body, json_budget(4, 50))
    compact = json.dumps({"posts": posts}, separators=(",", ":"), ensure_ascii=False).encode()
    assert not over_budget(compact, json_budget(len(posts), 50))
