"""Uploaded images: checked with the one image loader, then kept as files only while their request lives.

Predictors read ``Post.image`` as a path, so each accepted upload is written, as received, to
a private folder (``mkdtemp``: readable by this user only) under a random name, and deleted
when its request ends, answered or not. Before that, :func:`check_image` decodes it through
:func:`sentilens.data.images.load_image` with the server's pixel cap; a refusal gets the status
that fits, decided on the image header (the loader's message is for people, not for code):
413 over the pixel cap, 415 for a format Pillow does not know, 422 for a corrupt file. A decoded
image whose long side passes ``max_aspect_ratio`` times its short side is refused too (422): the
models scale the short side up to their input size, so a thin strip would become enormous.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sentilens.data.images import ImageError, load_image
from sentilens.data.records import Post
from sentilens.serve.errors import ApiError


def check_image(data: bytes, max_pixels: int, max_aspect_ratio: float, field: str) -> None:
    """Decode ``data`` fully (as the predictor will); raise the fitting :class:`ApiError` if it cannot be used."""
    try:
        width, height = load_image(data, max_pixels).size
    except ImageError as err:
        raise refusal(data, max_pixels, f"{field}: {err.problem}", field) from None
    if max(width, height) > max_aspect_ratio * min(width, height):
        raise ApiError(422, "extreme_aspect_ratio", f"{field}: a {width}x{height} image; the long side may be at most "
                       f"{max_aspect_ratio:g} times the short side (models enlarge the short side)", field)


def refusal(data: bytes, max_pixels: int, message: str, field: str) -> ApiError:
    """The status of an image the loader refused, from what its header says."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError:
        return ApiError(413, "too_many_pixels", message, field)
    except UnidentifiedImageError:
        return ApiError(415, "unsupported_image", message, field)
    except (OSError, SyntaxError, ValueError):
        return ApiError(422, "corrupt_image", message, field)
    if width * height > max_pixels:
        return ApiError(413, "too_many_pixels", message, field)
    return ApiError(422, "corrupt_image", message, field)


class UploadStore:
    """A private folder holding the images of the requests in flight."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sentilens-serve-"))

    def store(self, posts: Sequence[tuple[str, str, bytes | None]]) -> list[Post]:
        """``(id, text, image bytes)`` -> posts whose images are files here; pair with :meth:`release`."""
        stored: list[Post] = []
        try:
            for post_id, text, image in posts:
                path = None if image is None else self.root / f"{uuid.uuid4().hex}.upload"
                stored.append(Post(id=post_id, text=text, image=None if path is None else str(path)))
                if path is not None:
                    path.write_bytes(image)
        except BaseException:
            self.release(stored)
            raise
        return stored

    def release(self, posts: Sequence[Post]) -> None:
        for post in posts:
            if post.image is not None:
                Path(post.image).unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
