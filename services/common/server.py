"""Runs a gRPC service: health, reflection, interceptors, metrics, and a
graceful drain on SIGTERM or SIGINT.

Health has two faces, as Kubernetes probes use them:
- the empty service name ``""`` is liveness: SERVING while the process runs,
  NOT_SERVING once it is draining. A database outage does not change it, so an
  outage never restarts every pod.
- each of the service's own names (``moneta.ledger.v1.LedgerService``) is
  readiness: SERVING only while every dependency answers, re-checked every
  few seconds, and NOT_SERVING while draining.

When the service's port speaks TLS, the kubelet (whose gRPC probes cannot
present a certificate) reads both faces on a plaintext port that serves the
health service and nothing else (``MONETA_GRPC_HEALTH_PORT``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Gauge, start_http_server

from services.common.config import CommonSettings
from services.common.interceptors import ServerInterceptor
from services.common.tls import server_credentials

log = structlog.get_logger("moneta.server")

DependencyCheck = Callable[[], Awaitable[object]]

READY = Gauge("moneta_ready", "1 while every dependency of the service answers.")
DEPENDENCY_UP = Gauge("moneta_dependency_up", "1 while the dependency answers.", ["dependency"])

_CHECK_TIMEOUT_SECONDS = 1.5
_MAX_CONNECTION_AGE_MS = 300_000


@dataclass
class GrpcService:
    """What a service hands to the runner."""

    name: str
    port: int
    host: str
    # Registers the servicers on the server.
    register: Callable[[grpc.aio.Server], None]
    # Full names of the gRPC services registered, for health and reflection.
    service_names: Sequence[str]
    # Dependency checks by name; each raises (or times out) when it fails.
    dependencies: dict[str, DependencyCheck] = field(default_factory=dict)
    metrics_port: int = 0
    metrics_host: str = "0.0.0.0"
    grace_seconds: float = 10.0
    readiness_interval_seconds: float = 2.0
    reuse_port: bool = False
    # Long-running tasks (relays, consumers, sweepers), cancelled on stop.
    background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = ()
    # TLS for the service's port (None: plaintext); see services/common/tls.py.
    credentials: grpc.ServerCredentials | None = None
    # A plaintext port serving only health, for the kubelet's probes (0: none).
    health_port: int = 0


def configured_service(
    settings: CommonSettings,
    *,
    name: str,
    port: int,
    metrics_port: int,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    dependencies: dict[str, DependencyCheck],
    background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = (),
) -> GrpcService:
    """A service with the runner's settings (bind host, drain, readiness
    interval) taken from the common settings."""
    return GrpcService(
        name=name,
        port=port,
        host=settings.grpc_host,
        register=register,
        service_names=service_names,
        dependencies=dependencies,
        metrics_port=metrics_port,
        metrics_host=settings.metrics_host,
        grace_seconds=settings.shutdown_grace_seconds,
        readiness_interval_seconds=settings.readiness_interval_seconds,
        background=background,
        reuse_port=settings.grpc_reuse_port,
        credentials=server_credentials(settings),
        health_port=settings.grpc_health_port,
    )


async def check_dependencies(checks: dict[str, DependencyCheck]) -> dict[str, str | None]:
    """Runs every check at once; maps each name to None or its failure."""

    async def run(check: DependencyCheck) -> str | None:
        try:
            await asyncio.wait_for(check(), _CHECK_TIMEOUT_SECONDS)
        except TimeoutError:
            return "timeout"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"[:200]
        return None

    names = list(checks)
    results = await asyncio.gather(*(run(checks[n]) for n in names))
    return dict(zip(names, results, strict=True))


async def serve(service: GrpcService, stop: asyncio.Event | None = None) -> None:
    """Serves until SIGTERM/SIGINT (or ``stop``), then drains and returns."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    server = grpc.aio.server(
        interceptors=[ServerInterceptor()],
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            # With reuse on, several replicas on one host share the port and
            # the kernel spreads connections among them.
            ("grpc.so_reuseport", 1 if service.reuse_port else 0),
            # Clients reconnect (and resolve the name again) every few
            # minutes, so that replicas added since are called too.
            ("grpc.max_connection_age_ms", _MAX_CONNECTION_AGE_MS),
            ("grpc.max_connection_age_grace_ms", _MAX_CONNECTION_AGE_MS),
            # Channelz (call and socket statistics for grpcdebug) is not
            # served here; keeping it on costs every call a little CPU.
            ("grpc.enable_channelz", 0),
        ],
    )
    service.register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{service.host}:{service.port}"
    bound = (
        server.add_secure_port(address, service.credentials)
        if service.credentials is not None
        else server.add_insecure_port(address)
    )
    if bound == 0:
        raise SystemExit(f"{service.name}: cannot bind gRPC port {service.port}")

    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    for name in service.service_names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if service.metrics_port:
        start_http_server(service.metrics_port, addr=service.metrics_host)

    await server.start()
    health_server = await _start_health_server(service, health_servicer)
    log.info(
        "started",
        port=bound,
        metrics_port=service.metrics_port,
        health_port=service.health_port,
        tls=service.credentials is not None,
    )

    readiness = asyncio.create_task(_watch_readiness(service, health_servicer, stop))
    workers = [asyncio.create_task(_supervised(run)) for run in service.background]

    await stop.wait()
    log.info("draining", grace_seconds=service.grace_seconds)
    readiness.cancel()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(service.grace_seconds)
    if health_server is not None:
        await health_server.stop(0)
    for task in workers:
        task.cancel()
    for task in (readiness, *workers):
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    log.info("stopped")


async def _start_health_server(
    service: GrpcService, health_servicer: health.aio.HealthServicer
) -> grpc.aio.Server | None:
    """The plaintext health-only port the kubelet probes, answering from the
    same health servicer as the service's own port."""
    if not service.health_port:
        return None
    health_server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
    if health_server.add_insecure_port(f"{service.host}:{service.health_port}") == 0:
        raise SystemExit(f"{service.name}: cannot bind health port {service.health_port}")
    await health_server.start()
    return health_server


async def _supervised(run: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Keeps a background task going: a crash is logged and the task
    restarted, so that one bad moment never silently stops a relay or the
    ledger's writer."""
    name = getattr(run, "__qualname__", repr(run))
    while True:
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background_task_crashed", task=name)
            await asyncio.sleep(1.0)


async def _watch_readiness(
    service: GrpcService, health_servicer: health.aio.HealthServicer, stop: asyncio.Event
) -> None:
    ready: bool | None = None
    while not stop.is_set():
        failures = await check_dependencies(service.dependencies)
        for name, failure in failures.items():
            DEPENDENCY_UP.labels(name).set(0 if failure else 1)
        now_ready = not any(failures.values())
        if now_ready != ready and not stop.is_set():
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if now_ready
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in service.service_names:
                await health_servicer.set(name, status)
            READY.set(1 if now_ready else 0)
            if now_ready:
                log.info("ready")
            else:
                log.warning("not_ready", failures={k: v for k, v in failures.items() if v})
            ready = now_ready
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), service.readiness_interval_seconds)
