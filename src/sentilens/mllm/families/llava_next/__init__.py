"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, LLaVA-1.6): any-resolution tiles, and how they are filtered.

How the model sees an image (transformers' ``modeling_llava_next`` and its image processor):

- The image processor picks the grid resolution (``image_grid_pinpoints``) that keeps most of the
  image, resizes the image into it (aspect kept, centred, padded) and cuts ``nh x nw`` crops of
  the tower's size; a *base* tile, the whole image resized to one tile, comes first. Every tile
  goes through the same CLIP tower on its own, so **every tile has its own CLS token**.
- The language model reads the base tile's ``g x g`` patches, then the crops stitched into one
  ``(nh g) x (nw g)`` grid with the padding rows/columns cut off (``unpad_image``), read row by
  row with an ``image_newline`` embedding after each row. ``N = g^2 + H' (W' + 1)`` visual tokens.

Filtering, and why:

- **Scores.** Each patch is scored by the CLS attention *of its own tile* (the paper's Eq. 3,
  averaged over the chosen layers, :class:`sentilens.mllm.pruning.AttentionScorer` on the tower's
  pass over all tiles). A tile's CLS summarises that tile only, so it is the natural judge of
  its patches; the base tile's CLS sees the whole image at low resolution and scores the
  global view. Each row is a softmax over one tile's tokens, so scores of different tiles are on
  the same scale (a share of one CLS's attention) and are ranked together.
- **Budget over the whole image.** The top patches are chosen across all tiles at once: a tile
  showing the post's subject keeps many patches, a tile of sky few or none. Padding patches that
  ``unpad_image`` removes are never candidates.
- **Newline tokens** are handled by one rule: *a row's newline stays exactly when at least one
  patch of that row stays*, and the newline counts against the budget like a patch. Why: the
  newline marks where a row of the crop grid ends, which the language model was trained to read
  after every row; keeping it for rows that still have patches keeps that layout, while a row
  with nothing left has nothing to end. It costs the language model as much as a patch, so it is
  counted: with ``N`` the native visual-token count (patches and newlines), exactly
  ``k = ceil(r N)`` tokens reach the language model, and ``r = 1`` is the native model.
  Patches are taken in score order; a patch opening a new crop row costs 2 (itself and the
  row's newline), one in an open row or in the base tile 1. When one token of budget is left
  and the next patch would open a row, it is passed over for the next patch that costs 1; if
  none is left, the best row-opening patch is taken and the lowest-scored patch whose removal
  closes no row is given back, so the count is always exactly ``k``.
- **Order.** Kept tokens stay in the native reading order (base tile, then the grid row by row,
  each kept row's newline after its patches).
- ``random`` keeps a seeded draw under the same rule; ``inverse`` the lowest scores; ``+merge``
  is not offered (its contextual tokens have no place in the row layout).

Fine-tuning trains the projector and the language model as for LLaVA-1.5; the ``image_newline``
embedding stays as the checkpoint has it (frozen with the tower: it marks row ends the language
model already reads).

The heatmap (``explain``) draws the crops stitched together (the image at full resolution, padded
to a square grid); the base tile's patches are filtered too but not drawn.

The package, by job: :mod:`.family` (the adapter: preprocessing, tiles, visual tokens, heatmap),
:mod:`.layout` (an image's slots with its row newlines, the budget rule, the filter), :mod:`.tiny` (the
tiny model),
``template.jinja`` (LLaVA-NeXT-Mistral's chat format, which the tiny model ships).
"""
