"""The walking skeleton, end to end: one P2P transfer through the gateway,
the wallet, fraud, budget and the ledger, all real processes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from moneta.budget.v1 import budget_pb2, budget_pb2_grpc
from moneta.wallet.v1 import wallet_pb2_grpc
from tests.e2e.conftest import GRPC_SERVICES, Mesh, Person, block_user, create_person

SERVICE_NAMES = {
    "ledger": "moneta.ledger.v1.LedgerService",
    "wallet": "moneta.wallet.v1.WalletService",
    "budget": "moneta.budget.v1.BudgetService",
    "fraud": "moneta.fraud.v1.FraudService",
}


async def balance_of(http: httpx.AsyncClient, mesh: Mesh, person: Person) -> str:
    response = await http.get(f"/api/v1/wallets/{person.user_id}", headers=mesh.admin())
    assert response.status_code == 200, response.text
    return str(response.json()["balance"])


async def ledger_totals(http: httpx.AsyncClient, mesh: Mesh) -> dict[str, int]:
    response = await http.get("/api/v1/admin/ledger/verify", headers=mesh.admin())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ok"], body["discrepancies"]
    return {"transfers": body["transfers_checked"], "entries": body["entries_checked"]}


def transfer_body(sender: Person, recipient: str, amount: str, key: str) -> dict[str, str]:
    return {
        "sender_id": sender.user_id,
        "recipient": recipient,
        "amount": amount,
        "currency": "USD",
        "idempotency_key": key,
    }


async def test_p2p_transfer_moves_money_and_conserves_the_total(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "100.00")
    bob = await create_person(wallet_stub, http, mesh, "5.00")

    response = await http.post(
        "/api/v1/transfers",
        json=transfer_body(alice, bob.email, "12.50", "skeleton-1"),
        headers=mesh.auth(alice.user_id),
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "COMPLETED"
    assert body["sender_balance"] == "87.50"
    uuid.UUID(body["transfer_id"])
    after = {await balance_of(http, mesh, p) for p in (alice, bob)}
    assert after == {"87.50", "17.50"}
    assert sum(Decimal(b) for b in after) == Decimal("105.00")  # nothing created or lost
    await ledger_totals(http, mesh)  # per currency, debits still equal credits


async def test_recipient_is_found_by_username_and_by_user_id(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "10.00")
    bob = await create_person(wallet_stub, http, mesh, "0")

    for key, recipient in (("by-username", bob.username), ("by-id", bob.user_id)):
        response = await http.post(
            "/api/v1/transfers",
            json=transfer_body(alice, recipient, "1.00", key),
            headers=mesh.auth(alice.user_id),
        )
        assert response.status_code == 200, response.text

    assert await balance_of(http, mesh, bob) == "2.00"


async def test_repeated_idempotency_key_returns_the_same_transfer_and_moves_money_once(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "50.00")
    bob = await create_person(wallet_stub, http, mesh, "0")
    body = transfer_body(alice, bob.email, "20.00", "retry-me")

    first = await http.post("/api/v1/transfers", json=body, headers=mesh.auth(alice.user_id))
    second = await http.post("/api/v1/transfers", json=body, headers=mesh.auth(alice.user_id))

    assert first.status_code == second.status_code == 200
    assert first.json()["transfer_id"] == second.json()["transfer_id"]
    assert second.json()["sender_balance"] == "30.00"
    assert await balance_of(http, mesh, alice) == "30.00"
    assert await balance_of(http, mesh, bob) == "20.00"


async def test_idempotency_key_reused_for_another_request_is_a_conflict(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "50.00")
    bob = await create_person(wallet_stub, http, mesh, "0")
    await http.post(
        "/api/v1/transfers",
        json=transfer_body(alice, bob.email, "1.00", "same-key"),
        headers=mesh.auth(alice.user_id),
    )

    response = await http.post(
        "/api/v1/transfers",
        json=transfer_body(alice, bob.email, "2.00", "same-key"),
        headers=mesh.auth(alice.user_id),
    )

    assert response.status_code == 409
    assert response.json()["error"]["reason"] == "IDEMPOTENCY_KEY_REUSED"
    assert await balance_of(http, mesh, alice) == "49.00"


async def test_insufficient_funds_is_a_clear_422_and_writes_nothing(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "10.00")
    bob = await create_person(wallet_stub, http, mesh, "0")
    before = await ledger_totals(http, mesh)

    response = await http.post(
        "/api/v1/transfers",
        json=transfer_body(alice, bob.email, "10.01", "too-much"),
        headers=mesh.auth(alice.user_id),
    )

    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["status"], error["reason"]) == ("FAILED_PRECONDITION", "INSUFFICIENT_FUNDS")
    assert response.headers["X-Request-ID"]
    assert await balance_of(http, mesh, alice) == "10.00"
    assert await balance_of(http, mesh, bob) == "0.00"
    assert await ledger_totals(http, mesh) == before


async def test_blocked_sender_is_declined_without_naming_the_rule(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    mallory = await create_person(wallet_stub, http, mesh, "10.00")
    bob = await create_person(wallet_stub, http, mesh, "0")
    await block_user(mesh, mallory)

    response = await http.post(
        "/api/v1/transfers",
        json=transfer_body(mallory, bob.email, "1.00", "blocked"),
        headers=mesh.auth(mallory.user_id),
    )

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["reason"] == "TRANSACTION_DECLINED"
    assert "BLOCKLIST" not in response.text
    assert await balance_of(http, mesh, mallory) == "10.00"


async def test_hard_budget_refuses_the_spend_and_nothing_moves(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    carol = await create_person(wallet_stub, http, mesh, "100.00")
    bob = await create_person(wallet_stub, http, mesh, "0")
    now = datetime.now(UTC)
    budget = budget_pb2.Budget(
        user_id=carol.user_id,
        category="P2P",
        currency="USD",
        total_amount=500,
        period_type=budget_pb2.PERIOD_TYPE_MONTHLY,
        mode=budget_pb2.BUDGET_MODE_HARD,
    )
    budget.start_date.FromDatetime(now - timedelta(days=1))
    budget.end_date.FromDatetime(now + timedelta(days=30))
    async with grpc.aio.insecure_channel(mesh.grpc_addrs["budget"]) as channel:
        await budget_pb2_grpc.BudgetServiceStub(channel).CreateBudget(
            budget_pb2.CreateBudgetRequest(budget=budget)
        )

    response = await http.post(
        "/api/v1/transfers",
        json=transfer_body(carol, bob.email, "6.00", "over-budget"),
        headers=mesh.auth(carol.user_id),
    )

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["reason"] == "BUDGET_EXCEEDED"
    assert error["details"]["remaining_amount"] == "500"
    assert await balance_of(http, mesh, carol) == "100.00"


async def test_a_user_cannot_send_from_someone_elses_wallet(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "10.00")
    eve = await create_person(wallet_stub, http, mesh, "0")

    response = await http.post(
        "/api/v1/transfers",
        json=transfer_body(alice, eve.email, "1.00", "theft"),
        headers=mesh.auth(eve.user_id),
    )

    assert response.status_code == 404
    assert await balance_of(http, mesh, alice) == "10.00"


async def test_requests_without_a_valid_token_are_401(mesh: Mesh, http: httpx.AsyncClient) -> None:
    missing = await http.get(f"/api/v1/wallets/{uuid.uuid4()}")
    forged = await http.get(
        f"/api/v1/wallets/{uuid.uuid4()}", headers={"Authorization": "Bearer not.a.token"}
    )

    assert (missing.status_code, forged.status_code) == (401, 401)
    assert missing.json()["error"]["reason"] == "TOKEN_MISSING"
    assert forged.json()["error"]["reason"] == "TOKEN_INVALID"


async def test_gateway_is_healthy_and_ready(mesh: Mesh, http: httpx.AsyncClient) -> None:
    health = await http.get("/health")
    ready = await http.get("/ready")

    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert set(ready.json()["checks"]) == {"ledger", "wallet", "budget", "fraud", "redis"}


@pytest.mark.parametrize("service", GRPC_SERVICES)
async def test_grpc_service_answers_the_standard_health_check(mesh: Mesh, service: str) -> None:
    async with grpc.aio.insecure_channel(mesh.grpc_addrs[service]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        liveness = await stub.Check(health_pb2.HealthCheckRequest(service=""))
        readiness = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAMES[service]))

    assert liveness.status == health_pb2.HealthCheckResponse.SERVING
    assert readiness.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("service", GRPC_SERVICES)
def test_grpc_service_lists_its_services_through_reflection(mesh: Mesh, service: str) -> None:
    with grpc.insecure_channel(mesh.grpc_addrs[service]) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())

    assert {SERVICE_NAMES[service], "grpc.health.v1.Health"} <= services


async def test_unimplemented_rpc_answers_unimplemented_not_internal(mesh: Mesh) -> None:
    # Every RPC of the contracts has landed: a method no service knows stands in.
    async with grpc.aio.insecure_channel(mesh.grpc_addrs["fraud"]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await channel.unary_unary("/moneta.fraud.v1.FraudService/NotInTheContract")(b"")

    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
