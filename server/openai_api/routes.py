"""The OpenAI-compatible routes, vLLM's shapes: completions, chat, models, health,
metrics and adapter management, each a thin call into ``calls.Endpoints``."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nolaserve.adapters.errors import UnauthenticatedError

from .admin import AdapterEndpoints
from .calls import Endpoints
from .errors import HTTP_STATUS, error_body
from .protocol import ChatCompletionRequest, CompletionRequest


def build_app(endpoints: Endpoints, adapters: AdapterEndpoints | None) -> FastAPI:
    """The FastAPI application: inference, models, health, metrics and adapter admin."""
    app = FastAPI(title="nolaserve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"invalid request: {'.'.join(where) or 'body'}: {first.get('msg', exc)}"
        return JSONResponse(error_body(400, message, where[0] if where else None), 400)

    @app.exception_handler(UnauthenticatedError)
    async def unauthenticated(request: Request, exc: UnauthenticatedError) -> JSONResponse:
        return JSONResponse(error_body(HTTP_STATUS["UNAUTHENTICATED"], str(exc)), 401)

    def inference(path: str) -> list:
        token = endpoints.inference_token
        return [Depends(endpoints.auth(path, token, "inference_token"))]

    @app.post("/v1/completions", dependencies=inference("/v1/completions"))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await endpoints.generate("/v1/completions", body, request)

    @app.post("/v1/chat/completions", dependencies=inference("/v1/chat/completions"))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await endpoints.generate("/v1/chat/completions", body, request)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if endpoints.gate.draining else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(endpoints.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    if adapters is not None:
        adapters.add_routes(app, endpoints, inference("/v1/models"))
    return app
