"""The API's one error shape: ``{"error": {"code", "message", "field"}}`` with an HTTP status."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from sentilens.serve.schemas import ErrorDetail, ErrorResponse


class ApiError(Exception):
    """A request the server refuses; becomes a JSON :class:`ErrorResponse` with ``status``."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.field, self.headers)


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(code=code, message=message, field=field))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)
