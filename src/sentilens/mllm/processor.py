"""The one processor shim of the families whose transformers processor cannot be used as it is.

transformers' Qwen-VL processors require a video processor (which needs torchvision) and SmolVLM's
processor fixes its image layout text itself; posts have no video and the families build their own
image prompts, so :class:`CheckpointProcessor` holds the checkpoint's own tokenizer (with its chat
template) and its own image processor, each loaded with ``from_pretrained``, and renders prompts
through the tokenizer. A family subclasses it for what it adds (its image token, its settings).
"""

from __future__ import annotations

import json
from pathlib import Path


def chat_template_of(source: str) -> str | None:
    """The checkpoint's processor-level chat template (``chat_template.jinja``, or ``chat_template.json`` as
    Qwen2.5-VL's releases ship it), from the folder or the Hugging Face cache; None if it has none."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(source, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        if path:
            text = Path(path).read_text(encoding="utf-8")
            return text if name.endswith(".jinja") else json.loads(text).get("chat_template")
    return None


class CheckpointProcessor:
    """The checkpoint's tokenizer (chat template inside) and image processor: what prompts and pixels need."""

    default_image_token = "<image>"
    """The image placeholder when the tokenizer names none."""

    def __init__(self, tokenizer, image_processor, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token = getattr(tokenizer, "image_token", None) or self.default_image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def load_parts(cls, source: str) -> tuple:
        """(tokenizer, image processor, chat template) of a checkpoint."""
        from transformers import AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
        image_processor = AutoImageProcessor.from_pretrained(source)
        return tokenizer, image_processor, getattr(tokenizer, "chat_template", None) or chat_template_of(source)

    @classmethod
    def from_pretrained(cls, source: str):
        return cls(*cls.load_parts(source))

    def save_pretrained(self, out_dir: str | Path) -> None:
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)
        if self.chat_template and self.chat_template != getattr(self.tokenizer, "chat_template", None):
            (Path(out_dir) / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")

    def apply_chat_template(self, messages, chat_template: str | None = None, add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs):
        return self.tokenizer.apply_chat_template(messages, chat_template=chat_template or self.chat_template,
                                                  add_generation_prompt=add_generation_prompt, tokenize=tokenize,
                                                  **kwargs)
