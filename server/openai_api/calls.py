"""How an HTTP request is served (its bearer token was checked before it, by
``server.BearerAuth``): the same drain ``Gate`` and request counter as the gRPC servicers,
typed errors mapped through one table (``errors.HTTP_STATUS``), and generation (JSON in,
a ``GenerateRequest`` to the shared ``Generation``, JSON or server-sent events out) that
stops when the client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from nolaserve.adapters.errors import ClientGoneError, InvalidRequestError, Status

from ..fanout import Fanout
from ..generation import GenerateRequest, Generation, checked_request_id
from ..metrics import Metrics
from ..rpc import Gate
from .completion_bodies import CompletionBodies, Shape
from .errors import error_of
from .logprobs import LogprobFormat
from .protocol import ChatCompletionRequest, CompletionRequest
from .response_bodies import ResponseBodies
from .responses_api import ResponsesRequest

Bodies = CompletionBodies | ResponseBodies  # what one request's outputs become

OK = Status.OK


class Endpoints:
    """The handlers of one server, bound to its engine, gate and metrics."""

    def __init__(self, generation: Generation, metrics: Metrics, gate: Gate,
                 tool_call_parser: str = "", cached_details: bool = False) -> None:
        self.generation, self.metrics, self.gate = generation, metrics, gate
        self.tool_call_parser = tool_call_parser  # config: what tool_choice auto parses
        self.cached_details = cached_details  # config: usage's prompt_tokens_details

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

    async def respond(self, body: ResponsesRequest, request: Request) -> Response:
        """OpenAI's Responses API: ``body`` served as the chat request it makes, in the
        ``response`` object's shapes (responses_api.py)."""
        try:
            chat = body.chat()
        except Exception as e:
            return self._failed("/v1/responses", e)
        return await self.generate("/v1/responses", chat, request,
                                   lambda shape: ResponseBodies(shape, body))

    async def generate(self, name: str, body: CompletionRequest | ChatCompletionRequest,
                       request: Request, bodies: Callable[[Shape], Bodies] = CompletionBodies
                       ) -> Response:
        """``bodies`` builds the response bodies of the request's ``Shape``."""
        try:
            self.gate.enter()
        except Exception as e:
            return self._failed(name, e)
        fan = None
        try:
            request_id = checked_request_id(request.headers.get("x-request-id", ""),
                                            "x-request-id")
            requests = body.generate_requests(self.tool_call_parser)
            fan = await until_disconnect(request, self.generation.fan_out(
                requests, body.num_choices, request_id))
            responses = bodies(self._shape(body, request_id, requests, fan))
        except BaseException as e:
            if fan is not None:
                await fan.aclose()
            self.gate.exit()
            if not isinstance(e, Exception):
                raise
            return self._failed(name, body.client_error(e))
        if body.stream:
            call = _StreamCall(self, name, fan)
            return EventStream(call.events(responses), call.close)
        code = OK
        try:
            await until_disconnect(request, _collect(fan, responses))
            return JSONResponse(responses.complete())
        except asyncio.CancelledError:
            code = Status.CANCELLED
            raise
        except Exception as e:
            code, status, error = error_of(e)
            return JSONResponse(error, status)
        finally:
            await fan.aclose()
            self.gate.exit()
            self.metrics.count_request(name, code)

    def _shape(self, body: CompletionRequest | ChatCompletionRequest, request_id: str,
               requests: list[GenerateRequest], fan: Fanout) -> Shape:
        tokenizer = self.generation.tokenizer
        params = requests[0].params
        k, k_prompt = params.logprobs, body.prompt_logprobs
        if params.logprob_token_ids and k is not None:  # vLLM: they replace the top k
            k = len(params.logprob_token_ids)
        echoes = isinstance(body, CompletionRequest) and body.echo
        if tokenizer is None and (echoes or k is not None or k_prompt is not None):
            raise InvalidRequestError("this server has no tokenizer to show tokens as text: "
                                      "leave logprobs, prompt_logprobs and echo unset",
                                      "logprobs")
        echo = None
        if echoes:
            echo = [(r.prompt if r.prompt is not None else tokenizer.decode(ids), ids)
                    for r, ids in zip(requests, fan.prompt_ids)]
        return Shape(isinstance(body, ChatCompletionRequest), body.model, request_id,
                     body.return_token_ids, body.num_choices,
                     None if k is None else LogprobFormat(
                         tokenizer, k, body.return_tokens_as_token_ids), echo,
                     body.structured_output(self.tool_call_parser)[1],
                     None if k_prompt is None else LogprobFormat(tokenizer, k_prompt),
                     body.stream_usage if body.stream else "",
                     tuple(fan.prompt_ids), self.cached_details,
                     echoes and body.echo_only)

    def _failed(self, name: str, e: Exception) -> JSONResponse:
        code, status, body = error_of(e)
        self.metrics.count_request(name, code)
        return JSONResponse(body, status)


class _StreamCall:
    """One streamed request: its events, and the cleanup that runs however the response
    ends (finished, failed, or the client disconnected, even before the first event)."""

    def __init__(self, endpoints: Endpoints, name: str, outputs: Fanout) -> None:
        self.endpoints, self.name, self.outputs = endpoints, name, outputs
        self.code = Status.CANCELLED  # until the stream ends on its own
        self.closed = False

    async def events(self, responses: Bodies) -> AsyncIterator[bytes]:
        try:
            for head in responses.first_chunks():
                yield head
            async for index, out in self.outputs:
                if (chunk := responses.chunk(index, out)) is not None:
                    yield chunk
            for tail in responses.last_chunks():
                yield tail
            self.code = OK
        except Exception as e:
            self.code = error_of(e)[0]
            for tail in responses.error_chunks(e):
                yield tail

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


async def _collect(fan: Fanout, responses: Bodies) -> None:
    async for index, out in fan:
        responses.add(index, out)


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
