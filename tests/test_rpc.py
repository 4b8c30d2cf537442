"""What every servicer method shares (``server/rpc.py``), without a server: typed errors
to status codes, the cut of long details, malformed bodies, the drain gate and the per-RPC
count. The served contract is in test_server.py."""

import asyncio
import logging
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf.wrappers_pb2 import StringValue

from nolaserve.adapters.errors import (
    AdapterNotFoundError,
    LimitExceededError,
    QueueFullError,
    ServingError,
    Status,
)
from nolaserve.server.metrics import Metrics
from nolaserve.server.rpc import (
    DEADLINE_SLACK_S,
    GRPC_CODE,
    MAX_DETAILS,
    DecodeInterceptor,
    Gate,
    MalformedRequest,
    rpc,
    status_of,
)

DRAINING = ("the server is shutting down and takes no new requests; retry on another "
            "replica or after restart")
GUARD_S = 30  # only turns a broken drain into a failure; correct code never waits for it


class Aborted(Exception):
    pass


class Context:
    def __init__(self, remaining=None, cancelled=False):
        self.remaining, self._cancelled = remaining, cancelled

    def time_remaining(self):
        return self.remaining

    def cancelled(self):
        return self._cancelled

    async def abort(self, code, message):
        raise Aborted(code, message)


async def Echo(self, request, context):  # noqa: N802 - named like a servicer method
    self.seen_in_flight = self.gate.in_flight
    if isinstance(request, BaseException):
        raise request
    if request == "wait":
        await asyncio.sleep(3600)
    return StringValue(value=request)


class Servicer:
    """A servicer whose ``Echo`` is decorated here, inside the test that makes it (a
    class-body decorator would run at import, where no test sees it)."""

    def __init__(self):
        self.gate, self.metrics = Gate(), Metrics()
        self.max_message_bytes = 64
        self.seen_in_flight = None
        self.Echo = rpc(Echo).__get__(self)

    def count(self, code: str) -> float:
        return self.metrics.registry.get_sample_value(
            "nolaserve_requests_total", {"rpc": "Echo", "code": code}) or 0.0


class Odd(ServingError):
    status = "NOT_A_CODE"


@pytest.mark.parametrize("error, code", [
    (AdapterNotFoundError("no adapter 'a'"), Status.NOT_FOUND),
    (QueueFullError("queue full"), Status.RESOURCE_EXHAUSTED),
    (LimitExceededError("too many"), Status.RESOURCE_EXHAUSTED),
    (ValueError("bad value"), Status.INVALID_ARGUMENT),
    (Odd("odd"), Status.INTERNAL),
    (KeyError("bug"), Status.INTERNAL),
])
def test_status_of_maps_typed_errors(error, code, caplog):
    with caplog.at_level(logging.ERROR, logger="nolaserve.server"):
        got, message = status_of(error)
    assert got is code
    internal = code is Status.INTERNAL
    assert (f"{type(error).__name__}: " in message) is internal
    assert (str(error) in message)
    logged = [(r.getMessage(), r.exc_info and r.exc_info[1]) for r in caplog.records]
    assert logged == ([("unexpected error in an RPC", error)] if internal else [])


def test_every_status_maps_to_the_grpc_code_of_its_name():
    assert {s: c.name for s, c in GRPC_CODE.items()} == {s: s.name for s in Status}
    assert GRPC_CODE[Status.NOT_FOUND] is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("error", [ValueError, AdapterNotFoundError, KeyError])
def test_long_details_are_cut(error):
    for n in (MAX_DETAILS // 2, MAX_DETAILS + 1, 4 * MAX_DETAILS):
        _, message = status_of(error("y" * n))
        if len(message) <= MAX_DETAILS:
            assert "y" * n in message
        else:
            assert len(message) == MAX_DETAILS + len(" [cut]") and message.endswith("y [cut]")
    assert status_of(ValueError("y" * MAX_DETAILS))[1] == "y" * MAX_DETAILS


def call(servicer, request, context=None):
    return asyncio.run(servicer.Echo(request, context or Context()))


def test_a_served_call_counts_ok_and_leaves_the_gate_idle():
    s = Servicer()
    assert call(s, "hi").value == "hi"
    assert s.seen_in_flight == 1 and s.gate.in_flight == 0 and s.count("OK") == 1
    assert s.Echo.__name__ == "Echo"


def test_a_response_too_large_to_send_is_resource_exhausted_not_ok():
    """grpc would refuse it after the method returned: the count is what the client gets."""
    s = Servicer()
    with pytest.raises(Aborted) as info:
        call(s, "x" * 100)
    assert info.value.args[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than max_message_bytes (64)" in info.value.args[1]
    assert s.count("RESOURCE_EXHAUSTED") == 1 and s.count("OK") == 0
    assert s.gate.in_flight == 0


def test_a_failing_call_aborts_with_its_code_and_counts_it():
    s = Servicer()
    with pytest.raises(Aborted) as e:
        call(s, AdapterNotFoundError("no adapter 'a'"))
    assert e.value.args == (grpc.StatusCode.NOT_FOUND, "no adapter 'a'")
    assert s.count("NOT_FOUND") == 1 and s.count("OK") == 0 and s.gate.in_flight == 0


def test_a_malformed_body_is_invalid_argument_and_never_reaches_the_method():
    s = Servicer()
    with pytest.raises(Aborted) as e:
        call(s, MalformedRequest(ValueError("truncated message")))
    code, message = e.value.args
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid Echo request message: truncated message" in message
    assert s.seen_in_flight is None and s.count("INVALID_ARGUMENT") == 1


def test_an_error_after_the_client_left_is_counted_cancelled_without_an_abort():
    s = Servicer()
    assert call(s, RuntimeError("write failed"), Context(cancelled=True)) is None
    assert s.count("CANCELLED") == 1 and s.count("INTERNAL") == 0
    # a stream's write that fails at its deadline (a probe saw 2 of 10 counted CANCELLED)
    assert call(s, RuntimeError("write failed"), Context(0.0, cancelled=True)) is None
    assert s.count("DEADLINE_EXCEEDED") == 1 and s.count("INTERNAL") == 0


async def in_the_method(servicer: Servicer, task: asyncio.Task) -> None:
    """Until the wrapped method runs (or the call ended without reaching it)."""
    while servicer.seen_in_flight is None and not task.done():
        await asyncio.sleep(0)
    assert servicer.seen_in_flight == 1


@pytest.mark.parametrize("remaining, code", [(None, "CANCELLED"), (5.0, "CANCELLED"),
                                             (0.2, "CANCELLED"), (0.0, "DEADLINE_EXCEEDED"),
                                             (-1.0, "DEADLINE_EXCEEDED"),
                                             (DEADLINE_SLACK_S, "DEADLINE_EXCEEDED")])
def test_cancellation_propagates_and_is_counted_by_the_deadline(remaining, code):
    """The client's deadline fires first; its cancel can reach the server a little before
    the server's own copy of the deadline: within ``DEADLINE_SLACK_S`` it is counted as
    the deadline."""
    s = Servicer()

    async def main():
        task = asyncio.create_task(s.Echo("wait", Context(remaining)))
        await in_the_method(s, task)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert s.count(code) == 1 and s.gate.in_flight == 0


def test_draining_refuses_new_calls_and_waits_for_those_in_flight():
    s = Servicer()

    async def main():
        assert await s.gate.drain(0) is True  # nothing in flight: at once
        s.gate.draining = False
        task = asyncio.create_task(s.Echo("wait", Context()))
        await in_the_method(s, task)
        assert await s.gate.drain(0.01) is False  # still in flight
        with pytest.raises(Aborted) as e:
            await s.Echo("late", Context())
        assert e.value.args == (grpc.StatusCode.UNAVAILABLE, DRAINING)
        drained = asyncio.create_task(s.gate.drain(GUARD_S))
        await asyncio.sleep(0)
        assert not drained.done()
        task.cancel()
        assert await drained is True

    asyncio.run(main())
    assert s.gate.in_flight == 0 and s.count("UNAVAILABLE") == 1


def test_drain_waits_for_every_call_in_flight():
    s = Servicer()

    async def main():
        calls = [asyncio.create_task(s.Echo("wait", Context())) for _ in range(2)]
        for _ in range(100):  # both start within an iteration or two of the loop
            await asyncio.sleep(0)
        assert s.gate.in_flight == 2
        drained = asyncio.create_task(s.gate.drain(GUARD_S))
        calls[0].cancel()
        await asyncio.gather(calls[0], return_exceptions=True)
        await asyncio.sleep(0)
        assert not drained.done() and s.gate.in_flight == 1  # one is still running
        calls[1].cancel()
        assert await drained is True

    asyncio.run(main())
    assert s.gate.in_flight == 0 and s.count("CANCELLED") == 2


def test_decode_interceptor_turns_bad_bytes_into_a_malformed_request():
    def decode(data: bytes) -> str:
        if data == b"deep":
            raise RecursionError("nested too deep")
        return data.decode()

    handler = grpc.unary_unary_rpc_method_handler(lambda r, c: r, request_deserializer=decode)

    async def continuation(details):
        return handler

    details = SimpleNamespace(method="/nolaserve.v1.Echo/Echo")
    got = asyncio.run(DecodeInterceptor(["nolaserve.v1.Echo"]).intercept_service(
        continuation, details))
    assert got.unary_unary is handler.unary_unary
    assert got.request_deserializer(b"fine") == "fine"
    bad = got.request_deserializer(b"deep")
    assert isinstance(bad, MalformedRequest) and isinstance(bad.error, RecursionError)


@pytest.mark.parametrize("handler", [None, grpc.unary_unary_rpc_method_handler(lambda r, c: r)])
def test_decode_interceptor_leaves_handlers_without_a_decoder(handler):
    async def continuation(details):
        return handler

    details = SimpleNamespace(method="/grpc.health.v1.Health/Check")
    assert asyncio.run(DecodeInterceptor([]).intercept_service(continuation, details)) \
        is handler
