"""Decision offsets (``decision.py``): the weighted-F1 rule chosen on val, against hand-worked cases."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from sentilens.decision import tune_offsets
from sentilens.errors import SentilensError
from sentilens.fusion.config import parse_fusion_config
from sentilens.metrics import weighted_f1_of_indices


def test_weighted_f1_of_indices_is_scikit_learns():
    rng = np.random.default_rng(0)
    for k in (2, 3, 4):
        t, p = rng.integers(0, k, 300), rng.integers(0, k, 300)
        p[p == k - 1] = 0  # one label never predicted
        assert weighted_f1_of_indices(t, p, k) == pytest.approx(
            f1_score(t, p, labels=list(range(k)), average="weighted", zero_division=0))


def skewed_case() -> tuple[np.ndarray, np.ndarray]:
    """20 posts whose most probable label is always label 0: 10 of label 0, 5 of label 1, 5 of label 2."""
    rows = [(0.6, 0.3, 0.1)] * 10 + [(0.55, 0.4, 0.05)] * 5 + [(0.5, 0.1, 0.4)] * 5
    return np.array(rows), np.array([0] * 10 + [1] * 5 + [2] * 5)


def test_offsets_recover_the_small_labels_with_the_smallest_change():
    probabilities, truth = skewed_case()
    offsets, before, after = tune_offsets(probabilities, truth)
    # argmax names label 0 for all: F1 of label 0 = 2*10 / (10 + 20), weighted by 10/20, the others 0.
    assert before == pytest.approx(1 / 3)
    assert after == pytest.approx(1.0)
    # Label 1 wins on its own posts once b1 > log(0.55/0.4) = 0.318 and stays off label 0's below log(2) = 0.693:
    # the smallest grid value above is 0.4. Then label 2 needs b2 > log(0.5/0.4) = 0.223: 0.3.
    assert offsets == pytest.approx([0.0, 0.4, 0.3])
    adjusted = (np.log(probabilities) + np.array(offsets)).argmax(axis=1)
    assert (adjusted == truth).all()


def test_a_rule_that_cannot_be_bettered_keeps_zero_offsets():
    probabilities = np.array([(0.9, 0.1), (0.2, 0.8), (0.7, 0.3), (0.4, 0.6)])
    truth = np.array([0, 1, 0, 1])
    assert tune_offsets(probabilities, truth) == ([0.0, 0.0], 1.0, 1.0)


def test_two_labels_move_the_threshold():
    # sarcastic posts score 0.35-0.45: the plain rule misses them all; any b1 in (log(0.65/0.35), log(0.7/0.3))
    # = (0.619, 0.847) separates them, and 0.7 is the grid's value nearest zero there.
    probabilities = np.array([(0.7, 0.3)] * 6 + [(0.65, 0.35)] * 4)
    truth = np.array([0] * 6 + [1] * 4)
    offsets, before, after = tune_offsets(probabilities, truth)
    assert offsets == pytest.approx([0.0, 0.7]) and after == 1.0 and before < after


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="3 rows of probabilities for 2 labels"):
        tune_offsets(np.full((3, 2), 0.5), np.array([0, 1]))


def test_a_config_with_offsets_for_other_labels_is_refused_in_one_line(tmp_path):
    with pytest.raises(SentilensError, match="decision_offsets has 2 values for 3 labels") as err:
        parse_fusion_config({"labels": ["positive", "neutral", "negative"], "decision_offsets": [0.0, 1.0]},
                            tmp_path / "config.json")
    assert "\n" not in str(err.value)
