"""Helpers of the fusion tests: tiny HF models saved to disk and loaded back through from_pretrained,
small manifests, and counters of encoder calls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sentilens.data.records import SPLITS, Post, read_manifest, read_stats, write_manifest
from sentilens.fusion.encoders import ImageEncoder, TextEncoder

WORDS = "great day love happy best perfect worst hate awful sad terrible ugh photo at the cup box chair book lamp"


def save_tiny_gpt2(folder: Path) -> Path:
    """A 2-layer GPT-2 with a byte-level BPE tokenizer that, like GPT-2's, has no padding token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([WORDS] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                        bos_token_id=eos, eos_token_id=eos)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def save_tiny_resnet(folder: Path) -> Path:
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_channels=3)).save_pretrained(
        folder)
    return folder


def subset_manifest(src: Path, dst: Path, per_split: dict[str, int] | None = None, drop_images: bool = False) -> Path:
    """A copy of manifest ``src`` with the first posts of each split, optionally with every image removed."""
    splits = read_manifest(src)
    chosen = {}
    for split in SPLITS:
        posts = splits[split][: per_split[split]] if per_split else splits[split]
        chosen[split] = [Post(p.id, p.text, None if drop_images else p.image, p.label, p.meta) for p in posts]
    write_manifest(dst, chosen, read_stats(src)["labels"])
    return dst


class EncoderCalls:
    """Counts the posts each encoder class is asked to encode (patched at class level)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.text = 0
        self.image = 0
        text_encode, image_encode = TextEncoder.encode, ImageEncoder.encode

        def count_text(encoder, texts):
            self.text += len(texts)
            return text_encode(encoder, texts)

        def count_image(encoder, images):
            self.image += len(images)
            return image_encode(encoder, images)

        monkeypatch.setattr(TextEncoder, "encode", count_text)
        monkeypatch.setattr(ImageEncoder, "encode", count_image)
