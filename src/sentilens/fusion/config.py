"""The fusion run's configuration: encoders, prompt, variant, head sizes and training recipe.

One pydantic model is saved as the run's ``config.json`` and is enough to rebuild the model
(design.md, "Run directory"). Defaults follow the fusion paper's Section 4 (AdamW, lr 1e-3,
batch 32, dropout 0.5, cross-entropy); where the paper is silent (hidden width, capsule count,
epochs, text fine-tuning rate) the choice and its reason sit next to the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sentilens.errors import SentilensError
from sentilens.recipes import read_recipe, with_options
from sentilens.validation import fusion_footprint, memory_problem, pydantic_error

Variant = Literal["probe", "text", "image", "concat", "attention", "full"]
VARIANTS: tuple[str, ...] = ("probe", "text", "image", "concat", "attention", "full")

MAX_WIDTH = 65536
"""Largest feature or hidden width (the widest released encoders are 16384 wide); memory bounds it further."""

VARIANT_DESCRIPTIONS = {
    "probe": "baseline: logistic regression (C chosen on val) on the frozen pooled features",
    "text": "text only: prompted LM branch, attention over its tokens",
    "image": "image only: CNN branch, attention over its regions",
    "concat": "both pooled vectors side by side, no attention, no routing",
    "attention": "contextual cross-modal attention, no dynamic routing",
    "full": "contextual attention + dynamic routing (the paper's model)",
}

EMBEDDED_TEXT = "all-MiniLM-L6-v2"
EMBEDDED_IMAGE = "efficientnet-lite0"

AUTO_PROMPT = "auto"
PROMPTS = {
    "none": "{text}",
    "sentiment": 'Social media post: "{text}"\nThe feelings and the sentiment this post expresses are',
    "informative": ('Tweet written during a natural disaster: "{text}"\n'
                    "Does it report damage, casualties, needs or rescue, and how urgent is it? The tweet is"),
}
"""Named prompt templates. The paper does not publish its prompts (its Section 3.1 only says they
are "sentiment-relevant"), so these ask for the same things: the post's sentiment, and for
CrisisMMD its urgency and crisis content. ``none`` is the paper's "simple GPT" ablation row.
The template ends open so a causal LM's last token summarises the answer it is about to give.

``auto`` (the default) is ``sentiment`` for a causal LM and ``none`` for a bidirectional sentence
encoder: the paper prompts a GPT, whose last token must be steered to the question, while a
sentence encoder such as all-MiniLM-L6-v2 was trained to embed bare sentences and mean-pools all
tokens, so a wrapper only dilutes the post (measured in the README's real-text table)."""


def resolve_prompt(prompt: str) -> str | None:
    """The template of a named prompt, ``prompt`` itself when it is a template with ``{text}``, or
    ``None`` for ``auto`` (the text encoder picks, knowing whether it is a causal LM)."""
    if prompt == AUTO_PROMPT:
        return None
    if prompt in PROMPTS:
        return PROMPTS[prompt]
    if "{text}" not in prompt:
        raise SentilensError(f"prompt '{prompt}' is neither a known name ({', '.join([AUTO_PROMPT, *PROMPTS])}) "
                             "nor a template containing {text}")
    return prompt


class FusionConfig(BaseModel):
    """Everything a fusion run needs to be rebuilt; saved as ``config.json`` with ``family: fusion``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    family: Literal["fusion"] = "fusion"
    variant: Variant = "full"
    text_encoder: str = EMBEDDED_TEXT
    image_encoder: str = EMBEDDED_IMAGE
    prompt: str = AUTO_PROMPT
    max_text_tokens: int = Field(64, ge=8, le=8192)
    """Tweets are short: 99 % of MVSA-Multiple / HFM posts fit in 50 / 60 MiniLM tokens."""
    image_size: int = Field(224, ge=32, le=1024)
    """Square side images are resized to; at most 1024 (4.7x the CNNs' 224): 100000 was accepted and the OOM
    killer ended the run (a batch of 32 would need 3.8 TB)."""
    fine_tune_text: bool = False
    text_top_layers: int = Field(0, ge=0, le=1024)
    """Train the top N layers of the text encoder (0: none), on the cached output of the frozen layers below:
    most of what fine-tuning the whole encoder gains, at the cost of N layers instead of all of them."""
    text_top_lr: float = Field(1e-4, gt=0.0)
    """Learning rate of the trained top text layers: above ``text_lr``, as only a few layers move, from a
    head that starts untrained."""
    fine_tune_image: bool = False
    """Train the CNN too (the paper trains end to end); its features are then computed live, not cached."""
    text_dim: int | None = Field(None, ge=1, le=MAX_WIDTH)
    image_dim: int | None = Field(None, ge=1, le=MAX_WIDTH)
    hidden: int = Field(256, ge=8, le=MAX_WIDTH)
    """Common width of both modalities after projection; the paper only says features are aligned."""
    capsules: int = Field(4, ge=1, le=256)
    """Output capsules of the routing layer = steps of the RNN; as many as the input capsules."""
    routing_iterations: int = Field(3, ge=1, le=100)
    """Routing-by-agreement iterations, 3 as in Sabour et al. (2017) whose routing the paper cites."""
    rnn: Literal["gru", "lstm"] = "gru"
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    lr: float = Field(1e-3, gt=0.0)
    text_lr: float = Field(2e-5, gt=0.0)
    """Learning rate of the text encoder when it is fine-tuned: 1e-3 would wreck a pretrained LM."""
    image_lr: float = Field(1e-4, gt=0.0)
    """Learning rate of the image CNN when it is fine-tuned: the usual rate for fine-tuning an ImageNet
    CNN with AdamW, between the head's 1e-3 and the LM's 2e-5 (the paper gives one rate, 1e-3, for all)."""
    weight_decay: float = Field(0.01, ge=0.0)
    batch_size: int = Field(32, ge=1, le=65536)
    epochs: int = Field(20, ge=1, le=100_000)
    """The paper trains "100 iterations"; on frozen cached features the head converges well before."""
    patience: int | None = Field(None, ge=1, le=100_000)
    """Early stopping: end training once validation weighted F1 has not improved for this many epochs
    (the best epoch's weights are kept either way)."""
    class_weight: Literal["none", "balanced"] = "none"
    """``balanced`` weighs each label's loss by n / (labels x its count) in the training split, so rare
    labels weigh as much as common ones (raises macro F1 at some cost in weighted F1 on skewed sets)."""
    tune_decision: bool = False
    """After training, choose per-label offsets on the head's logits for the best validation weighted F1
    (:mod:`sentilens.decision`), instead of predicting the most probable label."""
    decision_offsets: list[float] | None = None
    """The offsets chosen (one per label, in ``labels``' order), written by training; ``None``: plain argmax."""
    seed: int = 0
    labels: list[str] = Field(default_factory=list)

    @field_validator("prompt")
    @classmethod
    def _known_prompt(cls, value: str) -> str:
        resolve_prompt(value)
        return value

    @model_validator(mode="after")
    def _probe_reads_frozen_features(self) -> FusionConfig:
        if self.variant == "probe" and (self.fine_tune_text or self.fine_tune_image or self.text_top_layers):
            raise ValueError("the probe is a logistic regression on frozen features: it cannot fine-tune an encoder")
        if self.text_top_layers and self.fine_tune_text:
            raise ValueError("text_top_layers trains the top layers of a frozen encoder; fine_tune_text trains all of "
                             "them: choose one")
        if self.text_top_layers and not self.uses_text:
            raise ValueError(f"text_top_layers: the {self.variant} variant reads no text")
        if self.decision_offsets is not None and len(self.decision_offsets) != len(self.labels):
            raise ValueError(f"decision_offsets has {len(self.decision_offsets)} values for {len(self.labels)} labels")
        return self

    @model_validator(mode="after")
    def _fits_in_memory(self) -> FusionConfig:
        # Checked on the config alone, so a run or recipe too large for this machine is refused before any
        # tensor is made; the encoders' widths are not known before they load (1024 stands in for them).
        params, activations = fusion_footprint(self.hidden, self.capsules, self.text_dim or 1024,
                                               self.image_dim or 1024, self.batch_size, self.variant == "full")
        needed = 4 * (4 * params + activations)  # float32 weights, gradients and AdamW's two moments
        problem = memory_problem(needed, f"training hidden {self.hidden} x capsules {self.capsules} x batch_size "
                                         f"{self.batch_size}")
        if problem:
            raise ValueError(problem)
        return self

    @property
    def prompt_template(self) -> str | None:
        return resolve_prompt(self.prompt)

    @property
    def feature_dims(self) -> tuple[int, int]:
        """(text, image) feature sizes the head reads; 1 stands for a modality the variant ignores."""
        return self.text_dim or 1, self.image_dim or 1

    @property
    def uses_text(self) -> bool:
        return self.variant != "image"

    @property
    def uses_image(self) -> bool:
        return self.variant != "text"


def load_recipe(path: str | Path) -> dict:
    """The fields of a YAML recipe (e.g. ``configs/fusion_crisismmd.yaml``), validated."""
    fields = read_recipe(path)
    fields.pop("family", None)
    try:
        FusionConfig(**fields)
    except ValidationError as err:
        raise pydantic_error(err, path) from None
    return fields


def parse_fusion_config(fields: dict, path: Path | None = None) -> FusionConfig:
    try:
        return FusionConfig(**fields)
    except ValidationError as err:
        raise pydantic_error(err, path) from None


def recipe_config(recipe: str | Path | None, overrides: dict) -> FusionConfig:
    """A config from an optional YAML recipe, with the options a user gave (non-``None``) on top."""
    fields = with_options(load_recipe(recipe) if recipe is not None else {}, overrides)
    return parse_fusion_config(fields, None if recipe is None else Path(recipe))


def describe_run(config: dict, run_dir: Path | None = None) -> dict:
    """The fusion run's self-description (the predictor's ``describe()``), from its ``config.json`` alone."""
    from sentilens.predict import config_summary

    settings = parse_fusion_config(config, None if run_dir is None else run_dir / "config.json")
    return {
        "family": settings.family,
        "labels": list(settings.labels),
        "base_model": f"{settings.text_encoder} + {settings.image_encoder}",
        "description": f"fusion {settings.variant} ({settings.image_encoder} + {settings.text_encoder}, "
                       f"prompt {settings.prompt})",
        "config": config_summary(settings.model_dump()),
    }
