"""Request bodies: a size cap enforced while the body arrives, and parsing into the typed requests.

:class:`BodyLimit` counts the bytes of every request body as the server receives them and
answers 413 as soon as the count passes the cap (or at once, when ``Content-Length`` already
says so), so no client can make the server buffer more than ``max_upload_bytes``. Parsing then
reads the capped body as JSON or multipart and validates it with the pydantic models of
:mod:`sentilens.serve.schemas`; anything malformed becomes a 422 naming the field.
"""

from __future__ import annotations

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sentilens.serve.errors import ApiError, error_response
from sentilens.serve.schemas import BatchRequest, PredictForm, PredictRequest

FORM_FIELDS = ("text", "image", "keep_ratio")


class BodyTooLarge(Exception):
    """Raised inside ``receive`` once a body passes the cap; :class:`BodyLimit` answers 413."""


class BodyLimit:
    """ASGI middleware refusing request bodies over ``max_bytes`` while they are read."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self.refuse(scope, receive, send)
            return
        received = 0
        started = False

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped_receive, watched_send)
        except BodyTooLarge:
            if started:
                raise
            await self.refuse(scope, receive, send)

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, "payload_too_large", f"request body over the limit of {self.max_bytes} bytes",
                                  headers={"Connection": "close"})
        await response(scope, receive, send)


def validated(model: type[BaseModel], data: bytes | dict) -> BaseModel:
    """``model`` built from a JSON body or a dict, or a 422 naming the first field at fault."""
    try:
        return model.model_validate_json(data) if isinstance(data, bytes) else model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        message = first["msg"] if field is None else f"{field}: {first['msg']}"
        raise ApiError(422, "malformed_body", message, field) from None


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_post(request: Request, max_text_chars: int) -> PredictRequest | PredictForm:
    """One post from a JSON body (image in base64) or a multipart form (image as a file part)."""
    kind = media_type(request)
    if kind == "application/json":
        return validated(PredictRequest, await request.body())
    if kind == "multipart/form-data":
        form = await read_form(request, max_text_chars)
        try:
            fields = await form_fields(form)
        finally:
            await form.close()
        return validated(PredictForm, fields)
    raise ApiError(415, "unsupported_media_type",
                   f"send application/json or multipart/form-data, not '{kind or 'no content type'}'")


async def read_batch(request: Request) -> BatchRequest:
    """Posts of a batch request (JSON only: a list of posts with base64 images)."""
    kind = media_type(request)
    if kind != "application/json":
        raise ApiError(415, "unsupported_media_type", f"send application/json, not '{kind or 'no content type'}'")
    return validated(BatchRequest, await request.body())


async def read_form(request: Request, max_text_chars: int) -> FormData:
    """The multipart form, at most one file and the known fields; a text part of at most 4 bytes a character."""
    parser = MultiPartParser(request.headers, request.stream(), max_files=1, max_fields=len(FORM_FIELDS),
                             max_part_size=4 * max_text_chars + 64)
    try:
        return await parser.parse()
    except MultiPartException as err:
        raise ApiError(422, "malformed_body", f"multipart body: {err.message}") from None


async def form_fields(form: FormData) -> dict[str, str | bytes]:
    fields: dict[str, str | bytes] = {}
    for key, value in form.multi_items():
        if key not in FORM_FIELDS:
            raise ApiError(422, "malformed_body", f"unknown form field '{key}' (known: {', '.join(FORM_FIELDS)})", key)
        if key in fields:
            raise ApiError(422, "malformed_body", f"form field '{key}' given twice", key)
        fields[key] = await value.read() if isinstance(value, UploadFile) else value
    return fields
