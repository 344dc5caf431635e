"""Decision offsets: the label rule tuned for the score a run is judged by (weighted F1).

A head trained with cross-entropy predicts the most probable label. On a skewed set that rarely
names the small labels (MVSA-Multiple: two thirds positive; the default head recalls about a
quarter of the neutral and negative posts), which is the accuracy-optimal rule but not the
weighted-F1-optimal one. The rule here adds one offset per label to the head's logits,

    label = argmax_c (z_c + b_c),    b_0 = 0,

(``z``: the fusion head's logits, or the log of an ensemble's averaged probabilities), which is
Bayes' rule under other label priors (``b_c = log(prior'_c / prior_c)``): the probabilities
a run reports are ``softmax(z + b)``, so the label stays their argmax. The offsets ``b`` are chosen
on the validation split, after the epoch is chosen, by coordinate ascent over :data:`OFFSET_GRID`
(each label but the first in turn, :data:`ROUNDS` passes), keeping a change only where it raises
validation weighted F1 and, among equal scores, the offset nearest zero. The test split is never read.
"""

from __future__ import annotations

import numpy as np

from sentilens.metrics import weighted_f1_of_indices

OFFSET_GRID = np.round(np.arange(-30, 31) * 0.1, 1)
"""Candidate offsets, in logits: -3.0 to 3.0 by 0.1 (a factor of 20 in prior odds either way)."""
ROUNDS = 3


def tune_offsets(probabilities: np.ndarray, truth: np.ndarray) -> tuple[list[float], float, float]:
    """Offsets maximising the weighted F1 of ``argmax(log p + b)`` against ``truth`` (label indices).

    Returns ``(offsets, weighted F1 without them, weighted F1 with them)``; all-zero offsets when nothing
    on the grid does better than the plain argmax.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    truth = np.asarray(truth)
    n, k = probabilities.shape
    if n == 0 or len(truth) != n:
        raise ValueError(f"{n} rows of probabilities for {len(truth)} labels")
    scores = np.log(np.clip(probabilities, 1e-12, None))
    offsets = np.zeros(k)
    before = best = weighted_f1_of_indices(truth, scores.argmax(axis=1), k)
    # Nearest zero first, so that among equal scores the smallest change wins.
    grid = OFFSET_GRID[np.argsort(np.abs(OFFSET_GRID), kind="stable")]
    for _ in range(ROUNDS):
        changed = False
        for c in range(1, k):
            for value in grid:
                trial = offsets.copy()
                trial[c] = value
                score = weighted_f1_of_indices(truth, (scores + trial).argmax(axis=1), k)
                if score > best + 1e-12:
                    best, offsets, changed = score, trial, True
        if not changed:
            break
    return [float(v) for v in offsets], float(before), float(best)


def apply_offsets(probabilities: np.ndarray, offsets: list[float] | None) -> np.ndarray:
    """``softmax(log p + b)`` row by row: the probabilities under the offsets' label rule (``p`` itself for
    ``None``), for a predictor that combines probabilities rather than logits."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if offsets is None:
        return probabilities
    scores = np.log(np.clip(probabilities, 1e-12, None)) + np.asarray(offsets, dtype=np.float64)
    scores -= scores.max(axis=1, keepdims=True)
    shifted = np.exp(scores)
    return shifted / shifted.sum(axis=1, keepdims=True)
