"""A user's whole path on every released checkpoint folder under ``tests/data/checkpoints``, through the real CLI.

Each folder's real-layout checkpoint (``benchmarks/real_layout.py``: the released config, tokenizer, processor,
template, vocabulary, image size and tensor names, random weights narrowed to 64 wide with 2 LM and 2 tower layers)
goes through ``train mllm --model DIR --lora`` for two optimizer steps of four posts, then ``eval``,
``sweep --ratios 1,0.4``, ``predict``, ``explain`` and one ``serve`` request. The visual-token counts are checked
against a hand computation from the released config and preprocessor files (:data:`VISUAL_TOKENS`), and the
budget at r = 0.4 is ``ceil(0.4 N)``, the project's rounding (``pruning.select.keep_count``).

The one test at LLaVA-1.5's real widths (4096 wide, the 32,064-word vocabulary, the CLIP-L tower; 2 + 2 layers) is
marked slow: ``benchmarks/real_path.py`` runs the same sequence and records its time and memory.
"""

from __future__ import annotations

import base64
import json
import math

import pytest
from PIL import Image
from typer.testing import CliRunner

from mllm_helpers import small_manifest
from sentilens.cli import app
from sentilens.data.records import read_split
from test_real_layout import DATA, real_layout

runner = CliRunner()

SYNTH_SIDE = 128
"""The synthetic posts' square images (``data.synth.make_synthetic``'s default size)."""


def llava_next_tokens(side: int) -> int:
    """LLaVA-NeXT's any-resolution count for a ``side`` x ``side`` image, from the released preprocessor: the
    pinpoints (height, width) each fit the image without upscaling past it, so every one keeps the whole image and
    the least padded wins (336 x 672, the first of the two tied); its 24 x 48 patch grid is cut back to the image's
    square aspect (24 x 24) with one newline token a row, after the 24 x 24 base view."""
    grid = 336 // 14
    return grid * grid + grid * (grid + 1)


VISUAL_TOKENS = {
    # CLIP ViT-L/14 at 336 px: 24 x 24 patches, the CLS token dropped ("default" selection)
    "llava-1.5-7b-hf": (336 // 14) ** 2,
    "llava-v1.6-mistral-7b-hf": llava_next_tokens(SYNTH_SIDE),
    # Qwen2.5-VL: the side rounded to 28 px (patch 14 x merge 2): 140 px, 5 x 5 merged cells
    "Qwen2.5-VL-7B-Instruct": round(SYNTH_SIDE / 28) ** 2,
    # Qwen3-VL: at least 65,536 pixels (shortest_edge), so 128 px grows to 256, in 32-px cells (patch 16 x merge 2)
    "Qwen3-VL-4B-Instruct": (256 // 32) ** 2,
    # SmolVLM v1: the long side resized to 2048 (size.longest_edge), cut into 512-px tiles (4 x 4), plus the
    # whole image as a global tile; image_seq_len 64 tokens each
    "SmolVLM-256M-Instruct": (4 * 4 + 1) * 64,
}
FOLDERS = sorted(VISUAL_TOKENS)


def build_checkpoint(name: str, out, width: int | None = 64):
    """The folder's real-layout checkpoint (LLaVA-NeXT's copy has no config.json: its reconstructed one)."""
    config = DATA / name / "config.reconstructed.json"
    real_layout().build(DATA / name, out, layers=2, tower_layers=2, width=width, seed=0, check=False,
                        config=config if config.is_file() else None)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_manifest(tmp_path_factory.mktemp("real-path-data"), n_train=8, n_val=2, n_test=4)


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_every_released_folder_is_tested():
    assert sorted(p.name for p in DATA.iterdir() if p.is_dir()) == FOLDERS


@pytest.mark.slow
@pytest.mark.parametrize("name", FOLDERS)
def test_the_users_path_on_a_released_folder(tmp_path, data, name):
    checkpoint = build_checkpoint(name, tmp_path / "checkpoint")
    run = tmp_path / "run"
    invoke("train", "mllm", "--data", str(data), "--out", str(run), "--model", str(checkpoint), "--lora",
           "--lora-r", "8", "--epochs", "1", "--batch-size", "4", "--global-batch-size", "4", "--json")
    history = json.loads((run / "history.json").read_text())
    assert [s["step"] for s in history[0]["steps"]] == [1, 2] and math.isfinite(history[0]["train_loss"])
    config = json.loads((run / "config.json").read_text())
    assert config["base_model"] == str(checkpoint.resolve()) and config["mode"] == "lora"
    # the default prompt budget holds the largest image: LLaVA-NeXT's 2,928 visual tokens + 400 (default_max_length)
    assert config["prompt"]["max_length"] == (2928 + 400 if name == "llava-v1.6-mistral-7b-hf" else 2048)

    test = read_split(data, "test")
    with_image = sum(p.image is not None for p in test)
    n = VISUAL_TOKENS[name]
    metrics = json.loads(invoke("eval", "--run", str(run), "--data", str(data), "--json"))
    assert metrics["n"] == len(test) and 0 <= metrics["accuracy"] <= 1
    assert metrics["mean_kept_tokens"] == pytest.approx(n * with_image / len(test))

    invoke("sweep", "--run", str(run), "--data", str(data), "--ratios", "1,0.4", "--repeats", "1", "--json")
    rows = json.loads((run / "sweep.json").read_text())["rows"]
    assert [(r["ratio"], r["kept_tokens"]) for r in rows] == [(1.0, n), (0.4, math.ceil(0.4 * n))]
    assert rows[1]["gflops_per_post"] < rows[0]["gflops_per_post"]

    image = next(p.image for p in test if p.image)
    posts = tmp_path / "posts.jsonl"
    posts.write_text(json.dumps({"id": "a", "text": "what a day", "image": image}) + "\n"
                     + json.dumps({"id": "b", "text": "no picture"}) + "\n")
    predictions_file = tmp_path / "preds.jsonl"
    invoke("predict", "--run", str(run), "--input", str(posts), "--output", str(predictions_file),
           "--keep-ratio", "0.4")
    predictions = [json.loads(line) for line in predictions_file.read_text().splitlines()]
    assert [(p["id"], p["kept_tokens"]) for p in predictions] == [("a", math.ceil(0.4 * n)), ("b", 0)]
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-5 for p in predictions)

    heat = tmp_path / "heat.png"
    info = json.loads(invoke("explain", "--run", str(run), "--image", image, "--text", "hello", "--out", str(heat),
                             "--keep-ratio", "0.4", "--json"))
    assert 0 < info["kept_patches"] < info["patches"] and Image.open(heat).size[0] > 0

    from fastapi.testclient import TestClient

    from sentilens.serve.app import create_app

    with TestClient(create_app(run), base_url="http://127.0.0.1") as client:
        encoded = base64.b64encode((open(image, "rb")).read()).decode("ascii")
        answer = client.post("/v1/predict", json={"text": "what a day", "image": encoded, "keep_ratio": 0.4})
        assert answer.status_code == 200, answer.text
        served = answer.json()
    assert served["kept_tokens"] == math.ceil(0.4 * n)
    assert served["probabilities"] == pytest.approx(predictions[0]["probabilities"], abs=1e-5)


# --- LLaVA-1.5 at its real widths ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_llava(tmp_path_factory):
    """LLaVA-1.5's real-layout checkpoint at its released widths (4096 wide, vocabulary 32,064, CLIP-L/14-336),
    2 LM and 2 tower layers, in the release's float16; built once for the module."""
    return build_checkpoint("llava-1.5-7b-hf", tmp_path_factory.mktemp("real-width") / "llava-1.5", width=None)


@pytest.mark.slow
def test_llava15_at_real_widths_trains_evaluates_sweeps_and_predicts(tmp_path, real_llava, fresh_accelerate_state):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(real_llava)
    assert (config.text_config.hidden_size, config.text_config.vocab_size) == (4096, 32064)
    assert (config.vision_config.hidden_size, config.vision_config.image_size) == (1024, 336)
    # two posts of two labels, batch 1: two optimizer steps; no val split (training keeps its last epoch)
    data = small_manifest(tmp_path, n_train=2, n_val=0, n_test=2, mixed=True)
    run = tmp_path / "run"
    invoke("train", "mllm", "--data", str(data), "--out", str(run), "--model", str(real_llava), "--lora",
           "--epochs", "1", "--batch-size", "1", "--global-batch-size", "1", "--mixed-precision", "bf16", "--json")
    history = json.loads((run / "history.json").read_text())
    assert len(history[0]["steps"]) == 2 and all(math.isfinite(s["loss"]) for s in history[0]["steps"])
    saved = json.loads((run / "config.json").read_text())
    # LoRA under bf16 autocast: the frozen base held in bf16 (no float32 copy), what test and serving load too
    assert saved["precision"] == {"weights": "bfloat16", "autocast": "bfloat16"}
    from safetensors import safe_open

    with safe_open(run / "model.safetensors", "pt") as trained:
        dtypes = {name: trained.get_slice(name).get_dtype() for name in trained.keys()}
    assert {dtype for name, dtype in dtypes.items() if "lora_" in name} == {"F32"}  # the adapters: float32

    test = read_split(data, "test")
    assert [p.image is not None for p in test] == [True, False]
    metrics = json.loads(invoke("eval", "--run", str(run), "--data", str(data), "--json"))
    assert metrics["n"] == 2 and metrics["mean_kept_tokens"] == 576 / 2

    invoke("sweep", "--run", str(run), "--data", str(data), "--ratios", "1,0.4", "--repeats", "1", "--json")
    rows = json.loads((run / "sweep.json").read_text())["rows"]
    assert [(r["ratio"], r["kept_tokens"]) for r in rows] == [(1.0, 576), (0.4, 231)]  # ceil(0.4 x 576)

    result = json.loads(invoke("predict", "--run", str(run), "--image", test[0].image, "--text", test[0].text,
                               "--keep-ratio", "0.4", "--json"))
    assert result["kept_tokens"] == 231 and abs(sum(result["probabilities"].values()) - 1) < 1e-5
