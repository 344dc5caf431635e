"""Typed request, response and error bodies of the HTTP API (they make its OpenAPI schema).

Images travel inside the request, never as addresses: JSON bodies carry them in base64 (a
``data:`` URL prefix is accepted, as browsers produce it), multipart bodies as a file part.
The server never fetches anything a client names.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, create_model

DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+;base64,")


def decode_base64(value: object) -> object:
    """Strict base64 (optionally behind a ``data:...;base64,`` prefix) to bytes; other values pass to pydantic."""
    if not isinstance(value, str):
        return value
    try:
        return base64.b64decode(DATA_URL.sub("", value, count=1), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image is not valid base64") from None


Base64Image = Annotated[
    bytes,
    BeforeValidator(decode_base64),
    WithJsonSchema({"type": "string", "contentEncoding": "base64",
                    "description": "The image file's bytes in base64 (JPEG, PNG, GIF, WebP, BMP...), "
                                   "optionally as a data: URL."}),
]
KeepRatio = Annotated[float | None, Field(
    None, gt=0.0, le=1.0, description="MLLM runs: fraction of visual tokens kept (CLS-attention filtering); "
                                      "absent: all tokens. A fusion run refuses it.")]


class PredictRequest(BaseModel):
    """One post as JSON (``POST /v1/predict`` and ``/v1/explain`` with ``Content-Type: application/json``)."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field("", description="The post's text.")
    image: Base64Image | None = None
    keep_ratio: KeepRatio = None


class PredictForm(BaseModel):
    """One post as ``multipart/form-data`` (the same fields, the image as a file part)."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field("", description="The post's text.")
    image: bytes | None = Field(None, description="The image file.")
    keep_ratio: KeepRatio = None


class BatchPost(BaseModel):
    """One post of a batch; ``id`` comes back with its prediction (default: its position)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, max_length=200)
    text: str = ""
    image: Base64Image | None = None


class BatchRequest(BaseModel):
    """Several posts predicted with one keep ratio (``POST /v1/predict/batch``, JSON only)."""

    model_config = ConfigDict(extra="forbid")

    posts: list[BatchPost] = Field(min_length=1)
    keep_ratio: KeepRatio = None


@dataclass(frozen=True)
class RequestModels:
    """The request-body models of one server: the generic ones above with its limits in the schema
    (``maxLength`` of texts, ``maxItems`` of the batch), so validation and ``/openapi.json`` say the same."""

    max_text_chars: int
    max_posts: int
    predict: type[BaseModel]
    form: type[BaseModel]
    batch: type[BaseModel]


def request_models(max_text_chars: int, max_posts: int) -> RequestModels:
    text = (str, Field("", max_length=max_text_chars, description="The post's text."))
    post = create_model("BatchPost", __base__=BatchPost, __doc__=BatchPost.__doc__, text=text)
    return RequestModels(
        max_text_chars=max_text_chars, max_posts=max_posts,
        predict=create_model("PredictRequest", __base__=PredictRequest, __doc__=PredictRequest.__doc__, text=text),
        form=create_model("PredictForm", __base__=PredictForm, __doc__=PredictForm.__doc__, text=text),
        batch=create_model("BatchRequest", __base__=BatchRequest, __doc__=BatchRequest.__doc__,
                           posts=(list[post], Field(min_length=1, max_length=max_posts))))


class PredictResponse(BaseModel):
    label: str = Field(description="The most probable label.")
    probabilities: dict[str, float] = Field(description="Probability of every label of the run.")
    keep_ratio: float | None = Field(description="The keep ratio used (null: all visual tokens, or a fusion run).")
    kept_tokens: int | None = Field(description="MLLM runs: visual tokens that reached the language model.")
    model: str = Field(description="family/run-name of the model that answered.")
    latency_ms: float = Field(description="Time spent on the request inside the server.")


class BatchPrediction(BaseModel):
    id: str
    label: str
    probabilities: dict[str, float]
    kept_tokens: int | None


class BatchResponse(BaseModel):
    predictions: list[BatchPrediction] = Field(description="One per post, in request order.")
    keep_ratio: float | None
    model: str
    latency_ms: float


class Heatmap(BaseModel):
    """Patch scores of the image on the vision tower's grid (row-major), and the patches kept."""

    grid: int = Field(description="Patches per side of the square grid.")
    scores: list[list[float]] = Field(description="grid x grid scores scaled to [0, 1] (min-max over the image's "
                                                  "tokens; 0 on cells that only square a rectangular grid).")
    kept: list[list[bool]] = Field(description="grid x grid: true where the patch reaches the language model.")
    kept_patches: int = Field(description="Kept cells of the grid. Tiled models (LLaVA-NeXT, SmolVLM) draw their "
                                          "crops; the tokens of their whole-image tile count in kept_tokens only.")
    patches: int = Field(description="Cells of the grid that are visual tokens of the image.")
    score_name: str = Field(description="What was scored: CLS attention, or mean attention received.")
    image: str = Field(description="The image as the vision tower sees it (padded or cropped, resized), a PNG "
                                   "data: URL.")
    content: list[float] = Field(description="[x0, y0, x1, y1] as fractions of the image: where the post's "
                                             "image lies; outside it is padding (all [0, 0, 1, 1] when cropped).")


class ExplainResponse(PredictResponse):
    heatmap: Heatmap


class ModelInfo(BaseModel):
    family: str = Field(description="mllm, fusion or ensemble.")
    run: str = Field(description="Name of the run directory.")
    labels: list[str]
    base_model: str = Field(description="MLLM: the LLaVA checkpoint; fusion: text encoder + image encoder; "
                                        "ensemble: its members' base models, joined by ' | '.")
    supports_keep_ratio: bool
    supports_explain: bool
    strategies: list[str] = Field(default_factory=list, description="The token-pruning strategies the run takes "
                                  "(the registry's forms and modifiers); empty: none.")
    config: dict[str, str | int | float | bool | None] = Field(description="The run config's top-level settings.")
    limits: dict[str, int | float] = Field(
        description="max_upload_bytes, max_pixels, max_aspect_ratio, max_text_chars, max_posts.")


class Health(BaseModel):
    status: str
    family: str
    queue_pending: int
    queue_capacity: int


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable reason, e.g. payload_too_large, corrupt_image.")
    message: str = Field(description="What was wrong, for a person.")
    field: str | None = Field(None, description="The request field at fault, when there is one.")


class ErrorResponse(BaseModel):
    """Every error the API answers, whatever the status."""

    error: ErrorDetail
