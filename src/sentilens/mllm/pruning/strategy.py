"""What a token-pruning strategy is: the base class every entry of :data:`sentilens.mllm.pruning.STRATEGIES` extends.

A strategy is parsed from the text a user gives (``--strategy``, ``with_options(strategy=...)``):
a head naming the strategy (one of its ``forms``) and optionally one ``+modifier`` it accepts.
It declares

- ``stage``: ``vision`` (it chooses visual tokens between the tower and the projector) or ``lm``
  (it drops visual tokens inside the language model, after a layer);
- ``needs``: what it reads (:data:`NEEDS`), so a family knows what to compute for it;
- which families it works for: :meth:`Strategy.unsupported` gives the one-line reason otherwise;

and gives the families what they choose by: :meth:`Strategy.unit_scores` (its own scores where it
does not read attention, from one image's :class:`UnitInputs`) and :meth:`Strategy.ranking` (the order
tokens are kept in). The families call :func:`sentilens.mllm.pruning.select.choose` with those.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from sentilens.errors import SentilensError

if TYPE_CHECKING:
    import torch

NEEDS: dict[str, str] = {
    "attention": "the vision tower's attention: CLS attention where the tower has a CLS token, else the attention "
                 "each patch receives",
    "features": "the visual features (the rows the family sends to its projector; for +merge also the feature "
                "layer's keys)",
    "pixels": "the image's pixels",
    "text_tokens": "the post's text tokens",
}
"""What a strategy may need, by name (a strategy's ``needs`` is a subset)."""

MODIFIERS: dict[str, str] = {
    "merge": "the dropped tokens merged into contextual tokens (VisionZip-style)",
    "native": "the kept tokens keep their r = 1 positions",
}
"""The ``+modifier`` suffixes, and what each does."""

MODIFIER_FAMILIES: dict[str, tuple[str, ...]] = {"merge": ("llava",), "native": ("llava",)}
"""The families each modifier works for: LLaVA-1.5's square grid is the only layout with a place for
contextual tokens and for r = 1 positions of a shortened sequence."""

MODIFIER_REFUSALS: dict[str, dict[str, str]] = {
    "merge": {"llava-next": " (its contextual tokens have no place in the row layout)",
              "qwen2.5-vl": " (its tokens are merged 2 x 2 blocks with 3-D positions)",
              "qwen3-vl": " (its tokens are merged 2 x 2 blocks with 3-D positions)"},
    "native": {"qwen2.5-vl": " (Qwen keeps every kept token's native 3-D position always)",
               "qwen3-vl": " (Qwen keeps every kept token's native 3-D position always)"},
}
"""Why a family refuses a modifier, where there is more to say than that it does."""

@dataclass
class UnitInputs:
    """What a family gives a strategy that reads no attention about one image's units (:meth:`Strategy.unit_scores`)."""

    pixels: torch.Tensor
    """The image's pixel values (its tiles, for a tiled family): what ``random`` seeds its draw by."""
    count: int
    """How many units the image has (the ``N`` of ``ceil(r N)``)."""
    budget: int
    """How many tokens will be kept (``ceil(r N)``)."""
    features: torch.Tensor | None = None
    """``(count, D)``: each unit's row as the family sends it to its projector (LLaVA's feature-layer state, Qwen's
    2 x 2 block and SmolVLM's pixel-shuffle block concatenated); None where the family has not computed them."""
    candidates: torch.Tensor | None = None
    """``(count,)`` bool: the units a strategy may choose by their features (LLaVA-NeXT's newline slots are not:
    its budget rule keeps them with their rows); None: every unit."""
    relevance: torch.Tensor | None = None
    """``(count,)`` each unit's relevance to the post's text in ``[0, 1]``, for a strategy that needs
    ``text_tokens`` at the vision stage (``cdpruner``); None where it is not computed."""


class Strategy:
    """One parsed strategy (subclasses set the class attributes and :meth:`parse_head`)."""

    name: ClassVar[str] = ""
    """Its key in :data:`sentilens.mllm.pruning.STRATEGIES`."""
    forms: ClassVar[tuple[str, ...]] = ()
    """How its head is written (``A:B`` and ``K`` stand for numbers)."""
    summary: ClassVar[str] = ""
    """One sentence for the CLI help and the report."""
    stage: ClassVar[str] = "vision"
    needs: ClassVar[frozenset[str]] = frozenset()
    modifiers: ClassVar[tuple[str, ...]] = ()
    """The ``+modifier`` suffixes it accepts."""
    showcase: ClassVar[tuple[str, ...]] = ()
    """The forms the full demo's sweep shows."""
    families: ClassVar[tuple[str, ...] | None] = None
    """The families it works for; None: every family."""
    pools: ClassVar[bool] = False
    """Whether it makes new tokens from the grid (``downsample``) instead of choosing among the units."""
    merges_rest: ClassVar[bool] = False
    """Whether some kept units carry the mean of dropped ones (``visionzip``: :meth:`merge_groups`)."""

    def __init__(self, head: str, modifier: str = "", layers: str = "all"):
        self.head = head
        self.modifier = modifier
        self.layers = layers
        """The tower layers whose attention scores the tokens (the layer grammar of
        :mod:`sentilens.mllm.pruning.top_attention`); ``all`` for a strategy that scores none."""

    @classmethod
    def parse_head(cls, head: str) -> dict | None:
        """The constructor's keyword arguments when ``head`` is one of this strategy's forms, else None."""
        return {} if head in cls.forms else None

    def __str__(self) -> str:
        return self.head + (f"+{self.modifier}" if self.modifier else "")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash((type(self).__name__, str(self)))

    # --- what it needs and where it works ------------------------------------------------------
    @property
    def scored(self) -> bool:
        """Whether the tower's attention must be captured for it."""
        return "attention" in self.needs

    @property
    def merges(self) -> bool:
        """``+merge``: the dropped tokens are merged into contextual tokens."""
        return self.modifier == "merge"

    @property
    def native_positions(self) -> bool:
        """``+native``: the kept tokens keep the positions they have at r = 1."""
        return self.modifier == "native"

    def unsupported(self, family: str) -> str | None:
        """Why this strategy cannot run on ``family`` (a family name, ``llava``...), or None: a strategy runs on
        its ``families`` (None: every family), a modifier on :data:`MODIFIER_FAMILIES`."""
        from sentilens.mllm.families import TITLES

        title = TITLES.get(family, family)
        if self.families is not None and family not in self.families:
            return f"'{self.head}' is not available for {title}"
        if self.modifier and family not in MODIFIER_FAMILIES[self.modifier]:
            why = MODIFIER_REFUSALS[self.modifier].get(family, "")
            verb = "is not available for" if self.merges else "is offered for LLaVA-1.5 only, not"
            return f"+{self.modifier} {verb} {title}{why}; use the strategy without +{self.modifier}"
        return None

    def check(self, family: str) -> None:
        """A one-line :class:`SentilensError` when :meth:`unsupported` gives a reason."""
        reason = self.unsupported(family)
        if reason is not None:
            raise SentilensError(f"strategy '{self}': {reason}")

    # --- what the families choose by ---------------------------------------------------------------
    def unit_scores(self, units: UnitInputs) -> torch.Tensor:
        """``(units.count,)`` scores of one image's units for a strategy that reads no attention (higher: kept
        first)."""
        # Families call this only when ``scored`` is False; an attention-reading strategy gets its scores
        # from the tower's hooked pass instead, so reaching here is a caller's bug, not a user's mistake.
        raise TypeError(f"strategy '{self}' scores tokens by the tower's attention, not by unit_scores")

    def batch_unit_scores(self, units: Sequence[UnitInputs]) -> list[torch.Tensor]:
        """:meth:`unit_scores` of each image of one call, for a family that has them all at once; a strategy
        whose selection is a loop of small steps per image (the greedy ones) overrides it to run the images'
        loops together, giving each image the scores :meth:`unit_scores` would."""
        return [self.unit_scores(unit) for unit in units]

    def ranking(self, scores: torch.Tensor) -> torch.Tensor:
        """The priorities tokens are kept by (highest first) given their ``scores``: the scores themselves."""
        return scores

    def priorities(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """The priorities for a budget of ``budget`` tokens: :meth:`ranking` unless the choice depends on it."""
        return self.ranking(scores)

    def merge_groups(self, scores: torch.Tensor, budget: int, features: torch.Tensor) -> torch.Tensor:
        """``(N,)`` the unit each unit's row is averaged into, -1 for none; overridden by the
        :attr:`merges_rest` strategies, every other strategy merges nothing."""
        import torch

        return torch.full((scores.shape[0],), -1, dtype=torch.long, device=scores.device)
