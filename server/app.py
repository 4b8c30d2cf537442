"""Assemble and run the server: engine, gRPC services (Inference, Admin, health,
reflection), token auth, optional TLS, Prometheus metrics and SIGTERM draining.

    serve(config) -> exit code            # blocking; what `nolaserve serve` calls
    await start(config, engine) -> RunningServer   # in-process (tests): .port, .stop(grace)

Every port is bound before the model loads (``ports.py``): a port in use fails at once,
and each answers while the model loads (health NOT_SERVING, the APIs "loading").
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nolaserve.adapters import cpu_threads
from nolaserve.adapters.errors import short
from nolaserve.adapters.registry_watch import RegistryWatcher
from nolaserve.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

from . import reflection
from .admin import AdminServicer
from .auth import TokenAuthInterceptor
from .build import build_engine
from .build_vllm import build_vllm_engine
from .config import Config
from .engine.async_engine import AsyncEngine
from .engine.engine import Engine
from .engine.vllm_engine import VllmEngine
from .generation import Generation
from .metrics import Metrics
from .openai_api import HttpServer, bind_http, http_app
from .ports import GRPC_OPTIONS, add_grpc_port, bind_tcp
from .rpc import DecodeInterceptor, Deferred, Gate
from .service import InferenceServicer

log = logging.getLogger("nolaserve.server")
REGISTRY = "registry"  # the health sub-service of the adapter registry's database
CANCELLED_FLUSH_S = 2.0  # after the grace: for cancelled streams to send their last message
SERVICES = {service.full_name: service for service in (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"],
    admin_pb2.DESCRIPTOR.services_by_name["Admin"])}
INFERENCE, ADMIN = SERVICES


@dataclass
class RunningServer:
    """A started server. ``stop`` drains it: new RPCs get UNAVAILABLE and health reports
    NOT_SERVING while in-flight ones get up to ``grace`` seconds; then everything stops."""

    config: Config
    server: grpc.aio.Server
    engine: AsyncEngine | VllmEngine
    metrics: Metrics
    gate: Gate
    health: Health
    port: int
    metrics_port: int | None
    owns_engine: bool
    http: HttpServer | None = None
    watcher: RegistryWatcher | None = None
    died: asyncio.Event = field(default_factory=asyncio.Event, init=False)  # step thread ended
    _stopping: asyncio.Task | None = field(default=None, init=False, repr=False)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    @property
    def http_url(self) -> str | None:
        """The OpenAI API's base URL (``.../v1``), or None when ``http_port`` is 0."""
        if self.http is None:
            return None
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        scheme = "https" if self.http.tls else "http"
        return f"{scheme}://{host}:{self.http.port}/v1"

    async def stop(self, grace: float | None = None) -> None:
        """Drain for up to ``grace`` seconds (default ``config.grace_period_s``), cancel
        what is left, stop the engine and the metrics endpoint. A second call waits for
        the first."""
        if self._stopping is None:
            grace = self.config.grace_period_s if grace is None else grace
            self._stopping = asyncio.create_task(self._stop(grace))
        await asyncio.shield(self._stopping)

    def watch_engine(self) -> None:
        """If the step thread ends unasked: health NOT_SERVING at once and ``died`` set
        (``serve_async`` then exits non-zero so that a supervisor restarts the process).
        The engine already failed every request with UNAVAILABLE."""
        loop = asyncio.get_running_loop()

        def on_death(error: BaseException) -> None:
            log.critical("the engine step thread ended: %r; reporting NOT_SERVING and "
                         "exiting", error, exc_info=error)
            asyncio.run_coroutine_threadsafe(self._engine_died(), loop)

        self.engine.on_death = on_death
        if self.engine.dead is not None:
            on_death(self.engine.dead)

    async def _engine_died(self) -> None:
        await self.health.enter_graceful_shutdown()
        self.died.set()

    async def _stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        if not await self.gate.drain(grace):
            log.warning("%d requests still running after %.1f s; cancelling them",
                        self.gate.in_flight, grace)
            await self.engine.cancel_all()  # each stream ends itself: a cancelled finish
            await self.gate.drain(CANCELLED_FLUSH_S)  # (gRPC) or an error event (HTTP)
        await self.server.stop(0)  # cancels what is left: their engine requests abort
        if self.http is not None:
            await self.http.stop()
        if self.watcher is not None:
            await asyncio.to_thread(self.watcher.stop)
        await asyncio.to_thread(self.engine.close if self.owns_engine else self.engine.stop)
        self.metrics.close()


async def start(config: Config, engine: Engine | VllmEngine | None = None) -> RunningServer:
    """Bind every port first (``host:port``, port 0 picks a free one; ``metrics_port`` and
    ``http_port`` unless 0), so that a port in use fails with ``PortInUseError`` before the
    model loads; serve them at once (health NOT_SERVING, Inference and Admin UNAVAILABLE,
    HTTP 503 while loading); then build the engine (unless given) and add the services."""
    metrics = Metrics()
    # the handlers' blocking work (registrations, RMM builds) runs torch serially
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(thread_name_prefix="asyncio", initializer=cpu_threads.serial))
    tokens = {ADMIN: (config.admin_token, "admin_token"),
              INFERENCE: (config.inference_token, "inference_token")}
    limit = config.max_message_bytes
    server = grpc.aio.server(
        interceptors=[TokenAuthInterceptor(tokens, metrics), DecodeInterceptor(SERVICES)],
        options=[*GRPC_OPTIONS, ("grpc.max_receive_message_length", limit),
                 ("grpc.max_send_message_length", limit)])
    metrics_port = http = aengine = watcher = None
    health_servicer, deferred = Health(), Deferred(*SERVICES.values())
    try:
        port = add_grpc_port(server, config.host, config.port, "--port", _credentials(config))
        if config.metrics_port:
            metrics_port = metrics.serve_http(
                bind_tcp(config.host, config.metrics_port, "--metrics-port"))
        http_sock = bind_http(config)
        http = HttpServer(http_sock, config) if http_sock is not None else None
        await _serve_health(server, deferred, health_servicer)
        if http is not None:
            await http.start()
        owns = engine is None
        if engine is None:
            log.info("ports bound; loading model %s", config.model or "(embedded SmolLM2)")
            engine = (await build_vllm_engine(config) if config.engine == "vllm" else
                      await _build_on_own_thread(config))
        aengine, generation, gate = _add_services(deferred, engine, config, metrics)
        if http is not None:
            http.app = http_app(config, generation, engine.store,
                                engine.limits.max_model_len, metrics, gate)
        for name in ("", INFERENCE, ADMIN, REGISTRY):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        watcher = watch_registry(engine, config, health_servicer, metrics)
    except BaseException:
        await _abort(server, aengine, http, metrics)
        raise
    running = RunningServer(config, server, aengine, metrics, gate, health_servicer, port,
                            metrics_port, owns, http, watcher)
    running.watch_engine()
    return running


def watch_registry(engine: Engine | VllmEngine, config: Config,
                   health_servicer: Health,
                   metrics: Metrics) -> RegistryWatcher:
    """Apply other replicas' registry changes to ``engine``'s store (``RegistryWatcher``)
    and report the registry's reachability as the ``registry`` health sub-service and the
    ``nolaserve_registry_up`` gauge. The whole server stays SERVING: hot adapters serve."""
    loop, store = asyncio.get_running_loop(), engine.store
    status = health_pb2.HealthCheckResponse

    def on_health(up: bool, message: str) -> None:
        metrics.registry_up.set(1 if up else 0)
        asyncio.run_coroutine_threadsafe(
            health_servicer.set(REGISTRY, status.SERVING if up else status.NOT_SERVING), loop)

    def on_change(adapter_id: str) -> None:
        metrics.registry_changes.inc()
        store.forget(adapter_id)

    metrics.registry_up.set(1)
    return RegistryWatcher(store.registry, on_change, on_health=on_health,
                           interval_s=config.registry_poll_interval_s).start()


async def _build_on_own_thread(config: Config) -> Engine:
    """``build_engine`` on a thread that ends with the build, and its OpenMP team with it:
    the step thread's is then the process's only one (``cpu_threads``)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="engine-build")
    try:
        return await asyncio.wrap_future(pool.submit(build_engine, config))
    finally:
        pool.shutdown(wait=False)


async def _abort(server: grpc.aio.Server, aengine: AsyncEngine | None,
                 http: HttpServer | None, metrics: Metrics) -> None:
    """Undo a start that failed part way: stop what started, close the bound sockets."""
    await server.stop(0)
    if http is not None:
        await http.stop()
    if aengine is not None:
        aengine.stop()
    metrics.close()


class Health(health.aio.HealthServicer):
    """grpc's health service with its ``List`` (every service's status), which grpcio's
    asyncio servicer leaves unimplemented though it is in the service it serves, and a
    ``Check`` of an unknown service whose NOT_FOUND names the known ones."""

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        status = self._server_status.get(request.service)
        if status is None:
            known = ", ".join(repr(name) for name in sorted(self._server_status))
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no service {short(request.service)} reports health here: "
                                f"ask for one of {known} ('' is the server)")
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request: health_pb2.HealthListRequest,
                   context: grpc.aio.ServicerContext) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._server_status.items()})


async def _serve_health(server: grpc.aio.Server, deferred: Deferred,
                        health_servicer: Health) -> None:
    """Start ``server`` before the model loads: health NOT_SERVING (every service it will
    report, ``registry`` too), reflection, and Inference and Admin ``deferred``
    (UNAVAILABLE until ``_add_services``)."""
    server.add_generic_rpc_handlers((deferred,))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable(server, *SERVICES, health.SERVICE_NAME)
    for name in ("", *SERVICES, REGISTRY):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()


def _add_services(deferred: Deferred, engine: Engine | VllmEngine, config: Config,
                  metrics: Metrics) -> tuple[AsyncEngine | VllmEngine, Generation, Gate]:
    """Inference and Admin over ``engine``, in place of ``deferred``'s UNAVAILABLE."""
    metrics.bind(engine)
    gate = Gate()
    # vLLM's engine is asynchronous itself; the native one gets its step thread here
    aengine = engine if isinstance(engine, VllmEngine) else AsyncEngine(
        engine, config.stream_interval)
    generation = Generation(aengine, metrics)
    inference_pb2_grpc.add_InferenceServicer_to_server(
        InferenceServicer(generation, metrics, gate, config.max_message_bytes), deferred)
    admin_pb2_grpc.add_AdminServicer_to_server(
        AdminServicer(engine, config, metrics, gate), deferred)
    return aengine, generation, gate


def _credentials(config: Config) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    pair = (Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())
    return grpc.ssl_server_credentials([pair])


async def serve_async(config: Config, engine: Engine | None = None) -> int:
    """Start, print the bound address, run until SIGTERM or SIGINT, drain, return 0; if
    the engine's step thread dies, stop at once and return 1."""
    started = time.perf_counter()
    running = await start(config, engine)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = f":{running.metrics_port}" if running.metrics_port else " off"
    log.info("started in %.1f s", time.perf_counter() - started)
    print(f"nolaserve listening on {running.address} (metrics{metrics})", flush=True)
    if running.http_url is not None:
        print(f"nolaserve OpenAI API on {running.http_url}", flush=True)
    try:
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(running.died.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if running.died.is_set():
            await running.stop(0)
            print("nolaserve stopped: the engine failed (see the log)", flush=True)
            return 1
        log.info("signal received: draining for up to %.1f s", config.grace_period_s)
        await running.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    print("nolaserve stopped", flush=True)
    return 0


def serve(config: Config, engine: Engine | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the process exit code (0, or 1 when
    the engine failed)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    raise_open_files_limit()
    return asyncio.run(serve_async(config, engine))


def raise_open_files_limit(target: int = 65536) -> None:
    """The soft limit on open files up to the hard one (at most ``target``), as vLLM
    does: at the usual 1,024 a burst of connections runs the server out of descriptors,
    and every accept then fails."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(hard, target)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-files limit from %d: %s", soft, e)
