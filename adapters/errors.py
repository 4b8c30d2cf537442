"""Every typed error nolaserve raises on purpose, in one hierarchy. Each carries a message
that says what to fix.

``ServingError.status`` is a ``Status``: the one vocabulary of outcomes that each front end
maps to its own codes through one table (``server/rpc.py`` ``GRPC_CODE`` for gRPC,
``server/openai_api/errors.py`` ``HTTP_STATUS`` for HTTP). This module sits in the lowest
layer so that every layer raises these and none imports grpc for them.

    ServingError
      AdapterError           the adapter store, registry and formats
      RequestError           a request the engine refuses or cannot run
      ServerDrainingError    the server is shutting down
      RequestFailedError     the engine finished a request with an error
      ModelLoadError         the base model cannot be loaded or introspected
      ClientGoneError        the client closed the connection before the response
"""

import enum


class Status(enum.Enum):
    """The outcome of a request, as every layer names it. The names are gRPC's (and the
    ``code`` label values of the request metrics)."""

    OK = "OK"
    CANCELLED = "CANCELLED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"


class ServingError(Exception):
    """Base class. ``status`` is what the front ends map to their codes."""

    status = Status.INTERNAL


class AdapterError(ServingError):
    """An adapter that cannot be registered, found, changed or served."""


class InvalidAdapterError(AdapterError, ValueError):
    """Malformed adapter bytes, metadata or tensors (INVALID_ARGUMENT)."""

    status = Status.INVALID_ARGUMENT


class InvalidAdapterIdError(InvalidAdapterError):
    """An adapter id that does not match ``ADAPTER_ID_PATTERN`` (INVALID_ARGUMENT)."""


class IncompatibleAdapterError(AdapterError):
    """A well-formed adapter that does not fit the loaded base model (FAILED_PRECONDITION)."""

    status = Status.FAILED_PRECONDITION


class AdapterNotFoundError(AdapterError):
    """No adapter is registered under that id (NOT_FOUND)."""

    status = Status.NOT_FOUND


class AdapterExistsError(AdapterError):
    """The id is taken and ``replace`` was not asked for (ALREADY_EXISTS)."""

    status = Status.ALREADY_EXISTS


class AdapterInUseError(AdapterError):
    """The adapter cannot change now: an RMM basis that tasks still need (FAILED_PRECONDITION)."""

    status = Status.FAILED_PRECONDITION


class AdapterDamagedError(AdapterError):
    """The registry's stored bytes of an adapter no longer match their sha256: its file or
    database was damaged (FAILED_PRECONDITION); re-register or restore it."""

    status = Status.FAILED_PRECONDITION


class RegistryUnavailableError(AdapterError):
    """The registry's database cannot be reached; retry when it is back (UNAVAILABLE)."""

    status = Status.UNAVAILABLE


class RegistrySchemaError(AdapterError):
    """The registry's schema is newer than this nolaserve knows (FAILED_PRECONDITION)."""

    status = Status.FAILED_PRECONDITION


class LimitExceededError(AdapterError):
    """A configured limit would be exceeded: basis size, pins, file size (RESOURCE_EXHAUSTED)."""

    status = Status.RESOURCE_EXHAUSTED


class NoFreeSlotError(LimitExceededError):
    """Every device slot is pinned or in use; retry when a request finishes (RESOURCE_EXHAUSTED)."""


class PathNotAllowedError(AdapterError):
    """A file path outside the directories the server may read adapters from
    (PERMISSION_DENIED)."""

    status = Status.PERMISSION_DENIED


class RequestError(ServingError):
    """A request the engine refuses or cannot run."""


class InvalidRequestError(RequestError, ValueError):
    """A request field is out of range or malformed (INVALID_ARGUMENT; ``param``, when
    known, names the field, as OpenAI's error body does)."""

    status = Status.INVALID_ARGUMENT

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class MalformedRequestError(InvalidRequestError):
    """The request body is not a valid protobuf message of the RPC (INVALID_ARGUMENT)."""


class RequestTooLargeError(RequestError):
    """The request can never fit the KV cache or the configured limits (RESOURCE_EXHAUSTED)."""

    status = Status.RESOURCE_EXHAUSTED


class QueueFullError(RequestError):
    """Too many requests are waiting; retry later (RESOURCE_EXHAUSTED)."""

    status = Status.RESOURCE_EXHAUSTED


class EngineStoppedError(RequestError):
    """The engine is shutting down (UNAVAILABLE)."""

    status = Status.UNAVAILABLE


class UnsupportedFieldError(InvalidRequestError):
    """A request field that would change the output but is not supported
    (INVALID_ARGUMENT; ``param`` names the field)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message, param)


class ClientGoneError(ServingError):
    """The client closed the connection before the response (CANCELLED)."""

    status = Status.CANCELLED


class ServerDrainingError(ServingError):
    """The server got SIGTERM and takes no new requests (UNAVAILABLE)."""

    status = Status.UNAVAILABLE


class RequestFailedError(ServingError):
    """The engine finished a request with an error, e.g. its adapter failed to load."""

    def __init__(self, message: str, status: Status = Status.FAILED_PRECONDITION):
        super().__init__(message)
        self.status = status


class ModelLoadError(ServingError, ValueError):
    """The model source is missing, unreadable or not a supported decoder-only LM
    (INVALID_ARGUMENT)."""

    status = Status.INVALID_ARGUMENT


def short(value: object, limit: int = 64) -> str:
    """``repr(value)`` of a caller-supplied value for an error message, cut to about
    ``limit`` characters so that a huge id or token is never echoed whole."""
    if not isinstance(value, str):
        text = repr(value)
        return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def check_utf8(text: str, field: str, param: str | None = None) -> None:
    """``InvalidRequestError`` naming ``field`` unless ``text`` encodes as UTF-8 (a JSON
    ``\\ud800`` escape decodes to a lone surrogate, which no tokenizer takes)."""
    try:
        text.encode()
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            f"{field} is not valid Unicode: a lone surrogate (U+{ord(text[e.start]):04X}) "
            f"at character {e.start}; send text that encodes as UTF-8", param) from None
