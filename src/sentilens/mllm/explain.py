"""Where the CLS token looks: the paper's Figure 3 for one post, plus the patches the filter keeps.

Left: the image as the vision tower sees it (the processor's resize and crop, normalisation
undone) under the patch scores of :mod:`sentilens.mllm.pruning` (the CLS attention averaged
over the chosen layers; for SigLIP-style towers the mean attention received). Right: the same
image with the dropped patches darkened, at keep ratio ``r``. The title names the label the
run predicts for the post at that ratio (through the shared predictor, so it is the label
``predict --keep-ratio r`` gives) and its probability.

The patch scores and the mask come from the predictor's ``explain`` (one extra tower pass over
the image with the same reducer ``predict`` builds for ``r``), so the mask is exactly the set of
patches the language model sees.

Attention on the cue. When a post's cue box is known (the synthetic set records it
in ``meta["cue_box"]``), :func:`mass_over_area` measures how much the scores favour it: the
share of the score mass on the box divided by the box's share of the frame. 1 is what uniform
scores give, ``1 / area`` is every bit of mass inside the box. The box is carried into the
tower's frame by sending a white-box-on-black mask through the checkpoint's own preprocessing
(resize, crop or pad, whatever it does) beside an all-white and an all-black frame, so a patch's
coverage is the fraction of its pixels inside the box, and padding counts as outside.
:func:`attention_on_cue` averages the ratio over posts; heatmaps outline the box.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sentilens.data.records import Post
from sentilens.errors import SentilensError
from sentilens.mllm.inputs import preprocess_images
from sentilens.outputs import save_figure
from sentilens.predict import Explanation, Predictor, check_keep_ratio

FIGURE_INCHES = (10.0, 5.0)
DPI = 100
"""The figure is FIGURE_INCHES x DPI pixels (1000 x 500)."""

DEFAULT_KEEP_RATIO = 0.4
"""Without --keep-ratio: the paper's 40 % point (1.75x faster at no accuracy cost on MVSA-Single)."""


def cue_cover(builder, image_size: tuple[int, int], box: list[int]) -> torch.Tensor:
    """``(S, S)`` fraction of each pixel of the tower's input frame that lies inside ``box``.

    ``box`` is ``[x0, y0, x1, y1]`` in pixels of the original ``image_size = (width, height)``, end exclusive.
    """
    from PIL import Image, ImageDraw

    width, height = image_size
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise SentilensError(f"cue box {box} does not lie inside a {width} x {height} image")
    mask = Image.new("RGB", image_size, (0, 0, 0))
    ImageDraw.Draw(mask).rectangle((x0, y0, x1 - 1, y1 - 1), fill=(255, 255, 255))
    frames = [mask, Image.new("RGB", image_size, (255, 255, 255)), Image.new("RGB", image_size, (0, 0, 0))]
    processor = builder.processor.image_processor
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    unit = (preprocess_images(builder, frames).float() * std + mean).mean(dim=1)  # (3, S, S), back in [0, 1]
    inside_image = unit[1] - unit[2]
    cover = torch.where(inside_image > 0.5, (unit[0] - unit[2]) / inside_image.clamp(min=1e-6), 0.0)
    return cover.clamp(0.0, 1.0)


def patch_cover(cover: torch.Tensor, grid: int) -> torch.Tensor:
    """``(grid, grid)`` mean of a pixel cover map over each patch."""
    side = cover.shape[0] // grid
    return cover[: side * grid, : side * grid].reshape(grid, side, grid, side).mean(dim=(1, 3))


def mass_over_area(scores: torch.Tensor, cover: torch.Tensor) -> float:
    """Share of the score mass on the cue over the cue's share of the frame (``scores``, ``cover``: same shape)."""
    scores, cover = scores.flatten().double(), cover.flatten().double()
    area = float(cover.mean())
    if area <= 0:
        raise SentilensError("the cue box covers no patch of the tower's frame")
    return float((scores * cover).sum() / scores.sum()) / area


def attention_on_cue(predictor, posts: list[Post]) -> dict:
    """``{"mass_over_area": mean over posts, "n": posts measured, ...}`` for the posts whose image
    has a ``meta["cue_box"]``, under the paper's scores (CLS attention averaged over all layers)."""
    from statistics import median

    from sentilens.data.images import load_image

    paper = predictor.with_options(strategy="all")
    ratios = []
    for post in posts:
        box = (post.meta or {}).get("cue_box")
        if post.image is None or box is None:
            continue
        scores = paper.explain(post, 1.0).scores
        cover = cue_cover(paper.builder, load_image(post.image).size, box)
        ratios.append(mass_over_area(scores, patch_cover(cover, scores.shape[0])))
    if not ratios:
        raise SentilensError("no post has an image with a cue box (meta.cue_box) to measure attention on")
    return {"mass_over_area": sum(ratios) / len(ratios), "n": len(ratios), "median": median(ratios),
            "min": min(ratios), "max": max(ratios), "scores": "CLS attention, mean over heads and all tower layers",
            "uniform_scores_give": 1.0}


def explain(predictor: Predictor, image: str | Path, text: str = "", keep_ratio: float | None = None,
            out: str | Path = "heat.png", cue_box: list[int] | None = None) -> dict:
    """Draw the heatmap and the kept-patch mask of one post to ``out``; returns the prediction and counts.

    With ``cue_box`` (``[x0, y0, x1, y1]`` in the image's pixels) the box is outlined on both
    panels and the result has its ``mass_over_area``.
    """
    if not predictor.capabilities.supports_explain:
        raise SentilensError(f"heatmaps need a run that filters visual tokens; this is a {predictor.family} run")
    ratio = DEFAULT_KEEP_RATIO if keep_ratio is None else keep_ratio
    check_keep_ratio(ratio)
    found = predictor.explain(Post(id="explain", text=text, image=str(image)), ratio)
    prediction, kept = found.prediction, found.kept
    probability = prediction.probabilities.get(prediction.label, float("nan"))
    title = (f"predicted: {prediction.label} (p = {probability:.2f})   "
             f"kept {int(kept.sum())} of {int(found.token_cells().sum())} patches (r = {ratio:g}, layers: "
             f"{found.strategy})")
    cover, ratio_on_cue = None, None
    if cue_box is not None:
        from sentilens.data.images import load_image

        cover = cue_cover(predictor.builder, load_image(image).size, cue_box)
        ratio_on_cue = mass_over_area(found.scores, patch_cover(cover, found.scores.shape[0]))
        title += f"\ncue box (outlined): score mass / area = {ratio_on_cue:.2f} (uniform scores: 1)"
    path = draw(found.picture, found.scores, kept, found.score_name, title, Path(out), cover)
    result = {"out": str(path), "label": prediction.label, "probabilities": prediction.probabilities,
              "keep_ratio": ratio, "kept_patches": int(kept.sum()), "patches": int(found.token_cells().sum()),
              "strategy": found.strategy}
    if ratio_on_cue is not None:
        result["mass_over_area"] = ratio_on_cue
    padding = padding_patches(found)
    result.update(content_box=list(found.content), padding_patches=int(padding.sum()),
                  padding_patches_kept=int((padding & kept).sum()))
    return result


def padding_patches(found: Explanation) -> torch.Tensor:
    """(g, g) bool: the patches lying wholly in the padding (outside the original image, ``image_aspect: pad``)."""
    grid = found.kept.shape[0]
    size = found.picture.shape[1] / grid
    starts = torch.arange(grid) * size
    x0, y0, x1, y1 = found.content
    outside_x = (starts + size <= x0) | (starts >= x1)
    outside_y = (starts + size <= y0) | (starts >= y1)
    return outside_y[:, None] | outside_x[None, :]


def draw(picture: torch.Tensor, scores: torch.Tensor, kept: torch.Tensor, score_name: str, title: str,
         out: Path, cue: torch.Tensor | None = None) -> Path:
    """Heatmap over the image (left) and the image with dropped patches darkened (right); ``cue``, a
    pixel cover map of the frame, is outlined on both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height, width = picture.shape[:2]
    extent = (0, width, height, 0)
    fig, (heat, mask) = plt.subplots(1, 2, figsize=FIGURE_INCHES, dpi=DPI)
    heat.imshow(picture.numpy(), extent=extent)
    shown = heat.imshow(scores.numpy(), cmap="jet", alpha=0.5, extent=extent, interpolation="bilinear")
    fig.colorbar(shown, ax=heat, fraction=0.046, pad=0.04)
    heat.set_title(f"{score_name} per patch")
    dim = torch.where(kept, 1.0, 0.2).repeat_interleave(height // kept.shape[0], 0).repeat_interleave(
        width // kept.shape[1], 1)
    covered = picture[: dim.shape[0], : dim.shape[1]] * dim.unsqueeze(-1)
    mask.imshow(covered.numpy(), extent=(0, dim.shape[1], dim.shape[0], 0))
    mask.set_title("patches kept")
    for axis in (heat, mask):
        if cue is not None:
            rows, cols = cue.shape
            axis.contour(torch.arange(cols) + 0.5, torch.arange(rows) + 0.5, cue.numpy(), levels=[0.5],
                         colors="white", linewidths=1.5)
        axis.set_xticks([])
        axis.set_yticks([])
    fig.suptitle(title, fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, out, dpi=DPI)
    plt.close(fig)
    return out
