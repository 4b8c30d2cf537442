"""How an HTTP request is served (its bearer token was checked before it, by
``server.BearerAuth``): the same drain ``Gate`` and request counter as the gRPC servicers,
typed errors mapped through one table (``errors.HTTP_STATUS``), and generation (JSON in,
a ``GenerateRequest`` to the shared ``Generation``, JSON or server-sent events out) that
stops when the client goes away."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from nolaserve.adapters.errors import ClientGoneError, Status

from ..engine.engine_types import RequestOutput
from ..generation import Generation
from ..metrics import Metrics
from ..rpc import Gate
from .errors import error_of, sse_error
from .protocol import ChatCompletionRequest, CompletionRequest
from .responses import DONE, Responses

OK = Status.OK


class Endpoints:
    """The handlers of one server, bound to its engine, gate and metrics."""

    def __init__(self, generation: Generation, metrics: Metrics, gate: Gate) -> None:
        self.generation, self.metrics, self.gate = generation, metrics, gate

    async def unary(self, name: str, fn: Callable[[], Awaitable[Response]]) -> Response:
        """Run ``fn`` behind the gate; count it; a typed error becomes its HTTP error."""
        code = OK
        try:
            self.gate.enter()
            try:
                return await fn()
            finally:
                self.gate.exit()
        except asyncio.CancelledError:
            code = Status.CANCELLED
            raise
        except Exception as e:
            code, status, body = error_of(e)
            return JSONResponse(body, status)
        finally:
            self.metrics.count_request(name, code)

    async def generate(self, name: str, body: CompletionRequest | ChatCompletionRequest,
                       request: Request) -> Response:
        try:
            self.gate.enter()
        except Exception as e:
            return self._failed(name, e)
        try:
            request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
            responses = Responses(isinstance(body, ChatCompletionRequest), body.model,
                                  request_id, body.return_token_ids)
            outputs = self.generation.outputs(body.generate_request(), request_id)
            first = await until_disconnect(request, anext(outputs))
        except BaseException as e:
            self.gate.exit()
            if not isinstance(e, Exception):
                raise
            return self._failed(name, e)
        if body.stream:
            call = _StreamCall(self, name, outputs)
            events = call.events(responses, first, body.include_usage)
            return EventStream(events, call.close)
        code = OK
        try:
            text, ids, last = await until_disconnect(request, _collect(first, outputs))
            return JSONResponse(responses.complete(text, ids, last))
        except asyncio.CancelledError:
            code = Status.CANCELLED
            raise
        except Exception as e:
            code, status, error = error_of(e)
            return JSONResponse(error, status)
        finally:
            await outputs.aclose()
            self.gate.exit()
            self.metrics.count_request(name, code)

    def _failed(self, name: str, e: Exception) -> JSONResponse:
        code, status, body = error_of(e)
        self.metrics.count_request(name, code)
        return JSONResponse(body, status)


class _StreamCall:
    """One streamed request: its events, and the cleanup that runs however the response
    ends (finished, failed, or the client disconnected, even before the first event)."""

    def __init__(self, endpoints: Endpoints, name: str,
                 outputs: AsyncIterator[RequestOutput]) -> None:
        self.endpoints, self.name, self.outputs = endpoints, name, outputs
        self.code = Status.CANCELLED  # until the stream ends on its own
        self.closed = False

    async def events(self, responses: Responses, out: RequestOutput, include_usage: bool
                     ) -> AsyncIterator[bytes]:
        try:
            if (head := responses.first_chunk()) is not None:
                yield head
            while True:
                if (chunk := responses.chunk(out, include_usage)) is not None:
                    yield chunk
                if out.finished:
                    break
                out = await anext(self.outputs)
            if include_usage:
                yield responses.usage_chunk(out)
            self.code = OK
            yield DONE
        except Exception as e:
            self.code = error_of(e)[0]
            yield sse_error(e)
            yield DONE

    async def close(self) -> None:
        """Abort the engine request if it still runs; leave the gate; count the call."""
        if self.closed:
            return
        self.closed = True
        try:
            await self.outputs.aclose()
        finally:
            self.endpoints.gate.exit()
            self.endpoints.metrics.count_request(self.name, self.code)


class EventStream(StreamingResponse):
    """Server-sent events whose ``on_close`` runs when the response ends, whichever way
    (a disconnect cancels the send loop, possibly before the body iterator started)."""

    def __init__(self, events: AsyncIterator[bytes],
                 on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


async def _collect(first: RequestOutput, outputs: AsyncIterator[RequestOutput]
                   ) -> tuple[str, list[int], RequestOutput]:
    text, ids, out = [first.text], list(first.token_ids), first
    while not out.finished:
        out = await anext(outputs)
        text.append(out.text)
        ids += out.token_ids
    return "".join(text), ids, out


async def until_disconnect(request: Request, awaitable: Awaitable):
    """Await ``awaitable`` unless the client disconnects first (then it is cancelled and
    ``ClientGoneError`` raised): a request nobody waits for stops using the engine."""
    task = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGoneError("the client disconnected")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
