r"""The fusion model of the paper's Figure 1: two branches -> contextual attention -> routing -> FC + RNN.

Inputs are each modality's sequence (text tokens T x D_t with a mask, image regions R x D_v) and
pooled vector. Both are projected to a common width d and layer-normalised (the paper only says
the 2048-d image vector and the LM's embedding are aligned):
:math:`X = \mathrm{LN}(H_t W_t)`, :math:`\bar x = \mathrm{LN}(p_t W_t)`, likewise :math:`V, \bar v`.
A post without text (or without image) gets a learned placeholder vector in place of the
sequence (one valid position) and of the pooled vector, so the rest of the model never branches.

The context vector summarises the post, :math:`c = \tanh(W_c [\bar x; \bar v] + b_c)`, and guides
the cross-modal attention of ``layers`` Eq. (1): image -> text tokens
:math:`a_t = \mathrm{Att}_t(X \mid [\bar v; c])` and text -> image regions
:math:`a_v = \mathrm{Att}_v(V \mid [\bar x; c])`.

Variants (the paper's ablation; every one ends in the same FC + RNN head, ``layers`` Eq. (3)):

==========  ===========================================================================
text        capsules :math:`(\bar x, a_t)`, the image treated as absent everywhere
image       capsules :math:`(\bar v, a_v)`, the text treated as absent everywhere
concat      capsules :math:`(\bar x, \bar v)`: plain concatenation, no attention
attention   capsules :math:`(\bar x, \bar v, a_t, a_v)`, no routing
full        dynamic routing (``layers`` Eq. (2)) of :math:`(\bar x, \bar v, a_t, a_v)`
probe       no fusion network: a logistic regression on the pooled vectors (the baseline row)
==========  ===========================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from sentilens.data.records import Post
from sentilens.fusion.cache import PostFeatures, has_text
from sentilens.fusion.config import FusionConfig
from sentilens.fusion.encoders import ImageEncoder, TextEncoder, TopLayers, stack_pixels
from sentilens.fusion.layers import ContextualAttention, DynamicRouting, RecurrentHead


@dataclass
class FusionBatch:
    """Padded features of a batch; ``*_present`` is false for a post lacking that modality."""

    text_states: torch.Tensor  # B x T x D_t
    text_mask: torch.Tensor  # B x T, bool
    text_pooled: torch.Tensor  # B x D_t
    text_present: torch.Tensor  # B, bool
    image_states: torch.Tensor  # B x R x D_v
    image_mask: torch.Tensor  # B x R, bool
    image_pooled: torch.Tensor  # B x D_v
    image_present: torch.Tensor  # B, bool

    def to(self, device: str | torch.device) -> FusionBatch:
        return FusionBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _pad(items: Sequence[dict[str, torch.Tensor] | None], dim: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    length = max([1, *(item["states"].shape[0] for item in items if item is not None)])
    states = torch.zeros(len(items), length, dim)
    mask = torch.zeros(len(items), length, dtype=torch.bool)
    pooled = torch.zeros(len(items), dim)
    present = torch.zeros(len(items), dtype=torch.bool)
    for row, item in enumerate(items):
        if item is None:
            continue
        n = item["states"].shape[0]
        states[row, :n], mask[row, :n], pooled[row], present[row] = item["states"], True, item["pooled"], True
    return states, mask, pooled, present


def collate(features: Sequence[PostFeatures], text_dim: int, image_dim: int) -> FusionBatch:
    """Pad per-post features into a :class:`FusionBatch` (sequences padded to the batch's longest)."""
    text = _pad([f.text for f in features], text_dim)
    image = _pad([f.image for f in features], image_dim)
    return FusionBatch(*text, *image)


def collate_features(features: Sequence[PostFeatures], posts: Sequence[Post], text_dim: int, image_dim: int,
               live_text: TextEncoder | None = None, device: str | torch.device = "cpu",
               live_image: ImageEncoder | None = None, text_top: TopLayers | None = None) -> FusionBatch:
    """The batch for ``posts``: cached features, or for a fine-tuned encoder its live outputs.

    ``live_text``, ``live_image`` and ``text_top`` (the trained top layers, run on the cached states of the
    layers below) run inside the caller's grad mode, so gradients reach them in training.
    """
    batch = collate(features, text_dim, image_dim).to(device)
    n = len(posts)
    if text_top is not None and bool(batch.text_present.any()):
        # Only posts with text: a row with no real token has nothing to attend to.
        index = batch.text_present.nonzero().squeeze(1)
        length = int(batch.text_mask[index].sum(dim=1).max())
        mask = batch.text_mask[index, :length]
        states, pooled = text_top(batch.text_states[index, :length], mask)
        batch.text_states = batch.text_states[:, :length].index_copy(0, index, states.to(batch.text_states.dtype))
        batch.text_mask = batch.text_mask[:, :length]
        batch.text_pooled = batch.text_pooled.index_copy(0, index, pooled.to(batch.text_pooled.dtype))
    pictured = [i for i, post in enumerate(posts) if post.image]
    if live_image is not None and pictured:
        pixels = stack_pixels([live_image.load_pixels(posts[i].image) for i in pictured]).to(live_image.device)
        regions, pooled = live_image.features(pixels)
        regions, pooled = regions.float().to(device), pooled.float().to(device)
        index = torch.tensor(pictured, device=regions.device)
        batch.image_states = regions.new_zeros(n, *regions.shape[1:]).index_copy(0, index, regions)
        batch.image_mask = torch.zeros(n, regions.shape[1], dtype=torch.bool, device=regions.device)
        batch.image_mask[index] = True
        batch.image_pooled = pooled.new_zeros(n, pooled.shape[1]).index_copy(0, index, pooled)
        batch.image_present = batch.image_mask.any(dim=1)
    rows = [i for i, post in enumerate(posts) if has_text(post)]
    if live_text is None or not rows:
        return batch
    states, mask, pooled = live_text([posts[i].text for i in rows])
    index = torch.tensor(rows, device=states.device)
    batch.text_states = states.new_zeros(n, *states.shape[1:]).index_copy(0, index, states)
    batch.text_mask = mask.new_zeros(n, mask.shape[1]).index_copy(0, index, mask)
    batch.text_pooled = pooled.new_zeros(n, pooled.shape[1]).index_copy(0, index, pooled)
    batch.text_present = batch.text_mask.any(dim=1)
    return batch


class ModalityProjection(nn.Module):
    """Project one modality to width d, with a learned placeholder for posts that lack it."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.placeholder = nn.Parameter(torch.randn(dim) * 0.02)

    def forward(self, states: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor, present: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sequence = self.norm(self.proj(states))
        summary = self.norm(self.proj(pooled))
        absent = ~present
        sequence = torch.where(absent[:, None, None], self.placeholder.expand_as(sequence), sequence)
        only_first = torch.zeros_like(mask)
        only_first[:, 0] = True
        mask = torch.where(absent[:, None], only_first, mask)
        summary = torch.where(absent[:, None], self.placeholder.expand_as(summary), summary)
        return sequence, mask, summary


class FusionModel(nn.Module):
    """Text + image features -> label logits, in one of the five variants."""

    def __init__(self, config: FusionConfig, text_dim: int, image_dim: int):
        super().__init__()
        d = config.hidden
        self.variant = config.variant
        self.text = ModalityProjection(text_dim, d)
        self.image = ModalityProjection(image_dim, d)
        self.context = nn.Linear(2 * d, d) if config.variant != "concat" else None
        self.attend_text = ContextualAttention(d, 2 * d) if config.variant in ("text", "attention", "full") else None
        self.attend_image = ContextualAttention(d, 2 * d) if config.variant in ("image", "attention", "full") else None
        n_capsules = 4 if config.variant in ("attention", "full") else 2
        self.routing = (DynamicRouting(n_capsules, config.capsules, d, d, config.routing_iterations)
                        if config.variant == "full" else None)
        self.head = RecurrentHead(d, len(config.labels), config.rnn, config.dropout)

    def capsules(self, batch: FusionBatch) -> torch.Tensor:
        """The capsule sequence fed to the head (B x K x d), after routing for the ``full`` variant."""
        text_present, image_present = batch.text_present, batch.image_present
        if self.variant == "image":
            text_present = torch.zeros_like(text_present)
        if self.variant == "text":
            image_present = torch.zeros_like(image_present)
        x, x_mask, x_bar = self.text(batch.text_states, batch.text_mask, batch.text_pooled, text_present)
        v, v_mask, v_bar = self.image(batch.image_states, batch.image_mask, batch.image_pooled, image_present)
        if self.variant == "concat":
            return torch.stack([x_bar, v_bar], dim=1)
        context = torch.tanh(self.context(torch.cat([x_bar, v_bar], dim=-1)))
        if self.variant == "text":
            a_t, _ = self.attend_text(x, x_mask, torch.cat([v_bar, context], dim=-1))
            return torch.stack([x_bar, a_t], dim=1)
        a_v, _ = self.attend_image(v, v_mask, torch.cat([x_bar, context], dim=-1))
        if self.variant == "image":
            return torch.stack([v_bar, a_v], dim=1)
        a_t, _ = self.attend_text(x, x_mask, torch.cat([v_bar, context], dim=-1))
        capsules = torch.stack([x_bar, v_bar, a_t, a_v], dim=1)
        if self.routing is not None:
            capsules, _ = self.routing(capsules)
        return capsules

    def forward(self, batch: FusionBatch) -> torch.Tensor:
        """Logits B x n_labels."""
        return self.head(self.capsules(batch))


class ProbeModel(nn.Module):
    """Standardised pooled features -> label logits (a fitted logistic regression as a torch module)."""

    def __init__(self, text_dim: int, image_dim: int, n_labels: int):
        super().__init__()
        width = text_dim + image_dim
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("scale", torch.ones(width))
        self.linear = nn.Linear(width, n_labels)

    def inputs(self, batch: FusionBatch) -> torch.Tensor:
        """B x width: the text and image pooled vectors side by side, zeros where a post lacks one."""
        return torch.cat([batch.text_pooled * batch.text_present[:, None],
                          batch.image_pooled * batch.image_present[:, None]], dim=1)

    def forward(self, batch: FusionBatch) -> torch.Tensor:
        return self.linear((self.inputs(batch) - self.mean) / self.scale)


def build_model(config: FusionConfig, text_dim: int, image_dim: int) -> nn.Module:
    """The variant's model: the fusion network, or for ``probe`` the logistic regression (``fusion.probe``)."""
    if config.variant == "probe":
        return ProbeModel(text_dim, image_dim, len(config.labels))
    return FusionModel(config, text_dim, image_dim)
