"""Model families of the MLLM package: what differs between LLaVA-1.5, LLaVA-NeXT, Qwen-VL and SmolVLM.

(A *model family* here is a kind of vision-language checkpoint inside the MLLM predictor family;
it is not the ``family`` field of a run, which is ``mllm`` for all of them.)

The checkpoint's config picks the family: :func:`family_for_config` maps ``config.model_type``
(``llava``, ``llava_next``, ...) to a :class:`ModelFamily`; anything else is a one-line
:class:`SentilensError` naming the supported classes. ``--model tiny:<name>`` builds the named
family's tiny random model (:func:`parse_tiny`; ``tiny`` alone is ``tiny:llava``). Every other
module of :mod:`sentilens.mllm` is family-neutral: it holds the loaded HF model and asks
:func:`family_of` for what differs.

What a family provides (subclass :class:`ModelFamily`, override what differs from LLaVA-1.5, and
register it in :data:`REGISTRY` as ``"name": "module:Class"``, imported on first use):

=========================  ====================================================================
``name``                   the ``tiny:<name>`` of the family (``llava``, ``llava-next``, ...)
``hf_class``               the transformers class of its checkpoints (loaded with ``from_pretrained``)
``processor_class``        the class name of its processor (a processor alone tells the family)
``model_types``            the ``config.model_type`` values it reads
``classes_by_type``        the transformers class of a ``model_type`` whose checkpoints are not ``hf_class``
                           (SmolVLM v1: ``idefics3`` -> ``Idefics3ForConditionalGeneration``)
``build_tiny(...)``        write a small random checkpoint + processor (tokenizer, image processor,
                           chat template) to a folder, offline; it is loaded back like a real one
``load_processor(source)`` the checkpoint's processor (default ``AutoProcessor.from_pretrained``)
``pretrains_tower``        True when ``build_tiny`` can take a tower pretrained by
                           :mod:`sentilens.mllm.tower` (a CLIP ViT of the tiny spec's shape)
``chat_template``          the prompt format used when a checkpoint ships none
                           (:class:`sentilens.mllm.prompt.PromptBuilder` renders through it)
``default_image_aspect``   ``pad`` / ``crop`` for ``--model tiny:<name>`` (see ``inputs.pixel_values``)
``image_inputs(...)``      image preprocessing: decoded RGB images -> ``(pixel_values, extras)``,
                           ``extras`` the other tensors the family's tower needs (``image_sizes``...)
``num_image_tokens(...)``  visual tokens one image becomes before filtering (the largest, when it
                           depends on the image), for the prompt's ``max_length`` budget
``visual_tokens(...)``     encode the images with the frozen tower, let the reducer (the token
                           filter, scored from that very tower pass) keep ``ceil(r * N)`` tokens
                           per image, project them: one ``(k_i, D_lm)`` tensor per image, in the
                           order the language model reads them
``make_reducer(...)``      the family's token filter for a keep ratio and scoring strategy; its
                           ``last`` holds each image's :class:`sentilens.mllm.pruning.Selection`
``patch_view(...)``        the heatmap data of one post (:class:`PatchView`: picture, square grid of
                           scores and kept flags, where the image lies), for ``explain`` and ``serve``
``prediction_flops(...)``  FLOPs of one post's prediction by part (the sweep's FLOP-ideal speedup)
``assemble(...)``          merge the kept visual tokens into the language model's input
                           (placeholder widened to ``k_i``, padding, positions); default: LLaVA's
``language_model_hidden``  the language model's forward on assembled inputs (label scoring,
                           training loss and generation all go through it; ``lm_head`` gives logits)
``vision_tower / projector / language_model``   the three parts (frozen / trained / trained or LoRA);
                           ``lora_pattern`` is the regex of the LM's module path LoRA adapts,
                           ``unquantized_modules`` what QLoRA leaves in full precision
=========================  ====================================================================

LLaVA-1.5 (:mod:`sentilens.mllm.families.llava`) is the reference implementation; every family is
one package here, split by job (docs/architecture.md, "How to add a VLM family").

This module imports nothing of :mod:`sentilens.mllm` (the families are imported
by name from :data:`REGISTRY`), so every mllm module may import it.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from sentilens.errors import SentilensError

TINY = "tiny"
DEFAULT_TINY_FAMILY = "llava"

REGISTRY: dict[str, str] = {
    "llava": "sentilens.mllm.families.llava.family:LlavaFamily",
    "llava-next": "sentilens.mllm.families.llava_next.family:LlavaNextFamily",
    "smolvlm": "sentilens.mllm.families.smolvlm.family:SmolVLMFamily",
    "qwen2.5-vl": "sentilens.mllm.families.qwen_vl.family:Qwen25VLFamily",
    "qwen3-vl": "sentilens.mllm.families.qwen_vl.family:Qwen3VLFamily",
}
"""``tiny:<name>`` -> ``"module:Class"`` of its :class:`ModelFamily` (imported on first use)."""

TITLES: dict[str, str] = {
    "llava": "LLaVA-1.5",
    "llava-next": "LLaVA-NeXT",
    "smolvlm": "SmolVLM",
    "qwen2.5-vl": "Qwen2.5-VL",
    "qwen3-vl": "Qwen3-VL",
}
"""How a run of each family names its model (``describe()``), without importing the family."""

_LOADED: dict[str, ModelFamily] = {}


@dataclass
class PatchView:
    """What a heatmap draws for one image (:meth:`ModelFamily.patch_view`): the tower's view of it and a
    square grid of patch scores and kept flags over that view."""

    picture: Tensor
    """(H, W, 3) in [0, 1]."""
    scores: Tensor
    """(g, g) patch scores."""
    kept: Tensor
    """(g, g) bool: the patches whose tokens reach the language model."""
    score_name: str
    content: tuple[float, float, float, float]
    """(x0, y0, x1, y1) in ``picture`` pixels: where the image lies; outside it is padding."""
    shown: Tensor | None = None
    """(g, g) bool: the cells that are visual tokens of the image (scored, possibly kept); the rest pads a
    rectangular grid to a square and is no token. None: every cell (LLaVA-1.5's square grid)."""


class ModelFamily(ABC):
    """One kind of vision-language checkpoint; see the module docstring for what each member is.

    The part accessors and the language-model forward default to the layout LLaVA-style models share
    (``model.model.vision_tower`` / ``multi_modal_projector`` / ``language_model``); everything else
    each family implements (:class:`sentilens.mllm.families.llava.LlavaFamily` is the reference).
    """

    name: str = ""
    hf_class: str = ""
    processor_class: str = ""
    model_types: tuple[str, ...] = ()
    classes_by_type: dict[str, str] = {}
    unquantized_modules: tuple[str, ...] = ("vision_tower", "multi_modal_projector", "lm_head")
    pretrains_tower: bool = False
    default_image_aspect: str = "crop"
    lora_pattern: str = r".*language_model\..*"

    @property
    @abstractmethod
    def chat_template(self) -> str:
        ...

    # --- checkpoints -------------------------------------------------------------------------
    def model_class(self, config=None):
        """The transformers class of a checkpoint of this family with ``config`` (None: :attr:`hf_class`)."""
        import transformers

        return getattr(transformers, self.classes_by_type.get(getattr(config, "model_type", None), self.hf_class))

    @abstractmethod
    def build_tiny(self, out_dir: str | Path, corpus: Sequence[str] = (), seed: int = 0, spec=None,
                   vision_tower: str | Path | None = None) -> Path:
        ...

    def load_processor(self, source: str):
        """The checkpoint's processor (tokenizer + image processor + chat template)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source)

    # --- parts -------------------------------------------------------------------------------
    def vision_tower(self, model) -> nn.Module:
        return model.model.vision_tower

    def projector(self, model) -> nn.Module:
        return model.model.multi_modal_projector

    def language_model(self, model) -> nn.Module:
        return model.model.language_model

    # --- images and visual tokens ------------------------------------------------------------
    @abstractmethod
    def image_inputs(self, processor, images: Sequence, aspect: str) -> tuple[Tensor, dict[str, Tensor]]:
        ...

    @abstractmethod
    def num_image_tokens(self, model, processor) -> int:
        ...

    @abstractmethod
    def visual_tokens(self, model, pixel_values: Tensor, extras: dict[str, Tensor], reducer=None) -> list[Tensor]:
        ...

    @abstractmethod
    def make_reducer(self, model, keep_ratio: float, strategy: str = "all"):
        ...

    @abstractmethod
    def prediction_flops(self, model, processor, size: tuple[int, int] | None, keep_ratio: float | None,
                         strategy: str, text_tokens: int, answer_tokens: int) -> dict[str, float]:
        """FLOPs of one post's prediction by part (``vision``, ``scoring``, ``projector``, ``language``,
        ``head``) and ``total``: its image of ``size = (width, height)`` (None: no image) filtered at
        ``keep_ratio`` under ``strategy``, ``text_tokens`` other prompt tokens, ``answer_tokens`` scored."""
        ...

    @abstractmethod
    def patch_view(self, model, builder, post, reducer) -> PatchView:
        """The heatmap of ``post``'s image under ``reducer`` (a filter from :meth:`make_reducer`), from one
        tower pass with that reducer, so the kept flags are exactly the tokens the language model sees."""
        ...

    # --- the language model ------------------------------------------------------------------
    @abstractmethod
    def assemble(self, model, token_ids, visual, targets=None, padding_side: str = "right", extras=None):
        ...

    def language_model_hidden(self, model, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor,
                              **kwargs):
        return self.language_model(model)(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                          position_ids=position_ids, **kwargs)


def supported_classes() -> str:
    """``"LlavaForConditionalGeneration, ..."``: the classes of every registered family."""
    families = [get_family(name) for name in REGISTRY]
    return ", ".join(name for family in families for name in (family.hf_class, *family.classes_by_type.values()))


def get_family(name: str) -> ModelFamily:
    """The registered family called ``name`` (``tiny:<name>``); unknown names are a user error."""
    if name not in REGISTRY:
        known = ", ".join(f"tiny:{n}" for n in REGISTRY)
        raise SentilensError(f"unknown model family '{name}' in --model tiny:{name}: choose one of {known}")
    if name not in _LOADED:
        module, _, cls = REGISTRY[name].partition(":")
        _LOADED[name] = getattr(importlib.import_module(module), cls)()
    return _LOADED[name]


def family_for_config(config, source: str = "") -> ModelFamily:
    """The family of a checkpoint, from its config's ``model_type``; anything else is refused in one line."""
    model_type = getattr(config, "model_type", None)
    for name in REGISTRY:
        family = get_family(name)
        if model_type in family.model_types:
            return family
    where = f"'{source}' is" if source else "the checkpoint is"
    raise SentilensError(f"{where} a '{model_type}' checkpoint; the MLLM family supports {supported_classes()}")


def family_for_processor(processor) -> ModelFamily:
    """The family whose processor class ``processor`` is; LLaVA-1.5 for any other processor."""
    name = type(processor).__name__
    for family_name in REGISTRY:
        family = get_family(family_name)
        if family.processor_class == name:
            return family
    return get_family(DEFAULT_TINY_FAMILY)


def family_of(model) -> ModelFamily:
    """The family of a loaded model (an HF model, or a PEFT model around one)."""
    config = getattr(model, "config", None)
    return family_for_config(config)


def parse_tiny(base_model: str) -> str | None:
    """The family name of ``tiny`` / ``tiny:<name>`` (``tiny`` is ``tiny:llava``), None for a real checkpoint."""
    if base_model == TINY:
        return DEFAULT_TINY_FAMILY
    if base_model.startswith(TINY + ":"):
        name = base_model[len(TINY) + 1:]
        get_family(name)
        return name
    return None


__all__ = ["DEFAULT_TINY_FAMILY", "REGISTRY", "TINY", "TITLES", "ModelFamily", "PatchView", "family_for_config",
           "family_for_processor", "family_of", "get_family", "parse_tiny", "supported_classes"]
