"""Typed adapter errors. Each carries a message that says what to fix.

The server maps them to gRPC status codes (see ``grpc_code``); nothing here imports grpc.
"""


class AdapterError(Exception):
    """Base class. ``grpc_code`` names the matching ``grpc.StatusCode`` member."""

    grpc_code = "INTERNAL"


class InvalidAdapterError(AdapterError, ValueError):
    """Malformed adapter bytes, metadata or tensors (INVALID_ARGUMENT)."""

    grpc_code = "INVALID_ARGUMENT"


class InvalidAdapterIdError(InvalidAdapterError):
    """An adapter id that does not match ``ADAPTER_ID_PATTERN`` (INVALID_ARGUMENT)."""


class IncompatibleAdapterError(AdapterError):
    """A well-formed adapter that does not fit the loaded base model (FAILED_PRECONDITION)."""

    grpc_code = "FAILED_PRECONDITION"


class AdapterNotFoundError(AdapterError):
    """No adapter is registered under that id (NOT_FOUND)."""

    grpc_code = "NOT_FOUND"


class AdapterExistsError(AdapterError):
    """The id is taken and ``replace`` was not asked for (ALREADY_EXISTS)."""

    grpc_code = "ALREADY_EXISTS"


class AdapterInUseError(AdapterError):
    """The adapter cannot change now: an RMM basis that tasks still need (FAILED_PRECONDITION)."""

    grpc_code = "FAILED_PRECONDITION"


class LimitExceededError(AdapterError):
    """A configured limit would be exceeded: basis size, pins, file size (RESOURCE_EXHAUSTED)."""

    grpc_code = "RESOURCE_EXHAUSTED"


class NoFreeSlotError(LimitExceededError):
    """Every device slot is pinned or in use; retry when a request finishes (RESOURCE_EXHAUSTED)."""


class ModelLoadError(ValueError):
    """The model source is missing, unreadable or not a supported decoder-only LM."""


def short(value: object, limit: int = 64) -> str:
    """``repr(value)`` of a caller-supplied value for an error message, cut to about
    ``limit`` characters so that a huge id or token is never echoed whole."""
    if not isinstance(value, str):
        text = repr(value)
        return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"
