"""The Inference service: proto in, ``Generation.fan_out``'s outputs out (``sampling.n``
completions). Closing them (the RPC was cancelled or its deadline passed) aborts the
engine requests."""

from __future__ import annotations

from contextlib import aclosing

import grpc

from nolaserve.v1 import inference_pb2, inference_pb2_grpc

from . import convert
from .engine.engine_types import RequestOutput
from .fanout import Fanout
from .generation import Generation, checked_request_id
from .metrics import Metrics
from .rpc import Gate, check_size, rpc


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, generation: Generation, metrics: Metrics, gate: Gate,
                 max_message_bytes: int) -> None:
        self.generation, self.metrics, self.gate = generation, metrics, gate
        self.max_message_bytes = max_message_bytes

    @rpc
    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> inference_pb2.GenerateResponse:
        """Run the request to the end; one response with the whole text and token ids (of
        each completion, with ``sampling.n > 1``)."""
        request_id = checked_request_id(request.request_id, "request_id")
        n = convert.num_completions(request)
        outs: list[list[RequestOutput]] = [[] for _ in range(n)]
        async with aclosing(await self._start(request, request_id, n)) as fan:
            async for index, out in fan:
                outs[index].append(out)
        if n == 1:
            return convert.generate_response(request_id, RequestOutput.joined(outs[0]))
        return convert.completions_response(request_id, [RequestOutput.joined(o) for o in outs])

    @rpc
    async def GenerateStream(self, request: inference_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> None:
        """Stream the completion (each of ``sampling.n``, by ``index``): each message has
        the new text and token ids, the last one finish_reason and usage. Written with
        ``context.write`` so that cancellation lands inside this coroutine and closes the
        engine requests at once."""
        request_id = checked_request_id(request.request_id, "request_id")
        n = convert.num_completions(request)
        async with aclosing(await self._start(request, request_id, n)) as fan:
            async for index, out in fan:
                response = convert.generate_response(request_id, out, index)
                check_size(response, self.max_message_bytes)
                await context.write(response)

    async def _start(self, request: inference_pb2.GenerateRequest, request_id: str,
                     n: int) -> Fanout:
        return await self.generation.fan_out([convert.generate_request(request)], n,
                                             request_id)


