"""``sentilens export``: an MLLM run as a standard Hugging Face checkpoint folder.

What the folder holds, and why:

- The weights of the run as the predictor uses them: LoRA adapters merged into the language model
  (PEFT's ``merge_and_unload``), the trained projector, the frozen tower, saved with the model class's
  own ``save_pretrained`` (safetensors), so ``AutoModelForImageTextToText.from_pretrained`` (or the
  family's class) loads it with no sentilens code. The dtype is the one the run was validated in
  (its ``precision``), float32 for runs that record none, so the scores are the predictor's.
- The processor (tokenizer, image processor) and the chat template the run was trained with
  (``chat_template.jinja``, also set as the tokenizer's), and the base folder's other small files
  (generation config, licence, ...) when the base is a local folder.
- ``README.md``: the prompt the run used (system text, the user turn, the answers and how labels are
  scored), how the image is fitted, how to serve the folder, and that serving engines apply no visual
  token pruning (the model then sees every visual token, as sentilens at r = 1).
- ``sentilens_prompt.json``: the same prompt for machines (the saved prompt settings, the full question,
  each label's answer text and token ids).

The folder is written beside ``--out`` under a temporary name and renamed into place at the end: a
failed export leaves nothing half-written, and an existing folder with files in it is never touched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from sentilens.errors import SentilensError
from sentilens.mllm.families import TITLES
from sentilens.mllm.prompt import label_text
from sentilens.outputs import atomic_write_text, name_problem, write_json
from sentilens.runs import CONFIG, load_config

PROMPT_FILE = "sentilens_prompt.json"
README = "README.md"
TEMPLATE_FILE = "chat_template.jinja"
POST = "{post}"
"""Where the post's text goes in the README's prompt."""

NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
NOT_COPIED_NAMES = {CONFIG, README, "chat_template.json", TEMPLATE_FILE, "model.safetensors.index.json",
                    "pytorch_model.bin.index.json", "SOURCE.md"}
"""Base-folder files an export does not copy: weights (the merged ones replace them), the config and chat
template (the run's replace them), the base's own README."""


DTYPES = ("float32", "bfloat16", "float16")


def export_run(run_dir: str | Path, out_dir: str | Path, dtype: str | None = None) -> dict:
    """Write the Hugging Face checkpoint of the MLLM run ``run_dir`` to the new folder ``out_dir``; returns
    what was written (``out``, ``files``, ``dtype``, ``model_class``, ``merged_lora``). ``dtype``: the weights'
    dtype (None: the one the run was validated in; another one halves a float32 export, and its scores then
    differ from the predictor's by that rounding)."""
    from sentilens.mllm.predictor import MllmPredictor, base_source

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config = load_config(run_dir)
    if config.get("family") != "mllm":
        raise SentilensError(f"export writes a Hugging Face vision-language checkpoint; this is a "
                             f"{config.get('family')} run, whose model has no transformers class", run_dir / CONFIG)
    if dtype is not None and dtype not in DTYPES:
        raise SentilensError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    _check_out(out_dir)
    predictor = MllmPredictor.from_run(run_dir, device="cpu")
    vlm, merged = _merged(predictor.model.net)
    if dtype is not None:
        vlm.to(getattr(torch, dtype))
    vlm.config.use_cache = True  # training switched it off; generation (serving) wants it
    builder = predictor.builder
    template = builder.chat_template
    processor = builder.processor
    processor.chat_template = template
    processor.tokenizer.chat_template = template
    base = base_source(run_dir, predictor.run_config.base_model)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name[:200]}.", suffix=".partial", dir=out_dir.parent))
    try:
        os.chmod(work, _folder_mode())
        vlm.save_pretrained(work)
        processor.save_pretrained(work)
        atomic_write_text(work / TEMPLATE_FILE, template)
        copied = _copy_base_files(Path(base), work)
        info = prompt_record(predictor)
        write_json(work / PROMPT_FILE, info)
        atomic_write_text(work / README, readme(predictor, info, type(vlm).__name__, str(vlm.dtype).split(".")[-1],
                                                merged, run_dir.name))
        _check_out(out_dir)  # again: something may have been put there while the export ran
        if out_dir.is_dir():
            out_dir.rmdir()  # empty: the finished folder takes its place
        os.rename(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {"out": str(out_dir), "files": sorted(p.name for p in out_dir.iterdir()), "copied": copied,
            "dtype": str(vlm.dtype).split(".")[-1], "model_class": type(vlm).__name__, "merged_lora": merged}


def _check_out(out_dir: Path) -> None:
    problem = name_problem(out_dir)
    if problem:
        raise SentilensError(problem, out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        what = "is not empty" if out_dir.is_dir() else "is a file"
        raise SentilensError(f"{what}: export writes a new folder; give another --out", out_dir)


def _folder_mode() -> int:
    """What ``mkdir`` would give a new folder (``mkdtemp`` makes it private)."""
    current = os.umask(0o022)
    os.umask(current)
    return 0o777 & ~current


def _merged(net) -> tuple[torch.nn.Module, bool]:
    """The plain transformers model of ``net``: LoRA adapters merged into the weights they adapt."""
    from peft import PeftModel

    if isinstance(net, PeftModel):
        return net.merge_and_unload(), True
    return net, False


def _copy_base_files(base: Path, out: Path) -> list[str]:
    """The base folder's small files the export did not write itself (generation config, licence, a video
    processor config...); nothing when the base is a Hugging Face id."""
    if not base.is_dir():
        return []
    copied = []
    for path in sorted(base.iterdir()):
        name = path.name
        if (not path.is_file() or name.startswith(".") or name in NOT_COPIED_NAMES
                or name.endswith(NOT_COPIED_SUFFIXES) or (out / name).exists()):
            continue
        shutil.copy2(path, out / name)
        copied.append(name)
    return copied


def prompt_record(predictor) -> dict:
    """The run's prompt for machines: settings, the full question, the conversation of a post with an image
    (``{post}`` standing for its text; a post without an image has no image part), each label's answer."""
    builder = predictor.builder
    tokenizer = builder.tokenizer
    end = tokenizer.convert_ids_to_tokens(builder.end_token_id)
    return {
        "labels": list(builder.labels),
        "model_family": builder.family.name,
        "base_model": predictor.run_config.training.get("base_model") or predictor.run_config.base_model,
        "prompt_settings": builder.settings.model_dump(mode="json", exclude={"chat_template"}),
        "system": builder.settings.system,
        "system_turn": builder.system_turn,
        "question": builder.question,
        "messages": builder.messages(POST, has_image=True),
        "answers": {label: {"text": builder.answer_prefix + label_text(label), "end_token": end,
                            "token_ids": builder.answer_ids[label]} for label in builder.labels},
        "image_aspect": builder.settings.image_aspect,
        "visual_tokens_per_image": builder.num_image_tokens,
    }


def readme(predictor, info: dict, model_class: str, dtype: str, merged: bool, run_name: str) -> str:
    """The exported folder's README: what the model is, its prompt, how to score and serve it."""
    from sentilens.mllm.inputs import pad_colour
    from sentilens.mllm.processor import CheckpointProcessor

    builder = predictor.builder
    settings = builder.settings
    family = builder.family
    title = TITLES.get(family.name, family.name)
    example = builder.render(POST, has_image=True)
    if settings.layout == "parts":
        user = ("the image, then the post's text and the question as two text parts (this run was trained "
                "before sentilens joined them; the template renders them as shown below)")
    else:
        user = "the image, then one text: the post's text, a newline, and the question"
    if not builder.system_turn:
        user += "; the template takes no system turn, so the system text opens the user's text"
    if settings.image_aspect == "pad":
        colour = pad_colour(builder.processor.image_processor)
        image = (f"padded to a square with the image processor's mean colour {tuple(colour)} (centred), then "
                 "given to the image processor")
    else:
        image = "given to the image processor as it is"
    answers = "\n".join(f"| `{label}` | `{a['text']}` then `{a['end_token']}` | {len(a['token_ids'])} |"
                        for label, a in info["answers"].items())
    shim = ""
    if isinstance(builder.processor, CheckpointProcessor):
        shim = ("\ntransformers' processor class of this family also needs a video processor (torchvision); "
                "without it,\nload `AutoTokenizer` and `AutoImageProcessor` from the folder, as sentilens does.")
    if predictor.run_config.weights is None:
        heading, weights = "prompted by sentilens", "never fine-tuned (a zero-shot run: the base checkpoint as it is)"
    else:
        heading = "fine-tuned by sentilens"
        weights = ("LoRA adapters merged into the language model" if merged
                   else f"{predictor.run_config.mode} fine-tuning") + ", the trained projector, the frozen vision tower"
    return f"""# {title} {heading} for {', '.join(builder.labels)}

Exported from the sentilens run `{run_name}` (`sentilens export`): base model `{info['base_model']}`
({title}, `{model_class}`), {weights}; weights in
`{dtype}`. A standard Hugging Face checkpoint: `AutoModelForImageTextToText.from_pretrained(folder)`
(or `{model_class}`) loads it with the tokenizer, image processor and chat template beside it.{shim}

## The prompt the run used

The chat template is `{TEMPLATE_FILE}` (the run's own; the tokenizer carries it too). Each post is one
conversation: {"a system turn with the system text, then " if builder.system_turn else ""}a user turn
with {user}. The assistant answers with the label's words and the end token.

- System text: `{settings.system}`
- Question: `{builder.question}`
- Image: {image}; one image becomes up to {builder.num_image_tokens} visual tokens, the processor widening
  the one `{builder.image_token}` placeholder of the prompt to them.
- The post's text: special-token strings typed in it (`{builder.image_token}`, `{builder.tokenizer.eos_token}`...) are
  written with a space after their `<`, so a post never adds an image or ends a turn; the prompt, image
  and answer fit in {settings.max_length} tokens, the post's text cut at a token boundary where they do not.

The prompt of a post with an image, `{POST}` standing for its text (a post without an image has no
image placeholder):

```text
{example}
```

| label | answer after the prompt | tokens |
|---|---|---|
{answers}

sentilens classifies by label scoring: each label's answer tokens (end token included) are scored
after the prompt, `log p(label) = sum of the answer tokens' log-probabilities`, and the label is the
argmax (the probabilities: the softmax over the labels). Greedy generation writes the same words when
the model is confident. `{PROMPT_FILE}` holds all of this for programs: the question, the system text,
each answer's text and token ids.

## Serving

Any engine that serves `{model_class}` serves this folder, for example `vllm serve <folder>`,
`python -m sglang.launch_server --model-path <folder>` or TGI's `--model-id <folder>`; send the
prompt above through the chat API (system text, then the image and the user text) and read the
generated label, or ask for the answer tokens' log-probabilities to score the labels as above.

**Token pruning is not applied.** No serving engine ships image-token pruning: the engine feeds the
language model every visual token of the image, which is sentilens at keep ratio r = 1. The speed-ups
and accuracies sentilens measured at lower keep ratios (`sentilens sweep`) hold only where sentilens
prunes (`sentilens predict --keep-ratio` or `sentilens serve` on the run itself).
"""
