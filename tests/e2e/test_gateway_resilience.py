"""The gateway when things go wrong, each with a gateway process of its own
in front of the real mesh: an upstream that is down answers 503 with
Retry-After and soon fails fast (its circuit open) while the others still
serve; an upstream that does not answer in time is 504; /ready names what
fails; without Redis, money still moves (once) and reads still answer;
rate limits answer 429 with Retry-After, per user and per IP."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import pytest

from moneta.wallet.v1 import wallet_pb2_grpc
from tests.conftest import ROOT, TestRun
from tests.e2e.conftest import JWT_SECRET, Mesh, create_person, free_port
from tests.processes import die_with_parent

Gateway = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@contextmanager
def silent_listener() -> Iterator[str]:
    """An address that accepts connections and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


@pytest.fixture
def gateway(mesh: Mesh, test_run: TestRun, tmp_path: Path) -> Gateway:
    """Starts a gateway in front of the mesh with some settings changed."""

    @asynccontextmanager
    async def start(**settings: str) -> AsyncIterator[httpx.AsyncClient]:
        port = free_port()
        env = {
            **test_run.env(),
            "PATH": "/usr/bin:/bin",
            "MONETA_JWT_SECRET": JWT_SECRET,
            "MONETA_GATEWAY_PORT": str(port),
            "MONETA_HTTP_HOST": "127.0.0.1",
            "MONETA_LOG_FORMAT": "json",
            "MONETA_RATE_LIMIT_IP_PER_SECOND": "100000",
            "MONETA_RATE_LIMIT_IP_BURST": "100000",
            **{f"MONETA_{n.upper()}_ADDR": a for n, a in mesh.grpc_addrs.items()},
            **settings,
        }
        log = tmp_path / f"gateway-{port}.log"
        process = _spawn(env, log)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                deadline = time.monotonic() + 30
                while True:
                    assert process.poll() is None, log.read_text()[-2000:]
                    try:
                        if (await client.get("/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, "the gateway did not start"
                    await asyncio.sleep(0.05)
                yield client
        finally:
            process.terminate()
            process.wait(timeout=10)

    return start


def _spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.gateway"],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )


def reason(response: httpx.Response) -> str:
    return str(response.json()["error"]["reason"])


async def test_a_down_upstream_is_503_then_fails_fast_while_others_serve(
    mesh: Mesh, gateway: Gateway
) -> None:
    settings = {
        "MONETA_FRAUD_ADDR": dead_address(),
        "MONETA_BREAKER_FAILURE_THRESHOLD": "3",
        "MONETA_BREAKER_COOLDOWN_SECONDS": "30",
    }
    async with gateway(**settings) as client:
        admin = mesh.admin()
        first = await client.get("/api/v1/fraud/reviews", headers=admin)
        started = time.perf_counter()
        fast = await client.get("/api/v1/fraud/reviews", headers=admin)
        elapsed = time.perf_counter() - started
        ledger = await client.get("/api/v1/admin/ledger/verify", headers=admin)
        ready = await client.get("/ready")

    assert (first.status_code, reason(first)) == (503, "DEPENDENCY_UNAVAILABLE")
    assert (fast.status_code, reason(fast)) == (503, "UPSTREAM_UNAVAILABLE")
    assert int(fast.headers["Retry-After"]) > 1
    assert elapsed < 0.1
    assert ledger.status_code == 200
    assert ready.status_code == 503 and ready.json()["failing"] == ["fraud"]


async def test_an_upstream_that_does_not_answer_in_time_is_504(
    mesh: Mesh, gateway: Gateway, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    with silent_listener() as silent:
        settings = {"MONETA_BUDGET_ADDR": silent, "MONETA_PEER_TIMEOUT_SECONDS": "0.3"}
        async with gateway(**settings) as client:
            user = str(uuid.uuid4())
            started = time.perf_counter()
            response = await client.get(f"/api/v1/budgets/{user}", headers=mesh.auth(user))
            elapsed = time.perf_counter() - started

    assert (response.status_code, reason(response)) == (504, "DEPENDENCY_TIMEOUT")
    assert elapsed < 2.0


async def test_without_redis_money_moves_once_and_reads_answer(
    mesh: Mesh,
    http: httpx.AsyncClient,
    gateway: Gateway,
    wallet_stub: wallet_pb2_grpc.WalletServiceStub,
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "20.00")
    bob = await create_person(wallet_stub, http, mesh, "0")
    body = {
        "sender_id": alice.user_id,
        "recipient": bob.user_id,
        "amount": "5",
        "idempotency_key": "r",
    }

    async with gateway(MONETA_REDIS_URL="redis://127.0.0.1:1/0") as client:
        answers = [
            await client.post("/api/v1/transfers", json=body, headers=mesh.auth(alice.user_id))
            for _ in range(3)
        ]
        read = await client.get(f"/api/v1/wallets/{bob.user_id}", headers=mesh.admin())
        ready = await client.get("/ready")

    assert [a.status_code for a in answers] == [200] * 3, answers[0].text
    assert len({a.json()["transfer_id"] for a in answers}) == 1  # the wallet's own idempotency
    assert read.json()["balance"] == "5.00"
    assert ready.status_code == 503 and ready.json()["failing"] == ["redis"]


async def test_a_user_over_their_rate_is_429_with_retry_after(mesh: Mesh, gateway: Gateway) -> None:
    limits = {"MONETA_RATE_LIMIT_USER_PER_SECOND": "0.2", "MONETA_RATE_LIMIT_USER_BURST": "3"}
    async with gateway(**limits) as client:
        user, other = str(uuid.uuid4()), str(uuid.uuid4())
        answers = [
            await client.get(f"/api/v1/budgets/{user}", headers=mesh.auth(user)) for _ in range(4)
        ]
        others = await client.get(f"/api/v1/budgets/{other}", headers=mesh.auth(other))

    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert reason(answers[-1]) == "RATE_LIMITED"
    assert int(answers[-1].headers["Retry-After"]) == 5
    assert others.status_code == 200


async def test_an_ip_over_its_rate_is_429_even_without_a_valid_token(
    mesh: Mesh, gateway: Gateway
) -> None:
    limits = {"MONETA_RATE_LIMIT_IP_PER_SECOND": "0.1", "MONETA_RATE_LIMIT_IP_BURST": "2"}
    async with gateway(**limits) as client:
        guesses = [
            await client.get("/api/v1/admin/ledger/verify", headers={"Authorization": "Bearer x"})
            for _ in range(3)
        ]
        health = await client.get("/health")

    assert [g.status_code for g in guesses] == [401, 401, 429]
    assert guesses[-1].headers["Retry-After"] == "10"
    assert health.status_code == 200  # probes are never limited
