"""Loading a vision-language model for fine-tuning: a checkpoint of any supported model family
(:mod:`sentilens.mllm.families`: LLaVA-1.5's ``LlavaForConditionalGeneration``, ...), frozen vision
tower, trainable projector + language model (the paper's "Training Setup"), LoRA/QLoRA, and the
tiny LLaVA-1.5.

- A checkpoint is an HF id (``llava-hf/llava-1.5-7b-hf``, the paper's model) or a local folder,
  loaded with its processor by ``from_pretrained`` / ``AutoProcessor``; its config's ``model_type``
  picks the family (anything else is refused, naming the supported classes).
- Modes: ``full`` (the paper: projector + whole language model trained), ``lora`` (LoRA on the
  language model's attention and MLP projections, projector trained fully; our choice of
  LLaVA-1.5's own LoRA recipe, r=128, alpha=256), ``qlora`` (the same on a 4-bit NF4 base via
  bitsandbytes; CUDA only). The vision tower never trains: ``requires_grad`` off and eval mode.
- Precision: float32 on CPU. On CUDA, full fine-tuning keeps float32 weights and trains under
  bf16 autocast (bf16 weights would round away most 2e-5 updates); LoRA loads the frozen base
  in bf16 and keeps adapters in float32, and so does LoRA on a CPU under ``--mixed-precision bf16``
  (``train.lora_base_dtype``). Evaluation (val in training, then test and serving)
  runs in the numerics training validated in: the run saves them (``precision``: weights dtype
  and autocast) and the predictor loads and predicts the same way; a run without that record
  is predicted in bf16 on CUDA.
- The tiny models' shared parts (:class:`TinySpec`, :func:`tiny_tokenizer`, :func:`tiny_vision_config`,
  :func:`tiny_text_config`, :func:`byte_level_bpe`): each family's ``tiny.py`` builds its small random
  checkpoint from them (the tiny LLaVA-1.5: :func:`sentilens.mllm.families.llava.tiny.build_tiny`),
  saved with ``save_pretrained`` and loaded back through the same path as a real checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from sentilens.errors import SentilensError
from sentilens.mllm.families import family_for_config, family_of
from sentilens.mllm.inputs import MllmBatch, Reducer, build_inputs, language_model_hidden
from sentilens.mllm.prompt import LLAVA15_SYSTEM, TASK_QUESTIONS
from sentilens.validation import check_base_config

Mode = Literal["full", "lora", "qlora"]
LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSettings(BaseModel):
    """LoRA on the language model's linear projections (LLaVA-1.5's LoRA recipe by default)."""

    r: int = Field(128, gt=0, le=65536)
    alpha: int = Field(256, gt=0, le=1 << 20)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(LM_PROJECTIONS))


class TinySpec(BaseModel):
    """Shapes of the tiny random LLaVA (a 96-px image is 6 x 6 = 36 patches + CLS).

    Bounded so that a tiny model stays tiny: the widest spec weighs about 1 GB and an image is at most
    4,096 patches (a recipe's 100,000-px image would have written a 10 GB checkpoint)."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(96, ge=16, le=1024)
    patch_size: int = Field(16, ge=2, le=256)
    vision_hidden: int = Field(64, ge=8, le=1024)
    vision_layers: int = Field(3, ge=2, le=24)
    vision_heads: int = Field(4, ge=1, le=64)
    text_hidden: int = Field(64, ge=8, le=2048)
    text_layers: int = Field(2, ge=1, le=24)
    text_heads: int = Field(4, ge=1, le=64)
    text_kv_heads: int = Field(2, ge=1, le=64)
    vocab_size: int = Field(1024, ge=300, le=65536)
    """At least the byte alphabet (256) and the special tokens."""

    @model_validator(mode="after")
    def _buildable(self) -> TinySpec:
        if self.patch_size > self.image_size or (self.image_size // self.patch_size) ** 2 > 4096:
            raise ValueError(f"image_size {self.image_size} / patch_size {self.patch_size}: an image must be 1 to "
                             "4096 patches")
        for width, heads in (("vision_hidden", "vision_heads"), ("text_hidden", "text_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"{width} {getattr(self, width)} is not a multiple of {heads} {getattr(self, heads)}")
        if self.text_heads % self.text_kv_heads:
            raise ValueError(f"text_heads {self.text_heads} is not a multiple of text_kv_heads {self.text_kv_heads}")
        return self


TINY_FEATURE_LAYER = -2
"""The tower hidden state the tiny LLaVA projects: the second-to-last, as LLaVA-1.5 reads CLIP."""


def tiny_vision_config(spec: TinySpec):
    """The tiny LLaVA's CLIP vision tower: a ViT with a CLS token, ``(image_size / patch_size)^2`` patches."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
                            num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                            image_size=spec.image_size, patch_size=spec.patch_size,
                            projection_dim=spec.vision_hidden)


def tiny_image_processor(spec: TinySpec):
    """CLIP preprocessing at the tiny tower's size: shortest edge resized, centre crop, CLIP mean/std."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = spec.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def byte_level_bpe(vocab_size: int, specials: Sequence[str], texts: Iterable[str]):
    """A byte-level BPE (``tokenizers.Tokenizer``) trained offline on ``texts``: it encodes any text, since
    every byte is in its alphabet; the tiny models of every family build their tokenizers on it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(texts), trainer)
    return bpe


def tiny_tokenizer(spec: TinySpec, corpus: Iterable[str] = (), instructions: Iterable[str] = (),
                   extra_specials: dict[str, str] | None = None, more_specials: Iterable[str] = ()):
    """A byte-level BPE tokenizer trained offline on the instruction strings plus ``corpus``, so it encodes
    any text; ``<s>`` is prepended like Llama's tokenizer does, ``<image>`` is its image token.
    ``extra_specials`` (name -> token) and ``more_specials`` add special tokens a family's processor needs."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    named = {"image_token": "<image>", **(extra_specials or {})}
    specials = list(dict.fromkeys(["<s>", "</s>", "<pad>", *named.values(), *more_specials]))
    base = [LLAVA15_SYSTEM, *TASK_QUESTIONS.values(), "USER: ASSISTANT: Answer with one of:",
            "positive neutral negative informative not informative"]
    bpe = byte_level_bpe(spec.vocab_size, specials, [*base, *instructions, *corpus])
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens=named, model_max_length=4096)


def tiny_text_config(spec: TinySpec, tokenizer):
    """The tiny models' language model: a small Llama over ``tokenizer``'s vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=2 * spec.text_hidden,
                       num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                       num_key_value_heads=spec.text_kv_heads, max_position_embeddings=4096,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)


def load_pretrained_tower(model_tower, vision, vision_tower: str | Path) -> None:
    """Copy a saved ``CLIPVisionModel`` of ``vision``'s shape (:mod:`sentilens.mllm.tower`) into ``model_tower``."""
    from transformers import CLIPVisionModel

    pretrained = CLIPVisionModel.from_pretrained(str(vision_tower), use_safetensors=True)
    shape = ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
             "intermediate_size")
    differs = [k for k in shape if getattr(vision, k) != getattr(pretrained.config, k, None)]
    if differs:
        raise SentilensError(f"the pretrained vision tower does not have the tiny model's shape "
                             f"({', '.join(differs)} differ)", vision_tower)
    model_tower.load_state_dict(pretrained.state_dict())


def load_checkpoint(source: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    four_bit: bool = False):
    """(model, processor) from an HF id or a local folder; the model's class is its family's."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = str(source)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise SentilensError(f"cannot load the model '{source}': {str(err).splitlines()[0]}") from None
    family = family_for_config(config, source)
    check_base_config(config.to_dict(), Path(source) / "config.json" if Path(source).is_dir() else source,
                      bytes_per_param=0.5 if four_bit else dtype.itemsize)
    kwargs: dict = {"dtype": dtype}
    if four_bit:
        kwargs.update(quantization_config=_four_bit_config(family.unquantized_modules),
                      device_map={"": torch.device(device)})
    try:
        processor = family.load_processor(source)
        # safetensors only: a checkpoint whose weights exist only as a pickle (pytorch_model.bin) is refused,
        # never unpickled (a pickle can run code when loaded).
        vlm = family.model_class(config).from_pretrained(source, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as err:
        raise SentilensError(f"cannot load the model '{source}': {str(err).splitlines()[0]}") from None
    if not four_bit:
        vlm.to(device)
    if not hasattr(processor, "image_token") or not hasattr(processor, "image_processor"):
        raise SentilensError(f"'{source}' has no {family.hf_class} processor (image processor + tokenizer with an "
                             "image token)")
    return vlm, processor


def _four_bit_config(unquantized: tuple[str, ...]):
    if not torch.cuda.is_available():
        raise SentilensError("QLoRA needs a CUDA GPU (bitsandbytes 4-bit); use --lora or full fine-tuning on CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SentilensError("QLoRA needs bitsandbytes: pip install 'sentilens[gpu]'") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16,
                              llm_int8_skip_modules=list(unquantized))


def num_image_tokens(model, processor) -> int:
    """Visual tokens one image becomes before filtering, by the model's family (the largest count where it
    depends on the image)."""
    return family_of(model).num_image_tokens(model, processor)


def llava_image_tokens(vlm, processor) -> int:
    """LLaVA-1.5: visual tokens one image becomes before filtering (576 at 336 px)."""
    vision = vlm.config.vision_config
    extra = 1 if "clip" in vision.model_type else int(getattr(processor, "num_additional_image_tokens", 0))
    tokens = (vision.image_size // vision.patch_size) ** 2 + extra  # CLIP towers prepend a CLS token
    return tokens - (1 if vlm.config.vision_feature_select_strategy == "default" else 0)


class MllmModel(nn.Module):
    """A LLaVA (possibly with LoRA adapters) whose ``forward`` is the label-only training loss.

    Everything a training step touches runs inside ``forward``, so DDP and DeepSpeed wrap one module.
    """

    def __init__(self, net: nn.Module, processor, mode: Mode):
        super().__init__()
        self.net = net
        self.processor = processor
        self.mode = mode
        self.reducer: Reducer | None = None  # visual-token filter in training (--train-keep-ratio); None: all tokens
        self.token_dropout: Reducer | None = None  # training only (--token-dropout): mllm.token_dropout

    @property
    def vlm(self):
        """The underlying vision-language model (``LlavaForConditionalGeneration``,
        ``Qwen3VLForConditionalGeneration``...; LoRA layers live inside it)."""
        from peft import PeftModel

        return self.net.get_base_model() if isinstance(self.net, PeftModel) else self.net

    def train(self, mode: bool = True) -> MllmModel:
        super().train(mode)
        family_of(self.vlm).vision_tower(self.vlm).eval()
        return self

    def forward(self, batch: MllmBatch) -> Tensor:
        """Mean cross-entropy of the answer tokens (Eq. 1's label likelihood), other targets ignored."""
        vlm = self.vlm
        reducer = self.token_dropout if self.training and self.token_dropout is not None else self.reducer
        inputs = build_inputs(vlm, batch, reducer=reducer, padding_side="right")
        hidden = language_model_hidden(vlm, inputs, use_cache=False).last_hidden_state
        targets = inputs.targets[:, 1:]
        scored = targets != -100
        logits = vlm.lm_head(hidden[:, :-1][scored]).float()
        loss = nn.functional.cross_entropy(logits, targets[scored])
        if batch.pixel_values is None:
            # a text-only batch leaves the projector out of the graph; DDP needs every trainable parameter in it
            loss = loss + 0.0 * sum(p.sum() for p in family_of(vlm).projector(vlm).parameters())
        return loss

    def trainable_state(self) -> dict[str, Tensor]:
        """Every trainable tensor by name: projector + language model (full), projector + adapters (LoRA)."""
        return {name: p for name, p in self.net.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, Tensor], source: str | Path = "") -> None:
        params = dict(self.net.named_parameters())
        expected = {name for name, p in params.items() if p.requires_grad}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise SentilensError(f"weights do not match the model (missing {missing[:3]}, unexpected {extra[:3]})",
                                 source or None)
        wrong = [f"{name} {tuple(tensor.shape)} (the model has {tuple(params[name].shape)})"
                 for name, tensor in state.items() if tensor.shape != params[name].shape]
        if wrong:
            raise SentilensError(f"weights do not match the model: {len(wrong)} tensors have another shape, e.g. "
                                 f"{wrong[0]}", source or None)
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def prepare_model(source: str | Path, mode: Mode = "full", lora: LoraSettings | None = None,
                  device: str | torch.device = "cpu", training: bool = True,
                  gradient_checkpointing: bool = False, dtype: torch.dtype | None = None) -> MllmModel:
    """Load a checkpoint and set up what trains: the projector and the language model or its adapters.

    ``dtype`` overrides the weights' dtype (a run's saved evaluation precision, so test runs in the
    numerics validation ran in); None: the rule in the module docstring.
    """
    if mode not in ("full", "lora", "qlora"):
        raise SentilensError(f"unknown fine-tuning mode '{mode}' (full, lora or qlora)")
    cuda = torch.device(device).type == "cuda"
    four_bit = mode == "qlora" and (training or cuda)
    if dtype is None:
        dtype = torch.bfloat16 if cuda and (mode != "full" or not training) else torch.float32
    vlm, processor = load_checkpoint(source, dtype=dtype, device=device, four_bit=four_bit)
    vlm.config.use_cache = False
    family = family_of(vlm)
    for p in vlm.parameters():
        p.requires_grad_(False)
    if mode == "full":
        for module in (family.projector(vlm), family.language_model(vlm), vlm.lm_head):
            module.requires_grad_(True)
        net: nn.Module = vlm
    else:
        net = _with_lora(vlm, lora or LoraSettings(), four_bit, gradient_checkpointing, family.lora_pattern)
        family.projector(vlm).requires_grad_(True)
    if gradient_checkpointing:
        vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = MllmModel(net, processor, mode)
    model.train(training)
    return model


def _with_lora(vlm, lora: LoraSettings, four_bit: bool, gradient_checkpointing: bool, scope: str):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if four_bit:
        vlm = prepare_model_for_kbit_training(vlm, use_gradient_checkpointing=gradient_checkpointing)
    names = "|".join(lora.target_modules)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=rf"{scope}\.({names})")
    return get_peft_model(vlm, config)
