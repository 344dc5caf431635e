"""The MLLM run's predictor (docs/architecture.md, "The predictor protocol"): rebuilds the fine-tuned model
from a run directory.

``config.json`` (:class:`sentilens.mllm.config.MllmRunConfig`) names the base checkpoint (an HF
id, an absolute folder, or ``base-model`` inside the run for ``--model tiny``), the fine-tuning
mode, LoRA settings, prompt settings and labels; ``model.safetensors`` holds the trained tensors
(projector + language model, or projector + LoRA adapters), loaded onto the freshly loaded base.
Nothing is unpickled.

``predict(posts, keep_ratio)`` scores labels (or decodes, ``with_options(decode="generate")``);
with a keep ratio, the visual tokens are filtered by :mod:`sentilens.mllm.pruning`'s reducer
(``reducer_for(model, keep_ratio, strategy)``, ``with_options(strategy=...)``) before the
projector. ``explain(post, r)`` gives the patch scores and kept patches of that same reducer.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch

from sentilens.data.images import load_image
from sentilens.data.records import Post
from sentilens.distributed import resolve_device
from sentilens.errors import SentilensError
from sentilens.mllm.config import MllmRunConfig, describe_run, load_run_config
from sentilens.mllm.families import family_of
from sentilens.mllm.flops import strategy_flops
from sentilens.mllm.inputs import Reducer
from sentilens.mllm.model import MllmModel, num_image_tokens, prepare_model
from sentilens.mllm.prompt import PromptBuilder
from sentilens.mllm.scoring import predict_posts
from sentilens.predict import Capabilities, Explanation, Prediction, check_keep_ratio
from sentilens.runs import CONFIG, load_config, load_weights


def base_source(run_dir: Path, base: str) -> str:
    """The base checkpoint of a run: a folder inside the run directory, else an HF id or path as stored."""
    inside = run_dir / base
    return str(inside) if inside.is_dir() else base


class MllmPredictor:
    """Predicts labels of posts with a fine-tuned LLaVA run."""

    family = "mllm"

    def __init__(self, model: MllmModel, builder: PromptBuilder, run_config: MllmRunConfig, batch_size: int = 8,
                 decode: str | None = None, strategy: str = "all"):
        from sentilens.mllm.config import DECODINGS

        self.model = model
        self.builder = builder
        self.run_config = run_config
        self.config = run_config.model_dump(mode="json")
        self.labels = list(builder.labels)
        self.batch_size = batch_size
        self.decode = decode or run_config.decode
        self.strategy = strategy
        from sentilens.mllm.pruning import strategy_names

        self.capabilities = Capabilities(supports_keep_ratio=True, supports_explain=True, decodings=DECODINGS,
                                         strategies=strategy_names(family_of(model.vlm).name))

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | torch.device | None = None) -> MllmPredictor:
        run_dir = Path(run_dir)
        settings = load_run_config(load_config(run_dir), run_dir / CONFIG)
        device = resolve_device(device)
        precision = settings.precision
        model = prepare_model(base_source(run_dir, settings.base_model), settings.mode, settings.lora, device=device,
                              training=False, dtype=None if precision is None else getattr(torch, precision.weights))
        family = family_of(model.vlm)
        if settings.model_family is not None and settings.model_family != family.name:
            raise SentilensError(f"the run was trained as a {settings.model_family} model but its base model "
                                 f"'{settings.base_model}' is a {family.name} checkpoint", run_dir / CONFIG)
        if settings.weights is not None:  # None: a zero-shot run, the base checkpoint as it is
            weights = run_dir / settings.weights
            model.load_trainable_state(load_weights(weights, device=device), weights)
        model.eval()
        builder = PromptBuilder(model.processor, settings.prompt, settings.labels,
                                num_image_tokens(model.vlm, model.processor), family=family)
        return cls(model, builder, settings, batch_size=settings.predict_batch_size)

    def describe(self) -> dict:
        return describe_run(self.config)

    def with_options(self, *, decode: str | None = None, strategy: str | None = None) -> MllmPredictor:
        """A copy sharing the loaded model, with another decoding and/or token-scoring strategy."""
        configured = copy.copy(self)
        if decode is not None:
            if decode not in self.capabilities.decodings:
                raise SentilensError(f"--decode must be one of {', '.join(self.capabilities.decodings)}, "
                                     f"got '{decode}'")
            configured.decode = decode
        if strategy is not None:
            from sentilens.mllm.pruning import parse_strategy, reducer_for

            parsed = parse_strategy(strategy)
            reducer_for(self.model.vlm, 1.0, str(parsed))  # refuses now what this model cannot run (family, layers)
            configured.strategy = str(parsed)
        return configured

    def reducer(self, keep_ratio: float | None) -> Reducer | None:
        """The visual-token filter for ``keep_ratio`` (None: every visual token reaches the language model)."""
        if keep_ratio is None:
            return None
        check_keep_ratio(keep_ratio)
        vlm = self.model.vlm
        from sentilens.mllm.pruning import reducer_for

        return reducer_for(vlm, keep_ratio, strategy=self.strategy)

    def flops_per_post(self, posts: Sequence[Post], keep_ratio: float | None = None) -> dict:
        """Mean FLOPs of predicting ``posts`` at ``keep_ratio``, by part (:mod:`sentilens.mllm.flops`),
        under the configured filtering strategy; padding inside a batch is not counted."""
        vlm, builder = self.model.vlm, self.builder
        answer_tokens = sum(len(ids) for ids in builder.answer_ids.values())
        total: dict[str, float] = {}
        for post in posts:
            has_image = post.image is not None
            text_tokens = len(builder.prompt_ids(post.text, has_image)) - int(has_image)
            size = load_image(post.image).size if has_image else None
            for part, value in strategy_flops(vlm, builder.processor, size, keep_ratio, self.strategy,
                                              text_tokens, answer_tokens).items():
                total[part] = total.get(part, 0.0) + value
        return {part: value / max(len(posts), 1) for part, value in total.items()}

    def lm_layers(self) -> int:
        """The language model's decoder layers (what an LM-stage method's per-layer token counts span)."""
        vlm = self.model.vlm
        return len(family_of(vlm).language_model(vlm).layers)

    def predict(self, posts: Sequence[Post], keep_ratio: float | None = None) -> list[Prediction]:
        return predict_posts(self.model.vlm, self.builder, list(posts), self.batch_size,
                             reducer=self.reducer(keep_ratio), decode=self.decode,
                             autocast=None if self.run_config.precision is None else self.run_config.precision.autocast)

    def explain(self, post: Post, keep_ratio: float) -> Explanation:
        """The prediction at ``keep_ratio`` and the patch scores + kept mask of the same reducer.

        The patch scores come from one extra tower pass over the image, with the reducer
        ``predict`` builds for ``keep_ratio``, so the mask is exactly the set of patches the
        language model sees.
        """
        if post.image is None:
            raise SentilensError("a heatmap needs an image")
        from sentilens.mllm.pruning import parse_strategy

        if parse_strategy(self.strategy).stage != "vision":
            raise SentilensError(f"strategy '{self.strategy}' prunes inside the language model; a heatmap shows a "
                                 "vision-stage strategy's choice (explain with --strategy all, for one)")
        check_keep_ratio(keep_ratio)
        prediction = self.predict([post], keep_ratio=keep_ratio)[0]
        vlm = self.model.vlm
        view = family_of(vlm).patch_view(vlm, self.builder, post, self.reducer(keep_ratio))
        return Explanation(prediction=prediction, picture=view.picture, scores=view.scores, kept=view.kept,
                           score_name=view.score_name, strategy=self.strategy, content=view.content,
                           shown=view.shown)
