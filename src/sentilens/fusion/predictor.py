"""The fusion family's predictor (design.md, "Predictor"): posts -> labels and probabilities.

``FusionPredictor.from_run(run_dir)`` rebuilds the encoders named in ``config.json`` and the
fusion head from ``model.safetensors`` (plus the text encoder's weights when it was fine-tuned).
Training scores its validation and test splits through :meth:`probabilities` on cached features.

Prediction (``predict``, used by ``eval``, ``predict``, ``sweep`` and ``serve``) runs the encoders
live as a pipeline (issue 13), because at a million posts per-post overheads matter:

- posts are ordered by token count and batched, so a batch pads to lengths close to its own
  (the order is undone at the end);
- worker threads decode and resize the images of the next batches while the encoders run on
  this one (Pillow and numpy release the GIL); JPEGs decode at a reduced scale still covering the
  encoder's input (:func:`sentilens.data.images.load_image`'s ``draft_size``);
- everything runs under ``torch.inference_mode``, and on a CPU the encoders run on ONNX Runtime
  (:mod:`sentilens.fusion.runtime`; ``runtime="torch"`` keeps eager PyTorch for comparison and GPUs).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from sentilens.data.records import Post
from sentilens.distributed import resolve_device
from sentilens.errors import SentilensError
from sentilens.fusion.cache import PostFeatures, has_text
from sentilens.fusion.config import FusionConfig, describe_run, parse_fusion_config
from sentilens.fusion.encoders import ImageEncoder, TextEncoder, TopLayers, build_encoders, stack_pixels
from sentilens.fusion.model import FusionModel, build_model, collate, collate_features
from sentilens.fusion.runtime import RUNTIMES, resolve_runtime
from sentilens.predict import Capabilities, LabelProbabilitiesOnly, Prediction
from sentilens.runs import CONFIG, MODEL_WEIGHTS, load_config, load_weights

TEXT_ENCODER_PREFIX = "text_encoder."
IMAGE_ENCODER_PREFIX = "image_encoder."
PREDICT_BATCH = 64
"""Posts per head call when scoring cached features."""
ENCODE_BATCH = 32
"""Posts per encoder call in the prediction pipeline."""
DECODE_AHEAD = 2
"""Batches of images decoded ahead of the encoders (each by one worker thread)."""
HEAD_THREADS = 1
"""Torch threads for the fusion head on a CPU. Its ops are small (a batch's head is ~4 ms a post on
one thread), and with two threads every op waits at an OpenMP barrier for the second thread to be
scheduled: on 2 shared cores under load that made each op ~20 ms and the head ten times slower
(measured with the profiler, load average 15)."""


@contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch intra-op threads (``None``: unchanged)."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def top_layer_weights(top: TopLayers) -> dict[str, torch.Tensor]:
    """The trained top layers' weights, named as in the text encoder's own state dict."""
    names = {id(module): name for name, module in top.encoder.model.named_modules()}
    return {f"{names[id(layer)]}.{k}": v for layer in top.layers for k, v in layer.state_dict().items()}


def run_weights(model: FusionModel, text_encoder: TextEncoder | None, image_encoder: ImageEncoder | None = None,
                text_top: TopLayers | None = None) -> dict[str, torch.Tensor]:
    """Everything trained: the fusion head, each encoder that was fine-tuned, the text encoder's trained top layers."""
    weights = dict(model.state_dict())
    if text_encoder is not None and text_encoder.trainable:
        weights.update({TEXT_ENCODER_PREFIX + k: v for k, v in text_encoder.model.state_dict().items()})
    if text_top is not None:
        weights.update({TEXT_ENCODER_PREFIX + k: v for k, v in top_layer_weights(text_top).items()})
    if image_encoder is not None and image_encoder.trainable:
        weights.update({IMAGE_ENCODER_PREFIX + k: v for k, v in image_encoder.model.state_dict().items()})
    return weights


class FusionPredictor(LabelProbabilitiesOnly):
    """Posts -> :class:`Prediction` with a fusion model and its encoders."""

    family = "fusion"
    # Label probabilities only: no token filtering, no heatmap, one decoding; encoders on ONNX Runtime or PyTorch.
    capabilities = Capabilities(runtimes=RUNTIMES)

    def __init__(self, settings: FusionConfig, model: FusionModel, text_encoder: TextEncoder | None,
                 image_encoder: ImageEncoder | None, device: str = "cpu", decode_workers: int = DECODE_AHEAD):
        self.settings = settings
        self.config = settings.model_dump()
        self.labels = list(settings.labels)
        self.model = model.to(device).eval()
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.device = device
        self.decode_workers = decode_workers
        # A run that trained the text encoder's top layers caches the states below them: probabilities()
        # reads those features and runs the top layers; prediction runs the whole encoder once.
        self.text_top = TopLayers(text_encoder, settings.text_top_layers) \
            if text_encoder is not None and settings.text_top_layers else None
        self.set_decision_offsets(settings.decision_offsets)

    def set_decision_offsets(self, offsets: Sequence[float] | None) -> None:
        """Offsets added to the head's logits before the softmax (:mod:`sentilens.decision`); ``None``: none."""
        offsets = None if offsets is None else [float(v) for v in offsets]
        if offsets is not None and len(offsets) != len(self.labels):
            raise ValueError(f"{len(offsets)} decision offsets for {len(self.labels)} labels")
        self.settings = self.settings.model_copy(update={"decision_offsets": offsets})
        self.config = self.settings.model_dump()
        self.decision_offsets = None if offsets is None else torch.tensor(offsets, dtype=torch.float32)

    def _softmax(self, logits: torch.Tensor) -> torch.Tensor:
        if self.decision_offsets is not None:
            logits = logits.float() + self.decision_offsets.to(logits.device)
        return torch.softmax(logits, dim=-1)

    @property
    def feature_encoders(self) -> tuple[TextEncoder | TopLayers | None, ImageEncoder | None]:
        """What computes the features :meth:`probabilities` reads (``featurize`` them with these)."""
        return self.text_top or self.text_encoder, self.image_encoder

    @property
    def runtime(self) -> str:
        """Where the encoders run: ``onnx`` or ``torch`` (per encoder when they differ)."""
        runtimes = {e.runtime for e in (self.text_encoder, self.image_encoder) if e is not None}
        return runtimes.pop() if len(runtimes) == 1 else ", ".join(
            f"{kind} {e.runtime}" for kind, e in (("text", self.text_encoder), ("image", self.image_encoder)) if e)

    def use_runtime(self, runtime: str = "auto") -> str:
        """Move the encoders to ``runtime`` (``auto``: ONNX Runtime on a CPU where installed); returns the one used."""
        if resolve_runtime(runtime, self.device) == "onnx":
            for encoder in (self.text_encoder, self.image_encoder):
                if encoder is not None and encoder.runtime != "onnx":
                    encoder.use_onnx()
        else:
            for encoder in (self.text_encoder, self.image_encoder):
                if encoder is not None:
                    encoder._onnx = None
        return self.runtime

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | None = None, runtime: str = "auto") -> FusionPredictor:
        """The run's predictor; ``runtime`` says where the encoders run (see :meth:`use_runtime`)."""
        run_dir = Path(run_dir)
        device = str(resolve_device(device))
        settings = parse_fusion_config(load_config(run_dir), run_dir / CONFIG)
        if not settings.labels:
            raise SentilensError("config.json lists no labels", run_dir / CONFIG)
        weights = load_weights(run_dir / MODEL_WEIGHTS)
        text_encoder, image_encoder = build_encoders(settings, device)
        if text_encoder is not None and settings.fine_tune_text:
            encoder_weights = _take(weights, TEXT_ENCODER_PREFIX)
            _load_state(text_encoder.model, encoder_weights, run_dir / MODEL_WEIGHTS)
        if text_encoder is not None and settings.text_top_layers:
            top = TopLayers(text_encoder, settings.text_top_layers)
            expected = top_layer_weights(top)
            encoder_weights = _take(weights, TEXT_ENCODER_PREFIX)
            _check_state(expected, encoder_weights, run_dir / MODEL_WEIGHTS)
            text_encoder.model.load_state_dict(encoder_weights, strict=False)  # exactly the top layers' keys
        if image_encoder is not None and settings.fine_tune_image:
            encoder_weights = _take(weights, IMAGE_ENCODER_PREFIX)
            _load_state(image_encoder.model, encoder_weights, run_dir / MODEL_WEIGHTS)
        model = build_model(settings, *settings.feature_dims)
        _load_state(model, weights, run_dir / MODEL_WEIGHTS)
        for encoder in (text_encoder, image_encoder if settings.fine_tune_image else None):
            if encoder is not None:
                encoder.model.eval()
        predictor = cls(settings, model, text_encoder, image_encoder, device=device)
        predictor.use_runtime(runtime)
        return predictor

    @torch.no_grad()
    def probabilities(self, features: Sequence[PostFeatures], posts: Sequence[Post]) -> torch.Tensor:
        """N x n_labels label probabilities from precomputed features."""
        self.model.eval()
        live_text = self.text_encoder if self.settings.fine_tune_text else None
        live_image = self.image_encoder if self.settings.fine_tune_image else None
        for encoder in (live_text, live_image):
            if encoder is not None:
                encoder.model.eval()
        if self.text_top is not None:
            self.text_top.layers.eval()  # training scores val between epochs: no dropout in what it scores
        out = []
        for start in range(0, len(posts), PREDICT_BATCH):
            end = start + PREDICT_BATCH
            batch = collate_features(features[start:end], posts[start:end], *self.settings.feature_dims, live_text,
                                     self.device, live_image, self.text_top)
            out.append(self._softmax(self.model(batch)).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.labels))

    def to_predictions(self, probabilities: torch.Tensor) -> list[Prediction]:
        return [Prediction(label=self.labels[int(row.argmax())],
                           probabilities={label: float(p) for label, p in zip(self.labels, row.tolist(), strict=True)})
                for row in probabilities]

    def describe(self) -> dict:
        return describe_run(self.config)

    def predict(self, posts: Sequence[Post], keep_ratio: float | None = None) -> list[Prediction]:
        self.refuse_keep_ratio(keep_ratio)
        return self.to_predictions(self.live_probabilities(posts))

    def _decode(self, posts: Sequence[Post]) -> list[np.ndarray | None]:
        """Normalised pixels of each post's image (``None`` without one); runs in a worker thread."""
        return [self.image_encoder.load_pixels(p.image) if p.image else None for p in posts]

    @torch.inference_mode()
    def live_probabilities(self, posts: Sequence[Post]) -> torch.Tensor:
        """N x n_labels label probabilities, the encoders run on the posts (the pipeline in the module doc)."""
        self.model.eval()
        text, image = self.text_encoder, self.image_encoder
        result = torch.zeros(len(posts), len(self.labels))
        if not posts:
            return result
        with_text = [i for i, p in enumerate(posts) if text is not None and has_text(p)]
        ids: dict[int, list[int]] = dict(zip(with_text, text.tokenize([posts[i].text for i in with_text]),
                                             strict=True)) if with_text else {}
        # Batching by length: padding costs compute in every layer of the text encoder.
        order = sorted(range(len(posts)), key=lambda i: len(ids.get(i, ())))
        batches = [order[start:start + ENCODE_BATCH] for start in range(0, len(order), ENCODE_BATCH)]
        pool = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="sentilens-decode") \
            if image is not None else None
        pending: deque[Future] = deque()
        try:
            for index, batch in enumerate(batches):
                while pool is not None and len(pending) < 1 + self.decode_workers \
                        and index + len(pending) < len(batches):
                    pending.append(pool.submit(self._decode, [posts[i] for i in batches[index + len(pending)]]))
                features = [PostFeatures() for _ in batch]
                rows = [j for j, i in enumerate(batch) if i in ids]
                if rows:
                    for j, encoded in zip(rows, text.encode_ids([ids[batch[j]] for j in rows]), strict=True):
                        features[j].text = encoded
                if pool is not None:
                    pixels = pending.popleft().result()
                    rows = [j for j, array in enumerate(pixels) if array is not None]
                    if rows:
                        encoded = image.encode_pixels(stack_pixels([pixels[j] for j in rows]))
                        for j, item in zip(rows, encoded, strict=True):
                            features[j].image = item
                with torch_threads(HEAD_THREADS if torch.device(self.device).type == "cpu" else None):
                    batch_input = collate(features, *self.settings.feature_dims).to(self.device)
                    result[batch] = self._softmax(self.model(batch_input)).float().cpu()
        finally:
            if pool is not None:
                for future in pending:
                    future.cancel()
                pool.shutdown(wait=True)
        return result


def _take(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors named ``prefix...``, removed from ``weights``, without the prefix."""
    return {k[len(prefix):]: weights.pop(k) for k in list(weights) if k.startswith(prefix)}


def _load_state(module: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    _check_state(module.state_dict(), weights, path)
    module.load_state_dict(weights)


def _check_state(shapes: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], path: Path) -> None:
    """``weights`` has exactly the names of ``shapes``, each with its shape; else one line naming the file."""
    expected = set(shapes)
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise SentilensError(f"weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})",
                             path)
    wrong = [f"{name} {tuple(tensor.shape)} (the model has {tuple(shapes[name].shape)})"
             for name, tensor in weights.items() if tensor.shape != shapes[name].shape]
    if wrong:
        raise SentilensError(f"weights do not match config.json: {len(wrong)} tensors have another shape, e.g. "
                             f"{wrong[0]}", path)
