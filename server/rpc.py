"""What every servicer method shares: typed errors to gRPC status codes (``status_of``
names the ``Status`` of any exception, ``GRPC_CODE`` is the one table to gRPC), the drain
gate, and the per-RPC request counter. Servicers decorate their methods with ``@rpc``."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from nolaserve.adapters.errors import (
    MalformedRequestError,
    RequestTooLargeError,
    ServerDrainingError,
    ServingError,
    Status,
)

from .metrics import Metrics

log = logging.getLogger("nolaserve.server")
T = TypeVar("T")
MAX_DETAILS = 1024  # status details longer than this are cut (gRPC metadata has limits)
DEADLINE_SLACK_S = 0.1  # a call that ends this close to its deadline ended by it
# Status -> gRPC code, the one table (the names are the same by design)
GRPC_CODE: dict[Status, grpc.StatusCode] = {s: grpc.StatusCode[s.name] for s in Status}


def status_of(error: BaseException) -> tuple[Status, str]:
    """The status and message of a failed request: a ``ServingError``'s ``status``, a
    ``ValueError`` (bad config or request value) is INVALID_ARGUMENT, anything else
    INTERNAL (and logged with its traceback). Messages are cut to ``MAX_DETAILS`` chars."""
    if isinstance(error, ServingError) and isinstance(error.status, Status):
        return error.status, _cut(str(error))
    if isinstance(error, ValueError):
        return Status.INVALID_ARGUMENT, _cut(str(error))
    log.exception("unexpected error in an RPC", exc_info=error)
    return Status.INTERNAL, _cut(f"internal server error ({type(error).__name__}: "
                                 f"{error}); the server log has the traceback")


def _cut(details: str) -> str:
    return details if len(details) <= MAX_DETAILS else details[:MAX_DETAILS] + " [cut]"


class MalformedRequest:
    """What ``DecodeInterceptor`` hands a servicer for bytes that are not its request
    message."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def message(self, method: str) -> str:
        return (f"the request body is not a valid {method} request message: "
                f"{str(self.error)[:200]}")


class DecodeInterceptor(grpc.aio.ServerInterceptor):
    """Decodes request bodies without raising: malformed bytes are answered
    INVALID_ARGUMENT (grpc itself would say UNKNOWN with a Python class name), by ``@rpc``
    for nolaserve's ``services`` (full names), here for the stock ones (health, reflection)."""

    def __init__(self, services: Iterable[str]) -> None:
        self._ours = tuple(f"/{name}/" for name in services)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer

        def safe(data: bytes) -> object:
            try:
                return decode(data)
            except Exception as e:  # DecodeError, or a RecursionError on deep nesting
                return MalformedRequest(e)

        handler = handler._replace(request_deserializer=safe)
        if details.method.startswith(self._ours):
            return handler
        return _refusing_malformed(handler, details.method.rpartition("/")[2])


def _refusing_malformed(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """``handler``, not under ``@rpc``, aborting INVALID_ARGUMENT on a ``MalformedRequest``
    (as each message of a request stream arrives)."""
    kind = (f"{'stream' if handler.request_streaming else 'unary'}_"
            f"{'stream' if handler.response_streaming else 'unary'}")
    behavior = getattr(handler, kind)

    async def checked(request: object, context: grpc.aio.ServicerContext) -> object:
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message(method))
        return request

    async def requests(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not handler.request_streaming:
            return await checked(request, context)
        return (await checked(r, context) async for r in request)

    if inspect.iscoroutinefunction(behavior):
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await behavior(await requests(request, context), context)
    else:  # an async generator of responses
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async for response in behavior(await requests(request, context), context):
                yield response
    return handler._replace(**{kind: wrapped})


class Gate:
    """Counts RPCs in flight and turns new ones away once draining starts."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        if self.draining:
            raise ServerDrainingError("the server is shutting down and takes no new "
                                      "requests; retry on another replica or after restart")
        self.in_flight += 1
        self._idle.clear()

    def exit(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new RPCs; wait up to ``timeout`` s for those in flight. True if none left."""
        self.draining = True
        if self.in_flight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


LOADING = "the model is still loading; retry when grpc.health.v1 reports SERVING"
_HANDLER_KIND = {(False, False): grpc.unary_unary_rpc_method_handler,
                 (False, True): grpc.unary_stream_rpc_method_handler,
                 (True, False): grpc.stream_unary_rpc_method_handler,
                 (True, True): grpc.stream_stream_rpc_method_handler}


class Deferred(grpc.GenericRpcHandler):
    """The handlers of ``services``, registered before the server starts though their
    servicers need the engine: health and reflection answer while the model loads, and
    until the servicers are added every call to ``services`` is UNAVAILABLE (``LOADING``).
    The generated ``add_<Service>Servicer_to_server(servicer, deferred)`` adds them."""

    def __init__(self, *services: ServiceDescriptor) -> None:
        self._handlers: list[grpc.GenericRpcHandler] = []
        self._loading = {f"/{service.full_name}/{m.name}":
                         _HANDLER_KIND[m.client_streaming, m.server_streaming](_loading)
                         for service in services for m in service.methods}

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self._handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        """Served through the generic handlers (added with them)."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        for handlers in self._handlers:
            handler = handlers.service(details)
            if handler is not None:
                return handler
        return self._loading.get(details.method)


async def _loading(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAVAILABLE, LOADING)


class Servicer(Protocol):
    gate: Gate
    metrics: Metrics
    max_message_bytes: int  # the server's grpc.max_send_message_length


def check_size(response: Any, limit: int) -> None:
    """``RequestTooLargeError`` for a response grpc would refuse to send (it would fail
    the call with RESOURCE_EXHAUSTED after the servicer returned, unseen by ``@rpc``)."""
    size = response.ByteSize()
    if size > limit:
        raise RequestTooLargeError(
            f"the response is {size} bytes, more than max_message_bytes ({limit}) allows: "
            "ask for fewer tokens or logprobs, use GenerateStream, or raise the server's "
            "max_message_bytes")


S = TypeVar("S", bound=Servicer)
Method = Callable[[S, Any, grpc.aio.ServicerContext], Awaitable[T]]


def gone(context: grpc.aio.ServicerContext) -> Status:
    """Why a call ended early: DEADLINE_EXCEEDED within ``DEADLINE_SLACK_S`` of its
    deadline, else CANCELLED (the client's own deadline fires first, and its cancel can
    reach the server before the server's later copy of that deadline does)."""
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= DEADLINE_SLACK_S
    return Status.DEADLINE_EXCEEDED if expired else Status.CANCELLED


def rpc(method: Method) -> Method:
    """Wrap a servicer method: refuse it while draining, count it by status code (a unary
    response too large to send is RESOURCE_EXHAUSTED, as the client sees it), and turn
    any exception into an aborted RPC with the mapped code and a message. Cancellation
    (client gone, deadline passed) propagates so the work below it stops."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: S, request: Any, context: grpc.aio.ServicerContext) -> T:
        code = Status.OK
        try:
            if isinstance(request, MalformedRequest):
                raise MalformedRequestError(request.message(name))
            self.gate.enter()
            try:
                response = await method(self, request, context)
            finally:
                self.gate.exit()
            if response is not None:  # a unary response; streams check each message
                check_size(response, self.max_message_bytes)
            return response
        except asyncio.CancelledError:
            code = gone(context)
            raise
        except Exception as e:
            if context.cancelled():  # the client went away, e.g. mid-write of a stream
                code = gone(context)
                return None
            code, details = status_of(e)
            await context.abort(GRPC_CODE[code], details)
        finally:
            self.metrics.count_request(name, code)

    return wrapper
