"""Visual token pruning as a registry of strategies (paper, "Reduction of Redundant Visual Features").

:data:`STRATEGIES` maps a name to a :class:`~sentilens.mllm.pruning.strategy.Strategy` class;
:func:`parse_strategy` turns the text a user gives (``all``, ``feature+merge``, ``random``...) into
an instance of the one whose form it is. Everything that lists or explains strategies (the CLI
help, the predictors' ``Capabilities.strategies``, ``sweep --strategy``, the report, the demo's
list) reads the registry.

- :mod:`.strategy`: the base class (stage, needs, supported families, the order tokens are kept in);
- :mod:`.top_attention`: the paper's top attention (``all``, ``feature``, ``last``, ``A:B``, ``K``,
  ``+merge``, ``+native``) and the ``inverse`` baseline;
- :mod:`.random_draw`: the ``random`` baseline;
- :mod:`.lm_stage`: ``lm:K``, pruning inside the language model after layer K;
- :mod:`.divprune`: ``divprune``, the most mutually different tokens (greedy max-min cosine distance);
- :mod:`.downsample`: ``downsample``, the patch grid area-pooled to the budget (LLaVA-1.5);
- :mod:`.fastv`: ``fastv:K``, inside the LM: the visual tokens the text after the image attends to most;
- :mod:`.dart`: ``dart:K``, inside the LM: a few pivots and the visual tokens least duplicated with them;
- :mod:`.visionzip`: ``visionzip``, dominant tokens by attention and contextual tokens merged from the rest;
- :mod:`.cdpruner`: ``cdpruner`` / ``dpp``, greedy MAP of a (text-conditioned) determinantal point process;
- :mod:`.attention`: the tower's attention as scores, from a hooked pass (CLS attention, or the
  attention received on a tower without CLS);
- :mod:`.select`: the budget ``ceil(r N)``, :func:`~.select.choose` (what every family calls) and ``+merge``;
- :mod:`.filters`: the base of the tiled families' reducers (LLaVA-1.5's: ``families/llava/vision.py``).

Adding a strategy: one module with a ``Strategy`` subclass, one line here (docs/architecture.md).
"""

from __future__ import annotations

import importlib

from sentilens.errors import SentilensError
from sentilens.mllm.pruning.cdpruner import ConditionalDpp
from sentilens.mllm.pruning.dart import PivotDuplication
from sentilens.mllm.pruning.divprune import DiversityPrune
from sentilens.mllm.pruning.downsample import Downsample
from sentilens.mllm.pruning.fastv import TextAttention
from sentilens.mllm.pruning.lm_stage import LastTokenAttention, LmPlan, LmStage, LmStrategy, lm_stage
from sentilens.mllm.pruning.random_draw import RandomDraw, random_priorities
from sentilens.mllm.pruning.strategy import MODIFIERS, NEEDS, Strategy, UnitInputs
from sentilens.mllm.pruning.top_attention import LowestAttention, TopAttention, feature_layer_index, layer_indices
from sentilens.mllm.pruning.visionzip import DominantAndContext

_LAZY = {
    "attention": ("AttentionScorer", "attention_with_received", "encoder_layers", "has_cls_token",
                  "received_attention", "received_attention_only", "received_by_route", "scoring_route"),
    "filters": ("TiledTokenFilter",),
    "select": ("FlatUnits", "Selection", "choose", "gather_rows", "keep_count", "merge_context", "reduce_image",
               "top_patches"),
}
"""Names of the torch modules, imported on first use, so the registry (CLI help) loads without torch."""


def __getattr__(name: str):
    for module, names in _LAZY.items():
        if name in names:
            return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


STRATEGIES: dict[str, type[Strategy]] = {
    TopAttention.name: TopAttention,
    RandomDraw.name: RandomDraw,
    LowestAttention.name: LowestAttention,
    LastTokenAttention.name: LastTokenAttention,
    DiversityPrune.name: DiversityPrune,
    Downsample.name: Downsample,
    TextAttention.name: TextAttention,
    PivotDuplication.name: PivotDuplication,
    DominantAndContext.name: DominantAndContext,
    ConditionalDpp.name: ConditionalDpp,
}
"""Strategy name -> class; a strategy's text is one of its ``forms``, optionally ``+modifier``."""

DEFAULT_STRATEGY = "all"


def parse_strategy(text: str) -> Strategy:
    """The strategy ``text`` names (``LAYERS``, ``LAYERS+merge``, ``random+native``...); else a one-line error."""
    name = text.strip()
    head, plus, modifier = name.partition("+")
    head = head or DEFAULT_STRATEGY
    for cls in STRATEGIES.values():
        options = cls.parse_head(head)
        if options is None:
            continue
        if plus and modifier not in cls.modifiers:
            break
        return cls(head, modifier, **options)
    raise SentilensError(f"unknown filtering strategy '{text}': expected {strategy_grammar()}")


def reducer_for(model, keep_ratio: float, strategy: str = DEFAULT_STRATEGY):
    """The reducer of any registered strategy for a loaded model: its family's vision-stage filter
    (``make_reducer``), or for an LM-stage strategy one that drops visual tokens inside the language model."""
    from sentilens.mllm.families import family_of

    family = family_of(model)
    parsed = parse_strategy(strategy)
    parsed.check(family.name)
    if parsed.stage == "lm":
        return LmStage(parsed, keep_ratio, len(family.language_model(model).layers), model.config.image_token_id)
    return family.make_reducer(model, keep_ratio, str(parsed))


def strategy_grammar() -> str:
    """What a strategy may be written as, from the registry (for messages)."""
    parts = []
    for cls in STRATEGIES.values():
        forms = " / ".join(cls.forms)
        suffixes = f"[{'|'.join('+' + m for m in cls.modifiers)}]" if cls.modifiers else ""
        parts.append(forms + suffixes)
    return ", ".join(parts)


def strategy_legend() -> str:
    """What each registered strategy and modifier is, in one sentence (the CLI help, the report)."""
    summaries = "; ".join(cls.summary for cls in STRATEGIES.values())
    modifiers = "; ".join(f"+{name}: {what}" for name, what in MODIFIERS.items())
    return f"{summaries}; LLaVA-1.5 also takes {modifiers}"


def strategy_help() -> str:
    """The ``--strategy`` help text, from the registry."""
    return f"Token filtering ({strategy_grammar()}): {strategy_legend()}."


def strategy_names(family: str | None = None) -> tuple[str, ...]:
    """Every strategy form and modifier (``all``, ..., ``random``, ``+merge``...), or those ``family`` supports."""
    def works(text: str) -> bool:
        return family is None or parse_strategy(text).unsupported(family) is None

    def usable(cls, form: str) -> bool:  # a form with a parameter (lm:K, A:B) stands for the class's showcase
        return works(form if cls.parse_head(form) is not None else cls.showcase[0].partition("+")[0])

    names = [form for cls in STRATEGIES.values() for form in cls.forms if usable(cls, form)]
    names += [f"+{modifier}" for modifier in MODIFIERS
              if any(works(f"{cls.showcase[0].partition('+')[0]}+{modifier}")
                     for cls in STRATEGIES.values() if modifier in cls.modifiers)]
    return tuple(names)


def showcase_strategies() -> tuple[str, ...]:
    """The strategies the full demo sweeps: each strategy's own showcase, in registry order."""
    return tuple(form for cls in STRATEGIES.values() for form in cls.showcase)


__all__ = ["DEFAULT_STRATEGY", "MODIFIERS", "NEEDS", "STRATEGIES", "AttentionScorer", "ConditionalDpp",
           "DiversityPrune", "DominantAndContext", "Downsample", "FlatUnits", "LastTokenAttention", "LmPlan",
           "LmStage", "LmStrategy", "LowestAttention", "PivotDuplication", "RandomDraw", "Selection", "Strategy",
           "TextAttention", "TiledTokenFilter", "TopAttention", "UnitInputs", "attention_with_received", "choose",
           "encoder_layers", "feature_layer_index", "gather_rows", "has_cls_token", "keep_count", "layer_indices",
           "lm_stage", "merge_context", "parse_strategy", "random_priorities", "received_attention",
           "received_attention_only", "received_by_route", "reduce_image", "reducer_for", "scoring_route",
           "showcase_strategies", "strategy_grammar", "strategy_help", "strategy_legend", "strategy_names",
           "top_patches"]
