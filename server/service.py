"""The Inference service: proto in, ``Generation.outputs`` out. Closing the engine's
iterator (the RPC was cancelled or its deadline passed) aborts the engine request."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from nolaserve.adapters.errors import InvalidRequestError
from nolaserve.v1 import inference_pb2, inference_pb2_grpc

from . import convert
from .engine.engine_types import RequestOutput
from .generation import Generation
from .metrics import Metrics
from .rpc import Gate, rpc

MAX_REQUEST_ID_BYTES = 128


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, generation: Generation, metrics: Metrics, gate: Gate) -> None:
        self.generation, self.metrics, self.gate = generation, metrics, gate

    @rpc
    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> inference_pb2.GenerateResponse:
        """Run the request to the end; one response with the whole text and token ids."""
        request_id = _request_id(request)
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
        request_id = _request_id(request)
        async with aclosing(self._outputs(request, request_id)) as outputs:
            async for out in outputs:
                await context.write(convert.generate_response(request_id, out))

    def _outputs(self, request: inference_pb2.GenerateRequest,
                 request_id: str) -> AsyncIterator[RequestOutput]:
        return self.generation.outputs(convert.generate_request(request), request_id)


def _request_id(request: inference_pb2.GenerateRequest) -> str:
    """The id echoed in every response: the client's (at most MAX_REQUEST_ID_BYTES) or a
    fresh uuid."""
    if len(request.request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise InvalidRequestError(f"request_id is {len(request.request_id.encode())} bytes; "
                                  f"the limit is {MAX_REQUEST_ID_BYTES}")
    return request.request_id or uuid.uuid4().hex
