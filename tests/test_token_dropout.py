"""Visual-token dropout in training (mllm.token_dropout): what each image keeps, and reproducible draws."""

from __future__ import annotations

import math

import pytest
import torch

from sentilens.errors import SentilensError
from sentilens.mllm.token_dropout import DROP_SHARE, TokenDropout

IMAGES, PATCHES, WIDTH = 400, 144, 3


def features() -> torch.Tensor:
    """Row j of every image holds j, so the kept rows tell which patches were kept."""
    return torch.arange(PATCHES, dtype=torch.float32)[None, :, None].expand(IMAGES, PATCHES, WIDTH).clone()


def kept_patches(dropout: TokenDropout) -> list[list[int]]:
    return [image[:, 0].long().tolist() for image in dropout(features(), torch.zeros(IMAGES, 3, 8, 8))]


def test_each_image_keeps_all_or_a_random_share_in_spatial_order():
    kept = kept_patches(TokenDropout(0.2, seed=0))
    thinned = [k for k in kept if len(k) < PATCHES]
    whole = [k for k in kept if len(k) == PATCHES]
    assert all(k == list(range(PATCHES)) for k in whole)
    assert all(k == sorted(set(k)) for k in thinned), "distinct patches, in spatial order"
    assert all(math.ceil(0.2 * PATCHES) <= len(k) for k in thinned)
    # binomial(400, 1/2): mean 200, sd 10 (a share of r = 1 draws also lands in 'whole': ceil(r N) = N near 1)
    assert abs(len(thinned) - DROP_SHARE * IMAGES) < 40
    sizes = [len(k) for k in thinned]  # r uniform in [0.2, 1]: counts spread over the range, mean near 0.6 N
    assert min(sizes) < 0.3 * PATCHES and max(sizes) > 0.9 * PATCHES
    assert abs(sum(sizes) / len(sizes) - 0.6 * PATCHES) < 0.06 * PATCHES
    assert len({tuple(k) for k in thinned}) == len(thinned), "not one draw repeated"


def test_draws_depend_on_seed_epoch_and_rank_only():
    first = TokenDropout(0.2, seed=3)
    first.start_epoch(2, rank=1)
    expected = kept_patches(first)
    again = TokenDropout(0.2, seed=3)
    kept_patches(again)  # draws of an earlier epoch do not carry over: a resumed run draws the same
    again.start_epoch(2, rank=1)
    assert kept_patches(again) == expected
    for seed, epoch, rank in ((4, 2, 1), (3, 1, 1), (3, 2, 0)):
        other = TokenDropout(0.2, seed=seed)
        other.start_epoch(epoch, rank)
        assert kept_patches(other) != expected


@pytest.mark.parametrize("ratio", [0.0, 1.5])
def test_a_keep_ratio_outside_the_range_is_refused(ratio):
    with pytest.raises(SentilensError, match="keep ratio"):
        TokenDropout(ratio, seed=0)
