"""Metrics against hand-computed values."""

import json
import random

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from sentilens.metrics import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    classification_metrics,
    paired_difference_interval,
    positive_label,
)

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


def test_binary_f1_is_the_positive_class_f1_hand_computed():
    labels = ["not_sarcastic", "sarcastic"]
    y_true = ["sarcastic", "sarcastic", "sarcastic", "not_sarcastic", "not_sarcastic"]
    y_pred = ["sarcastic", "not_sarcastic", "sarcastic", "sarcastic", "not_sarcastic"]
    m = classification_metrics(y_true, y_pred, labels)
    # sarcastic: TP 2, FP 1, FN 1 -> P = R = 2/3, F1 = 2/3
    assert m["positive_label"] == "sarcastic"
    assert m["binary_f1"] == pytest.approx(2 / 3)
    assert "binary_f1" not in classification_metrics(["positive"], ["positive"], LABELS)


@pytest.mark.parametrize(("labels", "positive"), [
    (["not_sarcastic", "sarcastic"], "sarcastic"),
    (["sarcastic", "not_sarcastic"], "sarcastic"),
    (["informative", "not_informative"], "informative"),
    (["not_informative", "informative"], "informative"),
    (["negative", "positive"], "positive"),
    (["cat", "dog"], "dog"),
    (["a", "b", "c"], None),
])
def test_positive_label(labels, positive):
    assert positive_label(labels) == positive


def _random_predictions(n, seed):
    rng = random.Random(seed)
    y_true = [rng.choice(LABELS) for _ in range(n)]
    # right 70 % of the time, otherwise a random label
    y_pred = [t if rng.random() < 0.7 else rng.choice(LABELS) for t in y_true]
    return y_true, y_pred


def test_bootstrap_intervals_match_scikit_learn_on_the_same_resamples():
    y_true, y_pred = _random_predictions(150, seed=3)
    m = classification_metrics(y_true, y_pred, LABELS)
    # Independent reference: the same seeded draws, each scored by scikit-learn.
    draws = np.random.default_rng(BOOTSTRAP_SEED).integers(0, 150, size=(BOOTSTRAP_RESAMPLES, 150))
    t, p = np.array(y_true), np.array(y_pred)
    acc = [accuracy_score(t[d], p[d]) for d in draws]
    wf1 = [f1_score(t[d], p[d], labels=LABELS, average="weighted", zero_division=0) for d in draws]
    assert m["accuracy_ci"] == pytest.approx([np.percentile(acc, 2.5), np.percentile(acc, 97.5)])
    assert m["weighted_f1_ci"] == pytest.approx([np.percentile(wf1, 2.5), np.percentile(wf1, 97.5)])
    assert m["accuracy_ci"][0] < m["accuracy"] < m["accuracy_ci"][1]
    assert m["weighted_f1_ci"][0] < m["weighted_f1"] < m["weighted_f1_ci"][1]


def test_bootstrap_is_seeded_and_narrows_with_more_posts():
    small = classification_metrics(*_random_predictions(100, seed=1), LABELS)
    again = classification_metrics(*_random_predictions(100, seed=1), LABELS)
    large = classification_metrics(*_random_predictions(4000, seed=1), LABELS)
    assert small["accuracy_ci"] == again["accuracy_ci"] and small["weighted_f1_ci"] == again["weighted_f1_ci"]

    def width(m, key):
        return m[key][1] - m[key][0]

    # the interval shrinks like 1/sqrt(n): 40x the posts, about 1/6 the width
    assert width(large, "accuracy_ci") < width(small, "accuracy_ci") / 3
    assert width(large, "weighted_f1_ci") < width(small, "weighted_f1_ci") / 3


def test_perfect_predictions_have_a_point_interval():
    y = ["positive", "neutral", "negative"] * 10
    m = classification_metrics(y, y, LABELS)
    assert m["accuracy_ci"] == [1.0, 1.0] and m["weighted_f1_ci"] == [1.0, 1.0]


def test_paired_difference_interval_matches_scikit_learn_on_the_same_resamples():
    y_true, better = _random_predictions(120, seed=5)
    rng = random.Random(6)
    worse = [t if rng.random() < 0.5 else rng.choice(LABELS) for t in y_true]
    diff = paired_difference_interval(y_true, better, worse, LABELS, resamples=200)
    draws = np.random.default_rng(BOOTSTRAP_SEED).integers(0, 120, size=(200, 120))
    t, a, b = np.array(y_true), np.array(better), np.array(worse)
    wf1 = [f1_score(t[d], a[d], labels=LABELS, average="weighted", zero_division=0)
           - f1_score(t[d], b[d], labels=LABELS, average="weighted", zero_division=0) for d in draws]
    acc = [accuracy_score(t[d], a[d]) - accuracy_score(t[d], b[d]) for d in draws]
    assert diff["weighted_f1_diff_ci"] == pytest.approx([np.percentile(wf1, 2.5), np.percentile(wf1, 97.5)])
    assert diff["accuracy_diff_ci"] == pytest.approx([np.percentile(acc, 2.5), np.percentile(acc, 97.5)])
    assert paired_difference_interval(y_true, better, better, LABELS)["weighted_f1_diff_ci"] == [0.0, 0.0]
