"""SmolVLM (``SmolVLMForConditionalGeneration``, an Idefics3 architecture): SigLIP tiles, pixel shuffle, filtering.

How the model sees an image (transformers' ``modeling_smolvlm`` and ``image_processing_pil_smolvlm``):

- The image processor resizes the image (longest edge at most ``size``), then to multiples of the
  tile size, and cuts it into ``rows x cols`` square tiles; a *global* tile, the whole image
  resized to one tile, comes last (a small image is the global tile alone). Every tile goes
  through the SigLIP tower on its own. SigLIP has **no CLS token**.
- The connector *pixel-shuffles* each tile: every ``s x s`` block of patches (``s =
  scale_factor``) becomes one language-model token (its ``s^2`` patch states concatenated), then
  a linear projection. A tile of ``g x g`` patches gives ``(g / s)^2`` tokens.
- The prompt around them is text: ``<fake_token_around_image><row_i_col_j>`` before each tile's
  tokens, a newline after each row of tiles, ``\\n<fake_token_around_image><global-img>`` before
  the global tile's tokens and ``<fake_token_around_image>`` after them
  (``processing_smolvlm.get_image_prompt_string``).

Filtering, and why:

- **Scores.** Without a CLS token, a patch is scored by the attention it *receives*: the mean over
  the tile's queries and the heads of ``softmax(q K^T / sqrt(d))``, averaged over the chosen layers. A
  scored layer computes its attention itself, every tile on its own, and sums each softmax block's
  columns on the way (:func:`sentilens.mllm.pruning.attention_with_received`, the helper the Qwen
  filter uses): the map the layer's output needs gives the scores too, where recomputing ``q K^T``
  beside the tower's own kernel would cost a good share of another tower pass (docs/pruning.md).
  A language-model token stands for its pixel-shuffle block, which the language model receives as
  one token, so it is kept or dropped whole: its score is the **mean of its block's patch scores**.
- **Budget over the whole image, global tile and crops alike.** All tiles have the same patch
  count, and each query's attention sums to 1 over its tile, so scores of different tiles are on
  one scale; the top ``ceil(r N)`` tokens are chosen over all tiles at once (``N`` = tiles x
  tokens per tile), each tile's kept tokens in spatial order, tiles in the native order.
- **The text around the tiles stays.** The ``<fake_token_around_image>``, ``<row_i_col_j>``,
  ``<global-img>`` and newline tokens are prompt text, not visual tokens: they are kept for every
  tile (even one that keeps no token), so the layout the language model was trained on is intact
  and exactly ``ceil(r N)`` *visual* tokens reach it.
- ``random`` keeps a seeded draw of the same count; ``inverse`` the lowest scores; ``+merge`` is not
  offered.

Processor: the checkpoint's tokenizer and image processor, loaded one by one (:class:`SmolProcessor`):
transformers' ``SmolVLMProcessor`` insists on a video processor (torchvision) and ``num2words``,
and posts have no video.

The package, by job: :mod:`.family` (the adapter: tiles, visual tokens, assembly, heatmap),
:mod:`.processor` (the processor and its image layout text), :mod:`.layout` (the visual tokens of one
image and the pixel-shuffle filter), :mod:`.tiny` (the tiny model), ``template.jinja`` (SmolVLM-Instruct's chat format).
"""
