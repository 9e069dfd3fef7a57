"""Admin and internal routes, end to end: payments held for review are
listed and resolved, accounts flagged and unflagged, the ledger verified;
an internal service credits a wallet once per reference; a wallet's
history by page number counts its total and filters."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from moneta.wallet.v1 import wallet_pb2_grpc
from tests.e2e.conftest import Mesh, Person, create_person


async def transfer(
    http: httpx.AsyncClient, mesh: Mesh, sender: Person, to: Person, amount: str
) -> httpx.Response:
    return await http.post(
        "/api/v1/transfers",
        json={"sender_id": sender.user_id, "recipient": to.user_id, "amount": amount,
              "idempotency_key": str(uuid.uuid4())},
        headers=mesh.auth(sender.user_id),
    )  # fmt: skip


async def wallet_id(http: httpx.AsyncClient, mesh: Mesh, person: Person) -> str:
    response = await http.get(f"/api/v1/wallets/{person.user_id}", headers=mesh.admin())
    return str(response.json()["wallet_id"])


# -- fraud


async def test_a_held_payment_is_listed_for_review_and_resolved(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "12000.00")
    bob = await create_person(wallet_stub, http, mesh, "0")
    held = await transfer(http, mesh, alice, bob, "10000.00")
    assert held.json()["status"] == "PENDING_REVIEW", held.text

    listed = await http.get("/api/v1/fraud/reviews?status=OPEN&page_size=200", headers=mesh.admin())
    (review,) = [r for r in listed.json()["reviews"] if r["user_id"] == alice.user_id]
    resolved = await http.post(
        f"/api/v1/fraud/reviews/{review['review_id']}/resolve",
        json={"decision": "REJECT", "mark_fraud": True},
        headers=mesh.admin(),
    )

    assert (review["amount"], review["currency"], review["status"]) == ("10000.00", "USD", "OPEN")
    assert review["reasons"] and review["resolved_at"] is None
    assert resolved.status_code == 200, resolved.text
    assert (resolved.json()["status"], resolved.json()["marked_fraud"]) == ("REJECTED", True)
    assert resolved.json()["resolved_at"]


async def test_an_unknown_review_is_404(mesh: Mesh, http: httpx.AsyncClient) -> None:
    for review_id in (str(uuid.uuid4()), "not-a-uuid"):
        response = await http.post(
            f"/api/v1/fraud/reviews/{review_id}/resolve",
            json={"decision": "APPROVE"},
            headers=mesh.admin(),
        )
        assert response.status_code == 404
        assert response.json()["error"]["reason"] == "REVIEW_NOT_FOUND"


async def test_an_account_is_flagged_and_unflagged(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    mule = await create_person(wallet_stub, http, mesh, "0")

    flagged = await http.post(
        "/api/v1/fraud/flags",
        json={"user_id": mule.user_id, "reason": "reported by a bank"},
        headers=mesh.admin(),
    )
    unflagged = await http.delete(
        f"/api/v1/fraud/flags/{mule.user_id}?reason=cleared", headers=mesh.admin()
    )

    assert flagged.status_code == 201, flagged.text
    assert flagged.json() == {"user_id": mule.user_id, "flagged": True}
    assert unflagged.status_code == 204 and unflagged.content == b""


async def test_the_ledger_verifies(mesh: Mesh, http: httpx.AsyncClient) -> None:
    response = await http.get("/api/v1/admin/ledger/verify", headers=mesh.admin())

    assert response.status_code == 200
    assert response.json()["ok"] is True and response.json()["discrepancies"] == []


# -- an internal service's adjustments


async def test_a_service_credits_a_wallet_once_per_reference(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    person = await create_person(wallet_stub, http, mesh, "1.00")
    wid = await wallet_id(http, mesh, person)
    service = mesh.auth("cashback-service", "service")
    body = {"amount": "2.50", "type": "CREDIT", "description": "cashback",
            "reference_id": "order-1", "reference_type": "cashback"}  # fmt: skip

    first = await http.post(f"/api/v1/wallets/{wid}/transactions", json=body, headers=service)
    again = await http.post(f"/api/v1/wallets/{wid}/transactions", json=body, headers=service)
    other = await http.post(
        f"/api/v1/wallets/{wid}/transactions", json={**body, "amount": "3"}, headers=service
    )

    assert first.status_code == again.status_code == 201, first.text
    assert again.content == first.content and again.headers["Idempotent-Replayed"] == "true"
    assert (first.json()["amount"], first.json()["type"]) == ("2.50", "ADJUSTMENT")
    assert other.status_code == 409
    balance = await http.get(f"/api/v1/wallets/{person.user_id}", headers=mesh.admin())
    assert balance.json()["balance"] == "3.50"


# -- history by page number


async def test_history_pages_count_the_total_and_filter(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "10.00")
    bob = await create_person(wallet_stub, http, mesh, "0")
    for amount in ("1.00", "2.00", "3.00", "4.00"):
        assert (await transfer(http, mesh, alice, bob, amount)).status_code == 200
    wid = await wallet_id(http, mesh, alice)
    auth = mesh.auth(alice.user_id)

    async def page(query: str) -> dict[str, Any]:
        response = await http.get(f"/api/v1/wallets/{wid}/transactions?{query}", headers=auth)
        assert response.status_code == 200, response.text
        return dict(response.json())

    first = await page("page=1&limit=2")
    last = await page("page=3&limit=2")
    sent = await page("type=P2P_OUT&limit=100")
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    none_yet = await page(f"start_date={tomorrow}")
    today = await page(f"end_date={datetime.now(UTC).date().isoformat()}")

    assert first["pagination"] == {"page": 1, "limit": 2, "total": 5, "total_capped": False}
    assert [t["amount"] for t in first["transactions"]] == ["-4.00", "-3.00"]
    assert [t["type"] for t in last["transactions"]] == ["ADJUSTMENT"]
    assert sent["pagination"]["total"] == 4
    assert none_yet["pagination"]["total"] == 0
    assert today["pagination"]["total"] == 5


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("page=200&limit=100", "PAGE_TOO_DEEP"),
        ("limit=1000", "VALIDATION_ERROR"),
        ("page=0", "VALIDATION_ERROR"),
        ("type=LOTTERY", "INVALID_TYPE"),
        ("start_date=yesterday", "INVALID_DATE"),
    ],
)
async def test_bad_history_queries_are_400(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    query: str,
    reason: str,
) -> None:
    person = await create_person(wallet_stub, http, mesh, "0")
    wid = await wallet_id(http, mesh, person)

    response = await http.get(
        f"/api/v1/wallets/{wid}/transactions?{query}", headers=mesh.auth(person.user_id)
    )

    assert response.status_code == 400, response.text
    assert response.json()["error"]["reason"] == reason
