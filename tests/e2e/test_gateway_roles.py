"""The role matrix, end to end: each role (user, manager, admin, service)
against each endpoint of the gateway, on real resources of one company's
user. A role the endpoint is not for is 403; a resource that is not the
caller's (a "self" endpoint used on someone else, another company's user,
another user's wallet) is 404, the same answer as one that does not exist."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import httpx
import pytest

from moneta.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from tests.e2e.conftest import Mesh

ROLES = ("user", "manager", "admin", "service")
ROUTING_NUMBER = "021000021"


@dataclass
class World:
    """One company: its manager, a user with a funded wallet, a bank
    account, a budget; a merchant; and tokens for every role."""

    mesh: Mesh
    wallet: wallet_pb2_grpc.WalletServiceStub
    company: str
    manager: str
    user: str
    wallet_id: str
    bank_account: str
    budget_id: str
    merchant: str
    admin: str
    service: str

    def auth(self, role: str) -> dict[str, str]:
        who = {
            "user": (self.user, ""),
            "manager": (self.manager, self.company),
            "admin": (self.admin, ""),
            "service": (self.service, ""),
        }[role]
        return self.mesh.auth(who[0], role, who[1])

    async def person(self, company: str = "", funded: str = "0") -> str:
        """A new user (of ``company``) with a wallet holding ``funded``."""
        user_id = str(uuid.uuid4())
        await self.wallet.CreateUser(
            wallet_pb2.CreateUserRequest(
                user=wallet_pb2.User(
                    user_id=user_id,
                    email=f"r{user_id.replace('-', '')[:16]}@example.com",
                    username=f"r{user_id.replace('-', '')[:16]}",
                    company_id=company,
                    role=wallet_pb2.ROLE_USER,
                    default_currency="USD",
                )
            )
        )
        return user_id


async def _created(response: Awaitable[httpx.Response]) -> dict[str, Any]:
    answer = await response
    assert answer.status_code in (200, 201), answer.text
    return dict(answer.json())


@pytest.fixture(scope="module")
async def world(mesh: Mesh) -> World:
    channel = grpc.aio.insecure_channel(mesh.grpc_addrs["wallet"])
    stub = wallet_pb2_grpc.WalletServiceStub(channel)
    admin = mesh.admin()
    w = World(mesh, stub, str(uuid.uuid4()), "", "", "", "", "", "", "", "svc-1")
    w.manager = await w.person(w.company)
    w.user = await w.person(w.company)
    w.admin = await w.person()  # admins are people too, with wallets of their own
    async with httpx.AsyncClient(base_url=mesh.gateway_url, timeout=10.0) as http:
        for person, balance in ((w.manager, "0"), (w.admin, "0"), (w.user, "500.00")):
            wallet = await _created(
                http.post(
                    "/api/v1/wallets",
                    json={"user_id": person, "currency": "USD", "initial_balance": balance},
                    headers=admin,
                )
            )
            if person == w.user:
                w.wallet_id = wallet["wallet_id"]
        account = await _created(
            http.post(
                "/api/v1/wallet/bank-accounts",
                json={
                    "user_id": w.user,
                    "account_number": "000123456789",
                    "routing_number": ROUTING_NUMBER,
                    "holder_name": "Role Matrix",
                },
                headers=w.auth("user"),
            )
        )
        w.bank_account = account["bank_account_id"]
        budget = await _created(
            http.post(
                "/api/v1/budgets",
                json={
                    "user_id": w.user,
                    "total_amount": "1000.00",
                    "currency": "USD",
                    "period_type": "MONTHLY",
                    "category": "MEALS",
                },
                headers=admin,
            )
        )
        w.budget_id = budget["budget_id"]
        merchant = await _created(
            http.post(
                "/api/v1/merchants", json={"name": "Matrix Cafe", "currency": "USD"}, headers=admin
            )
        )
        w.merchant = merchant["merchant_id"]
    return w


# -- the matrix: (method, path, body) built per case, and what each role gets

Request = tuple[str, str, dict[str, Any] | None]
Build = Callable[[World, httpx.AsyncClient], Awaitable[Request]]

OK, DENIED, HIDDEN = "ok", "denied", "hidden"
PEOPLE_OF_THE_COMPANY = {"user": OK, "manager": OK, "admin": OK, "service": DENIED}
OWNER_ONLY = {"user": OK, "manager": HIDDEN, "admin": HIDDEN, "service": DENIED}
MANAGERS = {"user": DENIED, "manager": OK, "admin": OK, "service": DENIED}
ADMINS = {"user": DENIED, "manager": DENIED, "admin": OK, "service": DENIED}
SERVICES = {"user": DENIED, "manager": DENIED, "admin": DENIED, "service": OK}


def key() -> str:
    return str(uuid.uuid4())


async def new_wallet(w: World, http: httpx.AsyncClient) -> Request:
    user = await w.person(w.company)
    return "POST", "/api/v1/wallets", {"user_id": user, "currency": "USD"}


async def exchange(w: World, http: httpx.AsyncClient) -> Request:
    quote = await _created(
        http.post(
            "/api/v1/exchange/quotes",
            json={"user_id": w.user, "from_currency": "USD", "to_currency": "EUR", "amount": "1"},
            headers=w.auth("user"),
        )
    )
    body = {"user_id": w.user, "quote_id": quote["quote_id"], "idempotency_key": key()}
    return "POST", "/api/v1/exchanges", body


async def qr(w: World, http: httpx.AsyncClient) -> Request:
    return (
        "POST",
        f"/api/v1/merchants/{w.merchant}/qr",
        {
            "amount": "1.00",
            "currency": "USD",
            "reference": key(),
        },
    )


def fixed(method: str, path: str, body: Callable[[World], dict[str, Any]] | None = None) -> Build:
    async def build(w: World, http: httpx.AsyncClient) -> Request:
        return method, path.format(w=w), body(w) if body else None

    return build


def budget_body(w: World) -> dict[str, Any]:
    start = datetime.now(UTC) + timedelta(days=400)  # never overlapping the fixture's budget
    return {
        "user_id": w.user,
        "total_amount": "10.00",
        "currency": "USD",
        "period_type": "ONE_TIME",
        "start_date": start.isoformat(),
        "end_date": (start + timedelta(days=1)).isoformat(),
        "category": "HOTEL",
    }


MATRIX: list[tuple[str, Build, dict[str, str]]] = [
    ("get wallet", fixed("GET", "/api/v1/wallets/{w.user}"), PEOPLE_OF_THE_COMPANY),
    ("create wallet", new_wallet, MANAGERS),
    (
        "wallet status",
        fixed(
            "PUT",
            "/api/v1/wallets/{w.wallet_id}/status",
            lambda w: {"status": "ACTIVE", "reason": "matrix"},
        ),
        MANAGERS,
    ),
    (
        "paged history",
        fixed("GET", "/api/v1/wallets/{w.wallet_id}/transactions?page=1&limit=5"),
        PEOPLE_OF_THE_COMPANY,
    ),
    (
        "service adjustment",
        fixed(
            "POST",
            "/api/v1/wallets/{w.wallet_id}/transactions",
            lambda w: {
                "amount": "0.01",
                "type": "CREDIT",
                "description": "matrix",
                "reference_id": key(),
                "reference_type": "matrix",
            },
        ),
        SERVICES,
    ),
    (
        "set own pin",
        fixed("PUT", "/api/v1/wallet/pin", lambda w: {"pin": "2468"}),
        {"user": OK, "manager": OK, "admin": OK, "service": DENIED},
    ),
    ("cursor history", fixed("GET", "/api/v1/wallet/{w.user}/transactions"), PEOPLE_OF_THE_COMPANY),
    (
        "link bank account",
        fixed(
            "POST",
            "/api/v1/wallet/bank-accounts",
            lambda w: {
                "user_id": w.user,
                "account_number": "000987654321",
                "routing_number": ROUTING_NUMBER,
                "holder_name": "Role Matrix",
            },
        ),
        OWNER_ONLY,
    ),
    *[
        (
            path,
            fixed(
                "POST",
                f"/api/v1/wallet/{path}",
                lambda w: {
                    "user_id": w.user,
                    "amount": "1.00",
                    "bank_account_id": w.bank_account,
                    "idempotency_key": key(),
                },
            ),
            OWNER_ONLY,
        )
        for path in ("add-funds", "withdraw")
    ],
    (
        "transfer",
        fixed(
            "POST",
            "/api/v1/transfers",
            lambda w: {
                "sender_id": w.user,
                "recipient": w.manager,
                "amount": "0.01",
                "idempotency_key": key(),
            },
        ),
        OWNER_ONLY,
    ),
    (
        "confirm transfer",
        fixed("POST", f"/api/v1/transfers/{uuid.uuid4()}/confirm", lambda w: {"pin": "1234"}),
        {"user": HIDDEN, "manager": HIDDEN, "admin": HIDDEN, "service": DENIED},
    ),
    (
        "create merchant",
        fixed("POST", "/api/v1/merchants", lambda w: {"name": "M", "currency": "USD"}),
        ADMINS,
    ),
    ("merchant qr", qr, ADMINS),
    (
        "pay merchant",
        fixed(
            "POST",
            "/api/v1/payments",
            lambda w: {
                "payer_id": w.user,
                "merchant_id": w.merchant,
                "amount": "0.01",
                "currency": "USD",
                "idempotency_key": key(),
            },
        ),
        OWNER_ONLY,
    ),
    (
        "exchange quote",
        fixed(
            "POST",
            "/api/v1/exchange/quotes",
            lambda w: {
                "user_id": w.user,
                "from_currency": "USD",
                "to_currency": "EUR",
                "amount": 1,
            },
        ),
        OWNER_ONLY,
    ),
    ("exchange", exchange, OWNER_ONLY),
    ("list budgets", fixed("GET", "/api/v1/budgets/{w.user}"), PEOPLE_OF_THE_COMPANY),
    ("create budget", fixed("POST", "/api/v1/budgets", budget_body), MANAGERS),
    (
        "update budget",
        fixed(
            "PUT",
            "/api/v1/budgets/{w.budget_id}",
            lambda w: {"total_amount": "1000.00", "reason": "matrix"},
        ),
        MANAGERS,
    ),
    (
        "budget history",
        fixed("GET", "/api/v1/budgets/{w.budget_id}/history"),
        PEOPLE_OF_THE_COMPANY,
    ),
    ("company policy", fixed("GET", "/api/v1/companies/{w.company}/budget-policy"), MANAGERS),
    (
        "set company policy",
        fixed("PUT", "/api/v1/companies/{w.company}/budget-policy", lambda w: {"budgets": []}),
        MANAGERS,
    ),
    ("fraud reviews", fixed("GET", "/api/v1/fraud/reviews?status=OPEN"), ADMINS),
    (
        "resolve review",
        fixed(
            "POST",
            f"/api/v1/fraud/reviews/{uuid.uuid4()}/resolve",
            lambda w: {"decision": "APPROVE"},
        ),
        {**ADMINS, "admin": HIDDEN},  # an admin reaches it: that review does not exist
    ),
    (
        "flag account",
        fixed("POST", "/api/v1/fraud/flags", lambda w: {"user_id": w.manager, "reason": "matrix"}),
        ADMINS,
    ),
    ("unflag account", fixed("DELETE", "/api/v1/fraud/flags/{w.manager}"), ADMINS),
    ("verify ledger", fixed("GET", "/api/v1/admin/ledger/verify"), ADMINS),
]


def outcome(response: httpx.Response) -> str:
    if response.status_code == 403:
        return DENIED
    if response.status_code == 404:
        return HIDDEN
    if 200 <= response.status_code < 300:
        return OK
    return f"{response.status_code}: {response.text}"


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(
    ("build", "expected"), [(b, e) for _, b, e in MATRIX], ids=[n for n, _, _ in MATRIX]
)
async def test_role_against_endpoint(
    world: World, http: httpx.AsyncClient, build: Build, expected: dict[str, str], role: str
) -> None:
    method, path, body = await build(world, http)

    response = await http.request(method, path, json=body, headers=world.auth(role))

    assert outcome(response) == expected[role], response.text
    if response.status_code in (403, 404):
        assert response.json()["error"]["reason"]


# -- someone else's resources


async def test_a_user_cannot_reach_another_users_resources(
    world: World, http: httpx.AsyncClient
) -> None:
    other = await world.person(world.company)
    auth = world.mesh.auth(other, "user", world.company)  # same company, plain user
    paths = [
        f"/api/v1/wallets/{world.user}",
        f"/api/v1/wallets/{world.wallet_id}/transactions",
        f"/api/v1/wallet/{world.user}/transactions",
        f"/api/v1/budgets/{world.user}",
        f"/api/v1/budgets/{world.budget_id}/history",
    ]

    answers = [await http.get(p, headers=auth) for p in paths]

    assert [a.status_code for a in answers] == [404] * len(paths)


async def test_another_companys_manager_cannot_reach_the_companys_users(
    world: World, http: httpx.AsyncClient
) -> None:
    elsewhere = str(uuid.uuid4())
    auth = world.mesh.auth(await world.person(elsewhere), "manager", elsewhere)
    reads = [
        f"/api/v1/wallets/{world.user}",
        f"/api/v1/wallets/{world.wallet_id}/transactions",
        f"/api/v1/budgets/{world.user}",
        f"/api/v1/budgets/{world.budget_id}/history",
        f"/api/v1/companies/{world.company}/budget-policy",
    ]

    answers = [await http.get(p, headers=auth) for p in reads]
    freeze = await http.put(
        f"/api/v1/wallets/{world.wallet_id}/status",
        json={"status": "FROZEN", "reason": "not mine"},
        headers=auth,
    )
    budget = await http.put(
        f"/api/v1/budgets/{world.budget_id}",
        json={"total_amount": "1", "reason": "x"},
        headers=auth,
    )

    assert [a.status_code for a in answers] == [404] * len(reads)
    assert (freeze.status_code, budget.status_code) == (404, 404)
    wallet = await http.get(f"/api/v1/wallets/{world.user}", headers=world.auth("admin"))
    assert wallet.json()["status"] == "ACTIVE"


async def test_someone_elses_resource_and_a_missing_one_answer_alike(
    world: World, http: httpx.AsyncClient
) -> None:
    auth = world.mesh.auth(await world.person(), "user")

    theirs = await http.get(f"/api/v1/wallets/{world.wallet_id}/transactions", headers=auth)
    missing = await http.get(f"/api/v1/wallets/{uuid.uuid4()}/transactions", headers=auth)
    garbage = await http.get("/api/v1/wallets/not-an-id/transactions", headers=auth)

    assert theirs.status_code == missing.status_code == garbage.status_code == 404
    assert theirs.json()["error"] == missing.json()["error"] == garbage.json()["error"]


async def test_a_manager_cannot_set_their_own_budget(world: World, http: httpx.AsyncClient) -> None:
    body = {**budget_body(world), "user_id": world.manager}

    response = await http.post("/api/v1/budgets", json=body, headers=world.auth("manager"))

    assert response.status_code == 403
    assert response.json()["error"]["reason"] == "SELF_ACTION_FORBIDDEN"


def test_the_matrix_covers_every_endpoint_but_the_public_ones() -> None:
    from services.gateway.app import create_app
    from services.gateway.config import GatewaySettings

    routes = {
        (method.upper(), path)
        for path, ops in create_app(GatewaySettings()).openapi()["paths"].items()
        for method in ops
        if path.startswith("/api/") and path != "/api/v1/webhooks/bank"
    }

    assert len(MATRIX) == len(routes)
