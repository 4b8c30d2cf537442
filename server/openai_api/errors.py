"""One table from the gRPC status code of a typed error to its HTTP status, and vLLM's
nested error body ``{"error": {"message", "type", "param", "code"}}``.

The HTTP API raises and catches the same typed errors as the gRPC service; ``status_of``
(``server/rpc.py``) names the gRPC code of any exception, this table the HTTP status.
"""

from __future__ import annotations

import json
from http import HTTPStatus

import grpc

from ..rpc import status_of

HTTP_STATUS: dict[str, int] = {
    "OK": 200,
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
_TYPE = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
         404: "NotFoundError", 409: "ConflictError", 413: "RequestTooLargeError",
         429: "RateLimitError", 499: "CancelledError", 500: "InternalServerError",
         501: "NotImplementedError", 503: "ServiceUnavailableError", 504: "TimeoutError"}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """vLLM's (and OpenAI's) error shape; ``code`` is the HTTP status."""
    kind = _TYPE.get(status, HTTPStatus(status).phrase.replace(" ", "") + "Error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_of(exc: BaseException) -> tuple[grpc.StatusCode, int, dict]:
    """The gRPC code, HTTP status and error body of ``exc`` (a typed error, a
    ``ValueError`` = INVALID_ARGUMENT, anything else INTERNAL, logged)."""
    code, message = status_of(exc)
    status = HTTP_STATUS.get(code.name, 500)
    return code, status, error_body(status, message, getattr(exc, "param", None))


def sse_error(exc: BaseException) -> bytes:
    """An error that happens after a stream started: one SSE event, as vLLM sends it."""
    return f"data: {json.dumps(error_of(exc)[2])}\n\n".encode()
