"""Request bodies: a size cap and a deadline enforced while the body arrives, and bounded parsing.

:class:`BodyLimit` counts the bytes of every request body as the server receives them and
answers 413 as soon as the count passes the cap (or at once, when ``Content-Length`` already
says so), so no client can make the server buffer more than ``max_upload_bytes``; a body not
complete ``timeout_s`` after its headers gets 408, so a client trickling bytes cannot hold a
request slot. Parsing then reads the capped body as JSON or multipart and validates it with the
pydantic models of :mod:`sentilens.serve.schemas` (built from the server's limits, so list and
text lengths are part of the schema); anything malformed becomes a 422 naming the field.

JSON is parsed in a worker thread, never on the event loop, and only after a structural budget:
parsing costs about 150 bytes of memory and 2 microseconds per JSON value, so 10 MB of ``{},``
(3.5 million empty posts, under the byte cap) took 7 s and 550 MB before any length check could
run. The characters that open or separate values (``{``, ``[``, ``,``) are counted first, at C
speed: a body that a valid request within the limits could never need (see :func:`json_budget`)
is refused unparsed.
"""

from __future__ import annotations

import anyio
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sentilens.serve.errors import ApiError, error_response
from sentilens.serve.schemas import RequestModels
from sentilens.validation import validation_problem

FORM_FIELDS = ("text", "image", "keep_ratio")


class BodyTooLarge(Exception):
    """Raised inside ``receive`` once a body passes the cap; :class:`BodyLimit` answers 413."""


class BodyTimeout(Exception):
    """Raised inside ``receive`` once a body is late; :class:`BodyLimit` answers 408."""


class BodyLimit:
    """ASGI middleware refusing request bodies over ``max_bytes``, or not complete within ``timeout_s``."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

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
        complete = False
        deadline = anyio.current_time() + self.timeout_s

        async def capped_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body, receive only reports a disconnect: no deadline
                return await receive()
            with anyio.move_on_after(deadline - anyio.current_time()) as waited:
                message = await receive()
            if waited.cancelled_caught:
                raise BodyTimeout
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
                complete = not message.get("more_body", False)
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
        except BodyTimeout:
            if started:
                raise
            response = error_response(408, "request_timeout", f"the request body did not arrive within "
                                      f"{self.timeout_s:g} s", headers={"Connection": "close"})
            await response(scope, receive, send)

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, "payload_too_large", f"request body over the limit of {self.max_bytes} bytes",
                                  headers={"Connection": "close"})
        await response(scope, receive, send)


def json_budget(posts: int, max_text_chars: int) -> int:
    """The most ``{``, ``[`` and ``,`` characters a valid JSON body with ``posts`` posts can hold.

    Per post: its object, three fields and separators (at most 8 structural characters), plus
    its text (``max_text_chars``) and id (200 characters), which may be made of those characters;
    base64 images never contain them, and an escaped character (``\\u002c``) contains none.
    """
    return 16 + posts * (8 + max_text_chars + 200)


def over_budget(data: bytes, budget: int) -> bool:
    return data.count(b"{") + data.count(b"[") + data.count(b",") > budget


PARSERS = anyio.CapacityLimiter(2)
"""JSON bodies parsed at once (in worker threads): bounds the memory of a burst of large bodies."""


def validated(model: type[BaseModel], data: bytes | dict) -> BaseModel:
    """``model`` built from a JSON body or a dict, or a 422 naming the first field at fault."""
    try:
        return model.model_validate_json(data) if isinstance(data, bytes) else model.model_validate(data)
    except ValidationError as err:
        field, problem, kind = validation_problem(err)
        loc = tuple((field or "").split("."))
        message = problem if field is None else f"{field}: {problem}"
        code = "malformed_body"
        if kind == "too_long" and loc == ("posts",):
            code = "batch_too_large"
        elif kind == "string_too_long" and loc[-1:] == ("text",):
            code = "text_too_long"
        raise ApiError(422, code, message, field) from None


def budgeted(model: type[BaseModel], data: bytes, budget: int) -> BaseModel:
    if over_budget(data, budget):
        raise ApiError(422, "malformed_body", "the JSON body has more values than any request within the limits "
                       f"needs (over {budget} of '{{', '[' and ','); check posts and text lengths")
    return validated(model, data)


async def parse_json(model: type[BaseModel], data: bytes, budget: int) -> BaseModel:
    """Check the structural budget, then validate a JSON body, off the event loop (see module doc)."""
    return await anyio.to_thread.run_sync(budgeted, model, data, budget, limiter=PARSERS)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_post(request: Request, models: RequestModels) -> BaseModel:
    """One post from a JSON body (image in base64) or a multipart form (image as a file part)."""
    kind = media_type(request)
    if kind == "application/json":
        return await parse_json(models.predict, await request.body(), json_budget(1, models.max_text_chars))
    if kind == "multipart/form-data":
        form = await read_form(request, models.max_text_chars)
        try:
            fields = await form_fields(form)
        finally:
            await form.close()
        return validated(models.form, fields)
    raise ApiError(415, "unsupported_media_type",
                   f"send application/json or multipart/form-data, not '{kind or 'no content type'}'")


async def read_batch(request: Request, models: RequestModels) -> BaseModel:
    """Posts of a batch request (JSON only: a list of posts with base64 images)."""
    kind = media_type(request)
    if kind != "application/json":
        raise ApiError(415, "unsupported_media_type", f"send application/json, not '{kind or 'no content type'}'")
    return await parse_json(models.batch, await request.body(), json_budget(models.max_posts, models.max_text_chars))


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
        if key == "image" and not isinstance(value, UploadFile):
            raise ApiError(422, "image_not_a_file", "form field 'image' must be a file part (a Content-Disposition "
                           "with a filename), not a text value", key)
        fields[key] = await value.read() if isinstance(value, UploadFile) else value
    return fields
