"""The bearer-token interceptor on its own, without a server: which services it guards,
what it lets through, and the shape and message of the handler that denies. The served
contract (a real server, a real channel) is in test_server.py."""

import asyncio
from dataclasses import dataclass

import grpc
import pytest

from nolaserve.server.auth import TokenAuthInterceptor, check_bearer
from nolaserve.server.metrics import Metrics

ADMIN, INFER = "nolaserve.v1.Admin", "nolaserve.v1.Inference"
SHAPES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


@dataclass
class Details:
    method: str
    invocation_metadata: tuple | None


class Aborted(Exception):
    pass


class Context:
    async def abort(self, code, message):
        raise Aborted(code, message)


def intercept(tokens, method, metadata, shape="unary_unary", handler=...):
    """The handler the interceptor returns for ``method``, and the metrics it counted."""
    metrics = Metrics()
    served = SHAPES[shape](lambda request, context: "served",
                           request_deserializer=bytes, response_serializer=str.encode)
    if handler is ...:
        handler = served

    async def continuation(details):
        return handler

    interceptor = TokenAuthInterceptor(tokens, metrics)
    got = asyncio.run(interceptor.intercept_service(continuation, Details(method, metadata)))
    return got, served, metrics


def denial(handler) -> tuple:
    """Call a denying handler: (code, message) it aborts with."""
    fn = next(getattr(handler, a) for a in ("unary_unary", "unary_stream", "stream_unary",
                                            "stream_stream") if getattr(handler, a))
    with pytest.raises(Aborted) as e:
        asyncio.run(fn(None, Context()))
    return e.value.args


def denied_count(metrics, rpc: str) -> float:
    return metrics.registry.get_sample_value(
        "nolaserve_requests_total", {"rpc": rpc, "code": "UNAUTHENTICATED"}) or 0.0


TOKENS = {ADMIN: ("adm", "admin_token"), INFER: ("inf", "inference_token")}


def test_the_right_token_passes_the_handler_through_untouched():
    for service, (token, _) in TOKENS.items():
        got, served, metrics = intercept(TOKENS, f"/{service}/Call",
                                         (("authorization", f"Bearer {token}"),))
        assert got is served
        assert denied_count(metrics, "Call") == 0


@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_missing_or_wrong_token_is_denied_in_the_handlers_own_shape(shape):
    for metadata, says in [(None, "needs the metadata 'authorization: Bearer <token>'"),
                           ((("authorization", "Bearer inf"),), "wrong token"),
                           ((("x-other", "Bearer adm"),), "needs the metadata")]:
        got, served, metrics = intercept(TOKENS, f"/{ADMIN}/RegisterAdapter", metadata, shape)
        assert got is not served
        assert (got.request_streaming, got.response_streaming) == \
            (served.request_streaming, served.response_streaming)
        assert got.request_deserializer is None  # the body is never decoded
        assert got.response_serializer is served.response_serializer
        code, message = denial(got)
        assert code is grpc.StatusCode.UNAUTHENTICATED
        assert says in message and ADMIN in message and "admin_token" in message
        assert denied_count(metrics, "RegisterAdapter") == 1


def test_only_services_with_a_token_are_guarded():
    only_admin = {ADMIN: ("adm", "admin_token"), INFER: ("", "inference_token")}
    got, served, _ = intercept(only_admin, f"/{INFER}/Generate", None)
    assert got is served  # no inference token configured: open
    got, served, _ = intercept(only_admin, f"/{ADMIN}/ListAdapters", None)
    assert got is not served
    got, served, _ = intercept(TOKENS, "/grpc.health.v1.Health/Check", None)
    assert got is served  # health and reflection are never listed


def test_an_unknown_method_stays_unknown():
    """A method no service implements gets no handler (UNIMPLEMENTED), token or not."""
    got, _, metrics = intercept(TOKENS, f"/{ADMIN}/NoSuchMethod", None, handler=None)
    assert got is None and denied_count(metrics, "NoSuchMethod") == 0


@pytest.mark.parametrize("value, ok", [
    ("Bearer adm", True), ("bearer adm", True), ("BEARER adm ", True), (b"Bearer adm", True),
    ("Bearer adm2", False), ("Bearer ad", False), ("Basic adm", False), ("adm", False),
    ("Bearer", False), ("Bearer  ", False), (b"Bearer \xff", False),
])
def test_check_bearer(value, ok):
    error = check_bearer([("Authorization", value)], "adm", ADMIN, "admin_token")
    assert (error is None) is ok
    if not ok:
        assert "wrong token" in error and "admin_token" in error


def test_check_bearer_reads_the_first_authorization_only():
    two = [("authorization", "Bearer nope"), ("authorization", "Bearer adm")]
    assert "wrong token" in check_bearer(two, "adm", ADMIN, "admin_token")
    assert check_bearer([("other", "x"), ("authorization", "Bearer adm")], "adm", ADMIN,
                        "admin_token") is None
