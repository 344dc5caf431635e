"""One predictor interface for both model families (design.md, "Predictor").

``load_predictor(run_dir)`` reads ``config.json``'s ``family`` and returns a :class:`Predictor`.
``eval``, ``predict``, ``sweep``, ``explain``, ``serve`` and ``demo`` all go through it, so each
behaviour exists once. A predictor says what it can do (:class:`Capabilities`), describes
itself (:meth:`Predictor.describe`) and returns configured copies of itself
(:meth:`Predictor.with_options`), so no caller outside a family package asks which family it
is: a new family registers itself in :data:`FAMILIES` and implements the protocol.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from sentilens.data.records import Post
from sentilens.distributed import is_main_process, predict_sharded
from sentilens.errors import SentilensError
from sentilens.jsonio import jsonl_lines
from sentilens.metrics import classification_metrics
from sentilens.outputs import RowAppender, check_output
from sentilens.progress import progress_bar
from sentilens.runs import load_config
from sentilens.validation import check_probabilities, parse_json

if TYPE_CHECKING:
    import torch

FAMILIES = {
    "fusion": "sentilens.fusion.predictor:FusionPredictor",
    "mllm": "sentilens.mllm.predictor:MllmPredictor",
    "ensemble": "sentilens.ensemble.predictor:EnsemblePredictor",
}
"""Model family -> ``module:class`` of its predictor (imported only when a run of that family is loaded)."""

RUN_DESCRIBERS = {
    "fusion": "sentilens.fusion.config:describe_run",
    "mllm": "sentilens.mllm.config:describe_run",
    "ensemble": "sentilens.ensemble.config:describe_run",
}
"""Model family -> ``module:function`` describing a run from its ``config.json`` alone (no model loaded)."""


@dataclass
class Prediction:
    """A label, the probability of every label, and for MLLM runs the visual tokens kept."""

    label: str
    probabilities: dict[str, float]
    kept_tokens: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_probabilities(self.probabilities)  # a NaN would reach the output as bare NaN (not JSON)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Capabilities:
    """What a predictor can do beyond ``predict(posts)``; callers check these, never the family."""

    supports_keep_ratio: bool = False
    """``predict(..., keep_ratio=r)`` filters visual tokens (the LLaVA paper's retention ratio)."""
    supports_explain: bool = False
    """:meth:`Predictor.explain` draws where the model looks (the LLaVA paper's Figure 3)."""
    decodings: tuple[str, ...] = ("score",)
    """Values ``with_options(decode=...)`` accepts; the first is the default."""
    strategies: tuple[str, ...] = ()
    """The token-pruning strategies ``with_options(strategy=...)`` accepts (``all``, ``feature``, ``A:B``,
    ``random``..., and the ``+merge`` / ``+native`` modifiers the family takes); empty: none."""
    runtimes: tuple[str, ...] = ()
    """Values ``load_predictor(..., runtime=...)`` accepts: where the encoders run (fusion: auto, onnx, torch)."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Explanation:
    """One post's prediction and the patches its image kept: the data of a Figure-3 heatmap."""

    prediction: Prediction
    picture: torch.Tensor
    """(H, W, 3) in [0, 1]: the image as the vision tower sees it."""
    scores: torch.Tensor
    """(g, g) patch scores."""
    kept: torch.Tensor
    """(g, g) bool: the patches that reach the language model."""
    score_name: str
    strategy: str
    content: tuple[float, float, float, float]
    """(x0, y0, x1, y1) in ``picture`` pixels: where the post's image lies; outside it is padding."""
    shown: torch.Tensor | None = None
    """(g, g) bool: the cells that are visual tokens (the rest squares a rectangular grid); None: all."""

    def token_cells(self) -> torch.Tensor:
        """(g, g) bool: the cells that are visual tokens of the image."""
        import torch

        return torch.ones_like(self.kept) if self.shown is None else self.shown


@runtime_checkable
class Predictor(Protocol):
    """What every family's predictor offers (``sentilens.mllm.predictor``, ``sentilens.fusion.predictor``)."""

    family: str
    labels: list[str]
    capabilities: Capabilities

    def predict(self, posts: Sequence[Post], keep_ratio: float | None = None) -> list[Prediction]: ...

    def describe(self) -> dict:
        """``{"family", "labels", "base_model", "description", "config"}``: for reports and ``/v1/model``.

        ``config`` holds the run config's scalar fields only."""
        ...

    def with_options(self, *, decode: str | None = None, strategy: str | None = None) -> Predictor:
        """A predictor sharing this one's model, configured with the options given (``None``: unchanged).

        An option this predictor's capabilities lack is a :class:`SentilensError`."""
        ...

    def explain(self, post: Post, keep_ratio: float) -> Explanation:
        """Prediction and patch selection of one post with an image (only when ``supports_explain``)."""
        ...


def _family_entry(registry: dict[str, str], config: dict, run_dir: str | Path):
    family = config["family"]
    if family not in registry:
        raise SentilensError(f"unknown model family '{family}' (known: {', '.join(registry)})",
                             Path(run_dir) / "config.json")
    module_name, name = registry[family].split(":")
    return getattr(importlib.import_module(module_name), name)


def load_predictor(run_dir: str | Path, device: str | None = None, runtime: str | None = None) -> Predictor:
    """The predictor of a run directory, whichever family trained it.

    ``runtime``: where the encoders run, for predictors whose ``capabilities.runtimes`` list it
    (fusion: ``auto``, the default, is ONNX Runtime on a CPU; ``onnx``; ``torch``).
    """
    cls = _family_entry(FAMILIES, load_config(run_dir), run_dir)
    if runtime is None:
        return cls.from_run(Path(run_dir), device=device)
    # Checked on the class, before any model is loaded (a family may set its capabilities per instance).
    runtimes = getattr(getattr(cls, "capabilities", None), "runtimes", ())
    if runtime not in runtimes:
        raise SentilensError(f"--runtime {runtime} is not supported by this {cls.family} run"
                             + (f" (choose from {', '.join(runtimes)})" if runtimes else ""))
    return cls.from_run(Path(run_dir), device=device, runtime=runtime)


def describe_run(run_dir: str | Path) -> dict:
    """What :meth:`Predictor.describe` says of a run, read from its ``config.json`` without loading the model."""
    config = load_config(run_dir)
    return _family_entry(RUN_DESCRIBERS, config, run_dir)(config, Path(run_dir))


def config_summary(config: dict) -> dict:
    """The scalar fields of a run config (what ``describe()["config"]`` shows)."""
    return {k: v for k, v in config.items() if isinstance(v, (str, int, float, bool)) or v is None}


def unsupported(option: str, predictor: Predictor) -> SentilensError:
    return SentilensError(f"{option} is not supported by this {predictor.family} run")


class LabelProbabilitiesOnly:
    """The protocol's options for a predictor that gives label probabilities and nothing else: one decoding,
    no token filtering, no heatmap (the fusion and ensemble families)."""

    family: str
    capabilities: Capabilities

    def with_options(self, *, decode: str | None = None, strategy: str | None = None):
        if decode is not None and decode not in self.capabilities.decodings:
            raise unsupported(f"--decode {decode}", self)
        if strategy is not None:
            raise unsupported("--strategy (visual token filtering)", self)
        return self

    def explain(self, post: Post, keep_ratio: float) -> Explanation:
        raise unsupported("explain (a heatmap of visual tokens)", self)

    def refuse_keep_ratio(self, keep_ratio: float | None) -> None:
        if keep_ratio is not None:
            raise unsupported("--keep-ratio (visual token filtering, for MLLM runs)", self)


def check_keep_ratio(keep_ratio: float | None) -> None:
    if keep_ratio is not None and not 0.0 < keep_ratio <= 1.0:
        raise SentilensError(f"keep ratio must be in (0, 1], got {keep_ratio}")


def compare_decodings(predictor: Predictor, posts: Sequence[Post], keep_ratio: float | None = None,
                      headline: str | None = None) -> dict:
    """Metrics of the ``headline`` decoding (default: the first the predictor offers), plus ``"decodings"``:
    each decoding's accuracy and F1 and ``agreement``, the fraction of posts on which every decoding gives
    the same label (``eval --compare-decodings``)."""
    decodings = predictor.capabilities.decodings
    if len(decodings) < 2:
        raise SentilensError(f"--compare-decodings needs a run with two decodings; this {predictor.family} run has "
                             "one")
    headline = headline or decodings[0]
    if headline not in decodings:
        raise SentilensError(f"--decode must be one of {', '.join(decodings)}, got '{headline}'")
    check_labelled(posts)
    predictions = {}
    for decode in decodings:
        configured = predictor.with_options(decode=decode)
        predictions[decode] = predict_sharded(lambda shard, p=configured: p.predict(shard, keep_ratio=keep_ratio),
                                                  posts)
    compared: dict = {}
    for decode, preds in predictions.items():
        metrics = prediction_metrics(posts, preds, predictor.labels)
        compared[decode] = {k: metrics[k] for k in ("accuracy", "weighted_f1", "macro_f1", "unparsable")
                            if k in metrics}
    same = [len({predictions[d][i].label for d in decodings}) == 1 for i in range(len(posts))]
    compared["agreement"] = sum(same) / len(posts)
    metrics = prediction_metrics(posts, predictions[headline], predictor.labels)
    return {**metrics, "decode": headline, "decodings": compared}


def check_labelled(posts: Sequence[Post]) -> None:
    unlabelled = [p.id for p in posts if p.label is None]
    if unlabelled:
        raise SentilensError(f"{len(unlabelled)} posts have no label (first: {unlabelled[0]})")


def evaluate(predictor: Predictor, posts: Sequence[Post], keep_ratio: float | None = None) -> dict:
    """Metrics of ``predictor`` on labelled ``posts`` (the shared body of ``eval`` and ``sweep``)."""
    check_labelled(posts)
    predictions = predict_sharded(lambda shard: predictor.predict(shard, keep_ratio=keep_ratio), posts)
    return prediction_metrics(posts, predictions, predictor.labels)


def prediction_metrics(posts: Sequence[Post], predictions: Sequence[Prediction], labels: Sequence[str]) -> dict:
    """Metrics of ``predictions`` against the labels of ``posts``, with the kept-token mean and unparsable count."""
    metrics = classification_metrics([p.label for p in posts], [p.label for p in predictions], list(labels))
    kept = [p.kept_tokens for p in predictions if p.kept_tokens is not None]
    if kept:
        metrics["mean_kept_tokens"] = sum(kept) / len(kept)
    if any("parsed" in p.extra for p in predictions):
        metrics["unparsable"] = sum(not p.extra.get("parsed", True) for p in predictions)
    return metrics


WRITE_CHUNK = 256
"""Posts predicted (and, under ``accelerate launch``, gathered) between two writes of the output file."""


def done_ids(output: Path) -> set[str]:
    """Ids already in a predictions file; a last line cut off by an interruption is removed from the file."""
    if not output.is_file():
        return set()
    data = output.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with output.open("r+b") as f:  # keep every whole row, drop the half-written one
            f.truncate(len(complete))
    try:
        text = complete.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SentilensError(f"not UTF-8 text (byte {err.start} cannot be decoded); cannot resume from it",
                             output) from None
    ids = set()
    for line_no, line in jsonl_lines(text):
        row = parse_json(line, output, line_no)
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise SentilensError("not a predictions row (JSON with a string 'id'); cannot resume from it",
                                 output, line_no)
        ids.add(row["id"])
    return ids


def predict_to_file(predictor: Predictor, posts: Sequence[Post], output: Path, keep_ratio: float | None = None,
                    resume: bool = False, on_rows: Callable[[list[dict]], None] | None = None,
                    source: Path | None = None) -> dict:
    """Predict ``posts`` into the JSONL ``output`` as it goes, with a progress bar (posts/s, ETA).

    Rows are appended and flushed every :data:`WRITE_CHUNK` posts, so an interrupted job keeps
    what it wrote; with ``resume`` the posts whose ids are already in ``output`` are skipped (else
    ``output`` is started afresh). ``output`` is locked while it is written
    (:class:`sentilens.outputs.RowAppender`): a second job on it is refused in one line, and a failed
    write (a full disk) keeps every complete row, for ``resume`` to continue from. ``source``, the file
    ``posts`` were read from, must not be ``output``. Under ``accelerate launch`` every chunk is sharded
    across the processes (:func:`sentilens.distributed.predict_sharded`) and only the main process writes.
    ``on_rows`` sees each chunk's rows. Returns the counts and the rate.
    """
    main = is_main_process()
    if main:
        check_output(output, source, append=resume)
    with RowAppender(output, fresh=not resume) if main else contextlib.nullcontext() as writer:
        skip = done_ids(output) if resume else set()
        todo = [p for p in posts if p.id not in skip]
        started = time.perf_counter()
        with progress_bar() as bar:
            task = bar.add_task("predicting", total=len(todo), unit="post",
                                status=f"{len(posts) - len(todo)} already in {output.name}" if skip else "")
            for start in range(0, len(todo), WRITE_CHUNK):
                chunk = todo[start:start + WRITE_CHUNK]
                try:
                    predictions = predict_sharded(lambda shard: predictor.predict(shard, keep_ratio=keep_ratio),
                                                  chunk)
                except SentilensError as err:  # a bad post: what was predicted before it stays, and is named
                    kept = len(posts) - len(todo) + start
                    if not kept or not main:
                        raise
                    raise SentilensError(f"{err.problem} (the {kept} predictions before it are kept in {output}: fix "
                                         "the post and run again with --resume)", err.path, err.line) from None
                rows = [{"id": p.id, **pred.to_dict()} for p, pred in zip(chunk, predictions, strict=True)]
                if writer is not None:
                    writer.write(rows)
                if on_rows is not None:
                    on_rows(rows)
                bar.advance(task, len(chunk))
    seconds = time.perf_counter() - started
    return {"output": str(output), "predicted": len(todo), "skipped": len(posts) - len(todo),
            "seconds": round(seconds, 3), "posts_per_s": round(len(todo) / seconds, 2) if seconds > 0 else None}
