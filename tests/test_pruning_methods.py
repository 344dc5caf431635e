"""The field's pruning methods against hand computations on a few tokens with chosen vectors.

Each method's rule is its module's docstring; here each is worked out by hand on an input small enough
to follow in the comments. (The contract test, tests/test_mllm_contract.py, runs every method on every
family: r = 1 gives the native logits and exactly the budget reaches the language model.)
"""

from __future__ import annotations

import math

import pytest
import torch

from sentilens.mllm.pruning import LmStage, UnitInputs, parse_strategy
from sentilens.mllm.pruning.divprune import DiversityPrune, max_min_order, order_priorities
from sentilens.mllm.pruning.fastv import TextAttention, text_after_image
from sentilens.mllm.pruning.select import FlatUnits, choose, gather_rows


def at_angles(degrees, lengths=None) -> torch.Tensor:
    """Vectors in the first two of three dimensions at the given angles (cosine distance = 1 - cos(angle between))."""
    lengths = lengths or [1.0] * len(degrees)
    return torch.tensor([[r * math.cos(math.radians(a)), r * math.sin(math.radians(a)), 0.0]
                         for a, r in zip(degrees, lengths, strict=True)])


# ---------------------------------------------------------------------------------------------- divprune

DIV_ANGLES = [0, 10, 90, 180, 45]
"""Five tokens. Nearest-neighbour cosine distances: t0 (0) and t1 (10): 1 - cos 10 = 0.015 (each other);
t2 (90): t4, 1 - cos 45 = 0.293; t3 (180): t2, 1 - cos 90 = 1; t4 (45): t1, 1 - cos 35 = 0.181.
Step 1 takes t3, the farthest from its nearest neighbour.
Step 2, distance to {t3}: t0 2, t1 1 - cos 170 = 1.985, t2 1, t4 1 - cos 135 = 1.707: t0.
Step 3, min distance to {t3, t0}: t1 min(1.985, 0.015) = 0.015, t2 min(1, 1) = 1, t4 min(1.707, 0.293) = 0.293: t2.
Step 4, to {t3, t0, t2}: t1 min(0.015, 1 - cos 80 = 0.826) = 0.015, t4 min(0.293, 0.293) = 0.293: t4.
Step 5: t1. The greedy order is t3, t0, t2, t4, t1."""


def test_divprune_follows_the_greedy_max_min_order_worked_out_by_hand():
    # lengths differ: cosine distance ignores them
    features = at_angles(DIV_ANGLES, [1.0, 2.0, 0.5, 5.0, 1.0])
    assert max_min_order(features, 5).tolist() == [3, 0, 2, 4, 1]
    assert max_min_order(features, 2).tolist() == [3, 0]  # the order does not depend on k
    strategy = parse_strategy("divprune")
    assert type(strategy) is DiversityPrune and not strategy.scored and strategy.needs == {"features"}
    kept = {}
    for budget in (1, 2, 3, 4):
        scores = strategy.unit_scores(UnitInputs(torch.zeros(3, 4, 4), 5, budget, features))
        kept[budget] = choose(FlatUnits(5), scores, budget, strategy).kept.tolist()
    # the first k of the order, handed on in spatial order; a smaller budget keeps a subset
    assert kept == {1: [3], 2: [0, 3], 3: [0, 2, 3], 4: [0, 2, 3, 4]}


def test_divprune_keeps_everything_at_r1_and_never_takes_a_token_twice():
    # three duplicates at 0 and one at 90. Nearest distances: t0, t1, t2 have a duplicate (0), t3 is 1 from
    # them: t3 first. Distance to {t3}: 1 for each of t0, t1, t2: t0 (the earliest). Then t1 and t2 are at
    # 0 from t0, a tie: t1, then t2, and no chosen token comes back although every distance left is 0
    features = at_angles([0, 0, 0, 90])
    assert max_min_order(features, 4).tolist() == [3, 0, 1, 2]
    scores = DiversityPrune("divprune").unit_scores(UnitInputs(torch.zeros(1), 4, 4, features))
    assert torch.equal(scores, torch.ones(4))  # r = 1: every token, nothing computed


def test_divprune_chooses_among_the_candidates_only():
    # LLaVA-NeXT's newline slots are no candidates: here slot 1 (the far token) is a newline and is skipped
    features = at_angles([0, 180, 90, 45])
    candidates = torch.tensor([True, False, True, True])
    scores = DiversityPrune("divprune").unit_scores(UnitInputs(torch.zeros(1), 4, 2, features, candidates))
    # among t0, t2, t3: nearest distances t0 0.293 (t3), t2 0.293 (t3), t3 0.293: t0 first (earliest);
    # then distance to t0: t2 1, t3 0.293: t2
    assert scores.tolist() == [2.0, 0.0, 1.0, 0.0]
    assert order_priorities(torch.tensor([2, 0]), 4).tolist() == [1.0, 0.0, 2.0, 0.0]


@pytest.mark.parametrize("rows", [1, 7, 1030])
def test_divprune_blocks_give_the_nearest_neighbour_of_the_whole_matrix(rows, monkeypatch):
    # the first step's similarity is computed in row blocks; any block size gives the full matrix's answer
    from sentilens.mllm.pruning import divprune

    features = torch.randn(40, 6, generator=torch.Generator().manual_seed(3))
    unit = torch.nn.functional.normalize(features, dim=-1)
    distance = 1 - unit @ unit.T
    distance.fill_diagonal_(float("inf"))
    order = [int(distance.min(dim=1).values.argmax())]
    distance.fill_diagonal_(0)
    while len(order) < 12:  # the reference: the whole distance matrix, one step at a time
        left = [i for i in range(40) if i not in order]
        order.append(max(left, key=lambda i: min(distance[i, j] for j in order)))
    monkeypatch.setattr(divprune, "SIMILARITY_BLOCK_ROWS", rows)
    assert max_min_order(features, 12).tolist() == order


# ---------------------------------------------------------------------------------------------- downsample


def test_downsample_pools_a_4x4_grid_to_3_tokens_as_worked_out_by_hand():
    # each patch's feature is its (row, col): a cell's mean is its centre of mass.
    # k = 3 on 4 x 4: rows = round(sqrt(3 * 4 / 4)) = 2 bands, widths floor(3/2) = 1 and 3 - 1 = 2.
    # Band 0 = rows 0-1 whole: mean (0.5, 1.5); band 1 = rows 2-3, cols 0-1: (2.5, 0.5) and cols 2-3: (2.5, 2.5)
    from sentilens.mllm.pruning.downsample import area_pool, band_widths

    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    features = torch.stack([rows, cols], dim=-1).reshape(16, 2)
    assert band_widths(3, 4, 4) == [1, 2]
    pooled = area_pool(features, 3, 4, 4)
    assert pooled.tokens.tolist() == [[0.5, 1.5], [2.5, 0.5], [2.5, 2.5]]
    # centre patches: (0, 1) = 1, (2, 0) = 8, (2, 2) = 10; a patch of band 0 is 1/8 of a token, of band 1 1/4
    assert pooled.kept.tolist() == [1, 8, 10]
    assert pooled.scores.tolist() == [0.125] * 8 + [0.25] * 8


def test_downsample_shapes_any_budget_exactly_and_is_the_identity_at_r1():
    from sentilens.mllm.pruning.downsample import area_pool, band_widths, pool_cells

    # k = 7 on 4 x 4: 3 bands (round(sqrt 7)), widths 2, 2, 3; rows [0, 2), [1, 3), [2, 4) as adaptive pooling
    assert band_widths(7, 4, 4) == [2, 2, 3]
    assert [cell[:2] for cell in pool_cells(7, 4, 4)] == [(0, 2)] * 2 + [(1, 3)] * 2 + [(2, 4)] * 3
    # a wide grid gets wide bands: k = 4 on 2 x 8: round(sqrt(4 * 2 / 8)) = 1 band of 4 cells, 2 x 2 each
    assert band_widths(4, 2, 8) == [4] and pool_cells(4, 2, 8)[1] == (0, 2, 2, 4)
    features = torch.randn(576, 5, generator=torch.Generator().manual_seed(0))
    for k in (1, 2, 5, 64, 115, 300, 575):
        assert area_pool(features, k, 24, 24).tokens.shape == (k, 5)
    same = area_pool(features, 576, 24, 24)
    assert torch.equal(same.tokens, features) and same.kept.tolist() == list(range(576))


def test_downsample_refuses_the_families_without_one_pooled_grid_in_one_line():
    strategy = parse_strategy("downsample")
    assert strategy.pools and strategy.unsupported("llava") is None
    for family in ("llava-next", "smolvlm", "qwen2.5-vl", "qwen3-vl"):
        reason = strategy.unsupported(family)
        assert reason.startswith("'downsample' is not available for ") and "\n" not in reason


# ---------------------------------------------------------------------------------------------- fastv

IMAGE = 9


def lm_choice(form: str, ratio: float, input_ids, query, key, value=None, mask=None) -> list[list[int]]:
    """The visual positions each post keeps when ``form`` chooses at its layer from these queries and keys."""
    ids = torch.tensor(input_ids)
    mask = torch.ones_like(ids) if mask is None else torch.tensor(mask)
    strategy = parse_strategy(form)
    plan = LmStage(strategy, ratio, strategy.lm_layer + 2, IMAGE).plan(ids, mask)
    plan.choose(query, key, key if value is None else value, 1.0)
    return [[p for p in range(ids.shape[1]) if plan.visual[b, p] and plan.keep[b, p]] for b in range(ids.shape[0])]


def test_fastv_keeps_what_the_text_after_the_image_attends_to_as_worked_out_by_hand():
    # one head, d = 1, scaling 1. Prompt: text, 3 visual tokens (1-3), 2 text tokens (4, 5).
    # keys ln(1, 2, 1, 4, 1, 1): a query of 1 attends in proportion to (1, 2, 1, 4, 1, 1), a query of 0 evenly.
    # Row 4 (q = 1) over positions 0..4: the visual tokens get 2/9, 1/9, 4/9.
    # Row 5 (q = 0) over positions 0..5: 1/6 each.
    # FastV's mean: 7/36, 5/36, 11/36: at r = 0.5 (ceil(1.5) = 2 of 3) it keeps positions 1 and 3.
    # lm:0 reads row 5 alone: a three-way tie, which goes to the earlier tokens, 1 and 2.
    ids = [[5, IMAGE, IMAGE, IMAGE, 5, 5]]
    key = torch.tensor([1.0, 2.0, 1.0, 4.0, 1.0, 1.0]).log().view(1, 1, 6, 1)
    query = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0]).view(1, 1, 6, 1)
    strategy = parse_strategy("fastv")
    assert strategy.lm_layer == 2 and strategy.stage == "lm" and str(parse_strategy("fastv:1")) == "fastv:1"
    assert isinstance(strategy, TextAttention)
    assert lm_choice("fastv:0", 0.5, ids, query, key) == [[1, 3]]
    assert lm_choice("lm:0", 0.5, ids, query, key) == [[1, 2]]
    plan = LmStage(parse_strategy("fastv:0"), 0.5, 2, IMAGE).plan(torch.tensor(ids), torch.ones(1, 6, dtype=torch.long))
    scores = strategy.lm_priorities(plan, query, key, key, 1.0)[0, 1:4]
    torch.testing.assert_close(scores, torch.tensor([7 / 36, 5 / 36, 11 / 36]))
    # a left-padded second post of the same prompt chooses the same, and its padding asks nothing
    padded = [[0, 5, IMAGE, IMAGE, IMAGE, 5, 5], [0, 0, 5, IMAGE, IMAGE, IMAGE, 5]]
    rows, real = text_after_image(LmStage(parse_strategy("fastv:0"), 0.5, 2, IMAGE).plan(
        torch.tensor(padded), torch.tensor([[0, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])))
    assert rows.tolist() == [[5, 6], [6, 6]] and real.tolist() == [[True, True], [True, False]]


# ---------------------------------------------------------------------------------------------- dart


def test_dart_keeps_the_pivots_and_the_least_duplicated_tokens_as_worked_out_by_hand(monkeypatch):
    # Prompt: text, 6 visual tokens v0..v5 at positions 1..6, text. Two pivots (the setting lowered from 4 so
    # that k = 4 leaves a choice). Key norms of v0..v5: 1, 3, 1, 2, 1, 1: the pivots are v1 (3) and v3 (2).
    # Values at angles v0 10, v1 0, v2 90, v3 180, v4 80, v5 175. Duplication = the largest cosine with a pivot:
    # v0 max(cos 10, cos 170) = 0.985, v2 max(cos 90, cos 90) = 0, v4 max(cos 80, cos 100) = 0.174,
    # v5 max(cos 175, cos 5) = 0.996. r = 0.6: k = ceil(3.6) = 4: v1, v3 and the two least duplicated, v2 and v4,
    # at positions 2, 3, 4, 5.
    from sentilens.mllm.pruning import dart

    monkeypatch.setattr(dart, "DART_PIVOTS", 2)
    ids = [[5, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, 5]]
    norms = torch.tensor([1.0, 1.0, 3.0, 1.0, 2.0, 1.0, 1.0, 1.0])
    key = torch.stack([norms, torch.zeros(8)], dim=-1).view(1, 1, 8, 2)
    value = at_angles([0, 10, 0, 90, 180, 80, 175, 0])[:, :2].view(1, 1, 8, 2)
    query = torch.zeros(1, 2, 8, 2)  # two query heads share the one key head; dart reads no query
    strategy = parse_strategy("dart")
    assert isinstance(strategy, dart.PivotDuplication) and strategy.lm_layer == 2 and strategy.needs == set()
    assert lm_choice("dart:0", 0.6, ids, query, key, value) == [[2, 3, 4, 5]]
    # k = 2 keeps the pivots alone; k = 1 the one pivot of largest key norm
    assert lm_choice("dart:0", 2 / 6, ids, query, key, value) == [[2, 4]]
    assert lm_choice("dart:0", 1 / 6, ids, query, key, value) == [[2]]


# ---------------------------------------------------------------------------------------------- visionzip


def test_visionzip_splits_the_budget_as_the_paper_and_merges_by_hand():
    from sentilens.mllm.pruning.visionzip import DominantAndContext, context_count

    # VisionZip's own splits: 54 + 10 of 64, 108 + 20 of 128, 162 + 30 of 192; nothing merged at r = 1
    assert [context_count(k, 576) for k in (64, 128, 192, 576)] == [10, 20, 30, 0]
    # 16 units, k = 13: c = floor(65 / 32) = 2 contextual, 11 dominant. The five lowest scores are units
    # 1, 4, 7, 10, 13 (the rest, in order); targets rest[floor(0 * 5 / 2)] = 1 and rest[floor(1 * 5 / 2)] = 7.
    # Rows: u1 (1, 0), u7 (0, 1); u4 (1, 0.1) is nearer u1, u10 (0.2, 1) nearer u7, u13 (0.9, -0.5) nearer u1
    # (cosines 0.87 against -0.49). Token at u1: mean of u1, u4, u13 = (2.9 / 3, -0.4 / 3); at u7: (0.1, 1).
    rest = [1, 4, 7, 10, 13]
    scores = torch.tensor([0.0 if u in rest else 10.0 + u for u in range(16)])
    scores[rest] = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.1])
    features = torch.full((16, 2), 5.0)
    features[rest] = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.2, 1.0], [0.9, -0.5]])
    strategy = parse_strategy("visionzip")
    assert isinstance(strategy, DominantAndContext) and strategy.layers == "feature" and strategy.scored
    selection = choose(FlatUnits(16), scores, 13, strategy, features)
    assert selection.kept.tolist() == [u for u in range(16) if u not in (4, 10, 13)]
    assert selection.groups.tolist() == [-1, 1, -1, -1, 1, -1, -1, 7, -1, -1, 7, -1, -1, 1, -1, -1]
    rows = gather_rows(features, selection)
    kept = selection.kept.tolist()
    torch.testing.assert_close(rows[kept.index(1)], torch.tensor([2.9 / 3, -0.4 / 3]))
    torch.testing.assert_close(rows[kept.index(7)], torch.tensor([0.1, 1.0]))
    assert torch.equal(rows[kept.index(0)], features[0])  # a dominant unit is sent as it is
    # r = 1: every unit, none merged
    whole = choose(FlatUnits(16), scores, 16, strategy, features)
    assert whole.groups is None and torch.equal(gather_rows(features, whole), features)
    assert strategy.unsupported("llava-next").startswith("'visionzip' is not available for LLaVA-NeXT: ")


def test_fastv_and_lm_rows_equal_the_eager_attention_map_with_grouped_heads_and_padding():
    # random queries and keys, 4 query heads on 2 key heads, a left-padded batch: the rows FastV and lm:K read
    # are the eager causal map's rows (padding masked), heads averaged
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([[0, 5, IMAGE, IMAGE, IMAGE, 5, 5, 5], [5, 5, IMAGE, IMAGE, IMAGE, IMAGE, 5, 5]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    query = torch.randn(2, 4, 8, 3, generator=generator)
    key = torch.randn(2, 2, 8, 3, generator=generator)
    logits = query @ key.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.5
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    allowed = causal[None, None] & mask.bool()[:, None, None, :]
    eager = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1).mean(dim=1)  # (B, 8, 8)
    text = {0: [5, 6, 7], 1: [6, 7]}  # the positions after each post's image
    for form, rows in (("fastv:0", text), ("lm:0", {0: [7], 1: [7]})):
        plan = LmStage(parse_strategy(form), 0.5, 2, IMAGE).plan(ids, mask)
        got = parse_strategy(form).lm_priorities(plan, query, key, key, 0.5)
        for b in (0, 1):
            torch.testing.assert_close(got[b], eager[b, rows[b]].mean(dim=0))


# ---------------------------------------------------------------------------------------------- cdpruner / dpp


def test_greedy_map_conditional_and_relevance_free_as_worked_out_by_hand():
    from sentilens.mllm.pruning.cdpruner import greedy_map

    # four tokens at angles 0, 10, 90, 45 with qualities q = 1, 2, 1, 1.5 (L_ij = q_i q_j cos(angle i - j)).
    # Step 1 takes the largest L_jj = q_j^2 (1, 4, 1, 2.25): t1. The gain of j given {t1} is
    # L_jj - L_1j^2 / L_11 = q_j^2 sin^2(angle j - 10): t0 sin^2 10 = 0.030, t2 sin^2 80 = 0.970,
    # t3 2.25 sin^2 35 = 0.740: t2. The conditional DPP keeps {t1, t2}.
    # Without relevance (q = 1) step 1 is a four-way tie of L_jj = 1: t0; then gains sin^2(angle j):
    # t1 0.030, t2 1, t3 0.5: t2. The relevance-free DPP keeps {t0, t2}.
    features = at_angles([0, 10, 90, 45])
    assert greedy_map(features, torch.tensor([1.0, 2.0, 1.0, 1.5]), 2).tolist() == [1, 2]
    assert greedy_map(features, torch.ones(4), 2).tolist() == [0, 2]
    # in the plane two tokens span everything: the remaining gains are 0, yet exactly k come, none twice
    assert sorted(greedy_map(features, torch.ones(4), 4).tolist()) == [0, 1, 2, 3]


def test_greedy_map_gains_are_the_determinant_ratios_of_the_kernel():
    from sentilens.mllm.pruning.cdpruner import greedy_map

    generator = torch.Generator().manual_seed(1)
    features = torch.randn(12, 8, generator=generator, dtype=torch.float64).float()
    quality = torch.rand(12, generator=generator) + 0.5
    unit = torch.nn.functional.normalize(features.double(), dim=-1)
    kernel = quality.double()[:, None] * (unit @ unit.T) * quality.double()[None, :]
    order = []
    for _ in range(6):  # the reference: each step the largest det(L_{S + j}) by brute force
        left = [j for j in range(12) if j not in order]
        order.append(max(left, key=lambda j: float(torch.linalg.det(kernel[order + [j]][:, order + [j]]))))
    assert greedy_map(features, quality, 6).tolist() == order


def test_the_greedy_selections_of_a_batch_are_each_image_s_own():
    # the images of one call are chosen together; each must get the order it gets alone (with duplicates
    # and a zero row in the mix, where ties decide), under a batch of any size and at the whole-matrix bound
    from sentilens.mllm.pruning import divprune
    from sentilens.mllm.pruning.cdpruner import ConditionalDpp, greedy_map, greedy_maps
    from sentilens.mllm.pruning.divprune import max_min_orders

    generator = torch.Generator().manual_seed(3)
    features = torch.randn(5, 40, 6, generator=generator)
    features[1, 7] = features[1, 3]  # a duplicate token
    features[2, :10] = features[2, 0]  # a flat region
    features[3, 5] = 0  # a blank block
    quality = torch.rand(5, 40, generator=generator) + 0.5
    assert max_min_orders(features, 12).tolist() == [max_min_order(image, 12).tolist() for image in features]
    assert greedy_maps(features, quality, 12).tolist() == [greedy_map(image, q, 12).tolist()
                                                           for image, q in zip(features, quality, strict=True)]
    units = [UnitInputs(torch.zeros(1), 40, 12, image) for image in features]
    for strategy in (DiversityPrune("divprune"), ConditionalDpp("dpp")):
        together = strategy.batch_unit_scores(units)
        assert [t.tolist() for t in together] == [strategy.unit_scores(unit).tolist() for unit in units]
    # images of another size or budget, and one with candidates, are grouped apart and still get their own
    mixed = [*units[:2], UnitInputs(torch.zeros(1), 20, 5, features[2, :20]),
             UnitInputs(torch.zeros(1), 40, 12, features[3], candidates=torch.arange(40) % 4 != 0)]
    assert [t.tolist() for t in DiversityPrune("divprune").batch_unit_scores(mixed)] == [
        DiversityPrune("divprune").unit_scores(unit).tolist() for unit in mixed]
    # a group holds no more similarity numbers than one image at the bound
    assert [len(g) for g in divprune.image_groups([units[0]] * 3)] == [3]
    big = UnitInputs(torch.zeros(1), divprune.WHOLE_MATRIX_MAX_TOKENS, 2, torch.zeros(1, 1))
    assert [len(g) for g in divprune.image_groups([big] * 3)] == [1, 1, 1]


def test_text_relevance_is_the_min_max_normalised_mean_cosine_with_the_text():
    from sentilens.mllm.pruning.cdpruner import text_relevance

    # tokens along x, y and the diagonal; text embeddings along x and the diagonal. Mean cosines:
    # x: (1 + 0.707) / 2 = 0.854, y: (0 + 0.707) / 2 = 0.354, diagonal: (0.707 + 1) / 2 = 0.854 -> 1, 0, 1
    projected = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    text = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(text_relevance(projected, text), torch.tensor([1.0, 0.0, 1.0]))
    assert text_relevance(torch.ones(3, 2), text).tolist() == [0.0, 0.0, 0.0]  # all alike: no preference


def test_cdpruner_reads_the_prompt_after_the_image_but_not_the_answer():
    from sentilens.mllm.inputs import MllmBatch, give_text

    class Filter:
        texts = None
        strategy = parse_strategy("cdpruner")

    class Config:
        image_token_id = IMAGE

    class Vlm:
        config = Config()

    reducer = Filter()
    batch = MllmBatch(token_ids=[[1, IMAGE, 3, 4, 7, 8], [2, 3], [IMAGE, 6]], pixel_values=None,
                      image_index=[1, None, 0], targets=[[-100, -100, -100, -100, 7, 8], [-100, -100], [-100, -100]])
    give_text(reducer, Vlm(), batch)
    assert {row: ids.tolist() for row, ids in reducer.texts.items()} == {1: [3, 4], 0: [6]}
    assert parse_strategy("cdpruner").needs == {"features", "text_tokens"} and parse_strategy("dpp").needs == {
        "features"}
    assert parse_strategy("cdpruner").unsupported("qwen3-vl").startswith("'cdpruner' is not available for Qwen3-VL")
    assert parse_strategy("dpp").unsupported("qwen3-vl") is None
