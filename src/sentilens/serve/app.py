"""The HTTP service of a run (``sentilens serve``): FastAPI app factory, endpoints, errors, web page.

Every prediction goes through ``sentilens.predict.load_predictor(run_dir)`` and the predictor's
``predict(posts, keep_ratio)``, the same path as ``sentilens predict``; one worker thread owns
the model and micro-batches requests (:mod:`sentilens.serve.batching`). Endpoints:

- ``POST /v1/predict``: one post (JSON with a base64 image, or multipart with a file part);
- ``POST /v1/predict/batch``: up to ``max_posts`` posts (JSON);
- ``POST /v1/explain``: MLLM runs, the prediction plus the patch-score heatmap (CLS attention, or attention
  received) and kept patches;
- ``GET /v1/model``: family, labels, base model, config summary, limits;
- ``GET /healthz``: liveness and queue depth; never needs the API key, so probes work;
- ``GET /``: the web page (``static/``);
- ``GET /docs``: the API docs (Swagger UI), its assets served from the installed ``fastapi-offline``
  package, so it works offline and under the server's CSP. There is no ``/redoc``: ReDoc injects inline
  styles, which that CSP forbids (it rendered an error page).

Bad input gets a JSON :class:`~sentilens.serve.schemas.ErrorResponse` with 400/401/408/413/415/422/503,
never a 500. :mod:`sentilens.serve.guard` and :mod:`sentilens.serve.body` keep slow or oversized
requests from stalling the server. The server never fetches a URL: images come inside the request.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import fastapi_offline
from fastapi import Depends, FastAPI, Request, Security
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from sentilens import __version__
from sentilens.data.records import Post
from sentilens.errors import SentilensError
from sentilens.predict import Prediction, Predictor, load_predictor
from sentilens.serve.batching import Batcher, QueueFull
from sentilens.serve.body import BodyLimit, read_batch, read_post
from sentilens.serve.errors import ApiError, error_response
from sentilens.serve.guard import RequestGuard
from sentilens.serve.schemas import (
    BatchPrediction,
    BatchResponse,
    ErrorResponse,
    ExplainResponse,
    Health,
    ModelInfo,
    PredictResponse,
    request_models,
)
from sentilens.serve.settings import ServeSettings
from sentilens.serve.uploads import UploadStore, check_image

log = logging.getLogger("sentilens.serve")

STATIC = Path(__file__).parent / "static"
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"
"""Swagger UI's script and style, from an installed package: /docs needs no network, and the CSP (scripts and
styles from 'self' only) holds on it too."""
DECODE_THREADS = 2
"""Uploads decoded at once (each can take up to max_pixels x 3 bytes): bounds the memory of a burst."""
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def error_docs(*statuses: int) -> dict:
    return {status: {"model": ErrorResponse} for status in statuses}


def body_doc(json_model: str, multipart: bool) -> dict:
    """The request body of an endpoint that parses it itself (so the cap applies while reading)."""
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{json_model}"}}}
    if multipart:
        content["multipart/form-data"] = {"schema": {"$ref": "#/components/schemas/PredictForm"}}
    return {"requestBody": {"required": True, "content": content}}


class Service:
    """The loaded run and what serves it: the batching worker, the upload folder, the limits."""

    def __init__(self, run_dir: Path, predictor: Predictor, settings: ServeSettings):
        self.run_dir = run_dir
        self.predictor = predictor
        self.settings = settings
        self.model_name = f"{predictor.family}/{run_dir.resolve().name}"
        self.batcher = Batcher(predictor, settings.max_batch, settings.max_wait_ms / 1000, settings.queue_size)
        self.store: UploadStore | None = None
        self.decoders: anyio.CapacityLimiter | None = None

    def start(self) -> None:
        self.store = UploadStore()
        self.decoders = anyio.CapacityLimiter(DECODE_THREADS)
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()
        if self.store is not None:
            self.store.close()

    def overloaded(self) -> ApiError:
        return ApiError(503, "overloaded", f"{self.batcher.capacity} requests are already waiting; retry later",
                        headers={"Retry-After": str(self.settings.retry_after_s)})

    def check_keep_ratio(self, keep_ratio: float | None) -> None:
        if keep_ratio is not None and not self.predictor.capabilities.supports_keep_ratio:
            raise ApiError(422, "keep_ratio_unsupported", "keep_ratio (visual token filtering) applies to MLLM runs; "
                           f"this server runs a {self.predictor.family} run", "keep_ratio")

    def check_posts(self, posts: Sequence[tuple[str, str, bytes | None]], fields: Sequence[str]) -> None:
        for (_, text, image), field in zip(posts, fields, strict=True):
            if not text.strip() and image is None:
                name = field.rstrip(".")
                raise ApiError(422, "empty_post", f"{name or 'the post'}: give a text, an image, or both", name or None)

    async def check_images(self, posts: Sequence[tuple[str, str, bytes | None]], fields: Sequence[str]) -> None:
        for (_, _, image), field in zip(posts, fields, strict=True):
            if image is not None:
                await anyio.to_thread.run_sync(check_image, image, self.settings.image_limits(), f"{field}image",
                                               limiter=self.decoders)

    async def run(self, posts: Sequence[tuple[str, str, bytes | None]], fields: Sequence[str],
                  keep_ratio: float | None, explain: Callable[[Predictor, Post], Any] | None = None) -> Any:
        """Check ``posts``, store their images, and await the worker: predictions, or ``explain(predictor, post)``."""
        self.check_posts(posts, fields)
        if self.batcher.pending >= self.batcher.capacity:  # refuse before spending time on decoding
            raise self.overloaded()
        await self.check_images(posts, fields)
        stored = await anyio.to_thread.run_sync(self.store.store, posts)
        try:
            try:
                future = (self.batcher.submit(stored, keep_ratio) if explain is None
                          else self.batcher.submit_call(lambda predictor: explain(predictor, stored[0])))
            except QueueFull:
                raise self.overloaded() from None
            return await future
        finally:
            self.store.release(stored)

    def model_info(self) -> ModelInfo:
        described, can = self.predictor.describe(), self.predictor.capabilities
        return ModelInfo(family=described["family"], run=self.run_dir.resolve().name, labels=described["labels"],
                         base_model=described["base_model"], supports_keep_ratio=can.supports_keep_ratio,
                         supports_explain=can.supports_explain, strategies=list(can.strategies),
                         config=described["config"],
                         limits=self.settings.limits())


def key_check(settings: ServeSettings):
    """The dependency that refuses /v1 requests without the API key (X-API-Key, or Authorization: Bearer)."""
    expected = settings.api_key.get_secret_value().encode()  # type: ignore[union-attr]
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The server's API key.")
    bearer = HTTPBearer(auto_error=False, description="The server's API key as a bearer token.")

    async def require_key(key: str | None = Security(header),
                          token: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        given = key if key is not None else (token.credentials if token is not None else None)
        if given is None or not hmac.compare_digest(given.encode(), expected):
            raise ApiError(401, "unauthorized", "missing or wrong API key: send it as X-API-Key or "
                           "Authorization: Bearer", headers={"WWW-Authenticate": "Bearer"})

    return require_key


def prediction_fields(prediction: Prediction) -> dict:
    return {"label": prediction.label, "probabilities": prediction.probabilities,
            "kept_tokens": prediction.kept_tokens}


def elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def create_app(run_dir: str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """The app serving the run in ``run_dir``; loads the model now, so a bad run fails before binding."""
    settings = settings or ServeSettings()
    run_dir = Path(run_dir)
    service = Service(run_dir, load_predictor(run_dir, device=settings.device, runtime=settings.runtime), settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        service.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(service.stop)

    app = FastAPI(title="sentilens", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Sentiment / informativeness of image + text posts with a sentilens run. "
                              "Images travel in the request (base64 or a file part); the server fetches no URL.")
    app.state.service = service
    models = app.state.request_models = request_models(settings.max_text_chars, settings.max_posts)
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(RequestGuard, allowed_hosts=settings.allowed_hosts, max_requests=settings.max_connections,
                       retry_after_s=settings.retry_after_s, check_origin=settings.api_key is None,
                       allowed_origins=settings.allowed_origins)
    # RequestGuard is outermost: framing, Host and Origin are checked before anything
    guarded = [Depends(key_check(settings))] if settings.api_key is not None else []
    install_error_handlers(app)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def swagger_page() -> FileResponse:
        return FileResponse(STATIC / "docs.html")

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz() -> Health:
        """Liveness and queue depth (open without the API key)."""
        return Health(status="ok", family=service.predictor.family, queue_pending=service.batcher.pending,
                      queue_capacity=service.batcher.capacity)

    @app.get("/v1/model", response_model=ModelInfo, responses=error_docs(401), dependencies=guarded, tags=["model"])
    async def model() -> ModelInfo:
        """The run being served: family, labels, base model, config summary and the request limits."""
        return service.model_info()

    @app.post("/v1/predict", response_model=PredictResponse, dependencies=guarded, tags=["predict"],
              responses=error_docs(400, 401, 408, 413, 415, 422, 503), openapi_extra=body_doc("PredictRequest", True))
    async def predict(request: Request) -> PredictResponse:
        """Label and probabilities of one post."""
        started = time.perf_counter()
        post = await read_post(request, models)
        service.check_keep_ratio(post.keep_ratio)
        (prediction,) = await service.run([("post", post.text, post.image)], [""], post.keep_ratio)
        return PredictResponse(**prediction_fields(prediction), keep_ratio=post.keep_ratio, model=service.model_name,
                               latency_ms=elapsed_ms(started))

    @app.post("/v1/predict/batch", response_model=BatchResponse, dependencies=guarded, tags=["predict"],
              responses=error_docs(400, 401, 408, 413, 415, 422, 503), openapi_extra=body_doc("BatchRequest", False))
    async def predict_batch(request: Request) -> BatchResponse:
        """Labels and probabilities of up to ``max_posts`` posts, at one keep ratio."""
        started = time.perf_counter()
        batch = await read_batch(request, models)  # at most max_posts posts: the schema says so
        service.check_keep_ratio(batch.keep_ratio)
        posts = [(p.id if p.id is not None else str(i), p.text, p.image) for i, p in enumerate(batch.posts)]
        predictions = await service.run(posts, [f"posts.{i}." for i in range(len(posts))], batch.keep_ratio)
        return BatchResponse(
            predictions=[BatchPrediction(id=post_id, **prediction_fields(p))
                         for (post_id, _, _), p in zip(posts, predictions, strict=True)],
            keep_ratio=batch.keep_ratio, model=service.model_name, latency_ms=elapsed_ms(started))

    @app.post("/v1/explain", response_model=ExplainResponse, dependencies=guarded, tags=["predict"],
              responses=error_docs(400, 401, 408, 413, 415, 422, 503), openapi_extra=body_doc("PredictRequest", True))
    async def explain(request: Request) -> ExplainResponse:
        """MLLM runs: the prediction, the patch-score heatmap of the image and the patches kept at the keep ratio
        (default 0.4, the paper's 40 % point)."""
        from sentilens.mllm.explain import DEFAULT_KEEP_RATIO
        from sentilens.serve.heatmap import explain_post

        started = time.perf_counter()
        post = await read_post(request, models)
        if not service.predictor.capabilities.supports_explain:
            raise ApiError(422, "explain_unsupported", "heatmaps need an MLLM run; this server runs a "
                           f"{service.predictor.family} run")
        if post.image is None:
            raise ApiError(422, "image_required", "a heatmap needs an image", "image")
        ratio = DEFAULT_KEEP_RATIO if post.keep_ratio is None else post.keep_ratio
        prediction, heatmap = await service.run([("post", post.text, post.image)], [""], ratio,
                                                explain=partial(explain_post, keep_ratio=ratio))
        return ExplainResponse(**prediction_fields(prediction), keep_ratio=ratio, model=service.model_name,
                               latency_ms=elapsed_ms(started), heatmap=heatmap)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    app.openapi = lambda: openapi_schema(app)
    return app


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError):
        return err.response()

    @app.exception_handler(SentilensError)
    async def user_error(_: Request, err: SentilensError):
        return error_response(422, "invalid_input", err.problem)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException):
        return error_response(err.status_code, HTTP_CODES.get(err.status_code, "http_error"), str(err.detail),
                              headers=err.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, _: ClientDisconnect):
        # Not an error of the server: one line, and an answer nobody will read.
        logging.getLogger("uvicorn.error").info("%s %s: the client disconnected before sending its whole request",
                                                request.method, request.url.path)
        return error_response(400, "client_disconnected", "the client disconnected mid-request")

    @app.exception_handler(Exception)
    async def internal_error(_: Request, err: Exception):
        log.exception("internal error", exc_info=err)
        return error_response(500, "internal", "internal server error")


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema plus the request-body models of the endpoints that parse their bodies themselves."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        models = app.state.request_models
        _, definitions = models_json_schema([(model, "validation") for model in (models.predict, models.form,
                                                                                  models.batch)],
                                            ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions["$defs"])
        app.openapi_schema = schema
    return app.openapi_schema
