"""Bearer-token authentication per service: a request to a protected service needs the
metadata ``authorization: Bearer <token>``. Health and reflection stay open."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence

import grpc

from nolaserve.adapters.errors import Status

from .metrics import Metrics


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """``tokens`` maps a full service name (``nolaserve.v1.Admin``) to its token and the
    config key that sets it; services with an empty token, or not listed, are open."""

    def __init__(self, tokens: dict[str, tuple[str, str]], metrics: Metrics) -> None:
        self.tokens = {svc: tk for svc, tk in tokens.items() if tk[0]}
        self.metrics = metrics

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails],
                                     Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        service, _, method = details.method.lstrip("/").partition("/")
        handler = await continuation(details)
        if service not in self.tokens or handler is None:
            return handler
        token, key = self.tokens[service]
        error = check_bearer(details.invocation_metadata or (), token, service, key)
        if error is None:
            return handler
        self.metrics.count_request(method, Status.UNAUTHENTICATED)
        return _denying(handler, error)


def check_bearer(metadata: Sequence[tuple[str, str | bytes]], token: str, service: str,
                 key: str, carrier: str = "metadata") -> str | None:
    """None if ``metadata`` (gRPC's, or HTTP's headers: ``carrier`` "header") carries
    ``authorization: Bearer <token>``, else what is wrong."""
    values = [v for k, v in metadata if k.lower() == "authorization"]
    if not values:
        return (f"the {service} service needs the {carrier} 'authorization: Bearer <token>' "
                f"with the server's {key}")
    value = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
    scheme, _, given = value.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                             token.encode()):
        return (f"wrong token for the {service} service: send 'authorization: Bearer "
                f"<token>' with the server's {key}")
    return None


def _denying(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts with UNAUTHENTICATED."""
    async def deny(request_or_iterator: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # No request deserializer: an unauthenticated body is never decoded.
    codec = dict(request_deserializer=None, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **codec)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **codec)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **codec)
    return grpc.unary_unary_rpc_method_handler(deny, **codec)
