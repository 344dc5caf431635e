"""The one safe image loader: everything in sentilens that reads an image calls ``load_image``.

It opens a file path or raw bytes and refuses, before decoding any pixel:

- a format outside the allow-list (JPEG, PNG, GIF, WebP, BMP, TIFF). Pillow can identify
  dozens of formats and hands some to outside programs (EPS and PDF go to Ghostscript): only
  the allow-listed plugins are ever asked to identify the bytes, whatever the file is named;
- a file over ``max_bytes`` (checked on the file size, before reading);
- an image over ``max_pixels`` (width x height read from the header: a decompression bomb);
- an image whose long side passes ``max_aspect_ratio`` times its short side: the models scale
  the short side up to their input size, so a 143-byte 20000 x 1 PNG would become a tensor of
  gigabytes (measured: 4.7 GB in ``predict``; 1 x 60000 was a ``MemoryError``).

Then it decodes fully (so a truncated file fails here, not later in a batch), takes the first
frame of an animation, applies the EXIF orientation, and converts every mode met in the wild to
RGB: palette and LA/RGBA images are composited on white so transparent areas do not turn black,
CMYK goes through Pillow's conversion, and 16/32-bit greyscale is scaled down to 8 bits rather
than clipped. Every refusal is an :class:`ImageError` whose ``kind`` says which rule refused it
(the server maps it to an HTTP status without opening the bytes again).

``draft_size`` (prediction, issue 13): a JPEG is decoded directly at a reduced scale (1/2, 1/4
or 1/8, libjpeg's DCT scaling via ``Image.draft``) as long as its shorter side stays at least
``draft_size``. A 1200 x 900 photo for a 224-pixel encoder decodes at 300 x 225, about four times
faster than in full, and the encoder's own resize then starts from a smaller image. Every limit
above is checked first, on the header, either way.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from sentilens.errors import SentilensError
from sentilens.outputs import input_problem

ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
"""Pillow plugins allowed to identify and decode an image; no other decoder is ever run."""
DEFAULT_MAX_PIXELS = 40_000_000
"""Pixel cap (width x height): about a 6300 x 6300 photo, far above any social-media upload."""
DEFAULT_MAX_BYTES = 50 * 2**20
"""File-size cap: a 40-megapixel JPEG is about 15 MB; 50 MiB leaves room for PNG and TIFF."""
DEFAULT_MAX_ASPECT_RATIO = 20.0
"""Long side over short side: panoramas and tall infographics stay under 10."""


@dataclass(frozen=True)
class ImageLimits:
    """What one image may be; the same rules everywhere, the server passes its own values."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO


class ImageError(SentilensError):
    """An image that cannot be used. ``kind``: missing, too_large, too_many_pixels, unsupported (also a folder,
    named pipe or device given as an image), extreme_aspect_ratio or corrupt."""

    def __init__(self, problem: str, path: str | Path | None = None, kind: str = "corrupt"):
        super().__init__(problem, path)
        self.kind = kind


def load_image(source: str | Path | bytes, limits: ImageLimits | None = None,
               draft_size: int | None = None) -> Image.Image:
    """Open ``source`` (a path or the file's bytes) and return an 8-bit RGB image.

    With ``draft_size``, a JPEG may be decoded at a reduced scale whose shorter side is still at
    least ``draft_size`` pixels (other formats are decoded in full).

    Raises :class:`ImageError` naming the file and the problem for anything else.
    """
    limits = limits or ImageLimits()
    name = "<upload>" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes):
        size = len(source)
    else:
        path = Path(source)
        problem = input_problem(path, "an image file", missing="image file not found")
        if problem:  # a folder, FIFO or device is named as such (a FIFO is never opened: that would block)
            raise ImageError(problem, name, "missing" if problem == "image file not found" else "unsupported")
        size = path.stat().st_size
    if size == 0:
        raise ImageError("empty file (0 bytes)", name, "corrupt")
    if size > limits.max_bytes:
        raise ImageError(f"image file has {size} bytes, over the cap of {limits.max_bytes}", name, "too_large")
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(fp, formats=ALLOWED_FORMATS) as img:
            check_shape(img.size, limits, name)
            img.seek(0)
            if draft_size is not None and img.format == "JPEG":
                _draft(img, draft_size)
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not a readable image (allowed formats: {', '.join(ALLOWED_FORMATS)})", name,
                         "unsupported") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"refused as a decompression bomb ({err})", name, "too_many_pixels") from None
    except (OSError, SyntaxError, ValueError, MemoryError) as err:
        raise ImageError(f"corrupt or truncated image ({err})", name, "corrupt") from None


def check_shape(size: tuple[int, int], limits: ImageLimits, name: str) -> None:
    """The pixel and aspect-ratio rules, on the size the header declares."""
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"image has {width}x{height} pixels", name, "corrupt")
    if width * height > limits.max_pixels:
        raise ImageError(f"image has {width}x{height} pixels, over the cap of {limits.max_pixels}", name,
                         "too_many_pixels")
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise ImageError(f"a {width}x{height} image; the long side may be at most {limits.max_aspect_ratio:g} "
                         "times the short side (models enlarge the short side)", name, "extreme_aspect_ratio")


def _draft(img: Image.Image, size: int) -> None:
    """Ask libjpeg to decode at the smallest scale whose shorter side is still ``size`` or more.

    ``Image.draft`` keeps both sides at or above the requested box, so the box is the image's own
    aspect ratio scaled to a shorter side of ``size``; EXIF rotation does not change the shorter side.
    """
    width, height = img.size
    scale = size / min(width, height)
    if scale < 1:
        img.draft(img.mode if img.mode in ("RGB", "L") else None, (max(1, round(width * scale)),
                                                                   max(1, round(height * scale))))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L") if img.mode != "I" else _scale_32bit(img)
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _scale_32bit(img: Image.Image) -> Image.Image:
    lo, hi = img.getextrema()
    span = max(hi - lo, 1)
    return img.point(lambda v: (v - lo) * 255 / span).convert("L")
