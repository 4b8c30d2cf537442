"""Prometheus metrics of one server, in their own ``CollectorRegistry`` (several servers
can share a process). Names start with ``nolaserve_``, and no label of theirs carries an
adapter id; the ``vllm:`` series that routers read keep vLLM's names, and vLLM's own
``vllm:lora_requests_info`` lists adapter ids in its labels.

Recorded where the work happens: request counts and latencies by the RPC layer
(``count_request``, ``RequestTimer``), batch shape by the engine step and adapter loads by
the slot pool that does them (``observe_step`` and ``materialize.observe``, passed to
``Engine.observe``). State (queues, KV blocks, slots, caches, registry) is read at scrape
time by ``EngineCollector`` from ``Engine.stats``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from nolaserve.adapters.errors import Status
from nolaserve.adapters.store import StoreStats

from .engine.engine import Engine
from .engine.engine_types import FinishReason, RequestOutput, StepStats
from .metrics_prefix import prefix_cache_series
from .metrics_vllm import NAMES as REQUEST_NAMES
from .metrics_vllm import RequestSeries

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_TOKENS = tuple(float(2**i) for i in range(14))  # 1 .. 8192
_ADAPTERS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
_LOAD = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Every instrument of one server."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.requests = Counter("nolaserve_requests", "RPCs by method and final status code",
                                ["rpc", "code"], registry=r)
        self.ttft = Histogram("nolaserve_time_to_first_token_seconds",
                              "RPC start to the first generated token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram("nolaserve_time_per_output_token_seconds",
                              "Mean time between generated tokens of a request",
                              buckets=_PER_TOKEN, registry=r)
        self.latency = Histogram("nolaserve_request_latency_seconds",
                                 "RPC start to the last token of a finished request",
                                 buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("nolaserve_prompt_tokens",
                                     "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("nolaserve_generation_tokens",
                                         "Generated tokens of finished requests", registry=r)
        self.batch_tokens = Histogram("nolaserve_batch_tokens", "Tokens computed per step",
                                      buckets=_TOKENS, registry=r)
        self.batch_adapters = Histogram("nolaserve_batch_distinct_adapters",
                                        "Distinct adapters per step (base model not counted)",
                                        buckets=_ADAPTERS, registry=r)
        self.materialize = Histogram("nolaserve_adapter_materialize_seconds",
                                     "Filling a device slot with an adapter (regenerated, or "
                                     "copied from the warm tier or a parked request's factors)",
                                     buckets=_LOAD, registry=r)
        self.registry_up = Gauge("nolaserve_registry_up", "1 while the adapter registry's "
                                 "database answers this replica, else 0", registry=r)
        self.registry_changes = Counter("nolaserve_registry_changes_applied",
                                        "Adapters registered, replaced or deleted by other "
                                        "replicas and applied here", registry=r)
        self.vllm: RequestSeries | None = None  # vLLM's names, once bound to an engine
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def bind(self, engine: Engine) -> None:
        """Observe ``engine``: per-step stats, cold loads and scrape-time state."""
        engine.observe(on_step=self.observe_step, on_load=self.materialize.observe)
        self.vllm = RequestSeries(self.registry, engine.model_name,
                                  engine.limits.max_model_len)
        self.registry.register(EngineCollector(engine))

    def observe_step(self, stats: StepStats) -> None:
        self.batch_tokens.observe(stats.num_tokens)
        self.batch_adapters.observe(stats.num_adapters)

    def count_request(self, rpc: str, code: Status) -> None:
        """Count one request by its final status (the label is the status's name)."""
        self.requests.labels(rpc, code.name).inc()

    def request_timer(self) -> RequestTimer:
        return RequestTimer(self)

    def serve_http(self, sock: socket.socket) -> int:
        """Serve ``/metrics`` on the listening socket ``sock`` (``ports.bind_tcp``, bound
        before the model loaded) from a daemon thread; returns its port."""
        self._http = _PreboundServer(sock)
        self._http.set_app(_at_metrics(make_wsgi_app(self.registry)))
        self._http_thread = threading.Thread(target=self._http.serve_forever,
                                             name="nolaserve-metrics", daemon=True)
        self._http_thread.start()
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _at_metrics(app: Callable) -> Callable:
    """The WSGI ``app`` at ``/metrics``; any other path answers 404 naming that one."""
    def routed(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/metrics":
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: the metrics are at /metrics\n"]

    return routed


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # no line per scrape
        pass


class _PreboundServer(ThreadingWSGIServer):
    """prometheus_client's threading WSGI server over a socket that is already bound."""

    def __init__(self, sock: socket.socket) -> None:
        self.address_family = sock.family
        host, port = sock.getsockname()[:2]
        super().__init__((host, port), _QuietHandler, bind_and_activate=False)
        self.socket.close()
        self.socket, self.server_address = sock, (host, port)
        self.server_name, self.server_port = host, port
        self.setup_environ()


class RequestTimer:
    """Feed it a request's outputs; it observes TTFT, the gaps between tokens, latency and
    token counts (``nolaserve_`` series for requests that finish normally; vLLM's names
    for every request that reached the engine, by ``finished_reason``, its prompt tokens
    counted once it was prefilled, as vLLM counts them: when its first token came)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics, self.vllm = metrics, metrics.vllm
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last = self.start
        self.tokens = 0
        self.done = False

    def observe(self, out: RequestOutput) -> None:
        now, m = time.perf_counter(), self.metrics
        if out.token_ids:
            self._token_times(now, len(out.token_ids))
        if not out.finished:
            return
        self.done = True
        prefilled = out.prompt_tokens if self.first is not None else 0
        self._vllm_finished(out.finish_reason, prefilled, out.completion_tokens, now)
        if out.finish_reason is FinishReason.ERROR:
            return
        m.latency.observe(now - self.start)
        m.prompt_tokens.inc(out.prompt_tokens)
        m.generation_tokens.inc(out.completion_tokens)
        if self.first is not None and out.completion_tokens > 1:
            m.tpot.observe((now - self.first) / (out.completion_tokens - 1))

    def aborted(self, prompt_tokens: int) -> None:
        """The client went away before the request finished (no-op after it finished)."""
        if not self.done:
            self.done = True
            prefilled = prompt_tokens if self.first is not None else 0
            self._vllm_finished(FinishReason.CANCELLED, prefilled, self.tokens,
                                time.perf_counter())

    def _token_times(self, now: float, tokens: int) -> None:
        self.tokens += tokens
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.start)
            if self.vllm is not None:
                self.vllm.ttft.observe(now - self.start)
        elif self.vllm is not None:
            self.vllm.token_gap(now - self.last, tokens)
        self.last = now

    def _vllm_finished(self, reason: FinishReason | None, prompt_tokens: int,
                       completion_tokens: int, now: float) -> None:
        if self.vllm is not None:
            decode = self.last - self.first if self.first is not None else None
            self.vllm.finished(reason, prompt_tokens, completion_tokens, now - self.start,
                               decode)


class EngineCollector(Collector):
    """Gauges and counters read from the engine and the adapter store at each scrape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats
        yield _gauge("nolaserve_requests_running", "Requests holding KV blocks", stats.running)
        yield _gauge("nolaserve_requests_waiting", "Requests waiting to be scheduled",
                     stats.waiting)
        yield _gauge("nolaserve_kv_cache_blocks_used", "KV-cache blocks in use",
                     stats.kv_blocks_used)
        yield _gauge("nolaserve_kv_cache_blocks_total", "KV-cache blocks", stats.kv_blocks_total)
        if stats.store is not None:
            yield CounterMetricFamily("nolaserve_requests_parked",
                                      "Times a request was parked: its adapter's slot handed "
                                      "on while it waits, its weights held (time slicing, or "
                                      "a request preempted that the next "
                                      "schedule did not reach); one request may be parked "
                                      "many times", stats.parked)
            yield from self._store_metrics(stats.store)
            yield lora_requests_info(stats.running_adapters, stats.waiting_adapters,
                                     stats.store.slots.slots_total)
        if stats.prefix_cache is not None:
            yield from prefix_cache_series(stats.prefix_cache, self.engine.model_name)
        if stats.preemptions is not None:  # under vLLM, vLLM's own series of this name
            family = CounterMetricFamily("vllm:num_preemptions", "Cumulative number of "
                                         "preemption from the engine.",
                                         labels=["model_name", "engine"])
            family.add_metric([self.engine.model_name, "0"], stats.preemptions)
            yield family
        yield from router_gauges(stats.waiting, stats.running,
                                 stats.kv_blocks_used / max(1, stats.kv_blocks_total),
                                 self.engine.model_name)
        yield from self.engine.extra_metrics(VLLM_NAMES)

    def _store_metrics(self, store: StoreStats) -> Iterator[Metric]:
        host, pool = store.host, store.slots
        counters = {"hits": (host.hits, pool.hits), "misses": (host.misses, pool.misses),
                    "evictions": (host.evictions, pool.evictions)}
        for what, (host_n, slot_n) in counters.items():
            family = CounterMetricFamily(f"nolaserve_adapter_cache_{what}",
                                         f"Adapter cache {what} (host: parsed adapters, "
                                         "slot: device slots)", labels=["cache"])
            family.add_metric(["host"], host_n)
            family.add_metric(["slot"], slot_n)
            yield family
        yield _gauge("nolaserve_adapter_slots_used", "Device slots holding an adapter",
                     pool.slots_used)
        yield _gauge("nolaserve_adapter_slots_total", "Device slots", pool.slots_total)
        yield _gauge("nolaserve_adapter_slots_pinned", "Pinned device slots", pool.pinned)
        yield _gauge("nolaserve_host_cache_bytes", "Bytes of parsed adapters in host memory",
                     host.bytes)
        yield _gauge("nolaserve_host_cache_entries", "Parsed adapters in host memory",
                     host.entries)
        yield _gauge("nolaserve_adapters_registered", "Adapters in the registry",
                     store.registered)


def lora_requests_info(running: Sequence[str], waiting: Sequence[str], max_lora: int
                       ) -> GaugeMetricFamily:
    """vLLM's ``vllm:lora_requests_info``, which LoRA-affinity routers (the Gateway API
    Inference Extension's endpoint picker, llm-d, KServe) read: one sample whose labels are
    ``max_lora`` (adapters the device holds at once: ``num_slots``) and the comma-separated
    ids of adapters with running and with waiting requests, each capped at ``max_lora`` ids
    and ``LORA_LABEL_CHARS`` characters; its value is the time of the scrape, as in vLLM."""
    family = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                               labels=["max_lora", "running_lora_adapters",
                                       "waiting_lora_adapters"])
    family.add_metric([str(max_lora), _adapter_list(running, max_lora),
                       _adapter_list(waiting, max_lora)], time.time())
    return family


LORA_LABEL_CHARS = 4096
# the vllm: series nolaserve exports itself (a backend's own ones of these names are dropped)
VLLM_NAMES = {"vllm:lora_requests_info", "vllm:num_requests_waiting",
              "vllm:num_requests_running", "vllm:gpu_cache_usage_perc",
              "vllm:kv_cache_usage_perc", *REQUEST_NAMES}


def router_gauges(waiting: int, running: int, kv_usage: float, model_name: str
                  ) -> Iterator[Metric]:
    """The vLLM series that the Gateway API Inference Extension's endpoint picker scores
    replicas by (queue length and KV-cache use, a fraction in [0, 1]); the KV one under its
    older and its newer name. Labelled as vLLM labels them (``model_name``, ``engine``)."""
    yield _gauge("vllm:num_requests_waiting", "Requests waiting to be processed", waiting,
                 model_name)
    yield _gauge("vllm:num_requests_running", "Requests running on the device", running,
                 model_name)
    for name in ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"):
        yield _gauge(name, "KV-cache usage; 1 means 100 percent usage", kv_usage, model_name)


def _adapter_list(adapter_ids: Sequence[str], cap: int) -> str:
    ids = list(dict.fromkeys(adapter_ids))[:cap]
    text = ",".join(ids)
    if len(text) > LORA_LABEL_CHARS:
        text = text[:LORA_LABEL_CHARS].rpartition(",")[0]
    return text


def _gauge(name: str, documentation: str, value: float, model_name: str | None = None
           ) -> GaugeMetricFamily:
    if model_name is None:
        return GaugeMetricFamily(name, documentation, value=value)
    family = GaugeMetricFamily(name, documentation, labels=["model_name", "engine"])
    family.add_metric([model_name, "0"], value)
    return family
