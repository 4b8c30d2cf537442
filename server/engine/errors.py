"""Typed request errors. ``grpc_code`` names the matching ``grpc.StatusCode`` member."""


class RequestError(Exception):
    grpc_code = "INTERNAL"


class InvalidRequestError(RequestError, ValueError):
    """A request field is out of range or malformed (INVALID_ARGUMENT)."""

    grpc_code = "INVALID_ARGUMENT"


class RequestTooLargeError(RequestError):
    """The request can never fit the KV cache or the configured limits (RESOURCE_EXHAUSTED)."""

    grpc_code = "RESOURCE_EXHAUSTED"


class QueueFullError(RequestError):
    """Too many requests are waiting; retry later (RESOURCE_EXHAUSTED)."""

    grpc_code = "RESOURCE_EXHAUSTED"


class EngineStoppedError(RequestError):
    """The engine is shutting down (UNAVAILABLE)."""

    grpc_code = "UNAVAILABLE"
