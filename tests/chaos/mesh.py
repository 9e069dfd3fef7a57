"""The whole mesh as processes that a fault test can kill, pause and
restart one at a time: ledger, budget, fraud, wallet, the wallet's event
consumers and the gateway, on the run's own databases, Redis prefix and
exchange (of the machine's servers, or of private ones: tests/chaos/infra.py).

Also used by ``bench/soak.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import asyncpg
import grpc
import httpx
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moneta.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from services.common.consumer import queue_names
from services.gateway.auth import TokenVerifier
from services.wallet.config import CONSUMERS
from tests.processes import SERVICE_NAMES, ServiceProcess, free_port

JWT_SECRET = "chaos-test-secret-0123456789abcdef0123456789"
BANK_WEBHOOK_SECRET = "chaos-bank-webhook-secret"
# Payments of this many major units or more wait for the payer's PIN; the
# load sends a few on purpose, and their holds expire after REVIEW_SECONDS.
REVIEW_AMOUNT = 50
REVIEW_SECONDS = 4
CONSUMER_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
# Start order: each wave starts at once, then is awaited.
WAVES = (("ledger", "budget", "fraud", "wallet"), ("consumers", "gateway"))
GRPC_SERVICES = ("ledger", "wallet", "budget", "fraud")


@dataclass
class Mesh:
    processes: dict[str, ServiceProcess]
    gateway_url: str
    env: dict[str, str]
    db_prefix: str
    redis_prefix: str
    exchange: str
    verifier: TokenVerifier = field(
        default_factory=lambda: TokenVerifier(JWT_SECRET, "moneta", "moneta-api")
    )

    # -- who calls

    def auth(self, user_id: str, role: str = "user") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.verifier.issue(user_id, role)}"}

    def admin(self) -> dict[str, str]:
        return self.auth(str(uuid.uuid4()), "admin")

    # -- where things are

    @property
    def postgres_url(self) -> str:
        return self.env["MONETA_POSTGRES_URL"]

    @property
    def amqp_url(self) -> str:
        return self.env["MONETA_AMQP_URL"]

    def database_url(self, service: str) -> str:
        base = self.postgres_url.rsplit("/", 1)[0]
        return f"{base}/{self.db_prefix}{service}"

    def grpc_addr(self, service: str) -> str:
        return self.processes[service].address

    # -- faults

    def kill(self, name: str) -> None:
        """kill -9: no drain, no cleanup."""
        self.processes[name].kill()

    def restart(self, name: str, wait_seconds: float = 60.0) -> None:
        """Starts ``name`` again (same port, same database) and waits until
        it is ready."""
        process = self.processes[name]
        process.stop()
        process.start(wait_seconds)

    async def crash(self, name: str, down_seconds: float = 0.5) -> None:
        """kill -9, down for a moment (its clients meet a dead process),
        then started again and ready."""
        self.kill(name)
        await asyncio.sleep(down_seconds)
        await asyncio.to_thread(self.restart, name)

    def pause(self, name: str) -> None:
        self.processes[name].pause()

    def resume(self, name: str) -> None:
        self.processes[name].resume()

    def pids(self) -> dict[str, int]:
        return {
            name: p.process.pid
            for name, p in self.processes.items()
            if p.process is not None and p.process.poll() is None
        }

    def start(self) -> None:
        for wave in WAVES:
            for name in wave:
                self.processes[name].launch()
            for name in wave:
                self.processes[name].wait_ready(90.0)

    def stop(self) -> None:
        for process in self.processes.values():
            process.resume()
        for name in reversed([n for wave in WAVES for n in wave]):
            self.processes[name].stop()

    def log_tail(self, name: str, chars: int = 4000) -> str:
        try:
            return self.processes[name].log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def build_mesh(
    log_dir: Path,
    *,
    infra_env: dict[str, str],
    db_prefix: str,
    redis_prefix: str,
    exchange: str,
    **settings: str,
) -> Mesh:
    """The mesh's processes (not started). ``infra_env`` names the servers
    (MONETA_POSTGRES_URL, MONETA_REDIS_URL, MONETA_AMQP_URL); ``settings``
    override any MONETA_* setting."""
    ports = {name: free_port() for name in (*GRPC_SERVICES, "consumers", "gateway")}
    env = {
        **os.environ,
        **infra_env,
        "MONETA_DB_PREFIX": db_prefix,
        "MONETA_REDIS_PREFIX": redis_prefix,
        "MONETA_AMQP_EXCHANGE": exchange,
        "MONETA_JWT_SECRET": JWT_SECRET,
        "MONETA_HTTP_HOST": "127.0.0.1",
        "MONETA_GRPC_HOST": "127.0.0.1",
        "MONETA_LOG_FORMAT": "json",
        "MONETA_READINESS_INTERVAL_SECONDS": "0.5",
        "MONETA_SHUTDOWN_GRACE_SECONDS": "2",
        "MONETA_GATEWAY_PORT": str(ports["gateway"]),
        "MONETA_EVENTS_PORT": str(ports["consumers"]),
        "MONETA_EVENTS_METRICS_PORT": "0",
        "MONETA_CONSUMER_RETRY_DELAYS": ",".join(str(d) for d in CONSUMER_RETRY_DELAYS),
        "MONETA_FRAUD_REVIEW_AMOUNT": str(REVIEW_AMOUNT),
        "MONETA_REVIEW_HOLD_SECONDS": str(REVIEW_SECONDS),
        # The load is a machine: a person's velocity limits would put every
        # payment of it in review. The amount rule stays.
        "MONETA_FRAUD_VELOCITY_SHORT_LIMIT": "1000000",
        "MONETA_FRAUD_VELOCITY_LONG_LIMIT": "1000000",
        "MONETA_FRAUD_UNUSUAL_AMOUNT_FACTOR": "1000000",
        "MONETA_BANK_WEBHOOK_SECRET": BANK_WEBHOOK_SECRET,
        # Nothing listens there: the tests play the bank partner themselves.
        "MONETA_BANK_PARTNER_URL": f"http://127.0.0.1:{free_port()}",
        # Every request of the load comes from 127.0.0.1.
        "MONETA_RATE_LIMIT_IP_PER_SECOND": "100000",
        "MONETA_RATE_LIMIT_IP_BURST": "100000",
        "MONETA_RESERVATION_SWEEP_SECONDS": "1",
    }
    for name in GRPC_SERVICES:
        env[f"MONETA_{name.upper()}_PORT"] = str(ports[name])
        env[f"MONETA_{name.upper()}_ADDR"] = f"127.0.0.1:{ports[name]}"
        env[f"MONETA_{name.upper()}_METRICS_PORT"] = "0"
    env.update(settings)
    gateway_url = f"http://127.0.0.1:{ports['gateway']}"

    def process(name: str, **how: str | tuple[str, ...]) -> ServiceProcess:
        return ServiceProcess(name, env, log_dir / f"{name}.log", ports[name], **how)  # type: ignore[arg-type]

    processes = {
        **{name: process(name) for name in GRPC_SERVICES},
        "consumers": process(
            "consumers", module="wallet", args=("consume",), health_name="moneta.events"
        ),
        "gateway": process("gateway", ready_url=f"{gateway_url}/ready"),
    }
    return Mesh(processes, gateway_url, env, db_prefix, redis_prefix, exchange)


@contextlib.contextmanager
def running_mesh(log_dir: Path, **how: object) -> Iterator[Mesh]:
    mesh = build_mesh(log_dir, **how)  # type: ignore[arg-type]
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


# ---------------------------------------------------------------- cleanup


async def drop_mesh_databases(mesh: Mesh) -> None:
    conn = await asyncpg.connect(mesh.database_url("postgres").rsplit("/", 1)[0] + "/postgres")
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1",
            mesh.db_prefix.replace("_", r"\_") + "%",
        )
        for row in rows:
            quoted = '"' + row["datname"].replace('"', '""') + '"'
            await conn.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
    finally:
        await conn.close()


async def delete_mesh_topology(mesh: Mesh) -> None:
    """The exchange and the consumers' queues outlive the processes: on a
    shared broker, remove them."""
    connection = await aio_pika.connect(mesh.amqp_url)
    try:
        channel = await connection.channel()
        for consumer in CONSUMERS:
            names = queue_names(f"{mesh.exchange}.wallet", consumer, CONSUMER_RETRY_DELAYS)
            for queue in names.all:
                await channel.queue_delete(queue)
        await channel.exchange_delete(mesh.exchange)
    finally:
        await connection.close()


async def verify_ledger(mesh: Mesh) -> ledger_pb2.VerifyLedgerResponse:
    async with grpc.aio.insecure_channel(mesh.grpc_addr("ledger")) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        response: ledger_pb2.VerifyLedgerResponse = await stub.VerifyLedger(
            ledger_pb2.VerifyLedgerRequest(), timeout=60
        )
        return response


# ---------------------------------------------------------------- readiness


@dataclass
class ReadinessWatch:
    """Polls every process's readiness (gRPC health under the service's
    name; the gateway's /ready) and keeps what it saw: (time, ready)."""

    mesh: Mesh
    every: float = 0.2
    seen: dict[str, list[tuple[float, bool]]] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def went_unready(self, name: str) -> bool:
        return any(not ready for _, ready in self.seen.get(name, []))

    def ready_again_at(self, name: str) -> float | None:
        """When ``name`` was last seen turning ready after being unready."""
        turned = None
        previous = True
        for at, ready in self.seen.get(name, []):
            if ready and not previous:
                turned = at
            previous = ready
        return turned

    async def _run(self) -> None:
        names = [n for n in self.mesh.processes if n != "gateway"]
        channels = {n: grpc.aio.insecure_channel(self.mesh.grpc_addr(n)) for n in names}
        try:
            async with httpx.AsyncClient(timeout=1.0) as http:
                while True:
                    results = await asyncio.gather(
                        *(self._grpc_ready(n, channels[n]) for n in names),
                        self._http_ready(http),
                    )
                    now = time.monotonic()
                    for name, ready in zip([*names, "gateway"], results, strict=True):
                        self.seen.setdefault(name, []).append((now, ready))
                    await asyncio.sleep(self.every)
        finally:
            for channel in channels.values():
                await channel.close()

    async def _grpc_ready(self, name: str, channel: grpc.aio.Channel) -> bool:
        process = self.mesh.processes[name]
        service = process.health_name or SERVICE_NAMES[process.module or process.name]
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1.0
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    async def _http_ready(self, http: httpx.AsyncClient) -> bool:
        try:
            return (await http.get(f"{self.mesh.gateway_url}/ready")).status_code == 200
        except httpx.HTTPError:
            return False


# ---------------------------------------------------------------- payment leases


async def expire_leases_of_dead_attempts(mesh: Mesh) -> int:
    """Moves the clock past the leases (30 s) that attempts which died with
    their process (or lost their database) still hold: a client's retry
    would wait that long for them, a fast test does not. Only while no
    request is in flight."""
    conn = await asyncpg.connect(mesh.database_url("wallet"))
    try:
        expired = await conn.fetch(
            "UPDATE payments SET lease_until = now() - interval '1 second'"
            " WHERE status = 'PROCESSING' AND lease_until > now() RETURNING payment_id"
        )
    finally:
        await conn.close()
    return len(expired)


async def wait_for_leases_to_lapse(mesh: Mesh, seconds: float = 45.0) -> None:
    """Waits until no payment is leased to an attempt any more."""
    conn = await asyncpg.connect(mesh.database_url("wallet"))
    try:
        deadline = time.monotonic() + seconds
        while await conn.fetchval("SELECT count(*) FROM payments WHERE lease_until > now()"):
            assert time.monotonic() < deadline, "payment leases outlived their 30 s"
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


# The gateway used to store a 409 REQUEST_IN_PROGRESS as the key's final
# answer; it no longer does (services/gateway/idempotency.py), so the tests
# no longer forget such answers for it. Kept switchable for a regression hunt.
FORGET_STORED_IN_PROGRESS = False


async def forget_stored_in_progress_answers(mesh: Mesh) -> int:
    client = aioredis.from_url(mesh.env["MONETA_REDIS_URL"])
    forgotten = 0
    try:
        async for key in client.scan_iter(match=f"{mesh.redis_prefix}gw:idem:*", count=1000):
            raw = await client.get(key)
            if raw and b"REQUEST_IN_PROGRESS" in raw and b'"status":409' in raw:
                forgotten += await client.delete(key)
    finally:
        await client.aclose()
    return forgotten
