"""The Inference service: proto in, ``AsyncEngine.generate`` out. Closing the engine's
iterator (the RPC was cancelled or its deadline passed) aborts the engine request."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from nolaserve.v1 import inference_pb2, inference_pb2_grpc

from . import convert
from .engine.async_engine import AsyncEngine
from .engine.engine import RequestOutput
from .engine.errors import InvalidRequestError
from .engine.sequence import FinishReason
from .metrics import Metrics
from .rpc import Gate, RequestFailedError, rpc

MAX_REQUEST_ID_BYTES = 128


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, engine: AsyncEngine, metrics: Metrics, gate: Gate) -> None:
        self.engine, self.metrics, self.gate = engine, metrics, gate

    @rpc
    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> inference_pb2.GenerateResponse:
        """Run the request to the end; one response with the whole text and token ids."""
        request_id = _request_id(request)
        text: list[str] = []
        token_ids: list[int] = []
        async with aclosing(self._outputs(request)) as outputs:
            async for out in outputs:
                text.append(out.text)
                token_ids += out.token_ids
        whole = dataclasses.replace(out, text="".join(text), token_ids=token_ids)
        return convert.generate_response(request_id, whole)

    @rpc
    async def GenerateStream(self, request: inference_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> None:
        """Stream the completion: each message has the new text and token ids, the last
        one finish_reason and usage. Written with ``context.write`` so that cancellation
        lands inside this coroutine and closes the engine request at once."""
        request_id = _request_id(request)
        async with aclosing(self._outputs(request)) as outputs:
            async for out in outputs:
                await context.write(convert.generate_response(request_id, out))

    async def _outputs(self, request: inference_pb2.GenerateRequest
                       ) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for ``request``; an engine-side failure raises."""
        timer = self.metrics.request_timer()
        tokenizer, limits = self.engine.engine.tokenizer, self.engine.engine.limits
        convert.check_prompt_size(request, min(limits.max_prompt_tokens,
                                               limits.max_model_len - 1))
        prompt = await asyncio.to_thread(convert.prompt_token_ids, tokenizer, request)
        params = convert.sampling_params(request.sampling)
        # The engine's id is its own: a client's request_id is only echoed back, so two
        # clients choosing the same id never meet.
        outputs = self.engine.generate(prompt, params, request.adapter_id or None)
        async with aclosing(outputs):
            async for out in outputs:
                if out.finish_reason is FinishReason.ERROR:
                    raise _failure(out)
                timer.observe(out)
                yield out


def _request_id(request: inference_pb2.GenerateRequest) -> str:
    """The id echoed in every response: the client's (at most MAX_REQUEST_ID_BYTES) or a
    fresh uuid."""
    if len(request.request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise InvalidRequestError(f"request_id is {len(request.request_id.encode())} bytes; "
                                  f"the limit is {MAX_REQUEST_ID_BYTES}")
    return request.request_id or uuid.uuid4().hex


def _failure(out: RequestOutput) -> RequestFailedError:
    error = out.error or "unknown engine error"
    if out.error_code == "INTERNAL":
        return RequestFailedError(f"{error}; retry, and report it if it persists", "INTERNAL")
    return RequestFailedError(f"the request failed: {error}", out.error_code)
