"""Qwen2.5-VL and Qwen3-VL (``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``).

How these models see an image (read from transformers' ``modeling_qwen2_5_vl`` / ``modeling_qwen3_vl``):

- Native resolution: the image processor resizes an image to a multiple of ``patch * merge`` pixels
  (within ``min_pixels``/``max_pixels``) and flattens it into ``H x W`` patches; ``grid_thw`` says
  ``(1, H, W)`` per image. The patches of all images of a batch run through the tower as one packed
  sequence; ``cu_seqlens`` keeps each image's attention to itself.
- 2x2 patch merging: the patches arrive grouped by merge block (4 consecutive patches form one
  block), and the merger maps each block to one language-model token: an image is
  ``N = (H/2) * (W/2)`` visual tokens. There is no CLS token.
- 3-D rotary positions (M-RoPE) in the language model: the image's token ``(h, w)`` gets position
  ``(s, s + h, s + w)`` (temporal, height, width) where ``s`` is the position after the text before
  it, and the text after the image continues at ``s + max(H/2, W/2)``, not ``s + N``.
- Qwen2.5-VL's tower attends inside 112-px windows in most layers (``fullatt_block_indexes`` name the
  few full-attention layers); it reorders the patches window by window for this and puts the merged
  tokens back in raster order at the end.
- Qwen3-VL's tower attends over the whole image in every layer, and also sends "deepstack" features:
  the hidden states after a few intermediate layers (``deepstack_visual_indexes``), merged by their
  own mergers, are added to the language model's hidden states at the visual positions after its
  first decoder layers.

Steps, one by one (as :mod:`sentilens.mllm.inputs` does for LLaVA) so a filter can sit between them
(:mod:`.vision`, then :mod:`.positions`):

1. :func:`encode_images` runs the frozen tower with its mergers switched for a recorder (so they run
   once, later, on the kept tokens only) and returns each image's pre-merger hidden states,
   ``(N, 4, Dv)`` per image in raster order (and for Qwen3-VL the same for each deepstack layer);
2. a :class:`QwenTokenFilter` picks the ``ceil(r * N)`` tokens to keep (none: all ``N``);
3. the mergers (the projector; trained in fine-tuning as LLaVA's projector is) map the kept blocks
   to language-model tokens, main and deepstack features alike;
4. :func:`assemble` widens each post's single image placeholder to its kept tokens and gives every
   token its 3-D position.

The filtering rules, and why:

- **Score of a merged token.** With no CLS token, a patch is scored by the attention it *receives*:
  ``mean_i softmax(q_i K^T / sqrt(d))_j`` over the image's queries ``i`` and the heads, then averaged
  over the scored layers. A scored layer computes its attention itself, a block of queries at a time,
  from the tower's own rotated queries and keys, and sums each softmax block's columns on the way (the
  output is the same attention; no map is held whole or computed twice); the other layers keep the
  tower's kernel (SDPA). A merged token stands for its 2x2 block, so its score is the mean
  of its four patches' scores: the language model receives the block as one token, so the block is
  kept or dropped as a whole.
- **Which layers (Qwen2.5-VL): full-attention layers only.** In a windowed layer a query spreads its
  attention over its own window, so every window receives the same total attention per query
  whatever it shows: such a layer only ranks patches against their window neighbours, and averaging
  it in would pull the image-wide ranking toward "a few tokens from every window", including windows
  of plain background. The full-attention layers compare every patch with every other. The default
  (``all``) averages every full-attention layer (4 of 32 in the released towers); ``feature``/``last``
  take the last layer (whose output the merger reads, a full-attention layer in the released models); a
  layer or slice that names only windowed layers is refused.
- **Which layers (Qwen3-VL): ``all``: every layer** (each attends over the whole image), as the paper
  averages all CLS rows. ``feature``: the layers whose outputs reach the language model, the deepstack
  layers and the last (4 of 27 in the released towers), as FasterVLM scores LLaVA's feature layer;
  ``last``: the last one. The cost differs: unlike a CLS row, received attention needs the whole
  ``T x T`` map of a scored layer, so a scored layer trades the tower's fused attention kernel for the
  block-by-block computation above; scoring all 27 layers costs more than scoring 4
  (``benchmarks/token_filtering.py`` measures both).
- **Deepstack (Qwen3-VL).** A deepstack feature belongs to one merged token (the same 2x2 block,
  taken at an earlier layer). A dropped token loses its deepstack features too and a kept one keeps
  all of them, in the same order as the main features: the language model adds level ``l`` to the
  hidden state of the same visual position, so the kept sets must be identical. The scores come from
  the tower's attention only; the deepstack features are not scored separately.
- **Positions: a kept token keeps its own native 3-D position** ``(s, s + h, s + w)``; nothing is
  renumbered, so a kept token sits where the native model puts it and the rotary geometry between
  kept tokens is unchanged. **The text after the image keeps its native positions too**
  (``s + max(H/2, W/2)`` onward), whatever was dropped: the answer tokens and the prompt text are at
  the positions the model was trained with. Positions count real tokens only (left padding gets
  none), so a post has the same positions alone and in a batch.
- Baselines as for LLaVA: ``random`` (seeded by the image's patches; no scoring pass) and ``inverse``
  (the lowest scores). ``+merge`` (VisionZip-style context tokens) is not offered for these families.

The processor: transformers' ``Qwen2_5_VLProcessor``/``Qwen3VLProcessor`` require a video processor,
which needs torchvision; posts have no video, so :class:`QwenProcessor` holds the checkpoint's own
tokenizer (with its chat template) and its own image processor (``Qwen2VLImageProcessor``), each
loaded with ``from_pretrained``.

The package, by job: :mod:`.family` (the adapter), :mod:`.processor` (tokenizer + image processor,
preprocessing), :mod:`.vision` (the tower pass, the received-attention scores, the filter, the merged
visual tokens, the heatmap), :mod:`.positions` (M-RoPE positions and the language model's input),
:mod:`.tiny` (the tiny random models), :mod:`.flops`, ``template.jinja`` (the ChatML template the tiny
models ship).
"""
