"""The contract every model family keeps with every token-pruning strategy, parametrised over both registries.

For each family of :data:`sentilens.mllm.families.REGISTRY` (its tiny random model, loaded back through
``from_pretrained``) and each strategy the registry showcases (:func:`showcase_strategies`: every
registered strategy, with and without its modifiers): r = 1 gives transformers' own logits; exactly
``ceil(r N)`` visual tokens reach the language model (for an LM-stage strategy, every token reaches the
layers up to its layer K and the budget those after it); a batch equals its posts one by one; the FLOP
count falls with r; the explain view has the shapes a heatmap draws. A combination the strategy does
not support is skipped with the strategy's own one-line reason. A new family or strategy is covered by
adding it to its registry.
"""

from __future__ import annotations

import pytest
import torch

from mllm_helpers import image_posts, tiny_family_model
from sentilens.data.images import load_image
from sentilens.mllm.families import REGISTRY, family_of
from sentilens.mllm.flops import strategy_flops
from sentilens.mllm.inputs import build_inputs, language_model_hidden, make_batch
from sentilens.mllm.pruning import keep_count, parse_strategy, reducer_for, showcase_strategies
from sentilens.mllm.scoring import label_log_probs

STRATEGY_FORMS = showcase_strategies()
RATIOS = (1.0, 0.7, 0.4, 0.1)


@pytest.fixture(scope="module")
def posts(tmp_path_factory):
    """Three images of different shapes (so tiled and native-resolution families keep different counts) and a
    text-only post, third."""
    specs = [((120, 100), (220, 40, 30)), ((300, 100), (20, 40, 200)), ((100, 300), (240, 240, 90))]
    return image_posts(tmp_path_factory.mktemp("images"), specs, step=5, slope=7)


@pytest.fixture(scope="module", params=list(REGISTRY))
def tiny(request, tmp_path_factory):
    model, builder = tiny_family_model(tmp_path_factory.mktemp("ckpt") / request.param, request.param)
    model.eval()
    return request.param, model.vlm, builder


def strategy_for(family: str, form: str):
    strategy = parse_strategy(form)
    reason = strategy.unsupported(family)
    if reason is not None:
        pytest.skip(f"{family} x {form}: {reason}")
    return strategy


def native_logits(llava, builder, post) -> torch.Tensor:
    """transformers' own forward on one post: its input ids with every visual token in place (ours at r = 1
    without any reducer), the image through the model's own tower, projector and position rule."""
    batch = make_batch(builder, [post])
    ours = build_inputs(llava, batch, padding_side="right")
    kwargs = {"input_ids": ours.input_ids, "attention_mask": ours.attention_mask}
    if batch.pixel_values is not None:
        kwargs["pixel_values"] = batch.pixel_values
        extras = batch.image_extras or {}
        if "image_grid_thw" in extras:  # Qwen-VL: the grid and which tokens are the image's
            kwargs["image_grid_thw"] = extras["image_grid_thw"]
            kwargs["mm_token_type_ids"] = (ours.input_ids == llava.config.image_token_id).int()
        if "image_sizes" in extras:  # LLaVA-NeXT: the original sizes pick the any-resolution layout
            kwargs["image_sizes"] = extras["image_sizes"]
    return llava(**kwargs).logits[0]


@pytest.mark.parametrize("form", STRATEGY_FORMS)
@torch.no_grad()
def test_r1_reproduces_the_native_logits(tiny, posts, form):
    family, llava, builder = tiny
    strategy = strategy_for(family, form)
    reducer = reducer_for(llava, 1.0, str(strategy))
    ours = build_inputs(llava, make_batch(builder, posts), reducer=reducer, padding_side="right")
    logits = llava.lm_head(language_model_hidden(llava, ours).last_hidden_state)
    for i, post in enumerate(posts):
        native = native_logits(llava, builder, post)
        real = ours.attention_mask[i].bool()
        torch.testing.assert_close(logits[i, real], native, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", STRATEGY_FORMS)
@torch.no_grad()
def test_exactly_the_budget_reaches_the_language_model(tiny, posts, form):
    family, llava, builder = tiny
    strategy = strategy_for(family, form)
    batch = make_batch(builder, posts)
    full = build_inputs(llava, batch, padding_side="left").image_tokens
    assert full[2] == 0 and all(n > 0 for i, n in enumerate(full) if i != 2)
    for ratio in RATIOS[1:]:
        reducer = reducer_for(llava, ratio, str(strategy))
        inputs = build_inputs(llava, batch, reducer=reducer, padding_side="left")
        budget = [keep_count(n, ratio) if n else 0 for n in full]
        assert inputs.image_tokens == budget, (family, form, ratio)
        if strategy.stage == "lm":  # every token up to layer K, the budget after it, as each layer's mask says
            label_log_probs(llava, inputs, [builder.answer_ids[label] for label in builder.labels])
            layers = len(family_of(llava).language_model(llava).layers)
            assert inputs.lm_plan.seen == {layer: full if layer <= strategy.lm_layer else budget
                                           for layer in range(layers)}


@pytest.mark.parametrize("form", STRATEGY_FORMS)
@torch.no_grad()
def test_a_batch_equals_its_posts_one_by_one(tiny, posts, form):
    family, llava, builder = tiny
    strategy = strategy_for(family, form)
    answers = [builder.answer_ids[label] for label in builder.labels]
    reducer = reducer_for(llava, 0.4, str(strategy))
    together = build_inputs(llava, make_batch(builder, posts), reducer=reducer, padding_side="left")
    batched = label_log_probs(llava, together, answers)
    for i, post in enumerate(posts):
        alone = build_inputs(llava, make_batch(builder, [post]), reducer=reducer, padding_side="left")
        assert alone.image_tokens == [together.image_tokens[i]]
        torch.testing.assert_close(batched[i], label_log_probs(llava, alone, answers)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", STRATEGY_FORMS)
def test_flops_fall_with_the_keep_ratio(tiny, posts, form):
    family, llava, builder = tiny
    strategy = strategy_for(family, form)
    size = load_image(posts[1].image).size
    answer_tokens = sum(len(ids) for ids in builder.answer_ids.values())
    totals = [strategy_flops(llava, builder.processor, size, ratio, str(strategy), 20, answer_tokens)["total"]
              for ratio in RATIOS]
    assert totals == sorted(totals, reverse=True) and totals[-1] < totals[0], (family, form, totals)
    text_only = strategy_flops(llava, builder.processor, None, 0.4, str(strategy), 20, answer_tokens)
    assert text_only["vision"] == text_only["scoring"] == text_only["projector"] == 0


@pytest.mark.parametrize("form", STRATEGY_FORMS)
@torch.no_grad()
def test_the_explain_view_has_the_shapes_a_heatmap_draws(tiny, posts, form):
    family, llava, builder = tiny
    strategy = strategy_for(family, form)
    if strategy.stage == "lm":
        pytest.skip(f"{form}: a heatmap shows a vision-stage strategy's choice; this one prunes inside the LM")
    reducer = reducer_for(llava, 0.4, str(strategy))
    view = family_of(llava).patch_view(llava, builder, posts[1], reducer)
    side = view.scores.shape[0]
    assert view.scores.shape == view.kept.shape == (side, side) and view.kept.dtype == torch.bool
    assert view.picture.ndim == 3 and view.picture.shape[2] == 3
    assert view.picture.shape[0] % side == 0 and view.picture.shape[1] % side == 0
    assert 0 <= float(view.picture.min()) and float(view.picture.max()) <= 1
    shown = torch.ones_like(view.kept) if view.shown is None else view.shown
    assert shown.shape == (side, side) and not (view.kept & ~shown).any()
    assert 0 < int(view.kept.sum()) < int(shown.sum())
    x0, y0, x1, y1 = view.content
    assert 0 <= x0 < x1 <= view.picture.shape[1] and 0 <= y0 < y1 <= view.picture.shape[0]
