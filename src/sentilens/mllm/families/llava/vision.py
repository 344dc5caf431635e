"""LLaVA-1.5's vision stage: the tower's features, the paper's token filter, the projected visual tokens.

Three steps, one by one instead of inside ``LlavaForConditionalGeneration.forward``, so that the
reducer sits between them: :func:`encode_images` (the feature layer's hidden states, CLS dropped),
the reducer (:class:`TokenFilter`: CLS attention from the same tower pass, ``ceil(r N)`` kept), the
multimodal projector (:func:`visual_tokens`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

from sentilens.errors import SentilensError
from sentilens.mllm.inputs import Reducer
from sentilens.mllm.pruning.attention import AttentionScorer, encoder_layers
from sentilens.mllm.pruning.downsample import area_pool
from sentilens.mllm.pruning.filters import parsed
from sentilens.mllm.pruning.select import Selection, keep_count, reduce_image
from sentilens.mllm.pruning.strategy import Strategy, UnitInputs
from sentilens.mllm.pruning.top_attention import feature_layer_index, layer_indices
from sentilens.stages import selection as timed_selection


def encode_images(llava, pixel_values: Tensor) -> Tensor:
    """Vision-tower features LLaVA projects: hidden state at ``vision_feature_layer``, CLS dropped if "default".

    Several feature layers (a list in the config) are concatenated along the feature axis, as
    LLaVA does. The tower is frozen, so this runs without gradients.
    """
    config = llava.config
    tower = llava.model.vision_tower
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    with torch.no_grad():
        out = tower(pixel_values.to(device=tower.device, dtype=tower.dtype), output_hidden_states=True)
        states = [out.hidden_states[layer] for layer in layers]
        if config.vision_feature_select_strategy == "default":
            states = [s[:, 1:] for s in states]
        return torch.cat(states, dim=-1)


def visual_tokens(llava, pixel_values: Tensor, reducer: Reducer | None = None) -> list[Tensor]:
    """Projected visual tokens of each image, ``(k_i, D_lm)``: encode, reduce, project."""
    capture = getattr(reducer, "capture", None)
    with capture() if capture is not None else nullcontext():
        features = encode_images(llava, pixel_values)
    kept = list(features) if reducer is None else list(reducer(features, pixel_values))
    if len(kept) != features.shape[0] or any(k.ndim != 2 or k.shape[1] != features.shape[2] for k in kept):
        raise ValueError(f"a reducer must return one (k, {features.shape[2]}) tensor per image, "
                         f"got {[tuple(k.shape) for k in kept]} for {features.shape[0]} images")
    chosen = getattr(reducer, "last", None) or []
    if len(chosen) == len(kept) and all(getattr(selection, "projected", None) is not None for selection in chosen):
        return [selection.projected for selection in chosen]  # projected to choose them (cdpruner)
    projector = llava.model.multi_modal_projector
    rows = torch.cat(kept).to(dtype=projector.linear_1.weight.dtype)
    return list(torch.split(projector(rows), [k.shape[0] for k in kept]))


class TokenFilter:
    """The reducer of :mod:`sentilens.mllm.inputs`: ``filter(features, pixel_values) -> [(k_i, Dv), ...]``.

    :func:`sentilens.mllm.inputs.visual_tokens` enters :meth:`capture` around the tower forward
    that produces ``features``, so the scores come from that very pass; called on pixels the
    tower did not just see, the filter runs the tower itself once.
    """

    def __init__(self, tower: nn.Module, keep_ratio: float, strategy: Strategy | str = "all",
                 vision_feature_layer: int | Sequence[int] = -2):
        self.strategy = parsed(strategy)
        keep_count(1, keep_ratio)
        self.keep_ratio = keep_ratio
        num_layers = len(encoder_layers(tower))
        layers = layer_indices(self.strategy.layers, num_layers, vision_feature_layer)
        key_layer = None
        if "features" in self.strategy.needs:
            first = vision_feature_layer if isinstance(vision_feature_layer, int) else vision_feature_layer[-1]
            key_layer = feature_layer_index(first, num_layers)
        self.scorer = AttentionScorer(tower, layers, keep_keys_of=key_layer)
        self.last: list[Selection] = []
        self.native_positions = self.strategy.native_positions
        """Whether :func:`sentilens.mllm.inputs.build_inputs` gives the kept tokens their r = 1 positions."""
        self.texts: dict[int, torch.Tensor] | None = None
        """Each image's prompt text after it, as token ids (:func:`sentilens.mllm.inputs.give_text`), for a strategy
        that reads it (``cdpruner``)."""
        self.text_space: tuple[nn.Module, nn.Module] | None = None
        """(projector, the language model's input embeddings): where the relevance to the text is measured."""

    @contextmanager
    def capture(self) -> Iterator[TokenFilter]:
        """Score during the caller's own tower forward (no second tower pass; none at all without attention)."""
        with self.scorer.capture() if self.strategy.scored else nullcontext():
            yield self

    @torch.no_grad()
    def __call__(self, features: torch.Tensor, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        strategy = self.strategy
        if strategy.pools:
            side = math.isqrt(features.shape[1])
            if side * side != features.shape[1]:
                raise SentilensError(f"strategy '{strategy}' pools a square patch grid; this tower gives "
                                     f"{features.shape[1]} patches")
            budget = keep_count(features.shape[1], self.keep_ratio)
            with timed_selection():
                self.last = [area_pool(image, budget, side, side) for image in features]
            return [selection.tokens for selection in self.last]
        if not strategy.scored:
            count = features.shape[1]
            budget = keep_count(count, self.keep_ratio)
            self.last = []
            with timed_selection():
                measured = [self.relevance(i, features[i], budget) for i in range(features.shape[0])]
                scores = strategy.batch_unit_scores([  # the images of the call chosen together
                    UnitInputs(pixel_values[i], count, budget, features[i], relevance=relevance)
                    for i, (relevance, _) in enumerate(measured)])
                for i, (image_scores, (_, projected)) in enumerate(zip(scores, measured, strict=True)):
                    selection = reduce_image(features[i], image_scores.to(features.device), self.keep_ratio, strategy)
                    if projected is not None:  # every patch was projected to measure relevance: keep the chosen ones
                        selection.projected = projected[selection.kept.to(projected.device)]
                    self.last.append(selection)
            return [selection.tokens for selection in self.last]
        scorer = self.scorer
        seen = scorer.pixel_values
        fresh = (scorer.scores is not None and seen is not None and seen.shape == pixel_values.shape
                 and torch.equal(seen, pixel_values.to(device=seen.device, dtype=seen.dtype)))
        if not fresh:
            tower = scorer.tower
            scorer.score(pixel_values.to(device=tower.device, dtype=tower.dtype))
        scores = scorer.scores
        if scores.shape != features.shape[:2]:
            raise SentilensError(f"token filtering scores {scores.shape[1]} patches per image but the features have "
                                 f"{features.shape[1]} rows (a CLIP tower needs vision_feature_select_strategy "
                                 f"'default', which drops the CLS feature)")
        self.last = [
            reduce_image(features[i], scores[i], self.keep_ratio, strategy,
                         None if scorer.keys is None else scorer.keys[i])
            for i in range(features.shape[0])
        ]
        return [selection.tokens for selection in self.last]

    def relevance(self, row: int, features: torch.Tensor,
                  budget: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(``(N,)`` relevance of image ``row``'s patches to its prompt text (:func:`text_relevance`: the projected
        patches against the text's input embeddings), the ``(N, D_lm)`` projected patches) where the strategy
        reads the text and chooses; else (None, None)."""
        if "text_tokens" not in self.strategy.needs or budget >= features.shape[0]:
            return None, None
        if self.text_space is None or self.texts is None or row not in self.texts:
            raise RuntimeError(f"strategy '{self.strategy}' chose before it was given the prompt's text")
        from sentilens.mllm.pruning.cdpruner import text_relevance

        projector, embeddings = self.text_space
        ids = self.texts[row]
        if not ids.numel():  # nothing after the image to be relevant to: every patch alike
            return torch.zeros(features.shape[0]), None
        projected = projector(features.to(projector.linear_1.weight.dtype))
        return text_relevance(projected, embeddings(ids.to(embeddings.weight.device))).cpu(), projected


def make_reducer(llava: nn.Module, keep_ratio: float, strategy: Strategy | str = "all") -> TokenFilter:
    """The filter for a ``LlavaForConditionalGeneration``."""
    strategy = parsed(strategy)
    strategy.check("llava")
    reducer = TokenFilter(llava.model.vision_tower, keep_ratio, strategy, llava.config.vision_feature_layer)
    reducer.text_space = (llava.model.multi_modal_projector, llava.get_input_embeddings())
    return reducer
