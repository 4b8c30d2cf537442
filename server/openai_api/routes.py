"""The OpenAI-compatible routes, vLLM's shapes: completions, chat, responses, models, tokenize,
detokenize, version, health, metrics and adapter management, each a thin call into
``calls.Endpoints``; and which of them need which bearer token (``token_rules``, checked
by ``server.BearerAuth`` before a body is read)."""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client.exposition import choose_encoder
from starlette.exceptions import HTTPException as StarletteHTTPException

from .admin import ADMIN_PATHS, AdapterEndpoints
from .calls import Endpoints
from .errors import error_body, invalid_body, unparsable_body
from .protocol import ChatCompletionRequest, CompletionRequest
from .responses_api import ResponsesRequest
from .tokens import DetokenizeRequest, TokenEndpoints, TokenizeRequest, version

INFERENCE_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/models",
                   "/v1/models/{model_id:path}", "/tokenize", "/detokenize", "/version")


def token_rules(inference_token: str, admin_token: str) -> dict[str, tuple[str, str]]:
    """Path -> (the token it needs, the config key that sets it); /health and /metrics
    are open, as is every path whose token is empty."""
    rules = {path: (inference_token, "inference_token") for path in INFERENCE_PATHS}
    rules.update({path: (admin_token, "admin_token") for path in ADMIN_PATHS})
    return {path: rule for path, rule in rules.items() if rule[0]}


def build_app(endpoints: Endpoints, adapters: AdapterEndpoints | None) -> FastAPI:
    """The FastAPI application: inference, models, health, metrics and adapter admin."""
    app = FastAPI(title="nolaserve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(400, *invalid_body(exc.errors())), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """An unknown path or method, or a body FastAPI's parser raised on (its
        ``__cause__``), in the error shape of every other answer."""
        route = f"{request.method} {request.url.path}"
        allow = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow")
        message = {404: f"no endpoint {route}: the endpoints are README's OpenAI API table",
                   405: f"{route}: use {allow or 'another method'}",
                   400: exc.__cause__ and unparsable_body(exc.__cause__),
                   }.get(exc.status_code) or str(exc.detail)
        return JSONResponse(error_body(exc.status_code, message), exc.status_code,
                            headers=exc.headers)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await endpoints.generate("/v1/completions", body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await endpoints.generate("/v1/chat/completions", body, request)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        return await endpoints.respond(body, request)

    tokens = TokenEndpoints(endpoints.generation)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Response:
        return await endpoints.unary("/tokenize", lambda: tokens.tokenize(body))

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Response:
        return await endpoints.unary("/detokenize", lambda: tokens.detokenize(body))

    @app.get("/version")
    async def get_version() -> Response:
        return JSONResponse({"version": version()})

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if endpoints.gate.draining else 200)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        """As ``metrics_port`` serves it: the format the ``Accept`` header asks for
        (OpenMetrics or Prometheus text 0.0.4)."""
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(endpoints.metrics.registry),
                        headers={"content-type": content_type})

    if adapters is not None:
        adapters.add_routes(app, endpoints)
    return app
