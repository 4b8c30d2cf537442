"""The OpenAI-compatible HTTP API: a second front end over the same engine, adapter store,
drain gate and metrics as the gRPC services (see README "OpenAI API").

    sock = bind_http(config)            # before the model loads; None when http_port = 0
    http = HttpServer(sock, config)     # started at once: 503 "loading" until it has
    http.app = http_app(config, generation, store, max_model_len, metrics, gate)
"""

from __future__ import annotations

import time

from nolaserve.adapters.store import AdapterStore

from ..config import Config
from ..generation import Generation
from ..metrics import Metrics
from ..rpc import Gate
from .admin import AdapterEndpoints
from .errors import HTTP_STATUS
from .routes import Endpoints, build_app, token_rules
from .server import BearerAuth, BodyLimit, HttpServer, bind_http

__all__ = ["HTTP_STATUS", "HttpServer", "bind_http", "http_app"]


def http_app(config: Config, generation: Generation, store: AdapterStore | None,
             max_model_len: int, metrics: Metrics, gate: Gate) -> BearerAuth:
    """The ASGI application of one nolaserve process; without a store, only completions,
    chat, health and metrics."""
    endpoints = Endpoints(generation, metrics, gate, config.tool_call_parser,
                          config.enable_prompt_tokens_details)
    adapters = None
    if store is not None:
        adapters = AdapterEndpoints(store, config, max_model_len, time.time())
    app = BodyLimit(build_app(endpoints, adapters), config.max_message_bytes)
    rules = token_rules(config.inference_token, config.admin_token)
    return BearerAuth(app, rules, metrics)
