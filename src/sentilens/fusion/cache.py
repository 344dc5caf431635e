"""Feature cache: frozen-encoder outputs on disk, so later epochs, runs and ablations never re-encode.

With frozen encoders (the paper's setting) the features of a post depend only on the encoder,
its settings (prompt template, token limit, image size) and the content. A post's features are
stored as one safetensors file named by ``sha256(encoder fingerprint, content hash)`` where the
content hash is that of the text, or of the image file's bytes (so a renamed image still hits and
an edited one misses). Features are kept unpadded, as computed: a cold and a warm run see the
same float32 values bit for bit. A file that cannot be read is treated as a miss and rewritten.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from sentilens.cache import cache_root
from sentilens.data.images import load_image
from sentilens.data.records import Post
from sentilens.fusion.encoders import Features, ImageEncoder, TextEncoder
from sentilens.progress import progress_bar
from sentilens.runs import save_weights

ENCODE_BATCH = 16


def default_cache_dir() -> Path:
    """``fusion`` under :func:`sentilens.cache.cache_root`."""
    return cache_root() / "fusion"


class FeatureCache:
    """Content-addressed safetensors files under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> Features | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))
        except (SafetensorError, OSError):
            return None

    def put(self, key: str, features: Features) -> None:
        save_weights(self.path(key), features)


def cache_key(fingerprint: str, content: bytes) -> str:
    return hashlib.sha256(fingerprint.encode() + b"\0" + hashlib.sha256(content).digest()).hexdigest()


def has_text(post: Post) -> bool:
    return bool(post.text.strip())


def _image_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        load_image(path)  # raises the loader's ImageError naming the file and the problem
        raise


@dataclass
class PostFeatures:
    """One post's cached features; ``None`` for a modality the post lacks (or the run does not use)."""

    text: Features | None = None
    image: Features | None = None


@dataclass
class CacheStats:
    """How many features came from the cache and how many were computed, per modality."""

    text_hits: int = 0
    text_encoded: int = 0
    image_hits: int = 0
    image_encoded: int = 0

    def to_dict(self) -> dict:
        return {"text_hits": self.text_hits, "text_encoded": self.text_encoded,
                "image_hits": self.image_hits, "image_encoded": self.image_encoded}


def _lookup(keys: dict[int, str], cache: FeatureCache | None, encode: Callable[[list[int]], list[Features]],
            description: str, unit: str, size: Callable[[int], int] | None = None
            ) -> tuple[dict[int, Features], int, int]:
    """Features of every index in ``keys``: cached ones read, the others encoded in batches and stored.

    ``size`` (e.g. a text's length) orders the encoding so each batch holds contents of similar size
    and pads little (features are stored unpadded, whichever batch computed them).

    Returns the features, how many posts were served from the cache, and how many distinct contents were encoded.
    """
    found: dict[int, Features] = {}
    by_key: dict[str, list[int]] = {}
    for index, key in keys.items():
        by_key.setdefault(key, []).append(index)
    todo = []
    for key, indices in by_key.items():
        cached = cache.get(key) if cache is not None else None
        if cached is None:
            todo.append(key)
        else:
            found.update({i: cached for i in indices})
    hits = len(keys) - sum(len(by_key[k]) for k in todo)
    if size is not None:
        todo.sort(key=lambda k: size(by_key[k][0]))
    # A bar only for work longer than one batch: a single post predicted by the server prints nothing.
    with progress_bar() if len(todo) > ENCODE_BATCH else nullcontext() as bar:
        task = bar.add_task(description, total=len(todo), unit=unit, status="") if bar else None
        for start in range(0, len(todo), ENCODE_BATCH):
            chunk = todo[start:start + ENCODE_BATCH]
            for key, features in zip(chunk, encode([by_key[k][0] for k in chunk]), strict=True):
                if cache is not None:
                    cache.put(key, features)
                found.update({i: features for i in by_key[key]})
            if bar:
                bar.advance(task, len(chunk))
    return found, hits, len(todo)


def featurize(posts: Sequence[Post], text_encoder: TextEncoder | None, image_encoder: ImageEncoder | None,
              cache: FeatureCache | None) -> tuple[list[PostFeatures], CacheStats]:
    """Features of ``posts`` for the encoders given (``None`` skips a modality), through ``cache``.

    Posts with empty text or no image get ``None`` for that modality: the model puts its learned
    placeholder there. Identical contents are encoded once.
    """
    stats = CacheStats()
    result = [PostFeatures() for _ in posts]
    if text_encoder is not None:
        keys = {i: cache_key(text_encoder.fingerprint, p.text.encode()) for i, p in enumerate(posts) if has_text(p)}
        found, stats.text_hits, stats.text_encoded = _lookup(
            keys, cache, lambda idx: text_encoder.encode([posts[i].text for i in idx]), "encoding texts", "text",
            size=lambda i: len(posts[i].text))
        for i, features in found.items():
            result[i].text = features
    if image_encoder is not None:
        keys = {i: cache_key(image_encoder.fingerprint, _image_bytes(p.image)) for i, p in enumerate(posts) if p.image}
        found, stats.image_hits, stats.image_encoded = _lookup(
            keys, cache, lambda idx: image_encoder.encode([load_image(posts[i].image) for i in idx]),
            "encoding images", "img")
        for i, features in found.items():
            result[i].image = features
    return result, stats
