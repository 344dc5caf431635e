"""The feature cache: hits, misses and what invalidates an entry, counted at the encoders."""

import pytest
import torch
from PIL import Image

from fusion_helpers import EncoderCalls, save_tiny_gpt2  # noqa: F401
from sentilens.data.images import ImageError
from sentilens.data.records import Post
from sentilens.fusion.cache import FeatureCache, cache_key, featurize
from sentilens.fusion.encoders import ImageEncoder, TextEncoder


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture
def posts(tmp_path):
    out = []
    for i, (text, color) in enumerate([("great day", (250, 200, 40)), ("worst day", (30, 30, 60)),
                                       ("great day", (140, 140, 130)), ("", (90, 20, 20))]):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (64, 64), color).save(path)
        out.append(Post(f"p{i}", text, str(path), "positive"))
    out.append(Post("p4", "no image here", None, "neutral"))
    return out


def test_warm_cache_skips_every_encoder_call_and_returns_the_same_bits(gpt2_dir, posts, tmp_path, monkeypatch):
    calls = EncoderCalls(monkeypatch)
    text, image, cache = TextEncoder(str(gpt2_dir), "Post: {text}"), ImageEncoder(image_size=64), FeatureCache(tmp_path)
    cold, stats = featurize(posts, text, image, cache)
    assert (calls.text, calls.image) == (3, 4)  # "great day" twice -> once; the empty text is not encoded
    assert stats.to_dict() == {"text_hits": 0, "text_encoded": 3, "image_hits": 0, "image_encoded": 4}
    assert cold[3].text is None and cold[4].image is None
    warm, stats = featurize(posts, text, image, cache)
    assert (calls.text, calls.image) == (3, 4)
    assert stats.to_dict() == {"text_hits": 4, "text_encoded": 0, "image_hits": 4, "image_encoded": 0}
    for a, b in zip(cold, warm, strict=True):
        for modality in ("text", "image"):
            fa, fb = getattr(a, modality), getattr(b, modality)
            assert (fa is None) == (fb is None)
            assert fa is None or all(torch.equal(fa[k], fb[k]) for k in ("states", "pooled"))


def test_prompt_image_bytes_and_damaged_files_invalidate_entries(gpt2_dir, posts, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "cache")
    image = ImageEncoder(image_size=64)
    featurize(posts, TextEncoder(str(gpt2_dir), "Post: {text}"), image, cache)
    calls = EncoderCalls(monkeypatch)
    featurize(posts, TextEncoder(str(gpt2_dir), "{text}"), None, cache)
    assert calls.text == 3  # another prompt, other features

    Image.new("RGB", (64, 64), (0, 255, 0)).save(posts[0].image)  # edited image: a miss
    renamed = posts[1].image.replace(".png", "-copy.png")
    with open(posts[1].image, "rb") as src, open(renamed, "wb") as dst:
        dst.write(src.read())
    moved = [posts[0], Post("p1", posts[1].text, renamed, "positive")]
    featurize(moved, None, image, cache)
    assert calls.image == 1  # the renamed copy hits

    # Damage an entry the next call must read: the text features of "worst day" under the first prompt.
    # (Any entry picked by file name could be one the next call never reads, e.g. the edited image's old one.)
    prompt = TextEncoder(str(gpt2_dir), "Post: {text}")
    damaged = cache.path(cache_key(prompt.fingerprint, posts[1].text.encode()))
    assert damaged.is_file()
    damaged.write_bytes(b"not a safetensors file")
    featurize(posts, prompt, image, cache)
    assert (calls.text, calls.image) == (3 + 1, 1)  # the damaged entry is recomputed...
    assert cache.get(damaged.stem) is not None  # ...and rewritten


def test_a_missing_image_is_a_user_error_naming_the_file(posts, tmp_path):
    gone = Post("x", "text", str(tmp_path / "nowhere.png"), "positive")
    with pytest.raises(ImageError, match="nowhere.png"):
        featurize([gone], None, ImageEncoder(image_size=64), FeatureCache(tmp_path))
