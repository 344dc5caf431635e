"""The one image loader: every mode met in the wild comes back as 8-bit RGB, bad files fail by name."""

import io

import numpy as np
import pytest
from PIL import Image

from sentilens.data.images import ImageError, ImageLimits, load_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def close(pixel, expected, tolerance=12):
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def test_rgb_jpeg_from_path_and_bytes(tmp_path):
    path = tmp_path / "red.jpg"
    Image.new("RGB", (16, 8), RED).save(path, "JPEG", quality=95)
    for source in (path, str(path), path.read_bytes()):
        img = load_image(source)
        assert img.mode == "RGB" and img.size == (16, 8)
        assert close(img.getpixel((8, 4)), RED)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, "JPEG", quality=95)  # full magenta+yellow = red
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    img = load_image(path)
    assert img.mode == "RGB"
    assert close(img.getpixel((4, 4)), RED)


def test_palette_png_with_transparency_composites_on_white(tmp_path):
    path = tmp_path / "palette.png"
    img = Image.new("P", (4, 2))
    img.putpalette([*RED, *BLUE] + [0, 0, 0] * 254)
    img.putdata([0, 0, 1, 1, 0, 0, 1, 1])
    img.save(path, transparency=1)  # palette index 1 (blue) is fully transparent
    with Image.open(path) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    rgb = load_image(path)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == RED
    assert rgb.getpixel((2, 0)) == WHITE  # transparent: white, not the hidden blue nor black


@pytest.mark.parametrize(("mode", "opaque", "clear", "expected_opaque"), [
    ("RGBA", (255, 0, 0, 255), (0, 0, 255, 0), RED),
    ("LA", (60, 255), (200, 0), (60, 60, 60)),
])
def test_alpha_images_composite_on_white(tmp_path, mode, opaque, clear, expected_opaque):
    img = Image.new(mode, (2, 1))
    img.putpixel((0, 0), opaque)
    img.putpixel((1, 0), clear)
    path = tmp_path / f"{mode}.png"
    img.save(path)
    rgb = load_image(path)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == expected_opaque
    assert rgb.getpixel((1, 0)) == WHITE


def test_half_transparent_pixel_is_blended_with_white(tmp_path):
    path = tmp_path / "half.png"
    Image.new("RGBA", (1, 1), (0, 0, 0, 128)).save(path)
    assert close(load_image(path).getpixel((0, 0)), (127, 127, 127), tolerance=1)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)  # 32896 / 256 = 128.5
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I")
    rgb = load_image(path)
    assert rgb.mode == "RGB"
    grey = [rgb.getpixel((x, 0))[0] for x in range(3)]
    assert grey[0] == 0 and grey[2] == 255 and abs(grey[1] - 128) <= 1  # clipping would give 255 for all > 255


def test_animated_gif_gives_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (6, 6), RED), Image.new("RGB", (6, 6), BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as raw:
        assert raw.n_frames == 2
    assert close(load_image(path).getpixel((3, 3)), RED, tolerance=0)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), BLUE)
    img.paste(RED, (0, 0, 20, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    img.save(path, "JPEG", quality=95, exif=exif)
    rgb = load_image(path)
    assert rgb.size == (20, 40)
    assert close(rgb.getpixel((10, 5)), RED)  # the left half is now on top
    assert close(rgb.getpixel((10, 35)), BLUE)


def test_truncated_jpeg_names_the_file(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert str(path) in str(err.value)
    assert "truncated" in err.value.problem


def test_non_image_bytes_and_missing_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_bytes(b"this is a text file, not a picture\n")
    with pytest.raises(ImageError, match="not a readable image") as err:
        load_image(path)
    assert err.value.path == str(path)
    with pytest.raises(ImageError, match="not a readable image") as err:
        load_image(b"\x00\x01\x02garbage")
    assert err.value.path == "<upload>"
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "absent.jpg")


def test_pixel_cap_refuses_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (30, 20), RED).save(path)
    assert load_image(path, ImageLimits(max_pixels=600)).size == (30, 20)
    with pytest.raises(ImageError, match="30x20 pixels, over the cap of 599"):
        load_image(path, ImageLimits(max_pixels=599))


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
       b"newpath 0 0 moveto 10 10 lineto stroke showpage\n%%EOF\n")


def test_eps_named_jpg_is_refused_without_running_its_decoder(tmp_path, monkeypatch):
    """Defect 1: Pillow identifies EPS by content and hands it to Ghostscript; only allow-listed plugins may look."""
    from PIL import EpsImagePlugin

    def forbidden(*args, **kwargs):
        raise AssertionError("the EPS plugin was asked to read the bytes")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", forbidden)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", forbidden)
    path = tmp_path / "photo.jpg"
    path.write_bytes(EPS)
    for source in (path, EPS):
        with pytest.raises(ImageError, match="allowed formats: JPEG, PNG, GIF, WEBP, BMP, TIFF") as err:
            load_image(source)
        assert err.value.kind == "unsupported"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"])
def test_every_allowed_format_opens(fmt):
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), RED).save(buffer, format=fmt)
    assert load_image(buffer.getvalue()).size == (12, 10)


@pytest.mark.parametrize("fmt", ["ICO", "PCX", "TGA", "PPM"])
def test_formats_outside_the_allow_list_are_refused(fmt):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), RED).save(buffer, format=fmt)
    with Image.open(io.BytesIO(buffer.getvalue())) as img:  # Pillow itself would read it
        assert img.format == fmt
    with pytest.raises(ImageError) as err:
        load_image(buffer.getvalue())
    assert err.value.kind == "unsupported"


def test_thin_strip_is_refused_on_its_header(tmp_path):
    """Defect 4: a 143-byte 20000x1 PNG cost 4.7 GB in predict; the aspect rule is the loader's own now."""
    path = tmp_path / "strip.png"
    Image.new("L", (20000, 1)).save(path, optimize=True)
    assert path.stat().st_size < 200
    with pytest.raises(ImageError, match="20000x1 image; the long side may be at most 20 times") as err:
        load_image(path)
    assert err.value.kind == "extreme_aspect_ratio"
    Image.new("RGB", (200, 10)).save(path)
    assert load_image(path).size == (200, 10)  # exactly 20:1 is allowed
    with pytest.raises(ImageError):
        load_image(path, ImageLimits(max_aspect_ratio=19.9))


def test_byte_cap_and_empty_file(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (8, 8), RED).save(path)
    size = path.stat().st_size
    assert load_image(path, ImageLimits(max_bytes=size)).size == (8, 8)
    with pytest.raises(ImageError, match=f"{size} bytes, over the cap of {size - 1}") as err:
        load_image(path, ImageLimits(max_bytes=size - 1))
    assert err.value.kind == "too_large"
    with pytest.raises(ImageError, match="empty file"):
        load_image(b"")
