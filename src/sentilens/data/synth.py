"""The synthetic demo set: image + text posts whose label needs both modalities (issue 2).

Neither paper defines such a set; it exists so the demo and the tests can train and evaluate
both model families in seconds on a CPU, on data where fusing the modalities measurably helps.

Every post is one of five *kinds*. A kind fixes what the text says on its surface, what the
image shows, and the label (positive / neutral / negative):

============  =============  ==============  ==========  ==========
kind          text           image           label       share
============  =============  ==============  ==========  ==========
text_only     pos or neg     neutral         = text      30 %
image_only    neutral        pos or neg      = image     30 %
sarcasm       positive       negative        negative    15 %
agree         pos or neg     same as text    = both      10 %
neutral       neutral        neutral         neutral     15 %
============  =============  ==============  ==========  ==========

Polar kinds are split evenly between positive and negative, so the label mix is 35 % positive,
15 % neutral, 50 % negative. Texts are drawn from one template pool per surface sentiment,
whatever the kind: a sarcastic "great day..." comes from the very pool that sincere positive
posts use, and a neutral image from the same scenes whether its text is polar or not. So a
model that sees one modality sees the same distribution for every kind sharing that modality's
surface, and its best accuracy is the sum, over surface groups, of the group's majority label
share (:func:`modality_ceilings`):

- text only: positive surface (text_only+ 15, agree+ 5, sarcasm 15: majority positive 20) +
  negative surface (text_only- 15, agree- 5: all negative 20) + neutral surface (image_only+ 15,
  image_only- 15, neutral 15: a three-way tie, 15) = **55 %**;
- image only: positive image (image_only+ 15, agree+ 5: 20) + negative image (image_only- 15,
  agree- 5, sarcasm 15: 35) + neutral image (text_only+ 15, text_only- 15, neutral 15: 15)
  = **70 %**;
- both modalities: each (text, image) pair has one label, **100 %**.

For a finite ``n`` the cell counts are rounded (largest remainder), so the ceilings of a
generated set can differ from these by O(1/n); with n a multiple of 20 they are exact.

Images (Pillow, ``image_size`` square PNG) carry a strong but *local* cue, as real tweet images
often do (a face, a sign or a photo inside a larger frame): the scene that shows the image's
sentiment fills a square *cue box* of 36-58 % of the frame's side (13-34 % of its area; ``cue_side``
sets another range, e.g. the demo's smaller cues), and
everything around it is uninformative, drawn from one distribution whatever the label: a
plain, gradient or striped backdrop of random colours, optionally cut by padding bars
(top/bottom or left/right, black, white or grey, 6-20 % of the side each) or a border (3-10 %).
The box is placed uniformly inside what the bars or border leave, and recorded in the row's
``meta["cue_box"]`` as ``[x0, y0, x1, y1]`` pixels (x1, y1 exclusive), with the backdrop in
``meta["layout"]``. So a filter that keeps the patches the cue is in loses nothing, and one
that keeps background loses the image. The scenes: positive = a bright warm sky with a sun over
hills, or a smiling yellow face; negative = a dark slate sky with storm clouds, rain and
lightning, or a frowning grey face in the rain; neutral = one or two everyday objects (cup,
box, chair, book, lamp) in muted colours on a grey-beige wall. Nuisance variation keeps
classes from being single images: positions, sizes, colour jitter, smooth blotches and fine
grain over the whole frame. The split is stratified per (kind, text, image) cell, 8:1:1,
so every split keeps the mix above and each class is split 8:1:1 (exactly when n is a multiple
of 200). Same seed, same bytes: every image has its own seed derived from the set's seed and
its index, and PNG encoding is deterministic.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sentilens.data.labels import SENTIMENT_LABELS
from sentilens.data.records import SPLITS, Post, write_manifest
from sentilens.data.splits import split_sizes
from sentilens.errors import SentilensError
from sentilens.outputs import atomic_writer

LABELS = list(SENTIMENT_LABELS)
KINDS = ("text_only", "image_only", "sarcasm", "agree", "neutral")
KIND_FRACTIONS: dict[str, float] = {"text_only": 0.30, "image_only": 0.30, "sarcasm": 0.15, "agree": 0.10,
                                    "neutral": 0.15}
MIN_IMAGE_SIZE = 32


@dataclass(frozen=True)
class Cell:
    """One (kind, text sentiment, image sentiment) combination, its label and its share of the set."""

    kind: str
    text_sentiment: str
    image_sentiment: str
    label: str
    share: Fraction


def kind_cells(fractions: Mapping[str, float] = KIND_FRACTIONS) -> list[Cell]:
    """Expand kind shares into cells; polar kinds split evenly between positive and negative."""
    unknown = set(fractions) - set(KINDS)
    if unknown:
        raise SentilensError(f"unknown kinds {sorted(unknown)} (choose from {', '.join(KINDS)})")
    shares = {kind: Fraction(str(fractions.get(kind, 0))) for kind in KINDS}
    if any(share < 0 for share in shares.values()) or sum(shares.values()) != 1:
        raise SentilensError(f"kind fractions must be non-negative and sum to 1, got {dict(fractions)}")
    half = Fraction(1, 2)
    cells = []
    for polarity in ("positive", "negative"):
        cells.append(Cell("text_only", polarity, "neutral", polarity, shares["text_only"] * half))
    for polarity in ("positive", "negative"):
        cells.append(Cell("image_only", "neutral", polarity, polarity, shares["image_only"] * half))
    cells.append(Cell("sarcasm", "positive", "negative", "negative", shares["sarcasm"]))
    for polarity in ("positive", "negative"):
        cells.append(Cell("agree", polarity, polarity, polarity, shares["agree"] * half))
    cells.append(Cell("neutral", "neutral", "neutral", "neutral", shares["neutral"]))
    return cells


def modality_ceilings(fractions: Mapping[str, float] = KIND_FRACTIONS) -> dict[str, float]:
    """Best accuracy reachable from the text alone, the image alone, and both, by construction.

    A one-modality model cannot tell apart posts whose visible modality has the same surface
    sentiment (their contents are drawn from the same pool), so the best it can do in each
    surface group is to answer the group's majority label. A model seeing both sees the
    (text, image) pair, and each pair has a single label.
    """
    cells = kind_cells(fractions)

    def ceiling(seen: Callable[[Cell], object]) -> float:
        groups: dict[object, Counter] = defaultdict(Counter)
        for cell in cells:
            groups[seen(cell)][cell.label] += cell.share
        return float(sum(max(counts.values()) for counts in groups.values()))

    return {"text_only": ceiling(lambda c: c.text_sentiment), "image_only": ceiling(lambda c: c.image_sentiment),
            "both": ceiling(lambda c: (c.text_sentiment, c.image_sentiment))}


def cell_counts(n: int, fractions: Mapping[str, float] = KIND_FRACTIONS) -> list[tuple[Cell, int]]:
    """Round ``n * share`` per cell by largest remainder (ties broken by cell order), summing to ``n``."""
    cells = kind_cells(fractions)
    exact = [cell.share * n for cell in cells]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(cells)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return list(zip(cells, counts, strict=True))


# ----------------------------------------------------------------------------- texts

WHEN = ["today", "this morning", "tonight", "on a monday", "this weekend", "after work", "at lunch"]
ACTIVITY = ["waiting for the bus", "doing laundry", "commuting", "grocery shopping", "walking the dog",
            "cooking dinner", "working from home", "queueing at the bank"]
THING = ["monday", "commute", "weekend", "afternoon", "meeting", "morning", "trip", "holiday"]
PLACE = ["the office", "the station", "home", "the park", "downtown", "the kitchen", "the library"]
OBJECT = ["cup", "box", "chair", "book", "lamp", "desk", "bag", "umbrella"]
ENDINGS = ["", "", "...", " #today", " #life"]

TEMPLATES = {
    # One pool for every positive-surface text, sincere or sarcastic: that is what makes sarcasm
    # invisible to a text-only model.
    "positive": ["great day {when}!", "just what I needed {when}", "love {activity} {when}",
                 "what a perfect {thing}", "best {thing} ever", "so happy {when}", "life could not be better {when}",
                 "wonderful {thing}, thanks everyone", "loving every minute of this {thing}"],
    "negative": ["worst {thing} ever", "hate {activity} {when}", "feeling awful {when}",
                 "this {thing} ruined everything", "so sad and tired {when}", "terrible {thing}, never again",
                 "ugh, {activity} again", "what a miserable {thing}", "I am so upset about this {thing}"],
    "neutral": ["{activity} {when}", "photo from {place} {when}", "at {place} {when}",
                "here is the {object} I mentioned", "{thing} at {place}", "posting this from {place}",
                "the {object} on my desk", "a new {object} for {place}", "the {object} from {place}"],
}


def synth_text(sentiment: str, rng: random.Random) -> str:
    """A short tweet-like text whose surface sentiment is ``sentiment``."""
    template = rng.choice(TEMPLATES[sentiment])
    text = template.format(when=rng.choice(WHEN), activity=rng.choice(ACTIVITY), thing=rng.choice(THING),
                           place=rng.choice(PLACE), object=rng.choice(OBJECT))
    text += rng.choice(ENDINGS)
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


# ----------------------------------------------------------------------------- images

Color = tuple[int, int, int]


def _jitter(color: Color, rng: random.Random, amount: int = 12) -> Color:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in color)


def _gradient(size: int, top: Color, bottom: Color) -> Image.Image:
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    rows = (1 - t) * np.array(top, dtype=float) + t * np.array(bottom, dtype=float)
    return Image.fromarray(np.repeat(rows, size, axis=1).astype(np.uint8), "RGB")


def _face(draw: ImageDraw.ImageDraw, size: int, rng: random.Random, skin: Color, smile: bool) -> None:
    r = size * rng.uniform(0.22, 0.32)
    cx, cy = size * rng.uniform(0.38, 0.62), size * rng.uniform(0.4, 0.6)
    line = max(2, round(size / 40))
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_jitter(skin, rng), outline=(40, 35, 30), width=line)
    eye = r * 0.12
    for dx in (-0.35, 0.35):
        ex, ey = cx + dx * r, cy - 0.25 * r
        draw.ellipse((ex - eye, ey - eye * 1.4, ex + eye, ey + eye * 1.4), fill=(30, 25, 25))
    m = r * 0.5
    if smile:  # lower half of a circle below the eyes: the corners go up
        draw.arc((cx - m, cy - 0.35 * r, cx + m, cy + 0.55 * r), 20, 160, fill=(60, 20, 20), width=line + 1)
    else:  # upper half of a circle low on the face: the corners go down
        draw.arc((cx - m, cy + 0.3 * r, cx + m, cy + 1.0 * r), 200, 340, fill=(30, 30, 40), width=line + 1)
        tx, ty = cx + 0.35 * r, cy + 0.05 * r
        draw.ellipse((tx - eye * 0.8, ty - eye * 0.6, tx + eye * 0.8, ty + eye * 1.6), fill=(120, 170, 230))


def _sun(draw: ImageDraw.ImageDraw, size: int, rng: random.Random, cx: float, cy: float, r: float) -> None:
    ray = max(2, round(size / 50))
    for k in range(12):
        angle = k * np.pi / 6 + rng.uniform(-0.1, 0.1)
        x0, y0 = cx + 1.2 * r * np.cos(angle), cy + 1.2 * r * np.sin(angle)
        x1, y1 = cx + 1.7 * r * np.cos(angle), cy + 1.7 * r * np.sin(angle)
        draw.line((x0, y0, x1, y1), fill=(255, 230, 90), width=ray)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_jitter((255, 236, 110), rng, 8))


def _rain(draw: ImageDraw.ImageDraw, size: int, rng: random.Random, top: float) -> None:
    drops = rng.randint(25, 45)
    length = size * 0.07
    for _ in range(drops):
        x, y = rng.uniform(0, size), rng.uniform(top, size)
        draw.line((x, y, x - length * 0.3, y + length), fill=_jitter((150, 165, 190), rng, 10), width=1)


def _clouds(draw: ImageDraw.ImageDraw, size: int, rng: random.Random, color: Color, count: int, y_max: float) -> None:
    for _ in range(count):
        cx, cy = rng.uniform(0, size), rng.uniform(-0.05 * size, y_max)
        rx, ry = size * rng.uniform(0.18, 0.32), size * rng.uniform(0.08, 0.14)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=_jitter(color, rng, 10))


def _positive_scene(size: int, rng: random.Random) -> tuple[Image.Image, str]:
    img = _gradient(size, _jitter((255, 170, 60), rng), _jitter((255, 225, 140), rng))
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.5:
        r = size * rng.uniform(0.1, 0.16)
        _sun(draw, size, rng, size * rng.uniform(0.2, 0.8), size * rng.uniform(0.18, 0.38), r)
        hill = size * rng.uniform(0.62, 0.78)
        draw.ellipse((-0.3 * size, hill, 1.3 * size, hill + size), fill=_jitter((150, 200, 70), rng))
        return img, "sunny"
    _sun(draw, size, rng, size * rng.choice([0.12, 0.88]), size * 0.12, size * 0.07)
    _face(draw, size, rng, (255, 215, 50), smile=True)
    return img, "smile"


def _negative_scene(size: int, rng: random.Random) -> tuple[Image.Image, str]:
    img = _gradient(size, _jitter((35, 40, 55), rng, 8), _jitter((70, 75, 90), rng, 8))
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.5:
        _clouds(draw, size, rng, (80, 84, 96), rng.randint(4, 7), size * 0.35)
        if rng.random() < 0.6:
            x = size * rng.uniform(0.25, 0.75)
            y = size * 0.3
            s = size * 0.08
            bolt = [(x, y), (x - s, y + 2 * s), (x, y + 2 * s), (x - s * 0.8, y + 4.5 * s), (x + s, y + 1.5 * s),
                    (x + 0.1 * s, y + 1.5 * s), (x + 0.7 * s, y)]
            draw.polygon(bolt, fill=_jitter((235, 225, 140), rng, 10))
        _rain(draw, size, rng, size * 0.25)
        return img, "storm"
    _face(draw, size, rng, (120, 130, 150), smile=False)
    _clouds(draw, size, rng, (75, 78, 90), rng.randint(2, 3), size * 0.1)
    _rain(draw, size, rng, 0.0)
    return img, "frown"


def _neutral_scene(size: int, rng: random.Random) -> tuple[Image.Image, str]:
    wall = _jitter((165, 160, 150), rng, 10)
    img = Image.new("RGB", (size, size), wall)
    draw = ImageDraw.Draw(img)
    floor = size * rng.uniform(0.68, 0.8)
    draw.rectangle((0, floor, size, size), fill=_jitter((135, 128, 118), rng, 8))
    objects = rng.sample(sorted(_OBJECTS), rng.choice([1, 1, 2]))
    slots = [0.5] if len(objects) == 1 else [0.3, 0.7]
    for name, slot in zip(objects, slots, strict=True):
        scale = size * rng.uniform(0.18, 0.26)
        cx = size * (slot + rng.uniform(-0.08, 0.08))
        _OBJECTS[name](draw, cx, floor, scale, _jitter(rng.choice(_MUTED), rng, 10))
    return img, "+".join(objects)


_MUTED: list[Color] = [(120, 105, 90), (100, 105, 112), (140, 130, 110), (115, 120, 110), (95, 90, 88)]


def _cup(draw: ImageDraw.ImageDraw, cx: float, floor: float, s: float, color: Color) -> None:
    draw.rectangle((cx - 0.5 * s, floor - 1.1 * s, cx + 0.5 * s, floor), fill=color)
    handle = (cx + 0.3 * s, floor - 0.9 * s, cx + 0.9 * s, floor - 0.3 * s)
    draw.ellipse(handle, outline=color, width=max(2, int(s / 8)))


def _box(draw: ImageDraw.ImageDraw, cx: float, floor: float, s: float, color: Color) -> None:
    top = tuple(min(255, c + 20) for c in color)
    draw.rectangle((cx - 0.8 * s, floor - 1.2 * s, cx + 0.6 * s, floor), fill=color)
    draw.polygon([(cx - 0.8 * s, floor - 1.2 * s), (cx - 0.5 * s, floor - 1.5 * s), (cx + 0.9 * s, floor - 1.5 * s),
                  (cx + 0.6 * s, floor - 1.2 * s)], fill=top)


def _chair(draw: ImageDraw.ImageDraw, cx: float, floor: float, s: float, color: Color) -> None:
    w = max(2, int(s / 7))
    draw.rectangle((cx - 0.6 * s, floor - 1.0 * s, cx + 0.6 * s, floor - 0.85 * s), fill=color)
    draw.rectangle((cx + 0.45 * s, floor - 2.2 * s, cx + 0.6 * s, floor - 0.85 * s), fill=color)
    for x in (cx - 0.55 * s, cx + 0.5 * s):
        draw.line((x, floor - 0.85 * s, x, floor), fill=color, width=w)


def _book(draw: ImageDraw.ImageDraw, cx: float, floor: float, s: float, color: Color) -> None:
    draw.rectangle((cx - 0.9 * s, floor - 0.45 * s, cx + 0.9 * s, floor), fill=color)
    draw.line((cx - 0.9 * s, floor - 0.22 * s, cx + 0.9 * s, floor - 0.22 * s), fill=(200, 195, 185), width=1)


def _lamp(draw: ImageDraw.ImageDraw, cx: float, floor: float, s: float, color: Color) -> None:
    draw.rectangle((cx - 0.4 * s, floor - 0.12 * s, cx + 0.4 * s, floor), fill=color)
    draw.line((cx, floor - 0.12 * s, cx, floor - 1.6 * s), fill=color, width=max(2, int(s / 8)))
    draw.polygon([(cx - 0.35 * s, floor - 2.2 * s), (cx + 0.35 * s, floor - 2.2 * s), (cx + 0.6 * s, floor - 1.55 * s),
                  (cx - 0.6 * s, floor - 1.55 * s)], fill=tuple(min(255, c + 30) for c in color))


_OBJECTS = {"cup": _cup, "box": _box, "chair": _chair, "book": _book, "lamp": _lamp}
_SCENES = {"positive": _positive_scene, "negative": _negative_scene, "neutral": _neutral_scene}

SCENE_CLASSES = ("sunny", "smile", "storm", "frown", "objects")
"""What a cue box shows: two positive scenes, two negative ones, and the neutral everyday objects."""


def scene_class(scene: str) -> str:
    """The class of a scene name as :func:`synth_image` returns it (``"cup+lamp"`` is ``"objects"``)."""
    return scene if scene in SCENE_CLASSES else "objects"


CUE_BOX_SIDE = (0.36, 0.58)
"""The cue box's side as a fraction of the frame's side (13-34 % of the area): the default ``cue_side``."""


def check_cue_side(cue_side: tuple[float, float]) -> tuple[float, float]:
    """``(low, high)`` with ``0 < low <= high <= 1``, else a :class:`SentilensError`."""
    low, high = cue_side
    if not 0 < low <= high <= 1:
        raise SentilensError(f"cue box side must be a range 0 < low <= high <= 1 (fractions of the frame's "
                             f"side), got {low}-{high}")
    return float(low), float(high)


BACKDROPS = ("plain", "gradient", "stripes")
PADDINGS = ("none", "bars_horizontal", "bars_vertical", "border")
BAR_SIDE = (0.06, 0.20)
BORDER_SIDE = (0.03, 0.10)


def _random_color(rng: random.Random) -> Color:
    return (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))


def _backdrop(size: int, rng: random.Random) -> tuple[Image.Image, dict, tuple[int, int, int, int]]:
    """The uninformative frame around the cue: ``(image, layout, free area [x0, y0, x1, y1])``.

    Nothing here depends on the label: every colour, the backdrop kind, the padding and its
    width are drawn from the same distribution for every image.
    """
    kind = rng.choice(BACKDROPS)
    first, second = _random_color(rng), _random_color(rng)
    if kind == "plain":
        img = Image.new("RGB", (size, size), first)
    elif kind == "gradient":
        img = _gradient(size, first, second)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.ROTATE_90)
    else:  # low-contrast wallpaper stripes
        img = Image.new("RGB", (size, size), first)
        draw = ImageDraw.Draw(img)
        stripe = tuple((2 * a + b) // 3 for a, b in zip(first, second, strict=True))
        period = max(4, round(size * rng.uniform(0.06, 0.14)))
        vertical = rng.random() < 0.5
        for at in range(0, size, period):
            box = (at, 0, at + period // 2 - 1, size) if vertical else (0, at, size, at + period // 2 - 1)
            draw.rectangle(box, fill=stripe)
    padding = rng.choice(PADDINGS)
    free = [0, 0, size, size]
    layout = {"backdrop": kind, "padding": padding, "padding_px": 0}
    if padding != "none":
        color = rng.choice([(0, 0, 0), (255, 255, 255), _jitter((128, 128, 128), rng, 40)])
        share = BORDER_SIDE if padding == "border" else BAR_SIDE
        width = max(1, round(size * rng.uniform(*share)))
        layout["padding_px"] = width
        draw = ImageDraw.Draw(img)
        if padding in ("bars_horizontal", "border"):
            draw.rectangle((0, 0, size, width - 1), fill=color)
            draw.rectangle((0, size - width, size, size), fill=color)
            free[1], free[3] = width, size - width
        if padding in ("bars_vertical", "border"):
            draw.rectangle((0, 0, width - 1, size), fill=color)
            draw.rectangle((size - width, 0, size, size), fill=color)
            free[0], free[2] = width, size - width
    return img, layout, (free[0], free[1], free[2], free[3])


def synth_image(sentiment: str, size: int, seed: int,
                cue_side: tuple[float, float] = CUE_BOX_SIDE) -> tuple[Image.Image, str, list[int], dict]:
    """Draw one image whose cue box (side a uniform fraction in ``cue_side`` of the frame's) shows
    ``sentiment``; returns the image, the scene name, the cue box ``[x0, y0, x1, y1]`` (pixels, end
    exclusive) and the backdrop's layout."""
    rng = random.Random(seed)
    img, layout, (fx0, fy0, fx1, fy1) = _backdrop(size, rng)
    side = min(round(size * rng.uniform(*cue_side)), fx1 - fx0, fy1 - fy0)
    side = max(side, min(8, size))
    x0, y0 = rng.randint(fx0, fx1 - side), rng.randint(fy0, fy1 - side)
    scene_img, scene = _SCENES[sentiment](side, rng)
    img.paste(scene_img, (x0, y0))
    noise_rng = np.random.default_rng(seed)
    coarse = max(2, size // 16)
    blotches = noise_rng.normal(0.0, 6.0, (coarse, coarse, 3))
    blotches = np.stack([np.asarray(Image.fromarray(blotches[..., c].astype(np.float32), "F")
                                    .resize((size, size), Image.Resampling.BILINEAR)) for c in range(3)], axis=-1)
    grain = noise_rng.integers(-2, 3, (size, size, 3))
    gain = noise_rng.uniform(0.95, 1.05, 3)
    pixels = np.asarray(img, dtype=float) * gain + blotches + grain
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return image, scene, [x0, y0, x0 + side, y0 + side], layout


# ----------------------------------------------------------------------------- the set


def _split_cell(posts: list[Post]) -> dict[str, list[Post]]:
    n_train, n_val, _ = split_sizes(len(posts))
    return {"train": posts[:n_train], "val": posts[n_train:n_train + n_val], "test": posts[n_train + n_val:]}


def make_synthetic(out_dir: str | Path, n: int = 600, seed: int = 0, image_size: int = 128,
                   fractions: Mapping[str, float] = KIND_FRACTIONS,
                   cue_side: tuple[float, float] = CUE_BOX_SIDE) -> dict:
    """Write the synthetic manifest (and its PNG images under ``out_dir/images``); returns the stats.

    ``stats["source"]`` records n, seed, the kind fractions and counts, and the modality ceilings.
    """
    if n < 1:
        raise SentilensError(f"--n must be at least 1, got {n}")
    if image_size < MIN_IMAGE_SIZE:
        raise SentilensError(f"image size must be at least {MIN_IMAGE_SIZE} pixels, got {image_size}")
    cue_side = check_cue_side(cue_side)
    counts = cell_counts(n, fractions)
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    plan = [cell for cell, count in counts for _ in range(count)]
    rng.shuffle(plan)
    by_cell: dict[Cell, list[Post]] = defaultdict(list)
    width = max(5, len(str(n - 1)))
    for i, cell in enumerate(plan):
        post_id = f"synth-{i:0{width}d}"
        image, scene, box, layout = synth_image(cell.image_sentiment, image_size, seed * 1_000_003 + i, cue_side)
        path = image_dir / f"{post_id}.png"
        with atomic_writer(path, binary=True, fsync=False) as f:  # not synced: the seed rebuilds the same bytes
            image.save(f, format="PNG", compress_level=3)
        meta = {"kind": cell.kind, "text_sentiment": cell.text_sentiment, "image_sentiment": cell.image_sentiment,
                "scene": scene, "cue_box": box, "layout": layout}
        by_cell[cell].append(Post(post_id, synth_text(cell.text_sentiment, rng), str(path), cell.label, meta))
    splits: dict[str, list[Post]] = {split: [] for split in SPLITS}
    for cell, _ in counts:
        for split, posts in _split_cell(by_cell[cell]).items():
            splits[split].extend(posts)
    for split in SPLITS:
        splits[split].sort(key=lambda post: post.id)
    source = {
        "name": "synthetic",
        "n": n,
        "seed": seed,
        "image_size": image_size,
        "cue_side": list(cue_side),
        "kind_fractions": {kind: float(Fraction(str(fractions.get(kind, 0)))) for kind in KINDS},
        "kind_counts": {split: {kind: sum(p.meta["kind"] == kind for p in splits[split]) for kind in KINDS}
                        for split in SPLITS},
        "ceilings": modality_ceilings(fractions),
    }
    return write_manifest(out_dir, splits, LABELS, source=source)
