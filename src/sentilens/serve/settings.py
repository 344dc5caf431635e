"""Limits and batching settings of ``sentilens serve``, one pydantic model.

Every limit bounds what one client can make the server hold or compute: the request body is cut
off while it is read (``max_upload_bytes``), images are refused on their header before any
decoding (``max_pixels``) and on their shape once decoded (``max_aspect_ratio``), texts and
batches are counted (``max_text_chars``, ``max_posts``, also in the request schema), at most
``queue_size`` requests wait for the model and ``max_connections`` are handled at once (past either,
503), idle and slow senders are cut off (``idle_timeout_s``, ``header_timeout_s``, ``body_timeout_s``)
and one client's idle sockets are capped (``max_client_connections``). Defaults fit a
single-user machine; the CLI exposes each one.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from sentilens.data.images import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_PIXELS, ImageLimits
from sentilens.errors import SentilensError
from sentilens.validation import pydantic_error, validation_problem


class ServeSettings(BaseModel):
    """What ``create_app`` needs besides the run directory."""

    model_config = ConfigDict(extra="forbid")

    max_upload_bytes: int = Field(10 * 2**20, ge=1024)
    """Bytes of one request body (multipart or JSON, base64 included); 413 past it."""
    max_pixels: int = Field(20_000_000, ge=1, le=DEFAULT_MAX_PIXELS)
    """Pixels (width x height) of one image, checked on its header before decoding; 413 past it.
    At most the loader's own cap, since the predictor decodes the stored upload again."""
    max_aspect_ratio: float = Field(DEFAULT_MAX_ASPECT_RATIO, ge=1.0, le=DEFAULT_MAX_ASPECT_RATIO)
    """Long side over short side of one image; 422 past it. The models resize the short side, so a
    1 x 20000 strip (a tiny PNG within any pixel cap) would become a 96 x 1.9 million tensor (measured:
    2.3 GB and 9 s for the tiny LLaVA's 96-px tower, several times more at LLaVA-1.5's 336 px). At most the
    loader's own limit, which the predictor applies again to the stored upload."""
    max_text_chars: int = Field(5000, ge=1)
    """Characters of one post's text; 422 past it."""
    max_posts: int = Field(32, ge=1)
    """Posts in one ``/v1/predict/batch`` request; 422 past it."""
    max_batch: int = Field(8, ge=1)
    """Posts the worker gathers from waiting requests into one model call."""
    max_wait_ms: float = Field(0.0, ge=0.0)
    """How long the worker waits for more requests once it holds one. 0: it takes only those already
    waiting; under load requests pile up while the model runs, so batches form without delaying a lone
    request; benchmarks/serve_load.py measures both policies."""
    queue_size: int = Field(64, ge=1)
    """Requests waiting for the model; one more gets 503 with Retry-After."""
    max_connections: int = Field(128, ge=1)
    """Requests being handled at once, uploads still arriving included; one more gets a JSON 503. ``/healthz``
    is always answered, so a probe can tell a busy server from a dead one."""
    max_client_connections: int = Field(64, ge=1)
    """Open sockets of one client address before its longest-idle ones (idle a second or more) are closed to make
    room for its new ones. Connections carrying a request are never closed for this; they count against
    ``max_connections``. Behind a reverse proxy every client has the proxy's address: raise it above the proxy's
    pool of kept-alive connections."""
    idle_timeout_s: float = Field(5.0, gt=0.0)
    """Seconds a connection may wait without sending a byte of a request (just opened, or kept alive after a
    response); then it is closed."""
    header_timeout_s: float = Field(10.0, gt=0.0)
    """Seconds a connection may take to send a request's headers (from connecting, or from the previous
    response on a kept-alive connection); then it is closed. Slow-header clients (slowloris) cannot hold
    sockets longer than this."""
    body_timeout_s: float = Field(30.0, gt=0.0)
    """Seconds a request may take to send its whole body once its headers are in; then 408. A 10 MiB upload
    at 1 Mbit/s takes 84 s: raise it for slow links."""
    allowed_hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1", "localhost", "::1"])
    """Host header values accepted (without the port); another gets 400. Refusing other names stops DNS
    rebinding: a web page on evil.example whose name is re-pointed at 127.0.0.1 sends ``Host: evil.example``."""
    allowed_origins: list[str] = Field(default_factory=list)
    """Origins (``scheme://host:port``) of other web pages allowed to send state-changing requests to a server
    without an API key, besides its own page; any other Origin gets 403."""
    retry_after_s: int = Field(1, ge=1)
    """Retry-After of a 503."""
    api_key: SecretStr | None = None
    """When set, every /v1 request must carry it (X-API-Key or Authorization: Bearer). Without it, a
    state-changing request whose Origin is another site is refused (403)."""
    device: str | None = None
    """Where the model runs (cpu, cuda, cuda:1); default: the predictor's own choice."""
    runtime: str | None = None
    """Fusion runs: where the encoders run (auto, onnx, torch); default: auto."""

    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_upload_bytes, max_pixels=self.max_pixels,
                           max_aspect_ratio=self.max_aspect_ratio)

    def limits(self) -> dict[str, int | float]:
        """The limits a client may want to know (shown by ``GET /v1/model``)."""
        return {"max_upload_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels,
                "max_aspect_ratio": self.max_aspect_ratio, "max_text_chars": self.max_text_chars,
                "max_posts": self.max_posts}


OPTIONS = {"idle_timeout_s": "--idle-timeout", "header_timeout_s": "--header-timeout",
           "body_timeout_s": "--body-timeout", "allowed_hosts": "--allowed-host",
           "allowed_origins": "--allowed-origin"}
"""The command-line option of each setting whose name is not the field's."""


def make_settings(options: dict) -> ServeSettings:
    """Settings from command-line options (None: the default); a value out of range is a user error."""
    try:
        return ServeSettings(**{key: value for key, value in options.items() if value is not None})
    except ValidationError as err:
        field = validation_problem(err)[0]
        head = (field or "").split(".")[0]
        option = OPTIONS.get(head, "--" + head.replace("_", "-")) if head else "serve"
        raise pydantic_error(err, names={head: option}) if head else SentilensError(
            f"serve: {validation_problem(err)[1]}") from None
