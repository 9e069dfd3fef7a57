"""The five services as real processes on free ports, against the run's own
databases, for tests that drive them over HTTP and gRPC."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest

from moneta.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from moneta.ledger.v1 import ledger_pb2
from moneta.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.common.db import create_pool
from services.common.errors import Unavailable
from services.common.infra import redis_client
from services.gateway.auth import TokenVerifier
from services.wallet.balance_cache import BalanceCache
from services.wallet.peers import Peers
from tests.conftest import ROOT, TestRun
from tests.processes import die_with_parent

GRPC_SERVICES = ("ledger", "wallet", "budget", "fraud")
JWT_SECRET = "e2e-test-secret-0123456789abcdef0123456789"
BANK_WEBHOOK_SECRET = "e2e-bank-webhook-secret"
ACCOUNT_NUMBER = "000123456789"
ROUTING_NUMBER = "021000021"
STARTUP_SECONDS = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Mesh:
    gateway_url: str
    grpc_addrs: dict[str, str]
    verifier: TokenVerifier
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def token(self, user_id: str, role: str = "user", company_id: str = "") -> str:
        return self.verifier.issue(user_id, role, company_id)

    def auth(self, user_id: str, role: str = "user", company_id: str = "") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user_id, role, company_id)}"}

    def admin(self) -> dict[str, str]:
        return self.auth(str(uuid.uuid4()), "admin")

    def peers(self, cache: BalanceCache, kind: type[Peers] | None = None) -> Peers:
        """The wallet's clients of this mesh's ledger, budget and fraud, on
        ``cache`` (the wallet's, so that what they move is seen at once);
        ``kind``: a subclass that fails on purpose."""
        addrs = (self.grpc_addrs["ledger"], self.grpc_addrs["budget"], self.grpc_addrs["fraud"])
        return (kind or Peers)(*addrs, 5.0, cache)


def _wait_ready(mesh: Mesh) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    last = ""
    while time.monotonic() < deadline:
        for name, proc in mesh.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode}:\n{mesh.logs[name].read_text()[-3000:]}"
                )
        try:
            response = httpx.get(f"{mesh.gateway_url}/ready", timeout=2.0)
            if response.status_code == 200:
                return
            last = response.text
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"the mesh did not become ready in {STARTUP_SECONDS}s: {last}")


@pytest.fixture(scope="session")
def mesh(test_run: TestRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    ports = {name: free_port() for name in GRPC_SERVICES}
    http_port = free_port()
    env = {
        **os.environ,
        **test_run.env(),
        "MONETA_JWT_SECRET": JWT_SECRET,
        "MONETA_GATEWAY_PORT": str(http_port),
        "MONETA_HTTP_HOST": "127.0.0.1",
        "MONETA_GRPC_HOST": "127.0.0.1",
        "MONETA_LOG_FORMAT": "json",
        "MONETA_READINESS_INTERVAL_SECONDS": "0.5",
        "MONETA_SHUTDOWN_GRACE_SECONDS": "2",
        # Payments of 10,000 or more go to review; their holds live 4 s here.
        "MONETA_FRAUD_REVIEW_AMOUNT": "10000",
        # Nothing listens there: the tests play the bank partner themselves,
        # and a `make run` simulator on the default port is left alone.
        "MONETA_BANK_PARTNER_URL": f"http://127.0.0.1:{free_port()}",
        "MONETA_BANK_WEBHOOK_SECRET": BANK_WEBHOOK_SECRET,
        "MONETA_REVIEW_HOLD_SECONDS": "4",
        # Every test request comes from 127.0.0.1, and the schema test sends
        # hundreds as one user: limits that would throttle the suite, not a
        # client. (test_gateway_resilience runs gateways with tight ones.)
        "MONETA_RATE_LIMIT_IP_PER_SECOND": "100000",
        "MONETA_RATE_LIMIT_IP_BURST": "100000",
        "MONETA_RATE_LIMIT_USER_PER_SECOND": "10000",
        "MONETA_RATE_LIMIT_USER_BURST": "10000",
    }
    for name, port in ports.items():
        env[f"MONETA_{name.upper()}_PORT"] = str(port)
        env[f"MONETA_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
        env[f"MONETA_{name.upper()}_METRICS_PORT"] = str(free_port())
    logs_dir = tmp_path_factory.mktemp("mesh-logs")
    mesh = Mesh(
        gateway_url=f"http://127.0.0.1:{http_port}",
        grpc_addrs={name: f"127.0.0.1:{port}" for name, port in ports.items()},
        verifier=TokenVerifier(JWT_SECRET, "moneta", "moneta-api"),
    )
    try:
        for name in (*GRPC_SERVICES, "gateway"):
            log_path = logs_dir / f"{name}.log"
            mesh.logs[name] = log_path
            mesh.processes[name] = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"],
                cwd=ROOT,
                env=env,
                stdout=log_path.open("wb"),
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        _wait_ready(mesh)
        yield mesh
    finally:
        for proc in mesh.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in mesh.processes.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
async def http(mesh: Mesh) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mesh.gateway_url, timeout=10.0) as client:
        yield client


@pytest.fixture
async def wallet_stub(mesh: Mesh) -> AsyncIterator[wallet_pb2_grpc.WalletServiceStub]:
    async with grpc.aio.insecure_channel(mesh.grpc_addrs["wallet"]) as channel:
        yield wallet_pb2_grpc.WalletServiceStub(channel)


@dataclass(frozen=True)
class Person:
    user_id: str
    email: str
    username: str


async def create_person(
    wallet: wallet_pb2_grpc.WalletServiceStub,
    http: httpx.AsyncClient,
    mesh: Mesh,
    initial_balance: str,
    currency: str = "USD",
    company_id: str = "",
) -> Person:
    """A user (through the wallet's admin gRPC call), of ``company_id`` if
    given, with a wallet funded from the platform or their company (through
    the gateway, as an admin)."""
    user_id = str(uuid.uuid4())
    handle = f"u{user_id[:8]}"
    await wallet.CreateUser(
        wallet_pb2.CreateUserRequest(
            user=wallet_pb2.User(
                user_id=user_id,
                email=f"{handle}@example.com",
                username=handle,
                full_name=f"Person {handle}",
                role=wallet_pb2.ROLE_USER,
                default_currency=currency,
                company_id=company_id,
            )
        )
    )
    response = await http.post(
        "/api/v1/wallets",
        json={"user_id": user_id, "currency": currency, "initial_balance": initial_balance},
        headers=mesh.admin(),
    )
    assert response.status_code == 201, response.text
    return Person(user_id, f"{handle}@example.com", handle)


async def set_pin(http: httpx.AsyncClient, mesh: Mesh, person: Person, pin: str) -> None:
    response = await http.put(
        "/api/v1/wallet/pin", json={"pin": pin}, headers=mesh.auth(person.user_id)
    )
    assert response.status_code == 204


async def fraud_case(mesh: Mesh, transfer_id: str) -> fraud_pb2.Review:
    """The fraud review case of a payment (its transfer id is the fraud
    transaction id)."""
    async with grpc.aio.insecure_channel(mesh.grpc_addrs["fraud"]) as channel:
        fraud = fraud_pb2_grpc.FraudServiceStub(channel)
        token = ""
        while True:
            page: fraud_pb2.ListReviewsResponse = await fraud.ListReviews(
                fraud_pb2.ListReviewsRequest(page_size=1000, page_token=token)
            )
            for case in page.reviews:
                if case.transaction_id == transfer_id:
                    return case
            token = page.next_page_token
            if not token:
                raise AssertionError(f"no review case for {transfer_id}")


async def block_user(mesh: Mesh, person: Person) -> None:
    """Puts the person on fraud's user blocklist."""
    async with grpc.aio.insecure_channel(mesh.grpc_addrs["fraud"]) as channel:
        await fraud_pb2_grpc.FraudServiceStub(channel).AddListEntry(
            fraud_pb2.AddListEntryRequest(
                entry=fraud_pb2.ListEntry(
                    list=fraud_pb2.LIST_KIND_BLOCK,
                    subject_type=fraud_pb2.SUBJECT_TYPE_USER,
                    value=person.user_id,
                    reason="e2e",
                )
            )
        )


class AnswerLost(Peers):
    """Peers whose ledger applies every transfer but whose answer is lost on
    the way back: an attempt that cannot know whether the money moved."""

    async def create_transfers(
        self, transfers: Sequence[ledger_pb2.Transfer]
    ) -> list[ledger_pb2.TransferResult]:
        await super().create_transfers(transfers)
        raise Unavailable("the ledger's answer was lost", reason="DEPENDENCY_UNAVAILABLE")


class LedgerDown(Peers):
    """Peers whose transfers never reach the ledger."""

    async def create_transfers(
        self, transfers: Sequence[ledger_pb2.Transfer]
    ) -> list[ledger_pb2.TransferResult]:
        raise Unavailable("the ledger is down", reason="DEPENDENCY_UNAVAILABLE")


async def budgeted_person(
    wallet: wallet_pb2_grpc.WalletServiceStub,
    http: httpx.AsyncClient,
    mesh: Mesh,
    initial_balance: str,
    category: str,
    total: str,
) -> Person:
    """A user of a company of their own, with ``initial_balance`` USD and a
    hard monthly budget of ``total`` USD for ``category``, given by one of
    the company's managers through the gateway."""
    company = str(uuid.uuid4())
    person = await create_person(wallet, http, mesh, initial_balance, company_id=company)
    created = await http.post(
        "/api/v1/budgets",
        json={"user_id": person.user_id, "total_amount": total, "currency": "USD",
              "period_type": "MONTHLY", "category": category},
        headers=mesh.auth(str(uuid.uuid4()), "manager", company),
    )  # fmt: skip
    assert created.status_code == 201, created.text
    return person


async def only_budget(http: httpx.AsyncClient, mesh: Mesh, person: Person) -> dict[str, str]:
    """The person's one budget, as the gateway shows it to them."""
    response = await http.get(
        f"/api/v1/budgets/{person.user_id}", headers=mesh.auth(person.user_id)
    )
    assert response.status_code == 200, response.text
    [budget] = response.json()["budgets"]
    return dict(budget)


async def budget_of(http: httpx.AsyncClient, mesh: Mesh, person: Person) -> tuple[str, str]:
    """(used, reserved) of the person's one budget."""
    budget = await only_budget(http, mesh, person)
    return budget["used_amount"], budget["reserved_amount"]


async def wallet_of(http: httpx.AsyncClient, mesh: Mesh, person: Person) -> dict[str, Any]:
    response = await http.get(f"/api/v1/wallets/{person.user_id}", headers=mesh.admin())
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def usd(http: httpx.AsyncClient, mesh: Mesh, person: Person) -> dict[str, str]:
    """The person's USD balance: available, pending, posted."""
    wallet = await wallet_of(http, mesh, person)
    for balance in wallet["balances"]:
        if balance["currency"] == "USD":
            return {k: balance[k] for k in ("available", "pending", "posted")}
    return {"available": "0.00", "pending": "0.00", "posted": "0.00"}


async def link_account(
    http: httpx.AsyncClient, mesh: Mesh, person: Person, number: str = ACCOUNT_NUMBER
) -> str:
    response = await http.post(
        "/api/v1/wallet/bank-accounts",
        json={
            "user_id": person.user_id,
            "account_number": number,
            "routing_number": ROUTING_NUMBER,
            "holder_name": "Test Holder",
        },
        headers=mesh.auth(person.user_id),
    )
    assert response.status_code == 201, response.text
    return str(response.json()["bank_account_id"])


async def create_merchant(http: httpx.AsyncClient, mesh: Mesh, currency: str = "USD") -> str:
    response = await http.post(
        "/api/v1/merchants",
        json={"name": f"Cafe {uuid.uuid4().hex[:6]}", "currency": currency},
        headers=mesh.admin(),
    )
    assert response.status_code == 201, response.text
    return str(response.json()["merchant_id"])


@dataclass
class InProcess:
    """The wallet's code run in the test's own process, against the mesh's
    database, cache and peers: to interrupt a payment where no API can."""

    pool: asyncpg.Pool
    cache: BalanceCache
    peers: Peers
    lossy: Peers
    down: Peers


@pytest.fixture
async def in_process(test_run: TestRun, mesh: Mesh) -> AsyncIterator[InProcess]:
    pool = await create_pool(test_run.database_url("wallet"))
    redis = redis_client(test_run.settings.redis_url)
    cache = BalanceCache(redis, test_run.redis_prefix)
    peers, lossy, down = (
        mesh.peers(cache),
        mesh.peers(cache, AnswerLost),
        mesh.peers(cache, LedgerDown),
    )
    yield InProcess(pool, cache, peers, lossy, down)
    for each in (peers, lossy, down):
        await each.close()
    await redis.aclose()
    await pool.close()
