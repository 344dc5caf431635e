"""Label scoring vs greedy generation: posts/s of the two ways to read a label from a fine-tuned LLaVA.

1. CPU, the tiny LLaVA (``--model tiny``: 96-px CLIP ViT, 36 visual tokens, 2-layer Llama) fine-tuned on
   the synthetic set, through ``predict_posts`` (the path ``eval``/``predict``/``serve`` use): posts/s
   at batch 1 and 16 for label scoring (one forward pass per batch) and greedy generation (KV cache,
   stops at the end token), their ratio, and how often the two agree.
2. GPU (only when CUDA is available): the LLaVA-1.5-7B architecture (CLIP ViT-L/14-336, 576 visual
   tokens, Llama-2-7B shape) with random weights in bf16; latency per post at batch 1 and 16. Random
   weights rarely write the end token, so generation is capped at the longest answer + 2 tokens, the
   same cap as with a trained model: its time is the time a trained model's full answer takes.

Usage: ``python benchmarks/mllm_scoring.py [--n 600] [--out benchmarks/results/mllm_scoring.json]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from sentilens.data.records import read_manifest
from sentilens.data.synth import make_synthetic
from sentilens.machine import cpu_name
from sentilens.mllm.predictor import MllmPredictor
from sentilens.mllm.prompt import PromptBuilder, PromptSettings
from sentilens.mllm.scoring import predict_posts
from sentilens.mllm.train import mllm_train_config, train_mllm
from sentilens.runs import write_json


def throughput(llava, builder: PromptBuilder, posts: list, batch_size: int, decode: str) -> tuple[float, list]:
    """(posts per second, predictions) after one warm-up batch."""
    predict_posts(llava, builder, posts[:batch_size], batch_size, decode=decode)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    predictions = predict_posts(llava, builder, posts, batch_size, decode=decode)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(posts) / (time.perf_counter() - start), predictions


def compare(llava, builder: PromptBuilder, posts: list, batch_sizes: tuple[int, ...]) -> dict:
    rows = {}
    for batch_size in batch_sizes:
        score_rate, scored = throughput(llava, builder, posts, batch_size, "score")
        generate_rate, generated = throughput(llava, builder, posts, batch_size, "generate")
        rows[f"batch_{batch_size}"] = {
            "score_posts_per_second": round(score_rate, 2),
            "generate_posts_per_second": round(generate_rate, 2),
            "score_ms_per_post": round(1000 / score_rate, 3),
            "generate_ms_per_post": round(1000 / generate_rate, 3),
            "score_over_generate_speed": round(score_rate / generate_rate, 3),
            "agreement": round(sum(a.label == b.label for a, b in zip(scored, generated, strict=True)) / len(posts), 4),
            "unparsable_generations": sum(not p.extra["parsed"] for p in generated),
        }
    return rows


def tiny_cpu(n: int, tmp: Path) -> dict:
    make_synthetic(tmp / "data", n=n, seed=0)
    options = {"data": tmp / "data", "out": tmp / "run", "base_model": "tiny", "epochs": 10, "lr": 5e-3,
               "batch_size": 8, "global_batch_size": 8, "eval_batch_size": 16}
    summary = train_mllm(mllm_train_config(options))
    predictor = MllmPredictor.from_run(tmp / "run", device="cpu")
    manifest = read_manifest(tmp / "data")
    posts = manifest["val"] + manifest["test"]
    return {
        "model": "tiny LLaVA (96 px CLIP ViT 3 layers, 36 visual tokens; Llama 2 layers x 64)",
        "trained": {"epochs": 10, "best_epoch": summary["best_epoch"], "val_accuracy": summary["val"]["accuracy"]},
        "posts": len(posts),
        **compare(predictor.model.vlm, predictor.builder, posts, (1, 16)),
    }


def llava15_7b_random(tmp: Path) -> dict:
    """The LLaVA-1.5-7B shape with random bf16 weights on the GPU; prompts tokenized by the tiny tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from sentilens.data.synth import LABELS
    from sentilens.mllm.families.llava.tiny import build_tiny
    from sentilens.mllm.model import load_checkpoint, num_image_tokens

    _, processor = load_checkpoint(build_tiny(tmp / "tokenizer"))
    size = {"height": 336, "width": 336}
    processor.image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=size)
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=576,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    with torch.device("cuda"):
        llava = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    builder = PromptBuilder(processor, PromptSettings(), LABELS, num_image_tokens(llava, processor))
    posts = read_manifest(tmp / "data")["test"][:64]
    return {"model": "LLaVA-1.5-7B architecture, random weights, bf16", "device": torch.cuda.get_device_name(),
            "posts": len(posts), "visual_tokens": builder.num_image_tokens, **compare(llava, builder, posts, (1, 16))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mllm_scoring.json")
    args = parser.parse_args()
    os.environ.setdefault("SENTILENS_QUIET", "1")
    torch.set_num_threads(1)  # tensors this small run fastest on one thread (and steadiest on a shared machine)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result = {
            "benchmark": "label scoring (one forward pass) vs greedy generation",
            "data": f"synthetic, n={args.n}, val + test posts",
            "cpu": tiny_cpu(args.n, tmp),
            "gpu": llava15_7b_random(tmp) if torch.cuda.is_available()
            else {"skipped": "no CUDA device on this machine: the LLaVA-1.5-7B part runs only on a GPU"},
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "load_average_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__,
                        "python": platform.python_version()},
        }
    write_json(args.out, result)
    print(f"written to {args.out}")
    for part in ("cpu", "gpu"):
        for key, row in result[part].items():
            if key.startswith("batch_"):
                print(f"{part} {key}: score {row['score_posts_per_second']} posts/s, generate "
                      f"{row['generate_posts_per_second']} posts/s ({row['score_over_generate_speed']}x), "
                      f"agreement {row['agreement']:.1%}")
    if "skipped" in result["gpu"]:
        print(f"gpu: skipped ({result['gpu']['skipped']})")


if __name__ == "__main__":
    main()
