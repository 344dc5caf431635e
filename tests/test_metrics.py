"""Metrics against hand-computed values."""

import json

import pytest

from sentilens.metrics import classification_metrics

LABELS = ["positive", "neutral", "negative"]


def test_hand_computed_three_class():
    y_true = ["positive", "positive", "positive", "neutral", "negative", "negative"]
    y_pred = ["positive", "positive", "negative", "neutral", "negative", "positive"]
    m = classification_metrics(y_true, y_pred, LABELS)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # positive: P=2/3 R=2/3 F1=2/3; neutral: 1,1,1; negative: P=1/2 R=1/2 F1=1/2
    assert m["per_class"]["positive"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert m["per_class"]["negative"]["f1"] == pytest.approx(0.5)
    assert m["weighted_f1"] == pytest.approx((3 * 2 / 3 + 1 * 1 + 2 * 0.5) / 6)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 0.5) / 3)
    assert m["confusion"] == [[2, 0, 1], [0, 1, 0], [1, 0, 1]]
    assert m["labels"] == LABELS and m["n"] == 6
    json.dumps(m)


def test_absent_class_scores_zero_and_keeps_its_row():
    m = classification_metrics(["positive", "negative"], ["positive", "positive"], LABELS)
    assert m["per_class"]["neutral"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert len(m["confusion"]) == 3


def test_rejects_unknown_labels_and_length_mismatch():
    with pytest.raises(ValueError, match="not in the label list"):
        classification_metrics(["happy"], ["positive"], LABELS)
    with pytest.raises(ValueError, match="predictions"):
        classification_metrics(["positive"], [], LABELS)
