"""The one safe image loader: everything in sentilens that reads an image calls ``load_image``.

It opens a file path or raw bytes, refuses decompression bombs before decoding (a pixel cap
checked on the header), decodes fully (so a truncated file fails here, not later in a batch),
takes the first frame of an animation, applies the EXIF orientation, and converts every mode
met in the wild to RGB: palette and LA/RGBA images are composited on white so transparent
areas do not turn black, CMYK goes through Pillow's conversion, and 16/32-bit greyscale is
scaled down to 8 bits rather than clipped.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from sentilens.errors import SentilensError

DEFAULT_MAX_PIXELS = 40_000_000
"""Pixel cap (width x height): about a 6300 x 6300 photo, far above any social-media upload."""


class ImageError(SentilensError):
    """An image that cannot be used: missing, not an image, corrupt, or too large."""


def load_image(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``source`` (a path or the file's bytes) and return an 8-bit RGB image.

    Raises :class:`ImageError` naming the file and the problem for anything else.
    """
    name = "<upload>" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise ImageError("image file not found", name)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(f"image has {width}x{height} pixels, over the cap of {max_pixels}", name)
            img.seek(0)
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not a readable image (unknown format)", name) from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"refused as a decompression bomb ({err})", name) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"corrupt or truncated image ({err})", name) from None


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
