"""Helpers of the command-line tests: the real entry point run in-process, the one-line error check, and a
predictor that needs no trained run (for what ``predict`` does around the model: files, locks, tables)."""

from __future__ import annotations

from collections.abc import Sequence

from sentilens.cli import main
from sentilens.data.records import Post
from sentilens.predict import Capabilities, Prediction


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``sentilens ARGS`` in-process through the real entry point: (exit code, stdout, stderr)."""
    monkeypatch.setattr("sys.argv", ["sentilens", *args])
    try:
        main()
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str, *fragments: str, alone: bool = False) -> None:
    """Exit 2 and one ``error:`` line holding ``fragments`` (model loading may draw its progress bar before;
    ``alone``: nothing else on stderr)."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and sum("error" in line.lower() for line in lines) == 1, err
    assert len(lines) == 1 or not alone, err
    for fragment in fragments:
        assert fragment in lines[-1], err


class LengthPredictor:
    """A stand-in for a trained run: the label is the parity of the text's length; ``seen`` lists the ids of
    every post it was asked about, in order."""

    family = "length"
    labels = ["even", "odd"]
    capabilities = Capabilities()

    def __init__(self):
        self.seen: list[str] = []

    def predict(self, posts: Sequence[Post], keep_ratio: float | None = None) -> list[Prediction]:
        self.seen.extend(post.id for post in posts)
        return [Prediction(label=self.labels[len(post.text) % 2],
                           probabilities={"even": float(len(post.text) % 2 == 0), "odd": float(len(post.text) % 2)})
                for post in posts]

    def with_options(self, *, decode: str | None = None, strategy: str | None = None) -> LengthPredictor:
        return self


def use_length_predictor(monkeypatch) -> LengthPredictor:
    """Make every ``--run`` load one :class:`LengthPredictor` (returned, to read what it saw)."""
    predictor = LengthPredictor()
    monkeypatch.setattr("sentilens.predict.load_predictor", lambda run, device=None, runtime=None: predictor)
    return predictor
