"""Classification metrics: the only implementation in the project.

Both papers report accuracy and weighted F1 (support-weighted mean of per-class F1);
macro F1, per-class precision/recall/F1 and the confusion matrix come along for the report.
For two-label tasks the fusion paper's "F1" is the F1 of the positive class (CrisisMMD:
``informative``; sarcasm: ``sarcastic``), reported as ``binary_f1`` with its ``positive_label``.

How sure a number is: a 95 % percentile bootstrap interval (``accuracy_ci``, ``weighted_f1_ci``,
``[low, high]``) over 1,000 resamples of the scored posts drawn with a fixed seed, so the same
predictions always give the same interval. It measures the test set's sampling noise only (not
the seed-to-seed spread of training). Point values are computed by scikit-learn; the resampled
ones by counting on the confusion cells (vectorised; the tests check it against scikit-learn).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
POSITIVE_LABELS = ("informative", "sarcastic", "positive")
"""Labels taken as the positive class of a two-label task when neither label negates the other."""
NEGATIONS = ("not_", "not ", "not-", "non_", "non-", "non ")


def positive_label(labels: Sequence[str]) -> str | None:
    """The positive class of a two-label task; ``None`` for any other number of labels.

    The label the other one negates (``sarcastic`` for ``not_sarcastic``), else a known positive word
    (:data:`POSITIVE_LABELS`), else the second label (scikit-learn's ``pos_label=1`` convention).
    """
    labels = list(labels)
    if len(labels) != 2:
        return None
    for label, other in (labels, labels[::-1]):
        if any(other.lower() == prefix + label.lower() for prefix in NEGATIONS):
            return label
    for label in labels:
        if label.lower() in POSITIVE_LABELS:
            return label
    return labels[1]


def bootstrap_intervals(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str],
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                        confidence: float = CONFIDENCE) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of accuracy and weighted F1: ``{"accuracy_ci", "weighted_f1_ci"}``.

    Each resample draws ``n`` posts with replacement (``numpy.random.default_rng(seed)``); its weighted F1
    is that of scikit-learn with ``zero_division=0`` (support-weighted per-class F1 = 2 TP / (true + predicted)).
    """
    t, p = _indices(y_true, labels), _indices(y_pred, labels)
    draws = np.random.default_rng(seed).integers(0, len(t), size=(resamples, len(t)))
    accuracy, weighted = _resampled_scores(t, p, draws, len(labels))
    return {"accuracy_ci": _percentiles(accuracy, confidence), "weighted_f1_ci": _percentiles(weighted, confidence)}


def paired_difference_interval(y_true: Sequence[str], y_pred_a: Sequence[str], y_pred_b: Sequence[str],
                               labels: Sequence[str], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                               confidence: float = CONFIDENCE) -> dict[str, list[float]]:
    """Intervals of ``a - b`` in accuracy and weighted F1, both models scored on the same resamples.

    Pairing removes the test set's shared noise: two models whose own intervals overlap can still
    differ surely when the interval of their difference excludes 0.
    """
    t = _indices(y_true, labels)
    draws = np.random.default_rng(seed).integers(0, len(t), size=(resamples, len(t)))
    acc_a, wf1_a = _resampled_scores(t, _indices(y_pred_a, labels), draws, len(labels))
    acc_b, wf1_b = _resampled_scores(t, _indices(y_pred_b, labels), draws, len(labels))
    return {"accuracy_diff_ci": _percentiles(acc_a - acc_b, confidence),
            "weighted_f1_diff_ci": _percentiles(wf1_a - wf1_b, confidence)}


def weighted_f1_of_indices(t: np.ndarray, p: np.ndarray, k: int) -> float:
    """Weighted F1 of label indices ``p`` against ``t`` over ``k`` labels, counted on the confusion cells
    (what :func:`classification_metrics` gives, without its string labels: for tight loops)."""
    return float(_resampled_scores(np.asarray(t), np.asarray(p), np.arange(len(t))[None, :], k)[1][0])


def _indices(y: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    return np.array([index[v] for v in y])


def _resampled_scores(t: np.ndarray, p: np.ndarray, draws: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and weighted F1 of each resample (row of ``draws``), counted on the confusion cells."""
    resamples, n = draws.shape
    t_s, p_s = t[draws], p[draws]
    correct = t_s == p_s
    weighted = np.zeros(resamples)
    for c in range(k):
        true_c = (t_s == c).sum(axis=1)
        pred_c = (p_s == c).sum(axis=1)
        tp_c = (correct & (t_s == c)).sum(axis=1)
        denom = true_c + pred_c
        f1_c = np.divide(2.0 * tp_c, denom, out=np.zeros(resamples), where=denom > 0)
        weighted += true_c * f1_c
    return correct.mean(axis=1), weighted / n


def _percentiles(values: np.ndarray, confidence: float) -> list[float]:
    tail = (1.0 - confidence) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str],
                           intervals: bool = True) -> dict:
    """Metrics of ``y_pred`` against ``y_true`` over the fixed label order ``labels``.

    Returns ``{"accuracy", "weighted_f1", "macro_f1", "per_class", "confusion", "labels", "n"}``
    where ``confusion[i][j]`` counts posts of true label ``labels[i]`` predicted ``labels[j]``; with
    ``intervals`` also ``accuracy_ci`` and ``weighted_f1_ci`` (see :func:`bootstrap_intervals`), and for
    two labels ``binary_f1`` and ``positive_label`` (see :func:`positive_label`).
    A class absent from both truth and predictions scores 0 (``zero_division=0``).
    """
    labels = list(labels)
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    unknown = sorted({*y_true, *y_pred} - set(labels))
    if unknown:
        raise ValueError(f"labels {unknown} are not in the label list {labels}")
    if not y_true:
        raise ValueError("no posts to score")
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
    }
    positive = positive_label(labels)
    if positive is not None:
        metrics["binary_f1"] = float(f1[labels.index(positive)])
        metrics["positive_label"] = positive
    if intervals:
        metrics.update(bootstrap_intervals(y_true, y_pred, labels))
    metrics.update({
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "labels": labels,
        "n": len(y_true),
    })
    return metrics


def with_interval(value: float, interval: Sequence[float] | None) -> str:
    """``0.6650 [0.6512, 0.6789]``: a point value and its 95 % interval, as every table prints them."""
    if interval is None:
        return f"{value:.4f}"
    return f"{value:.4f} [{interval[0]:.4f}, {interval[1]:.4f}]"
