"""LLaVA-1.5 (``LlavaForConditionalGeneration``): the paper's model, and the defaults of every family.

A CLIP ViT with a CLS token sees one square image (336 px for LLaVA-1.5: 576 patches); the
feature layer's patch states (CLS dropped) go through the two-layer projector, one language-model
token per patch. Filtering (:mod:`sentilens.mllm.pruning`, the paper's Eq. 3) scores each patch by
the CLS attention averaged over the tower's layers and keeps the top ``ceil(r * N)`` in spatial
order. The code is where it has always been: :mod:`sentilens.mllm.inputs` (encode, reduce,
project, assemble), :mod:`sentilens.mllm.pruning`, :func:`sentilens.mllm.model.build_tiny`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sentilens.mllm.families import ModelFamily


class LlavaFamily(ModelFamily):
    name = "llava"
    hf_class = "LlavaForConditionalGeneration"
    processor_class = "LlavaProcessor"
    model_types = ("llava",)
    pretrains_tower = True
    default_image_aspect = "pad"

    def build_tiny(self, out_dir: str | Path, corpus: Sequence[str] = (), seed: int = 0, spec=None,
                   vision_tower: str | Path | None = None) -> Path:
        from sentilens.mllm.model import build_tiny

        return build_tiny(out_dir, corpus=corpus, seed=seed, spec=spec, vision_tower=vision_tower)
