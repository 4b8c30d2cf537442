"""The Inference service: proto in, ``AsyncEngine.generate`` out. Closing the engine's
iterator (the RPC was cancelled or its deadline passed) aborts the engine request."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from nolaserve.clients.api import inference_pb2, inference_pb2_grpc

from . import convert
from .engine.async_engine import AsyncEngine
from .engine.engine import RequestOutput
from .engine.sequence import FinishReason
from .metrics import Metrics
from .rpc import Gate, RequestFailedError, rpc


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, engine: AsyncEngine, metrics: Metrics, gate: Gate) -> None:
        self.engine, self.metrics, self.gate = engine, metrics, gate

    @rpc
    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> inference_pb2.GenerateResponse:
        """Run the request to the end; one response with the whole text and token ids."""
        request_id = request.request_id or uuid.uuid4().hex
        text: list[str] = []
        token_ids: list[int] = []
        async with aclosing(self._outputs(request, request_id)) as outputs:
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
        request_id = request.request_id or uuid.uuid4().hex
        async with aclosing(self._outputs(request, request_id)) as outputs:
            async for out in outputs:
                await context.write(convert.generate_response(request_id, out))

    async def _outputs(self, request: inference_pb2.GenerateRequest,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for ``request``; an engine-side failure raises."""
        timer = self.metrics.request_timer()
        tokenizer = self.engine.engine.tokenizer
        prompt = await asyncio.to_thread(convert.prompt_token_ids, tokenizer, request)
        params = convert.sampling_params(request.sampling)
        outputs = self.engine.generate(prompt, params, request.adapter_id or None, request_id)
        async with aclosing(outputs):
            async for out in outputs:
                if out.finish_reason is FinishReason.ERROR:
                    raise _failure(out)
                timer.observe(out)
                yield out


def _failure(out: RequestOutput) -> RequestFailedError:
    error = out.error or "unknown engine error"
    if out.error_code == "INTERNAL":
        return RequestFailedError(f"{error}; retry, and report it if it persists", "INTERNAL")
    return RequestFailedError(f"the request failed: {error}", out.error_code)
