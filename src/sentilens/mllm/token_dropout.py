"""Visual-token dropout in training (``train mllm --token-dropout R``; our addition, off by default).

The paper fine-tunes on whole images and filters visual tokens at inference only (its Figure 2). Its
language model, LLaVA-1.5's Vicuna, was pretrained on text of every length; a language model trained
from scratch on images of one token count (the demo's tiny LLaVA) learns that one layout instead.
Filtered at inference, the kept tokens and the text after them sit at positions it never saw in
training. Measured on the demo's full size without dropout: the paper's filter scores 0.942 at
r = 0.4 against 0.992 at r = 1, while the same tokens at their r = 1 positions (``all+native``)
score 0.992: the renumbering, not the dropped patches, cost the accuracy.

With dropout, each training image keeps all its visual tokens with probability
:data:`DROP_SHARE`'s complement, else a uniformly random ``ceil(r * N)`` of them, in spatial order,
with ``r`` uniform in ``[R, 1]``; positions are renumbered as at inference. A uniform choice favours no
scoring rule, so the paper's filter and its ``random`` baseline are later compared on the same model.
Draws come from a generator seeded by the run's seed, the epoch and the process rank, so a resumed
run draws what an uninterrupted one would. LLaVA-1.5 only (the reducer interface of
:func:`sentilens.mllm.families.llava.vision.visual_tokens`).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from sentilens.mllm.pruning import keep_count

DROP_SHARE = 0.5
"""Share of the training images whose visual tokens are thinned (the others keep all of theirs)."""


class TokenDropout:
    """A training reducer: ``dropout(features, pixel_values) -> [(k_i, Dv), ...]``, random by design."""

    native_positions = False

    def __init__(self, min_keep_ratio: float, seed: int):
        keep_count(1, min_keep_ratio)  # the same range check as the filter's keep ratio
        self.min_keep_ratio = min_keep_ratio
        self.seed = seed
        self.generator = torch.Generator()
        self.start_epoch(0)

    def start_epoch(self, epoch: int, rank: int = 0) -> None:
        """Reseed for ``epoch`` on process ``rank`` (a resumed run starts at an epoch's beginning)."""
        self.generator.manual_seed(((self.seed * 100_003 + epoch) * 1_009 + rank) & (2 ** 63 - 1))

    def capture(self):
        return nullcontext(self)  # no scores to take from the tower pass

    @torch.no_grad()
    def __call__(self, features: torch.Tensor, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        kept = []
        for image in features:
            draws = torch.rand(2, generator=self.generator).tolist()
            if draws[0] < DROP_SHARE:
                ratio = self.min_keep_ratio + (1 - self.min_keep_ratio) * draws[1]
                order = torch.randperm(image.shape[0], generator=self.generator)
                image = image[order[:keep_count(image.shape[0], ratio)].sort().values.to(image.device)]
            kept.append(image)
        return kept
