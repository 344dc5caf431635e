"""Helpers of the MLLM tests: the tiny LLaVA saved and loaded back, small synthetic manifests, native HF inputs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from sentilens.cli import app
from sentilens.data.records import Post, read_manifest, read_split, write_manifest
from sentilens.data.synth import LABELS, make_synthetic
from sentilens.mllm.families.llava.tiny import build_tiny
from sentilens.mllm.model import num_image_tokens, prepare_model
from sentilens.mllm.prompt import PromptBuilder, PromptSettings

LONG_TEXT = " ".join(["what a long and winding story about the weather this week"] * 4)


FAST_TINY = {"base_model": "tiny", "tiny_vision": "random", "lr": 3e-3, "batch_size": 8, "global_batch_size": 8,
             "eval_batch_size": 8}
"""Training options of the tiny LLaVA in tests: a random model needs a large step and small batches. The
tower stays random (no pretraining first): these tests check the fine-tuning machinery, not the tower;
tests/test_mllm_tower.py and the demo test cover the pretrained one."""


def tiny_model(folder: Path, mode: str = "full", training: bool = False):
    """(MllmModel, PromptBuilder) of a freshly built tiny LLaVA, loaded through ``from_pretrained``."""
    if not (folder / "config.json").is_file():
        build_tiny(folder, corpus=["the sun is out and I love it", "another terrible storm"])
    model = prepare_model(folder, mode, training=training)
    builder = PromptBuilder(model.processor, PromptSettings(), LABELS, num_image_tokens(model.vlm, model.processor))
    return model, builder


def tiny_family_model(folder: Path, family: str):
    """(MllmModel, PromptBuilder) of a freshly built tiny model of ``family`` (``tiny:<family>``), loaded through
    ``from_pretrained``, prompts built for square-cropped images."""
    from sentilens.mllm.families import family_of, get_family

    get_family(family).build_tiny(folder, corpus=["the sun is out and I love it", "another terrible storm"])
    model = prepare_model(folder, training=False)
    builder = PromptBuilder(model.processor, PromptSettings(image_aspect="crop"), LABELS,
                            num_image_tokens(model.vlm, model.processor), family=family_of(model.vlm))
    return model, builder


def image_posts(folder: Path, specs, step: int, slope: int) -> list[Post]:
    """Three image posts (``specs``: ``(size, colour)`` each, with a dark block and a dotted line every ``step``
    pixels of slope ``slope`` so no two patches look alike) and a text-only post, third."""
    from PIL import Image

    paths = []
    for i, (size, colour) in enumerate(specs):
        img = Image.new("RGB", size, colour)
        img.paste((10, 10, 10), (0, 0, size[0] // 3, size[1] // 2))
        for x in range(0, size[0], step):
            img.putpixel((x, (x * slope) % size[1]), (255, 255, 255))
        paths.append(folder / f"{i}.png")
        img.save(paths[-1])
    return [Post("a", "sun and sea, love it", str(paths[0])),
            Post("b", "a much longer text about yet another storm ruining the whole weekend", str(paths[1])),
            Post("c", "text only", None), Post("d", "ok", str(paths[2]))]


def small_manifest(folder: Path, n_train: int = 32, n_val: int = 8, n_test: int = 8, mixed: bool = False) -> Path:
    """A manifest cut from the synthetic set (made once per folder); the test split also gets a long
    post and a text-only post. With ``n_val=0`` there is no val split, so training keeps its last epoch.
    ``mixed``: the training posts take the labels in turn, so even two posts are two labels."""
    source = folder / "synth"
    if not (source / "stats.json").is_file():
        make_synthetic(source, n=200, seed=3)
    full = read_manifest(source)
    if mixed:
        by_label = [[p for p in full["train"] if p.label == label] for label in LABELS]
        full["train"] = [post for group in zip(*by_label, strict=False) for post in group]
    test = full["test"][: n_test - 2]
    test.append(dataclasses.replace(full["test"][n_test - 2], id="long", text=LONG_TEXT))
    test.append(Post(id="text-only", text="worst day ever, everything went wrong", image=None, label="negative"))
    splits = {"train": full["train"][:n_train], "val": full["val"][:n_val], "test": test}
    out = folder / f"manifest-{n_train}-{n_val}-{n_test}{'-mixed' if mixed else ''}"
    write_manifest(out, splits, LABELS, source={"name": "synthetic subset"})
    return out


def train_tiny_mllm(data: Path, out: Path, epochs: int = 1, model: str = "tiny") -> Path:
    """A tiny-model run (``model``: ``tiny`` = the tiny LLaVA, or ``tiny:<family>``) trained on ``data`` into
    ``out`` with the tests' recipe (FAST_TINY)."""
    from sentilens.mllm.train import mllm_train_config, train_mllm

    train_mllm(mllm_train_config({"data": data, "out": out, **FAST_TINY, "base_model": model, "epochs": epochs}))
    return out


def sweep_every_method(runner, run: Path, data: Path, n: int) -> None:
    """``sweep --strategy every --ratios 1,0.4,0.2``: each registered method the family can run has its rows,
    with ceil(r n) visual tokens (an LM-stage method: all n up to its layer K, the budget after it); each one it
    cannot run is refused with a one-line reason."""
    from sentilens.mllm.pruning import parse_strategy, showcase_strategies

    result = runner.invoke(app, ["sweep", "--run", str(run), "--data", str(data), "--ratios", "1,0.4,0.2",
                                 "--strategy", "every", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    sweep = json.loads((run / "sweep.json").read_text())
    refused = sweep.get("refused_strategies", {})
    ran = {r["strategy"] for r in sweep["rows"]}
    assert ran | set(refused) == set(showcase_strategies()) and not ran & set(refused)
    assert all(reason and "\n" not in reason for reason in refused.values())
    for row in sweep["rows"]:
        budget = math.ceil(row["ratio"] * n)
        assert row["kept_tokens"] == budget, row
        if parse_strategy(row["strategy"]).stage == "lm":
            per_layer = row["kept_tokens_per_layer"]
            k = parse_strategy(row["strategy"]).lm_layer
            assert per_layer[:k + 1] == [n] * (k + 1) and set(per_layer[k + 1:]) <= {budget}


def eval_sweep_predict_explain(runner, run: Path, data: Path, tmp_path: Path) -> None:
    """The commands after ``train mllm`` on a tiny run of any family: eval at r = 0.4; sweep 1,0.4 (fewer kept
    tokens and FLOPs at 0.4); predict at r = 0.2 (ceil(0.2 N) tokens for the image post, 0 for the text-only
    one, N read off the unfiltered sweep row); explain at r = 0.3 (some patches kept, a heatmap written)."""
    result = runner.invoke(app, ["eval", "--run", str(run), "--data", str(data), "--keep-ratio", "0.4", "--json"])
    assert result.exit_code == 0, result.output
    assert 0 <= json.loads(result.stdout)["accuracy"] <= 1
    result = runner.invoke(app, ["sweep", "--run", str(run), "--data", str(data), "--ratios", "1,0.4",
                                 "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads((run / "sweep.json").read_text())["rows"]
    assert [r["ratio"] for r in rows] == [1.0, 0.4]
    assert rows[1]["kept_tokens"] < rows[0]["kept_tokens"]
    assert rows[1]["gflops_per_post"] < rows[0]["gflops_per_post"]
    image = next(p.image for p in read_split(data, "test") if p.image)
    n = rows[0]["kept_tokens"]  # an image's visual tokens, unfiltered (the synthetic images share one size)
    sweep_every_method(runner, run, data, n)
    posts = tmp_path / "posts.jsonl"
    posts.write_text(json.dumps({"id": "a", "text": "what a day", "image": image}) + "\n"
                     + json.dumps({"id": "b", "text": "no picture"}) + "\n")
    predictions_file = tmp_path / "preds.jsonl"
    result = runner.invoke(app, ["predict", "--run", str(run), "--input", str(posts), "--output",
                                 str(predictions_file), "--keep-ratio", "0.2"])
    assert result.exit_code == 0, result.output
    predictions = [json.loads(line) for line in predictions_file.read_text().splitlines()]
    assert [p["id"] for p in predictions] == ["a", "b"]
    assert [p["kept_tokens"] for p in predictions] == [math.ceil(0.2 * n), 0]
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-5 for p in predictions)
    out = tmp_path / "heat.png"
    result = runner.invoke(app, ["explain", "--run", str(run), "--image", image, "--text", "hello", "--out", str(out),
                                 "--keep-ratio", "0.3", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert 0 < info["kept_patches"] < info["patches"] and out.is_file()


def interrupt_after_first_epoch(monkeypatch, options: dict, out: Path) -> None:
    """Train an MLLM run into ``out`` and stop it by a KeyboardInterrupt as its second epoch starts: the resume
    state then records one epoch done (what ``--resume`` picks up)."""
    import pytest

    from sentilens.mllm import train as train_module
    from sentilens.mllm.train import mllm_train_config, train_mllm

    original = train_module._train_epoch

    def interrupted(*args):
        if args[-1] == 1:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(train_module, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_mllm(mllm_train_config({**options, "out": out}))
    assert json.loads((out / "resume" / "state.json").read_text())["epochs_done"] == 1
    monkeypatch.setattr(train_module, "_train_epoch", original)


def plain_probabilities(folder, text: str, image_path) -> dict[str, float]:
    """Label probabilities of one post by plain transformers from an exported folder alone (``sentilens export``):
    its ``sentilens_prompt.json`` (the conversation, the answers), chat template, tokenizer and image processor,
    and the model class's own forward on the prompt followed by each answer. No sentilens code."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    info = json.loads((folder / "sentilens_prompt.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = json.loads(json.dumps(info["messages"]).replace("{post}", text))
    if image_path is None:
        messages[-1]["content"] = [part for part in messages[-1]["content"] if part["type"] != "image"]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                           chat_template=(folder / "chat_template.jinja").read_text())
    bos = tokenizer.bos_token
    ids = tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]
    extra = {}
    if image_path is not None:
        image_processor = AutoImageProcessor.from_pretrained(folder)
        pixels = image_processor(Image.open(image_path).convert("RGB"), return_tensors="pt")
        extra["pixel_values"] = pixels["pixel_values"]
        config = model.config
        image_id = config.image_token_id
        if "image_grid_thw" in pixels:  # Qwen: one pad token per merged 2 x 2 patch cell
            extra["image_grid_thw"] = pixels["image_grid_thw"]
            count = int(pixels["image_grid_thw"].prod()) // image_processor.merge_size ** 2
        else:  # LLaVA: one token per patch
            vision = config.vision_config
            count = (vision.image_size // vision.patch_size) ** 2
        at = ids.index(image_id)
        ids = ids[:at] + [image_id] * count + ids[at + 1:]
    scores = []
    with torch.no_grad():
        for label in info["labels"]:
            answer = info["answers"][label]
            whole = tokenizer(prompt + answer["text"], add_special_tokens=not (bos and prompt.startswith(bos)))
            words = whole["input_ids"][len(tokenizer(prompt, add_special_tokens=not (
                bos and prompt.startswith(bos)))["input_ids"]):]
            tokens = words + [tokenizer.convert_tokens_to_ids(answer["end_token"])]
            assert tokens == answer["token_ids"]  # the README's answer text tokenizes to what sentilens scores
            full = torch.tensor([ids + tokens])
            kwargs = dict(extra)
            if "image_grid_thw" in extra:
                kwargs["mm_token_type_ids"] = (full == model.config.image_token_id).int()
            logits = model(input_ids=full, **kwargs).logits[0].float()
            log_probs = logits[len(ids) - 1:-1].log_softmax(-1)
            scores.append(log_probs.gather(-1, torch.tensor(tokens)[:, None]).sum())
    probabilities = torch.stack(scores).softmax(-1)
    return dict(zip(info["labels"], probabilities.tolist(), strict=True))
