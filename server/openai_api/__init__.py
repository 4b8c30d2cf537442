"""The OpenAI-compatible HTTP API: a second front end over the same engine, adapter store,
drain gate and metrics as the gRPC services (see README "OpenAI API").

    sock = bind_http(config)            # before the model loads; None when http_port = 0
    http = http_server(config, generation, store, max_model_len, metrics, gate, sock)
"""

from __future__ import annotations

import socket
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

__all__ = ["HTTP_STATUS", "HttpServer", "bind_http", "http_server"]


def http_server(config: Config, generation: Generation, store: AdapterStore | None,
                max_model_len: int, metrics: Metrics, gate: Gate,
                sock: socket.socket) -> HttpServer:
    """The HTTP server of one nolaserve process, on the pre-bound ``sock``; without a
    store, only completions, chat, health and metrics."""
    endpoints = Endpoints(generation, metrics, gate, config.tool_call_parser,
                          config.enable_prompt_tokens_details)
    adapters = None
    if store is not None:
        adapters = AdapterEndpoints(store, config, max_model_len, time.time())
    app = BodyLimit(build_app(endpoints, adapters), config.max_message_bytes)
    rules = token_rules(config.inference_token, config.admin_token)
    return HttpServer(BearerAuth(app, rules, metrics), sock, config)
