"""Classification metrics: the only implementation in the project.

Both papers report accuracy and weighted F1 (support-weighted mean of per-class F1);
macro F1, per-class precision/recall/F1 and the confusion matrix come along for the report.
Everything is computed by scikit-learn and returned as plain JSON-serialisable fractions.
"""

from __future__ import annotations

from collections.abc import Sequence

from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict:
    """Metrics of ``y_pred`` against ``y_true`` over the fixed label order ``labels``.

    Returns ``{"accuracy", "weighted_f1", "macro_f1", "per_class", "confusion", "labels", "n"}``
    where ``confusion[i][j]`` counts posts of true label ``labels[i]`` predicted ``labels[j]``.
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
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
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
    }
