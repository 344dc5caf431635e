"""CLS-attention token filtering (paper eq. 3): scores against eager attention maps, selection, merge, refusal."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)

from sentilens.errors import SentilensError
from sentilens.mllm.families.llava.vision import TokenFilter
from sentilens.mllm.pruning import (
    MODIFIERS,
    NEEDS,
    STRATEGIES,
    AttentionScorer,
    LastTokenAttention,
    LowestAttention,
    RandomDraw,
    TopAttention,
    keep_count,
    layer_indices,
    merge_context,
    parse_strategy,
    reduce_image,
    showcase_strategies,
    strategy_help,
    strategy_names,
    top_patches,
)
from sentilens.mllm.pruning import attention as pruning

LAYERS = 4
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
             image_size=32, patch_size=8, initializer_factor=6.0)  # a large init gives peaked attention maps


def saved_pair(cls, config, folder):
    """The same random tower loaded twice through from_pretrained: SDPA (the default) and eager."""
    torch.manual_seed(0)
    cls(config).save_pretrained(folder)
    sdpa = cls.from_pretrained(folder).eval()
    eager = cls.from_pretrained(folder, attn_implementation="eager").eval()
    return sdpa, eager


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return saved_pair(CLIPVisionModel, CLIPVisionConfig(**TOWER), tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    config = SiglipVisionConfig(**{k: v for k, v in TOWER.items() if k != "initializer_factor"})
    sdpa, eager = saved_pair(SiglipVisionModel, config, tmp_path_factory.mktemp("siglip"))
    with torch.no_grad():  # SigLIP's init ignores initializer_factor: sharpen its attention by hand
        for tower in (sdpa, eager):
            for layer in tower.encoder.layers:
                layer.self_attn.q_proj.weight.mul_(6.0)
    return sdpa, eager


def pixels(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def eager_maps(tower, x):
    with torch.no_grad():
        maps = tower(x, output_attentions=True).attentions
    assert len(maps) == LAYERS and maps[0].shape == (x.shape[0], 4, 17 if hasattr(tower.embeddings, "class_embedding")
                                                      else 16, maps[0].shape[-1])
    return maps


@pytest.mark.parametrize("layers, expected", [("all", [0, 1, 2, 3]), ("last", [3]), ("feature", [2]),
                                              ("1:3", [1, 2]), ("-3:", [1, 2, 3]), ("0", [0])])
def test_cls_scores_equal_eager_attention_maps(clip, layers, expected):
    sdpa, eager = clip
    x = pixels()
    maps = eager_maps(eager, x)
    reference = torch.stack([maps[i][:, :, 0, 1:].mean(dim=1) for i in expected]).mean(dim=0)
    assert layer_indices(layers, LAYERS, -2) == expected
    scorer = AttentionScorer(sdpa, layer_indices(layers, LAYERS, -2))
    scores = scorer.score(x)
    assert sdpa.config._attn_implementation == "sdpa"
    assert scores.shape == (3, 16)
    assert reference.max() / reference.min() > 3, "the reference maps are too flat to test anything"
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=0)


def test_scoring_leaves_the_tower_output_unchanged(clip):
    sdpa, _ = clip
    x = pixels()
    with torch.no_grad():
        plain = sdpa(x, output_hidden_states=True).hidden_states
        scorer = AttentionScorer(sdpa, range(LAYERS))
        with scorer.capture():
            hooked = sdpa(x, output_hidden_states=True).hidden_states
    assert all(torch.equal(a, b) for a, b in zip(plain, hooked, strict=True))
    assert scorer.scores is not None
    # hooks are gone after the block: a further forward leaves the scores alone
    before = scorer.scores.clone()
    with torch.no_grad():
        sdpa(pixels(seed=5))
    assert torch.equal(scorer.scores, before)


# "layer" (CPU): the layer computes its attention; "blocks" / "kernel" (GPU): the tower's kernel beside the sums
@pytest.mark.parametrize("route", ["layer", "blocks"])
@pytest.mark.parametrize("chunk_elements", [1 << 24, 40])  # one block; 40 elements = one query per block
def test_siglip_scores_are_the_mean_received_attention(siglip, monkeypatch, chunk_elements, route):
    monkeypatch.setattr(pruning, "QUERY_CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(pruning, "CPU_QUERY_CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(pruning, "scoring_route", lambda device: route)
    sdpa, eager = siglip
    x = pixels()
    maps = eager_maps(eager, x)
    reference = torch.stack([m.mean(dim=(1, 2)) for m in maps]).mean(dim=0)  # mean over heads and queries
    scorer = AttentionScorer(sdpa, range(LAYERS))
    assert not scorer.cls
    with torch.no_grad():
        plain = sdpa(x, output_hidden_states=True).hidden_states
        with scorer.capture():
            scored = sdpa(x, output_hidden_states=True).hidden_states
    scores = scorer.scores
    assert scores.shape == (3, 16)
    assert reference.max() / reference.min() > 1.5
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=0)
    exact = route != "layer"  # the GPU routes keep the tower's own kernel: bit-equal
    for a, b in zip(plain, scored, strict=True):
        torch.testing.assert_close(a, b, atol=0 if exact else 1e-5, rtol=0 if exact else 1e-5)


@pytest.mark.parametrize("chunk_elements", [1 << 24, 40, 7])  # several maps a block; 4 queries; 1 query
def test_attention_with_received_is_sdpa_plus_the_mean_of_the_softmax_map(monkeypatch, chunk_elements):
    monkeypatch.setattr(pruning, "QUERY_CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(pruning, "CPU_QUERY_CHUNK_ELEMENTS", chunk_elements)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=generator) * 2 for _ in range(3))
    out, received = pruning.attention_with_received(q, k, v, 0.3)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, reference.transpose(1, 2))
    weights = torch.softmax(q @ k.transpose(-1, -2) * 0.3, dim=-1)  # (B, heads, queries, keys)
    torch.testing.assert_close(received, weights.mean(dim=(1, 2)))
    with pytest.raises(ValueError, match="unpadded"):
        pruning.attention_with_received(q, k, v, 0.3, torch.ones(2, 1, 10, 10, dtype=torch.bool))
    torch.testing.assert_close(pruning.received_attention_only(q, k, 0.3), weights.mean(dim=(1, 2)))
    # in bfloat16 (a GPU tower's dtype) the float32 column sums stay within bfloat16's rounding of the map
    low = pruning.received_attention_only(q.bfloat16(), k.bfloat16(), 0.3)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, weights.mean(dim=(1, 2)), atol=0.02, rtol=0.05)


KERNEL_CHECK = """
import torch
from sentilens.mllm.pruning import attention as pruning
from sentilens.mllm.received_kernel import received_attention_fused

generator = torch.Generator().manual_seed(1)
for shape in [(2, 3, 10, 8), (1, 2, 130, 72), (2, 1, 64, 80)]:  # partial tiles, several tiles, d not a power of 2
    q, k = (torch.randn(*shape, generator=generator) * 2 for _ in range(2))
    weights = torch.softmax(q @ k.transpose(-1, -2) * 0.3, dim=-1)
    torch.testing.assert_close(received_attention_fused(q, k, 0.3), weights.mean(dim=(1, 2)))
    torch.testing.assert_close(pruning.received_by_route("kernel", q, k, 0.3), weights.mean(dim=(1, 2)))
try:
    pruning.received_by_route("kernel", q, k, 0.3, torch.ones(1, dtype=torch.bool))
except ValueError as err:
    assert "unpadded" in str(err)
else:
    raise AssertionError("a mask was accepted")
print("ok")
"""


def test_the_fused_kernel_sums_the_softmax_map_down_each_key():
    """The GPU kernel, run by Triton's CPU interpreter (a fresh process: Triton reads TRITON_INTERPRET when it is
    first imported, which torch does at start-up); skipped where Triton is not installed (CPU builds of torch)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_filter_on_a_siglip_tower_keeps_the_most_attended_patches(siglip):
    sdpa, eager = siglip
    x = pixels()
    reference = torch.stack([m.mean(dim=(1, 2)) for m in eager_maps(eager, x)]).mean(dim=0)
    reducer = TokenFilter(sdpa, 0.5, "all", vision_feature_layer=-1)
    with torch.no_grad(), reducer.capture():
        features = sdpa(x, output_hidden_states=True).hidden_states[-1]  # no CLS: every row is a patch
    kept = reducer(features, x)
    for i, rows in enumerate(kept):
        assert torch.equal(rows, features[i, top_patches(reference[i], 8)])


def test_unsupported_towers_are_refused(tmp_path):
    vit = ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=8))
    with pytest.raises(SentilensError, match="'vit' is not supported"):
        TokenFilter(vit, 0.5)
    clip_no_cls = CLIPVisionModel(CLIPVisionConfig(**TOWER))
    del clip_no_cls.embeddings.class_embedding
    with pytest.raises(SentilensError, match="no CLS token"):
        TokenFilter(clip_no_cls, 0.5)


@pytest.mark.parametrize("text", ["all+drop", "first", "9:12", "2:2"])
def test_bad_strategies_are_refused(clip, text):
    with pytest.raises(SentilensError):
        TokenFilter(clip[0], 0.5, text)


@pytest.mark.parametrize("n, ratio, expected", [
    (576, 1.0, 576), (576, 0.8, 461), (576, 0.6, 346), (576, 0.4, 231), (576, 0.2, 116), (576, 0.05, 29),
    (5, 0.2, 1), (10, 0.3, 3), (16, 0.01, 1), (7, 0.5, 4),
])
def test_keep_count_is_ceil_of_ratio_times_patches(n, ratio, expected):
    assert keep_count(n, ratio) == expected


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_keep_ratio_outside_unit_interval_is_refused(ratio):
    with pytest.raises(SentilensError, match="keep ratio"):
        keep_count(10, ratio)


def test_top_patches_keep_spatial_order_and_break_ties_by_position():
    scores = torch.tensor([0.1, 0.5, 0.5, 0.2, 0.5, 0.9, 0.2])
    assert top_patches(scores, 3).tolist() == [1, 2, 5]
    assert top_patches(scores, 4).tolist() == [1, 2, 4, 5]
    assert top_patches(scores, 5).tolist() == [1, 2, 3, 4, 5]
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        s = torch.randint(0, 4, (30,), generator=generator).float()  # many ties
        k = int(torch.randint(1, 31, (1,), generator=generator))
        expected = sorted(sorted(range(30), key=lambda i: (-s[i].item(), i))[:k])
        assert top_patches(s, k).tolist() == expected


def test_filter_keeps_ceil_r_n_top_patches_in_order_from_the_same_tower_pass(clip):
    sdpa, eager = clip
    x = pixels(4)
    maps = eager_maps(eager, x)
    reference = torch.stack([m[:, :, 0, 1:].mean(dim=1) for m in maps]).mean(dim=0)
    runs = []
    handle = sdpa.register_forward_hook(lambda *_: runs.append(1))
    try:
        for ratio in (1.0, 0.6, 0.25, 0.05):
            reducer = TokenFilter(sdpa, ratio, "all", vision_feature_layer=-2)
            with torch.no_grad(), reducer.capture():
                features = sdpa(x, output_hidden_states=True).hidden_states[-2][:, 1:]
            runs.clear()
            kept = reducer(features, x)
            assert not runs, "the filter ran the tower again although it saw these pixels"
            for i, rows in enumerate(kept):
                k = math.ceil(ratio * 16)
                order = top_patches(reference[i], k)
                assert rows.shape == (k, 32)
                assert reducer.last[i].kept.tolist() == order.tolist()
                assert torch.equal(rows, features[i, order])
            if ratio == 1.0:
                assert all(torch.equal(rows, features[i]) for i, rows in enumerate(kept))
        # pixels the tower has not just seen: the filter scores them itself, once
        other = pixels(4, seed=9)
        runs.clear()
        reducer(features, other)
        assert len(runs) == 1
    finally:
        handle.remove()


def test_merge_context_averages_groups_by_key_similarity():
    features = torch.arange(8, dtype=torch.float32).unsqueeze(1).repeat(1, 2)  # row i = (i, i)
    up, right = torch.tensor([0.1, 1.0]), torch.tensor([1.0, 0.2])
    keys = torch.stack([up, right, up, right, right, up, right, up])
    dominant = torch.tensor([0, 3])
    # non-dominant patches 1 2 4 5 6 7; two targets evenly spaced among them (positions 0, 3): patch 1 (right)
    # and patch 5 (up); right-keyed patches 4, 6 join patch 1, up-keyed patches 2, 7 join patch 5
    context = merge_context(features, keys, dominant, 2)
    expected = torch.tensor([[(1 + 4 + 6) / 3] * 2, [(2 + 5 + 7) / 3] * 2])
    torch.testing.assert_close(context, expected)
    assert merge_context(features, keys, torch.arange(8), 2).shape == (0, 2)  # nothing left to merge


def test_merge_keeps_the_token_budget_and_the_dominant_patches():
    generator = torch.Generator().manual_seed(0)
    features, keys = torch.randn(40, 6, generator=generator), torch.randn(40, 5, generator=generator)
    scores = torch.rand(40, generator=generator)
    for ratio in (1.0, 0.8, 0.5, 0.3, 0.1):
        total = keep_count(40, ratio)
        merged = reduce_image(features, scores, ratio, parse_strategy("all+merge"), keys)
        n_context = total // 6 if total < 40 else 0
        assert merged.tokens.shape == (total, 6)
        assert merged.kept.tolist() == top_patches(scores, total - n_context).tolist()
        assert torch.equal(merged.tokens[:total - n_context], features[merged.kept])
        if ratio == 1.0:
            assert torch.equal(merged.tokens, features)


def test_merge_strategy_through_the_tower(clip):
    sdpa, _ = clip
    x = pixels(2)
    reducer = TokenFilter(sdpa, 0.75, "feature+merge", vision_feature_layer=-2)
    with torch.no_grad(), reducer.capture():
        features = sdpa(x, output_hidden_states=True).hidden_states[-2][:, 1:]
    kept = reducer(features, x)
    assert [rows.shape[0] for rows in kept] == [12, 12]  # ceil(0.75 * 16): 10 dominant + 2 contextual
    assert all(sel.kept.numel() == 10 for sel in reducer.last)
    assert reducer.scorer.keys.shape == (2, 16, 32)


@pytest.mark.parametrize("text, kind, modifier", [("random", RandomDraw, ""), ("inverse", LowestAttention, ""),
                                                   ("all", TopAttention, ""), ("", TopAttention, ""),
                                                   ("feature+merge", TopAttention, "merge"),
                                                   ("all+native", TopAttention, "native"),
                                                   ("1:3+native", TopAttention, "native"),
                                                   ("random+native", RandomDraw, "native"),
                                                   ("inverse+native", LowestAttention, "native"),
                                                   ("lm:2", LastTokenAttention, "")])
def test_strategies_parse_to_their_registry_class_and_print_back(text, kind, modifier):
    strategy = parse_strategy(text)
    assert type(strategy) is kind and STRATEGIES[kind.name] is kind and strategy.modifier == modifier
    assert str(strategy) == (text or "all") and parse_strategy(str(strategy)) == strategy
    assert strategy.stage == ("lm" if kind is LastTokenAttention else "vision") and strategy.needs <= set(NEEDS)
    assert strategy.scored == (kind in (TopAttention, LowestAttention))
    assert strategy.merges == (modifier == "merge") and strategy.native_positions == (modifier == "native")


@pytest.mark.parametrize("text", ["random+merge", "inverse+merge", "randomly", "all+merge+native", "all+natives",
                                  "evil", "1:2:3", "feature+", "lm:", "lm:x", "lm:1+native", "lm",
                                  "fastv:", "fastv:x", "fastv+native"])
def test_unknown_or_misspelt_strategies_are_one_line_errors(text):
    with pytest.raises(SentilensError, match=r"^unknown filtering strategy .*: expected all / feature") as err:
        parse_strategy(text)
    assert "\n" not in str(err.value)


def test_a_layer_beyond_the_tower_names_the_tower_size(clip):
    sdpa, _ = clip
    with pytest.raises(SentilensError, match=rf"^bad scoring layers '40': .*the tower has {LAYERS} layers, 0 to "
                                             rf"{LAYERS - 1}\)$"):
        TokenFilter(sdpa, 0.5, "40")
    assert layer_indices("-1", LAYERS) == [LAYERS - 1] and layer_indices("1:", LAYERS) == [1, 2, 3]


def test_the_registry_lists_the_forms_and_what_each_family_supports():
    assert strategy_names() == ("all", "feature", "last", "A:B", "K", "random", "inverse", "lm:K", "divprune",
                                "downsample", "fastv", "fastv:K", "dart", "dart:K", "visionzip", "cdpruner",
                                "dpp", "+merge", "+native")
    assert strategy_names("llava") == strategy_names()
    for family in ("llava-next", "smolvlm", "qwen2.5-vl", "qwen3-vl"):
        assert strategy_names(family) == ("all", "feature", "last", "A:B", "K", "random", "inverse", "lm:K",
                                          "divprune", "fastv", "fastv:K", "dart", "dart:K",
                                          *(("visionzip",) if family != "llava-next" else ()), "dpp")
        assert parse_strategy("all+merge").unsupported(family).startswith("+merge is not available for ")
    assert parse_strategy("all+merge").unsupported("llava") is None
    assert showcase_strategies() == ("all", "feature", "all+merge", "all+native", "random", "random+native",
                                     "inverse", "lm:0", "divprune", "downsample", "fastv:0",
                                     "dart:0", "visionzip", "cdpruner", "dpp")
    help_text = strategy_help()
    for cls in STRATEGIES.values():
        assert cls.summary in help_text
    assert all(f"+{name}" in help_text for name in MODIFIERS)


def test_inverse_keeps_the_lowest_scored_patches_of_the_eager_reference(clip):
    sdpa, eager = clip
    x = pixels(4)
    reference = torch.stack([m[:, :, 0, 1:].mean(dim=1) for m in eager_maps(eager, x)]).mean(dim=0)
    for ratio in (0.6, 0.25):
        reducer = TokenFilter(sdpa, ratio, "inverse", vision_feature_layer=-2)
        with torch.no_grad(), reducer.capture():
            features = sdpa(x, output_hidden_states=True).hidden_states[-2][:, 1:]
        kept = reducer(features, x)
        k = math.ceil(ratio * 16)
        for i, rows in enumerate(kept):
            lowest = sorted(sorted(range(16), key=lambda j: reference[i, j].item())[:k])
            assert reducer.last[i].kept.tolist() == lowest
            assert torch.equal(rows, features[i, lowest])


def test_random_keeps_a_seeded_draw_of_the_same_count_per_image_without_scoring(clip):
    sdpa, _ = clip
    x = pixels(5)
    features = torch.randn(5, 16, 32, generator=torch.Generator().manual_seed(4))
    runs = []
    handle = sdpa.register_forward_hook(lambda *_: runs.append(1))
    try:
        kept = {}
        for ratio in (0.75, 0.5, 0.25):
            reducer = TokenFilter(sdpa, ratio, "random")
            with reducer.capture():
                rows = reducer(features, x)
            kept[ratio] = [s.kept.tolist() for s in reducer.last]
            k = math.ceil(ratio * 16)
            for i, selection in enumerate(reducer.last):
                assert len(set(kept[ratio][i])) == k and kept[ratio][i] == sorted(kept[ratio][i])
                assert torch.equal(rows[i], features[i, selection.kept])
            alone = TokenFilter(sdpa, ratio, "random")
            alone(features[2:3], x[2:3])
            assert alone.last[0].kept.tolist() == kept[ratio][2]  # the same draw alone as in a batch
        assert not runs, "the random baseline ran the tower"
    finally:
        handle.remove()
    for i in range(5):  # a smaller ratio keeps a subset of a larger one's patches
        assert set(kept[0.25][i]) <= set(kept[0.5][i]) <= set(kept[0.75][i])
    assert len({tuple(k) for k in kept[0.5]}) == 5  # different images, different draws
    # over many images every patch is about equally likely to be kept
    many = torch.randn(400, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    reducer = TokenFilter(sdpa, 0.25, "random")
    reducer(torch.zeros(400, 16, 32), many)
    counts = torch.bincount(torch.cat([s.kept for s in reducer.last]), minlength=16).float()
    assert counts.sum() == 400 * 4
    assert (counts / 400).sub(0.25).abs().max() < 0.08
