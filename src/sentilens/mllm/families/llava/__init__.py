"""LLaVA-1.5 (``LlavaForConditionalGeneration``): the paper's model, and the defaults of every family.

A CLIP ViT with a CLS token sees one square image (336 px for LLaVA-1.5: 576 patches); the
feature layer's patch states (CLS dropped) go through the two-layer projector, one language-model
token per patch. Filtering (:mod:`sentilens.mllm.pruning`, the paper's Eq. 3) scores each patch by
the CLS attention averaged over the tower's layers and keeps the top ``ceil(r * N)`` in spatial
order.

The package, by job: :mod:`.family` (the adapter), :mod:`.vision` (the tower's features, the filter,
the projected visual tokens), :mod:`.tiny` (the tiny LLaVA-1.5), ``template.jinja`` (LLaVA-1.5's
Vicuna-v1 chat format); the sequence assembly is the family-neutral :func:`sentilens.mllm.inputs.assemble`.
"""
