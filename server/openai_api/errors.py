"""One table from the ``Status`` of a typed error to its HTTP status, and vLLM's nested
error body ``{"error": {"message", "type", "param", "code"}}``.

The HTTP API raises and catches the same typed errors as the gRPC service; ``status_of``
(``server/rpc.py``) names the ``Status`` of any exception, this table the HTTP status.
"""

from __future__ import annotations

import json
import sys
from http import HTTPStatus

from nolaserve.adapters.errors import Status, short

from ..rpc import status_of

HTTP_STATUS: dict[Status, int] = {
    Status.OK: 200,
    Status.INVALID_ARGUMENT: 400,
    Status.FAILED_PRECONDITION: 400,
    Status.UNAUTHENTICATED: 401,
    Status.PERMISSION_DENIED: 403,
    Status.NOT_FOUND: 404,
    Status.ALREADY_EXISTS: 409,
    Status.RESOURCE_EXHAUSTED: 429,
    Status.CANCELLED: 499,  # nginx's "client closed request"; no HTTPStatus member
    Status.INTERNAL: 500,
    Status.UNIMPLEMENTED: 501,
    Status.UNAVAILABLE: 503,
    Status.DEADLINE_EXCEEDED: 504,
}
_TYPE = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
         404: "NotFoundError", 409: "ConflictError", 413: "RequestTooLargeError",
         429: "RateLimitError", 499: "CancelledError", 500: "InternalServerError",
         501: "NotImplementedError", 503: "ServiceUnavailableError", 504: "TimeoutError"}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """vLLM's (and OpenAI's) error shape; ``code`` is the HTTP status."""
    kind = _TYPE.get(status) or _type_of(status)
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _type_of(status: int) -> str:
    """``NameOfThePhraseError``, or ``Error`` for a status that ``HTTPStatus`` lacks."""
    try:
        return HTTPStatus(status).phrase.replace(" ", "") + "Error"
    except ValueError:
        return "Error"


def invalid_body(errors: list[dict]) -> tuple[str, str | None]:
    """The message and param of a body (or query) that does not validate: pydantic's
    ``errors()``, the first of them."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return (f"the request body is not valid JSON ({first.get('ctx', {}).get('error')}, "
                f"at character {first['loc'][-1]}): send a JSON object"), None
    where = [str(p) for p in first.get("loc", ()) if p not in ("body", "query")]
    if first.get("loc") == ("body",):  # the body itself, not one of its fields
        return ("the request body is empty: send a JSON object" if first.get("type") ==
                "missing" else "the request body must be a JSON object"), None
    return (f"invalid request: {'.'.join(where) or 'body'}: {first.get('msg', 'invalid')}",
            where[0] if where else None)


def unparsable_body(cause: BaseException) -> str:
    """The message of a body that the JSON parser raised ``cause`` on, other than a
    syntax error (``invalid_body``'s)."""
    if isinstance(cause, UnicodeDecodeError):
        return (f"the request body is not valid UTF-8 ({cause.reason} at byte {cause.start}): "
                "send JSON encoded as UTF-8")
    if isinstance(cause, RecursionError):
        return ("the request body nests arrays or objects too deep to parse: send JSON "
                "nested at most a few hundred levels")
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return (f"the request body holds a number of more than {sys.get_int_max_str_digits()} "
                "digits: send shorter numbers")
    return f"the request body cannot be parsed ({short(str(cause))}): send a JSON object"


def error_of(exc: BaseException) -> tuple[Status, int, dict]:
    """The ``Status``, HTTP status and error body of ``exc`` (a typed error, a
    ``ValueError`` = INVALID_ARGUMENT, anything else INTERNAL, logged)."""
    status, message = status_of(exc)
    code = HTTP_STATUS.get(status, 500)
    return status, code, error_body(code, message, getattr(exc, "param", None))


def sse_error(exc: BaseException) -> bytes:
    """An error that happens after a stream started: one SSE event, as vLLM sends it."""
    return f"data: {json.dumps(error_of(exc)[2])}\n\n".encode()
