"""SmolVLM's processor (the one processor shim with ``image_seq_len``) and the image layout text it writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sentilens.mllm.processor import CheckpointProcessor

FAKE = "<fake_token_around_image>"

GLOBAL = "<global-img>"

END_OF_UTTERANCE = "<end_of_utterance>"

TEXT, PAD = -1, -2
"""``span_tile`` values of a layout-text token and of padding past an image's span."""

MAX_GRID = 4
"""The tiny model's tokenizer has ``<row_i_col_j>`` tokens up to this grid (its images split into at most 2 x 2)."""


class SmolProcessor(CheckpointProcessor):
    """The checkpoint's tokenizer and image processor (:class:`~sentilens.mllm.processor.CheckpointProcessor`),
    and ``image_seq_len`` (tokens per tile, from ``processor_config.json``)."""

    def __init__(self, tokenizer, image_processor, image_seq_len: int, chat_template: str | None = None,
                 processor_class: str = "SmolVLMProcessor"):
        super().__init__(tokenizer, image_processor, chat_template)
        self.image_seq_len = image_seq_len
        # transformers' processor class of the checkpoint (SmolVLM v1's is Idefics3Processor), saved back as it was
        self.processor_class = processor_class
        self.image_token = "<image>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def from_pretrained(cls, source: str) -> SmolProcessor:
        import json

        tokenizer, image_processor, template = cls.load_parts(source)
        settings = Path(source) / "processor_config.json"
        saved = json.loads(settings.read_text(encoding="utf-8")) if settings.is_file() else {}
        return cls(tokenizer, image_processor, int(saved.get("image_seq_len", 169)), template,
                   saved.get("processor_class", "SmolVLMProcessor"))

    def save_pretrained(self, out_dir: str | Path) -> None:
        import json

        super().save_pretrained(out_dir)
        (Path(out_dir) / "processor_config.json").write_text(
            json.dumps({"processor_class": self.processor_class, "image_seq_len": self.image_seq_len}),
            encoding="utf-8")

    def image_prompt(self, rows: int, cols: int, counts: Sequence[int] | None = None) -> str:
        """The text an image becomes (transformers' ``get_image_prompt_string``), with ``counts[t]`` image
        tokens in tile ``t`` (row-major tiles, the global tile last; None: ``image_seq_len`` each)."""
        tiles = rows * cols + 1 if rows or cols else 1
        counts = list(counts) if counts is not None else [self.image_seq_len] * tiles
        image = self.image_token
        if not (rows or cols):
            return f"{FAKE}{GLOBAL}" + image * counts[0] + FAKE
        text = ""
        for r in range(rows):
            for c in range(cols):
                text += f"{FAKE}<row_{r + 1}_col_{c + 1}>" + image * counts[r * cols + c]
            text += "\n"
        return text + f"\n{FAKE}{GLOBAL}" + image * counts[-1] + FAKE
