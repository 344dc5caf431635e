"""Posts -> :class:`Prediction` with an ensemble: every member predicts, the probabilities are averaged.

The combination is soft voting, ``p(c) = sum_m w_m p_m(c) / sum_m w_m``, then the label rule of
:mod:`sentilens.decision` (``argmax log p + b``; plain argmax without offsets). Averaging probabilities,
not labels, lets a confident member outvote two unsure ones, and works across families whose logits
mean different things. Each member runs its own encoders in turn, so an ensemble predicts at the
harmonic sum of its members' rates.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sentilens.data.records import Post
from sentilens.decision import apply_offsets
from sentilens.ensemble.config import MEMBERS, EnsembleConfig, describe_members, parse_ensemble_config
from sentilens.errors import SentilensError
from sentilens.predict import Capabilities, LabelProbabilitiesOnly, Prediction, Predictor, load_predictor
from sentilens.runs import CONFIG, load_config


class EnsemblePredictor(LabelProbabilitiesOnly):
    """Several runs' predictors behind the one protocol."""

    family = "ensemble"
    # Label probabilities only; the members keep their own runtimes, filtering and decodings at their defaults.
    capabilities = Capabilities()

    def __init__(self, settings: EnsembleConfig, members: Sequence[Predictor]):
        self.settings = settings
        self.labels = list(settings.labels)
        self.members = list(members)
        weights = np.asarray(settings.weights, dtype=np.float64)
        self.weights = weights / weights.sum()

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | None = None) -> EnsemblePredictor:
        run_dir = Path(run_dir)
        settings = parse_ensemble_config(load_config(run_dir), run_dir / CONFIG)
        members = []
        for name in settings.members:
            folder = run_dir / MEMBERS / name
            if not (folder / CONFIG).is_file():
                raise SentilensError(f"member '{name}' is missing (no {MEMBERS}/{name}/config.json)", run_dir)
            member = load_predictor(folder, device=device)
            if list(member.labels) != settings.labels:
                raise SentilensError(f"this member's labels {member.labels} differ from the ensemble's "
                                     f"{settings.labels}", folder / CONFIG)
            members.append(member)
        return cls(settings, members)

    def member_probabilities(self, posts: Sequence[Post]) -> np.ndarray:
        """``(members, posts, labels)``: each member's probabilities, in the ensemble's label order."""
        stacked = np.zeros((len(self.members), len(posts), len(self.labels)))
        for m, member in enumerate(self.members):
            for i, prediction in enumerate(member.predict(posts)):
                stacked[m, i] = [prediction.probabilities[label] for label in self.labels]
        return stacked

    def combine(self, stacked: np.ndarray) -> np.ndarray:
        """``(posts, labels)``: the weighted mean of :meth:`member_probabilities`, under the run's decision
        offsets."""
        return apply_offsets(np.tensordot(self.weights, stacked, axes=1), self.settings.decision_offsets)

    def to_predictions(self, probabilities: np.ndarray) -> list[Prediction]:
        return [Prediction(label=self.labels[int(row.argmax())],
                           probabilities={label: float(v) for label, v in zip(self.labels, row, strict=True)})
                for row in probabilities]

    def predict(self, posts: Sequence[Post], keep_ratio: float | None = None) -> list[Prediction]:
        self.refuse_keep_ratio(keep_ratio)
        if not posts:
            return []
        return self.to_predictions(self.combine(self.member_probabilities(posts)))

    def describe(self) -> dict:
        return describe_members(self.settings, [member.describe() for member in self.members])

