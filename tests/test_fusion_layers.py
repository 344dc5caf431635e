"""Fusion layers and model against eager references: attention, routing, masks, placeholders, shapes."""

import pytest
import torch

from sentilens.fusion.cache import PostFeatures
from sentilens.fusion.config import VARIANTS, FusionConfig
from sentilens.fusion.layers import ContextualAttention, DynamicRouting, masked_softmax, squash
from sentilens.fusion.model import FusionModel, collate

LABELS = ["positive", "neutral", "negative"]
DT, DV = 12, 10


def features(text_len: int | None, regions: int | None, seed: int) -> PostFeatures:
    g = torch.Generator().manual_seed(seed)
    text = None if text_len is None else {"states": torch.randn(text_len, DT, generator=g),
                                          "pooled": torch.randn(DT, generator=g)}
    image = None if regions is None else {"states": torch.randn(regions, DV, generator=g),
                                          "pooled": torch.randn(DV, generator=g)}
    return PostFeatures(text=text, image=image)


def model(variant: str = "full", iterations: int = 3, seed: int = 0) -> FusionModel:
    torch.manual_seed(seed)
    config = FusionConfig(variant=variant, hidden=16, capsules=3, routing_iterations=iterations, labels=LABELS)
    return FusionModel(config, DT, DV).eval()


def test_masked_softmax_ignores_masked_positions_and_empty_rows():
    scores = torch.tensor([[1.0, 2.0, 50.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    weights = masked_softmax(scores, mask)
    e1, e2 = torch.exp(torch.tensor(1.0)), torch.exp(torch.tensor(2.0))
    assert torch.allclose(weights[0], torch.stack([e1 / (e1 + e2), e2 / (e1 + e2), torch.tensor(0.0)]))
    assert torch.equal(weights[1], torch.zeros(3))


def test_contextual_attention_matches_hand_computation():
    torch.manual_seed(0)
    attention = ContextualAttention(dim=4, guide_dim=3, attention_dim=5)
    sequence, guide = torch.randn(2, 6, 4), torch.randn(2, 3)
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    pooled, weights = attention(sequence, mask, guide)
    for b in range(2):
        valid = mask[b].nonzero().flatten().tolist()
        energies = torch.stack([
            attention.score.weight[0] @ torch.tanh(attention.keys.weight @ sequence[b, i]
                                                   + attention.guide.weight @ guide[b] + attention.guide.bias)
            for i in valid])
        alpha = torch.softmax(energies, dim=0)
        assert torch.allclose(weights[b, valid], alpha, atol=1e-6)
        assert torch.all(weights[b, ~mask[b]] == 0)
        assert torch.allclose(pooled[b], (alpha[:, None] * sequence[b, valid]).sum(0), atol=1e-6)


def reference_routing(u_hat: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sabour et al.'s Procedure 1 with explicit loops (agreement scaled by 1/sqrt(d)): u_hat is n_in x n_out x d."""
    n_in, n_out, d = u_hat.shape
    b = [[0.0] * n_out for _ in range(n_in)]
    for it in range(iterations):
        c = [torch.softmax(torch.tensor(b[i]), dim=0) for i in range(n_in)]
        v = []
        for j in range(n_out):
            s = sum(c[i][j] * u_hat[i, j] for i in range(n_in))
            norm2 = float((s * s).sum())
            v.append(norm2 / (1 + norm2) * s / norm2 ** 0.5)
        if it < iterations - 1:
            for i in range(n_in):
                for j in range(n_out):
                    b[i][j] += float(u_hat[i, j] @ v[j]) / d ** 0.5
    return torch.stack(v), torch.stack(c)


@pytest.mark.parametrize("iterations", [1, 3])
def test_routing_matches_reference_and_couplings_sum_to_one(iterations):
    torch.manual_seed(1)
    routing = DynamicRouting(n_in=4, n_out=3, d_in=5, d_out=6, iterations=iterations)
    capsules = torch.randn(2, 4, 5)
    outputs, coupling = routing(capsules)
    assert outputs.shape == (2, 3, 6) and coupling.shape == (2, 4, 3)
    assert torch.allclose(coupling.sum(dim=2), torch.ones(2, 4), atol=1e-6)
    for b in range(2):
        u_hat = torch.stack([torch.stack([routing.weight[i, j] @ capsules[b, i] for j in range(3)])
                             for i in range(4)]).detach()
        ref_v, ref_c = reference_routing(u_hat, iterations)
        assert torch.allclose(outputs[b], ref_v, atol=1e-5)
        assert torch.allclose(coupling[b], ref_c, atol=1e-5)
    if iterations == 1:
        assert torch.allclose(coupling, torch.full_like(coupling, 1 / 3))
    else:
        assert not torch.allclose(coupling, torch.full_like(coupling, 1 / 3), atol=1e-3)


def test_squash_keeps_direction_and_bounds_length():
    s = torch.tensor([[3.0, 4.0], [0.03, 0.04]])
    v = squash(s)
    assert torch.allclose(v[0], torch.tensor([0.6, 0.8]) * 25 / 26, atol=1e-6)
    assert torch.all(v.norm(dim=-1) < 1)


def test_routing_changes_the_model_output():
    routed = model("full", iterations=3)
    uniform = model("full", iterations=1)
    uniform.load_state_dict(routed.state_dict())
    batch = collate([features(5, 4, seed) for seed in range(4)], DT, DV)
    assert not torch.allclose(routed(batch), uniform(batch), atol=1e-4)


def test_collate_pads_and_masks_ragged_features():
    batch = collate([features(5, 4, 0), features(2, None, 1), features(None, 4, 2)], DT, DV)
    assert batch.text_states.shape == (3, 5, DT) and batch.image_states.shape == (3, 4, DV)
    assert batch.text_mask.sum(dim=1).tolist() == [5, 2, 0]
    assert batch.image_mask.sum(dim=1).tolist() == [4, 0, 4]
    assert batch.text_present.tolist() == [True, True, False]
    assert batch.image_present.tolist() == [True, False, True]
    assert torch.all(batch.text_states[1, 2:] == 0)
    empty = collate([features(None, None, 3)], DT, DV)
    assert empty.text_states.shape == (1, 1, DT) and not empty.text_present.any()


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "probe"])  # the probe has no network
def test_every_variant_gives_logits_and_capsules(variant):
    m = model(variant)
    batch = collate([features(5, 4, 0), features(2, None, 1), features(None, 4, 2)], DT, DV)
    expected = {"text": 2, "image": 2, "concat": 2, "attention": 4, "full": 3}[variant]
    assert m.capsules(batch).shape == (3, expected, 16)
    logits = m(batch)
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()


def test_padding_and_missing_content_do_not_leak():
    m = model("full")
    post = features(3, 4, 0)
    longer = features(7, 4, 1)
    alone = m(collate([post], DT, DV))
    padded = m(collate([post, longer], DT, DV))[:1]
    assert torch.allclose(alone, padded, atol=1e-5)
    batch = collate([features(3, None, 0), features(4, 4, 1)], DT, DV)
    before = m(batch)[0]
    batch.image_states[0] = 100.0  # content behind an absent image must be ignored
    batch.image_pooled[0] = -100.0
    assert torch.allclose(m(batch)[0], before)


def test_missing_modality_uses_the_learned_placeholder():
    m = model("full")
    batch = collate([features(3, None, 0), features(None, 4, 1), features(3, 4, 2)], DT, DV)
    m(batch).sum().backward()
    assert m.image.placeholder.grad.abs().sum() > 0 and m.text.placeholder.grad.abs().sum() > 0
    before = m(batch).detach()
    with torch.no_grad():
        m.image.placeholder.add_(1.0)
    after = m(batch).detach()
    assert not torch.allclose(after[0], before[0])  # the post without an image reads the placeholder
    assert torch.allclose(after[1:], before[1:])  # posts with their image do not


def test_unimodal_variants_ignore_the_other_modality():
    text_model, image_model = model("text"), model("image")
    batch = collate([features(3, 4, 0)], DT, DV)
    new_image, new_text = collate([features(3, 4, 0)], DT, DV), collate([features(3, 4, 0)], DT, DV)
    new_image.image_states.normal_(), new_image.image_pooled.normal_()
    new_text.text_states.normal_(), new_text.text_pooled.normal_()
    assert torch.allclose(text_model(new_image), text_model(batch))
    assert not torch.allclose(text_model(new_text), text_model(batch))
    assert torch.allclose(image_model(new_text), image_model(batch))
    assert not torch.allclose(image_model(new_image), image_model(batch))
