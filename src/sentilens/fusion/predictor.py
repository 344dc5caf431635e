"""The fusion family's predictor (design.md, "Predictor"): posts -> labels and probabilities.

``FusionPredictor.from_run(run_dir)`` rebuilds the encoders named in ``config.json`` and the
fusion head from ``model.safetensors`` (plus the text encoder's weights when it was fine-tuned).
Training scores its validation and test splits through the same :meth:`probabilities`, so the
metrics a run reports and those ``sentilens eval`` recomputes come from one code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from sentilens.data.records import Post
from sentilens.distributed import default_device
from sentilens.errors import SentilensError
from sentilens.fusion.cache import FeatureCache, PostFeatures, featurize
from sentilens.fusion.config import FusionConfig, describe_run, parse_fusion_config
from sentilens.fusion.encoders import ImageEncoder, TextEncoder, build_encoders
from sentilens.fusion.model import FusionModel, build_model, collate_features
from sentilens.predict import Capabilities, Explanation, Prediction, unsupported
from sentilens.runs import CONFIG, MODEL_WEIGHTS, load_config, load_weights

TEXT_ENCODER_PREFIX = "text_encoder."
PREDICT_BATCH = 64
CHUNK = 512
"""Posts featurised at a time by :meth:`FusionPredictor.predict`, bounding memory on large inputs."""


def run_weights(model: FusionModel, text_encoder: TextEncoder | None) -> dict[str, torch.Tensor]:
    """Everything trained: the fusion head, and the text encoder when it was fine-tuned."""
    weights = dict(model.state_dict())
    if text_encoder is not None and text_encoder.trainable:
        weights.update({TEXT_ENCODER_PREFIX + k: v for k, v in text_encoder.model.state_dict().items()})
    return weights


class FusionPredictor:
    """Posts -> :class:`Prediction` with a fusion model and its encoders."""

    family = "fusion"
    capabilities = Capabilities()  # label probabilities only: no token filtering, no heatmap, one decoding

    def __init__(self, settings: FusionConfig, model: FusionModel, text_encoder: TextEncoder | None,
                 image_encoder: ImageEncoder | None, cache: FeatureCache | None = None, device: str = "cpu"):
        self.settings = settings
        self.config = settings.model_dump()
        self.labels = list(settings.labels)
        self.model = model.to(device).eval()
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.cache = cache
        self.device = device

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | None = None) -> FusionPredictor:
        run_dir = Path(run_dir)
        device = device or str(default_device())
        settings = parse_fusion_config(load_config(run_dir), run_dir / CONFIG)
        if not settings.labels:
            raise SentilensError("config.json lists no labels", run_dir / CONFIG)
        weights = load_weights(run_dir / MODEL_WEIGHTS)
        text_encoder, image_encoder = build_encoders(settings, device)
        if text_encoder is not None and settings.fine_tune_text:
            encoder_weights = {k[len(TEXT_ENCODER_PREFIX):]: weights.pop(k) for k in list(weights)
                               if k.startswith(TEXT_ENCODER_PREFIX)}
            _load_state(text_encoder.model, encoder_weights, run_dir / MODEL_WEIGHTS)
        model = build_model(settings, *settings.feature_dims)
        _load_state(model, weights, run_dir / MODEL_WEIGHTS)
        if text_encoder is not None:
            text_encoder.model.eval()
        return cls(settings, model, text_encoder, image_encoder, device=device)

    def features(self, posts: Sequence[Post]) -> list[PostFeatures]:
        """Cached (frozen) features of ``posts`` for the modalities this run reads."""
        frozen_text = None if self.settings.fine_tune_text else self.text_encoder
        return featurize(posts, frozen_text, self.image_encoder, self.cache)[0]

    @torch.no_grad()
    def probabilities(self, features: Sequence[PostFeatures], posts: Sequence[Post]) -> torch.Tensor:
        """N x n_labels label probabilities from precomputed features."""
        self.model.eval()
        live_text = self.text_encoder if self.settings.fine_tune_text else None
        if live_text is not None:
            live_text.model.eval()
        out = []
        for start in range(0, len(posts), PREDICT_BATCH):
            end = start + PREDICT_BATCH
            batch = collate_features(features[start:end], posts[start:end], *self.settings.feature_dims, live_text,
                               self.device)
            out.append(torch.softmax(self.model(batch), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.labels))

    def to_predictions(self, probabilities: torch.Tensor) -> list[Prediction]:
        return [Prediction(label=self.labels[int(row.argmax())],
                           probabilities={label: float(p) for label, p in zip(self.labels, row.tolist(), strict=True)})
                for row in probabilities]

    def describe(self) -> dict:
        return describe_run(self.config)

    def with_options(self, *, decode: str | None = None, strategy: str | None = None) -> FusionPredictor:
        if decode is not None and decode not in self.capabilities.decodings:
            raise unsupported(f"--decode {decode}", self)
        if strategy is not None:
            raise unsupported("--strategy (visual token filtering)", self)
        return self

    def explain(self, post: Post, keep_ratio: float) -> Explanation:
        raise unsupported("explain (a heatmap of visual tokens)", self)

    def predict(self, posts: Sequence[Post], keep_ratio: float | None = None) -> list[Prediction]:
        if keep_ratio is not None:
            raise unsupported("--keep-ratio (visual token filtering, for MLLM runs)", self)
        predictions: list[Prediction] = []
        for start in range(0, len(posts), CHUNK):
            chunk = list(posts[start:start + CHUNK])
            predictions.extend(self.to_predictions(self.probabilities(self.features(chunk), chunk)))
        return predictions


def _load_state(module: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise SentilensError(f"weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})",
                             path)
    shapes = module.state_dict()
    wrong = [f"{name} {tuple(tensor.shape)} (the model has {tuple(shapes[name].shape)})"
             for name, tensor in weights.items() if tensor.shape != shapes[name].shape]
    if wrong:
        raise SentilensError(f"weights do not match config.json: {len(wrong)} tensors have another shape, e.g. "
                             f"{wrong[0]}", path)
    module.load_state_dict(weights)
