"""The baseline row of every fusion table: a logistic regression on the frozen pooled features (issue 10).

The simplest model a user could fit on the same encoders: each post is the concatenation of the
pooled vectors of the modalities the data has (text: the encoder's pooled vector; image: the CNN's
average-pooled map; a post lacking a modality gets zeros there), standardised with the training
split's mean and deviation, then scikit-learn's ``LogisticRegression`` (L2, lbfgs, multinomial for
three labels). Its inverse regularisation ``C`` is chosen on the validation split's weighted F1
from :data:`C_GRID`, the model kept being the one fitted on the training split with that ``C``
(validation only selects, as for the fusion head's best epoch).

The fitted model is stored as tensors, like every run: ``model.ProbeModel`` holds the scaler as
buffers and the coefficients as a linear layer, so ``model.safetensors``, ``eval``, ``predict`` and
``serve`` work as for the other variants and nothing is pickled. Its softmax equals scikit-learn's
``predict_proba``: for three labels the multinomial model is the softmax of ``W x + b``; for two,
scikit-learn keeps one row ``w`` and ``sigmoid(w x + b) = softmax([0, w x + b])[1]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from sentilens.fusion.cache import PostFeatures
from sentilens.fusion.model import ProbeModel

C_GRID: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
MAX_ITER = 2000


def pooled_matrix(features: Sequence[PostFeatures], text_dim: int, image_dim: int) -> np.ndarray:
    """N x width float64 matrix of the pooled features, in ``ProbeModel.inputs``' layout."""
    rows = [np.concatenate([f.text["pooled"].numpy() if f.text is not None else np.zeros(text_dim, np.float32),
                            f.image["pooled"].numpy() if f.image is not None else np.zeros(image_dim, np.float32)])
            for f in features]
    return np.asarray(rows, dtype=np.float64)


def fit_probe(model: ProbeModel, train: Sequence[PostFeatures], train_labels: Sequence[int],
              val: Sequence[PostFeatures], val_labels: Sequence[int], text_dim: int, image_dim: int,
              seed: int = 0) -> dict:
    """Fit ``model`` in place: scaler from train, ``C`` on val's weighted F1; returns the search record."""
    n_labels = model.linear.out_features
    x = pooled_matrix(train, text_dim, image_dim)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    # A constant column (e.g. the whole image half on a text-only set) says nothing: it is left out of
    # the fit and keeps a zero weight, so the probe of a text-only set is the text-only probe.
    varying = scale > 0
    scale[~varying] = 1.0
    y = np.asarray(train_labels)
    if len(set(y.tolist())) < 2:
        raise ValueError("the probe needs at least two labels among the training posts")
    x = ((x - mean) / scale)[:, varying]
    x_val = ((pooled_matrix(val, text_dim, image_dim) - mean) / scale)[:, varying] if val else None
    search, best = [], None
    for c in C_GRID if val else (1.0,):
        classifier = LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed).fit(x, y)
        score = (float(f1_score(val_labels, classifier.predict(x_val), average="weighted", zero_division=0))
                 if val else None)
        search.append({"C": c, "val_weighted_f1": score})
        if best is None or (score is not None and score > best[0]):
            best = (score, c, classifier)
    _, c, classifier = best
    weight = np.zeros((n_labels, varying.size))
    bias = np.zeros(n_labels)
    classes = classifier.classes_.tolist()
    if len(classes) == 2:  # one row for the second class; the first class's logit stays 0
        weight[classes[1], varying], bias[classes[1]] = classifier.coef_[0], classifier.intercept_[0]
    else:
        for row, label in enumerate(classes):
            weight[label, varying], bias[label] = classifier.coef_[row], classifier.intercept_[row]
    absent = [i for i in range(n_labels) if i not in classes]
    bias[absent] = -1e4  # a label absent from the training posts is never predicted
    with torch.no_grad():
        model.mean.copy_(torch.from_numpy(mean))
        model.scale.copy_(torch.from_numpy(scale))
        model.linear.weight.copy_(torch.from_numpy(weight))
        model.linear.bias.copy_(torch.from_numpy(bias))
    return {"C": c, "search": search}
