"""The web page's heatmap: the paper's Figure 3 as data (patch scores, kept mask, the tower's view).

The patch scores and the kept mask come from the predictor's ``explain`` (see
:class:`sentilens.predict.Predictor`), the same routine ``sentilens explain`` draws, so the page
shows exactly the patches the language model sees at that keep ratio. The page colours and
outlines them itself, which keeps the answer small (a grid of numbers and the tower-sized
image) and the drawing interactive.
"""

from __future__ import annotations

import base64
import io

from PIL import Image

from sentilens.data.records import Post
from sentilens.predict import Prediction, Predictor
from sentilens.serve.schemas import Heatmap


def explain_post(predictor: Predictor, post: Post, keep_ratio: float) -> tuple[Prediction, Heatmap]:
    """Prediction of ``post`` at ``keep_ratio`` and its heatmap (runs that support explain; on the model's worker)."""
    found = predictor.explain(post, keep_ratio)
    prediction, picture, scores, kept, score_name = (found.prediction, found.picture, found.scores, found.kept,
                                                     found.score_name)
    content = [round(v / picture.shape[1], 4) for v in found.content]
    tokens = found.token_cells()
    # min-max over the image's own tokens: cells that only square a rectangular grid are no token (0)
    low, high = float(scores[tokens].min()), float(scores[tokens].max())
    scaled = ((scores - low) / (high - low) if high > low else scores * 0.0).where(tokens, 0.0)
    heatmap = Heatmap(grid=kept.shape[0], scores=[[round(v, 4) for v in row] for row in scaled.tolist()],
                      kept=kept.tolist(), kept_patches=int(kept.sum()), patches=int(tokens.sum()),
                      score_name=score_name, image=png_data_url(picture.numpy()), content=content)
    return prediction, heatmap


def png_data_url(picture) -> str:
    """An (H, W, 3) array in [0, 1] as a ``data:image/png;base64,...`` URL."""
    buffer = io.BytesIO()
    Image.fromarray((picture * 255).round().clip(0, 255).astype("uint8")).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
