"""Uploaded images: checked with the one image loader, then kept as files only while their request lives.

Predictors read ``Post.image`` as a path, so each accepted upload is written, as received, to
a private folder (``mkdtemp``: readable by this user only) under a random name, and deleted
when its request ends, answered or not. Before that, :func:`check_image` decodes it through
:func:`sentilens.data.images.load_image` with the server's limits.  The loader
says which rule refused an image (``ImageError.kind``): 413 over the byte or pixel cap, 415 for a
format outside the allow-list, 422 for an extreme aspect ratio or a corrupt (or empty) file.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from sentilens.data.images import ImageError, ImageLimits, load_image
from sentilens.data.records import Post
from sentilens.serve.errors import ApiError

STATUS = {"too_large": (413, "payload_too_large"), "too_many_pixels": (413, "too_many_pixels"),
          "unsupported": (415, "unsupported_image"), "extreme_aspect_ratio": (422, "extreme_aspect_ratio")}
"""HTTP status and error code of each kind of loader refusal; any other kind is a corrupt image (422)."""


def check_image(data: bytes, limits: ImageLimits, field: str) -> None:
    """Decode ``data`` fully (as the predictor will); raise the fitting :class:`ApiError` if it cannot be used."""
    try:
        load_image(data, limits)
    except ImageError as err:
        status, code = STATUS.get(err.kind, (422, "corrupt_image"))
        raise ApiError(status, code, f"{field}: {err.problem}", field) from None


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
