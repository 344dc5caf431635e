"""Zero-shot classification: an instruct checkpoint that was never fine-tuned, as a run (``eval --model``).

Many users have no labelled training data yet and want to know how an instruct VLM does on their posts
before they fine-tune. :func:`zero_shot_predictor` loads the checkpoint as it is, builds the prompt a new
run would train with (the task's question, the label list, the checkpoint's own chat template, the answer
prefix that template writes) and labels the posts by label scoring, exactly as a fine-tuned run does.

It writes a run folder whose ``config.json`` has ``weights: null`` (nothing trained: the predictor loads
the base checkpoint alone) and ``training.zero_shot: true``, so ``sweep``, ``report``, ``predict``,
``serve`` and ``export`` work on it as on any run.
"""

from __future__ import annotations

from pathlib import Path

from sentilens.errors import SentilensError
from sentilens.runs import CONFIG, load_config, save_config


def default_run_dir(model: str) -> Path:
    """Where ``eval --model`` keeps the zero-shot run when no ``--run`` is given: ``runs/zero-shot-<name>``."""
    name = Path(model.rstrip("/")).name or "model"
    return Path("runs") / f"zero-shot-{name}"


def zero_shot_predictor(model: str, labels: list[str], run_dir: str | Path, device=None,
                        data: str | Path | None = None):
    """The predictor of ``model`` (an HF id or a checkpoint folder) never fine-tuned, for ``labels`` (``data``: the
    manifest they come from, recorded); its run folder ``run_dir`` is written, or reused when it already is this
    zero-shot run (with its saved prompt and labels)."""
    from sentilens.distributed import default_device
    from sentilens.mllm.config import EvalPrecision, MllmRunConfig
    from sentilens.mllm.families import family_of, parse_tiny
    from sentilens.mllm.model import num_image_tokens, prepare_model
    from sentilens.mllm.predictor import MllmPredictor
    from sentilens.mllm.prompt import PromptBuilder, PromptSettings, default_max_length, infer_task, resolved_settings
    from sentilens.mllm.train import default_image_aspect, stored_source

    if parse_tiny(model) is not None:
        raise SentilensError(f"--model {model} is a random tiny model: zero-shot needs an instruct checkpoint "
                             "(a Hugging Face id or a folder)")
    run_dir = Path(run_dir)
    source = stored_source(model)
    if (run_dir / CONFIG).is_file():
        saved = load_config(run_dir)
        if saved.get("weights", "") is None and saved.get("base_model") == source:
            if saved.get("labels") != list(labels):
                raise SentilensError(f"holds a zero-shot run of this model for the labels {saved.get('labels')}, "
                                     f"not {list(labels)}: give another --run", run_dir)
            return MllmPredictor.from_run(run_dir, device=device)  # this zero-shot run again: its saved prompt
        raise SentilensError("already holds another run: give another --run for the zero-shot run", run_dir)
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise SentilensError(f"zero-shot needs at least two distinct labels to choose from, got {labels}")
    loaded = prepare_model(model, "full", device=device or default_device(), training=False)
    family = family_of(loaded.vlm)
    tokens = num_image_tokens(loaded.vlm, loaded.processor)
    settings = PromptSettings(task=infer_task(labels), image_aspect=default_image_aspect(model),
                              max_length=default_max_length(tokens))
    builder = PromptBuilder(loaded.processor, settings, labels, tokens, family=family)
    settings = resolved_settings(settings, builder.chat_template, answer_prefix=builder.answer_prefix)
    builder = PromptBuilder(loaded.processor, settings, labels, tokens, family=family)
    config = MllmRunConfig(
        base_model=source, model_family=family.name, mode="full", prompt=settings, labels=labels, weights=None,
        num_image_tokens=tokens, decode="score",
        precision=EvalPrecision(weights=str(loaded.vlm.lm_head.weight.dtype).split(".")[-1]),
        training={"zero_shot": True, "base_model": model, "data": None if data is None else str(data)},
    )
    save_config(run_dir, config)
    return MllmPredictor(loaded, builder, config, batch_size=config.predict_batch_size)
