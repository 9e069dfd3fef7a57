"""Money in from a bank and out to it, end to end: linked bank accounts,
adding funds and withdrawing through the gateway, the bank partner's signed
webhook settling, failing and returning them, debts left by a returned
deposit that was already spent, the outbox relay and the bank simulator.

The mesh's gateway signs with its own webhook secret: the environment's
MONETA_BANK_WEBHOOK_SECRET, else the development default.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from moneta.budget.v1 import budget_pb2
from moneta.fraud.v1 import fraud_pb2
from moneta.wallet.v1 import wallet_pb2_grpc
from services.common.db import create_pool
from services.common.errors import Aborted, FailedPrecondition, PermissionDenied, Unavailable
from services.common.infra import redis_client
from services.wallet import banking, handlers
from services.wallet.balance_cache import BalanceCache
from services.wallet.domain import wallet_id_for
from services.wallet.peers import Peers
from tests.conftest import ROOT, TestRun, service_pool
from tests.e2e.conftest import (
    ACCOUNT_NUMBER,
    BANK_WEBHOOK_SECRET,
    ROUTING_NUMBER,
    AnswerLost,
    LedgerDown,
    Mesh,
    Person,
    block_user,
    budget_of,
    budgeted_person,
    create_person,
    fraud_case,
    free_port,
    link_account,
    only_budget,
    set_pin,
    usd,
    wallet_of,
)
from tests.processes import die_with_parent

# The secret the mesh's gateway checks webhooks with.
WEBHOOK_SECRET = BANK_WEBHOOK_SECRET


# -- helpers


@pytest.fixture
async def wallet_db(test_run: TestRun, mesh: Mesh) -> AsyncIterator[asyncpg.Pool]:
    """The mesh wallet's own database."""
    pool = await create_pool(test_run.database_url("wallet"), min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
async def peers(test_run: TestRun, mesh: Mesh) -> AsyncIterator[Peers]:
    """The wallet's clients of the mesh's ledger, budget and fraud, with the
    mesh wallet's balance cache (so that what they move is seen at once)."""
    redis = redis_client(test_run.settings.redis_url)
    ledger = mesh.peers(BalanceCache(redis, test_run.redis_prefix))
    yield ledger
    await ledger.close()
    await redis.aclose()


async def bank_transfer(
    http: httpx.AsyncClient,
    mesh: Mesh,
    person: Person,
    path: str,
    account_id: str,
    amount: Any,
    key: str | None,
    **extra: Any,
) -> httpx.Response:
    body = {"user_id": person.user_id, "amount": amount, "bank_account_id": account_id, **extra}
    if key is not None:
        body["idempotency_key"] = key
    return await http.post(f"/api/v1/wallet/{path}", json=body, headers=mesh.auth(person.user_id))


async def add_funds(
    http: httpx.AsyncClient, mesh: Mesh, person: Person, account_id: str, amount: str, key: str
) -> str:
    response = await bank_transfer(http, mesh, person, "add-funds", account_id, amount, key)
    assert response.status_code == 202, response.text
    return str(response.json()["transfer_id"])


def signed(body: bytes, secret: str = WEBHOOK_SECRET, at: int | None = None) -> dict[str, str]:
    at = int(time.time()) if at is None else at
    digest = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-Moneta-Signature": f"t={at},v1={digest}"}


async def webhook(
    http: httpx.AsyncClient,
    transfer_id: str,
    status: str,
    *,
    secret: str = WEBHOOK_SECRET,
    at: int | None = None,
    reason: str | None = None,
) -> httpx.Response:
    payload: dict[str, str] = {
        "transfer_id": transfer_id,
        "status": status,
        "bank_reference": f"TEST-{uuid.uuid4().hex[:8]}",
    }
    if reason:
        payload["reason"] = reason
    body = json.dumps(payload).encode()
    return await http.post("/api/v1/webhooks/bank", content=body, headers=signed(body, secret, at))


async def verified(http: httpx.AsyncClient, mesh: Mesh) -> int:
    """VerifyLedger passes; the number of transfers it checked."""
    response = await http.get("/api/v1/admin/ledger/verify", headers=mesh.admin())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ok"], body["discrepancies"]
    return int(body["transfers_checked"])


async def pay(
    http: httpx.AsyncClient, mesh: Mesh, sender: Person, recipient: Person, amount: str, key: str
) -> httpx.Response:
    return await http.post(
        "/api/v1/transfers",
        json={
            "sender_id": sender.user_id,
            "recipient": recipient.email,
            "amount": amount,
            "currency": "USD",
            "idempotency_key": key,
        },
        headers=mesh.auth(sender.user_id),
    )


async def history_of(
    http: httpx.AsyncClient, mesh: Mesh, person: Person
) -> list[tuple[str, str, str]]:
    """(type, amount, status) of the person's history, newest first."""
    response = await http.get(
        f"/api/v1/wallet/{person.user_id}/transactions", headers=mesh.auth(person.user_id)
    )
    assert response.status_code == 200, response.text
    return [(t["type"], t["amount"], t["status"]) for t in response.json()["transactions"]]


def reason_of(response: httpx.Response) -> str:
    return str(response.json()["error"]["reason"])


# -- linking


async def test_a_linked_bank_account_shows_only_its_last_four_digits(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    wallet_db: asyncpg.Pool,
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "0")

    response = await http.post(
        "/api/v1/wallet/bank-accounts",
        json={
            "user_id": alice.user_id,
            "account_number": ACCOUNT_NUMBER,
            "routing_number": ROUTING_NUMBER,
            "holder_name": "Alice Example",
        },
        headers=mesh.auth(alice.user_id),
    )

    assert response.status_code == 201, response.text
    assert response.json()["last4"] == "6789"
    assert "123456789" not in response.text
    stored = await wallet_db.fetchrow(
        "SELECT account_number_encrypted, last4 FROM bank_accounts WHERE bank_account_id = $1",
        uuid.UUID(response.json()["bank_account_id"]),
    )
    assert stored is not None and stored["last4"] == "6789"
    assert b"123456789" not in stored["account_number_encrypted"]
    # Linking the same account again is the same link.
    assert await link_account(http, mesh, alice) == response.json()["bank_account_id"]


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("account_number", "12-34-56", "INVALID_ACCOUNT_NUMBER"),
        ("account_number", "123", "INVALID_ACCOUNT_NUMBER"),
        ("routing_number", "021000022", "INVALID_ROUTING_NUMBER"),
        ("routing_number", "12345", "INVALID_ROUTING_NUMBER"),
    ],
)
async def test_bad_bank_details_are_refused_with_a_reason(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    field: str,
    value: str,
    reason: str,
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "0")
    body = {
        "user_id": alice.user_id,
        "account_number": ACCOUNT_NUMBER,
        "routing_number": ROUTING_NUMBER,
        "holder_name": "Alice Example",
        field: value,
    }

    response = await http.post(
        "/api/v1/wallet/bank-accounts", json=body, headers=mesh.auth(alice.user_id)
    )

    assert response.status_code == 400, response.text
    assert reason_of(response) == reason


async def test_nobody_links_or_uses_a_bank_account_for_someone_else(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "10.00")
    eve = await create_person(wallet_stub, http, mesh, "0")
    alices_account = await link_account(http, mesh, alice)

    linked = await http.post(
        "/api/v1/wallet/bank-accounts",
        json={
            "user_id": alice.user_id,
            "account_number": "99998888",
            "routing_number": ROUTING_NUMBER,
            "holder_name": "Eve",
        },
        headers=mesh.auth(eve.user_id),
    )
    withdrawn = await http.post(
        "/api/v1/wallet/withdraw",
        json={
            "user_id": alice.user_id,
            "amount": "1.00",
            "bank_account_id": alices_account,
            "idempotency_key": "eve",
        },
        headers=mesh.auth(eve.user_id),
    )
    into_own_wallet = await bank_transfer(
        http, mesh, eve, "add-funds", alices_account, "1.00", "eve-2"
    )

    assert (linked.status_code, withdrawn.status_code) == (404, 404)
    assert into_own_wallet.status_code == 404
    assert reason_of(into_own_wallet) == "BANK_ACCOUNT_NOT_FOUND"


# -- adding funds


async def test_added_funds_are_pending_not_available_until_the_bank_settles(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "0")
    account = await link_account(http, mesh, alice)

    response = await bank_transfer(http, mesh, alice, "add-funds", account, "100.00", "add-1")

    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "PENDING"
    uuid.UUID(body["transfer_id"])
    eta = datetime.fromisoformat(body["estimated_completion"].removesuffix("Z")).replace(tzinfo=UTC)
    assert eta.weekday() < 5
    assert 2 <= (eta - datetime.now(UTC)).total_seconds() / 86400 <= 5.01
    assert await usd(http, mesh, alice) == {
        "available": "0.00",
        "pending": "100.00",
        "posted": "0.00",
    }
    await verified(http, mesh)


async def test_settlement_makes_the_funds_available_and_a_second_delivery_changes_nothing(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "0")
    deposit = await add_funds(
        http, mesh, alice, await link_account(http, mesh, alice), "75.50", "a"
    )

    assert await history_of(http, mesh, alice) == [("DEPOSIT", "75.50", "PENDING")]
    first = await webhook(http, deposit, "SETTLED")
    transfers = await verified(http, mesh)
    second = await webhook(http, deposit, "SETTLED")

    assert first.status_code == second.status_code == 200, first.text
    assert first.json() == second.json() == {"transfer_id": deposit, "status": "COMPLETED"}
    assert await usd(http, mesh, alice) == {
        "available": "75.50",
        "pending": "0.00",
        "posted": "75.50",
    }
    assert await verified(http, mesh) == transfers  # the second delivery moved nothing
    assert await history_of(http, mesh, alice) == [("DEPOSIT", "75.50", "COMPLETED")]


async def test_concurrent_deliveries_of_one_settlement_apply_it_once(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "0")
    deposit = await add_funds(http, mesh, alice, await link_account(http, mesh, alice), "12", "c")

    answers = await asyncio.gather(*(webhook(http, deposit, "SETTLED") for _ in range(5)))

    assert [a.status_code for a in answers] == [200] * 5
    assert {a.json()["status"] for a in answers} == {"COMPLETED"}
    assert await usd(http, mesh, alice) == {
        "available": "12.00",
        "pending": "0.00",
        "posted": "12.00",
    }
    await verified(http, mesh)


async def test_concurrent_requests_with_one_key_hold_the_money_once(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "50.00")
    account = await link_account(http, mesh, alice)

    answers = await asyncio.gather(
        *(bank_transfer(http, mesh, alice, "withdraw", account, "30.00", "once") for _ in range(5))
    )

    assert [a.status_code for a in answers] == [202] * 5, [a.text for a in answers]
    assert len({a.json()["transfer_id"] for a in answers}) == 1
    assert await usd(http, mesh, alice) == {
        "available": "20.00",
        "pending": "-30.00",
        "posted": "50.00",
    }
    await verified(http, mesh)


async def test_a_failed_deposit_releases_the_hold(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "5.00")
    deposit = await add_funds(http, mesh, alice, await link_account(http, mesh, alice), "40", "f")

    failed = await webhook(http, deposit, "FAILED", reason="R01 insufficient funds")
    again = await webhook(http, deposit, "FAILED")
    contradiction = await webhook(http, deposit, "SETTLED")

    assert failed.status_code == again.status_code == 200, failed.text
    assert failed.json()["status"] == again.json()["status"] == "FAILED"
    assert contradiction.status_code == 422
    assert reason_of(contradiction) == "SETTLEMENT_CONFLICT"
    assert await usd(http, mesh, alice) == {
        "available": "5.00",
        "pending": "0.00",
        "posted": "5.00",
    }
    await verified(http, mesh)


async def test_the_same_key_replays_and_a_different_request_with_it_is_a_conflict(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "0")
    account = await link_account(http, mesh, alice)

    first = await bank_transfer(http, mesh, alice, "add-funds", account, "10.00", "same")
    # The key may come in the Idempotency-Key header instead.
    replay = await http.post(
        "/api/v1/wallet/add-funds",
        json={"user_id": alice.user_id, "amount": "10.00", "bank_account_id": account},
        headers={**mesh.auth(alice.user_id), "Idempotency-Key": "same"},
    )
    other = await bank_transfer(http, mesh, alice, "add-funds", account, "11.00", "same")
    other_kind = await bank_transfer(http, mesh, alice, "withdraw", account, "10.00", "same")
    keyless = await bank_transfer(http, mesh, alice, "add-funds", account, "10.00", None)

    assert first.status_code == replay.status_code == 202
    assert first.json() == replay.json()
    assert (other.status_code, reason_of(other)) == (409, "IDEMPOTENCY_KEY_REUSED")
    assert (other_kind.status_code, reason_of(other_kind)) == (409, "IDEMPOTENCY_KEY_REUSED")
    assert (keyless.status_code, reason_of(keyless)) == (400, "IDEMPOTENCY_KEY_REQUIRED")
    assert (await usd(http, mesh, alice))["pending"] == "10.00"


@pytest.mark.parametrize(("amount", "reason"), [("10.001", "AMOUNT_PRECISION"),
                                                ("0", "INVALID_AMOUNT"),
                                                ("-5.00", "INVALID_AMOUNT")])  # fmt: skip
async def test_bad_amounts_are_400_and_move_nothing(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    amount: str,
    reason: str,
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "20.00")
    account = await link_account(http, mesh, alice)

    added = await bank_transfer(http, mesh, alice, "add-funds", account, amount, "bad-in")
    withdrawn = await bank_transfer(http, mesh, alice, "withdraw", account, amount, "bad-out")

    assert (added.status_code, reason_of(added)) == (400, reason)
    assert (withdrawn.status_code, reason_of(withdrawn)) == (400, reason)
    assert await usd(http, mesh, alice) == {
        "available": "20.00",
        "pending": "0.00",
        "posted": "20.00",
    }


# -- the webhook's signature


async def test_forged_expired_and_unsigned_webhooks_are_401_and_change_nothing(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "0")
    deposit = await add_funds(http, mesh, alice, await link_account(http, mesh, alice), "30", "w")

    forged = await webhook(http, deposit, "SETTLED", secret="not-the-bank")
    expired = await webhook(http, deposit, "SETTLED", at=int(time.time()) - 301)
    unsigned = await http.post(
        "/api/v1/webhooks/bank",
        json={"transfer_id": deposit, "status": "SETTLED", "bank_reference": "X"},
    )
    body = json.dumps({"transfer_id": deposit, "status": "SETTLED", "bank_reference": "X"})
    tampered = await http.post(
        "/api/v1/webhooks/bank",
        content=body.replace("SETTLED", "FAILED").encode(),
        headers=signed(body.encode()),
    )

    assert [r.status_code for r in (forged, expired, unsigned, tampered)] == [401] * 4
    assert reason_of(forged) == reason_of(unsigned) == reason_of(tampered)
    assert reason_of(forged) == "WEBHOOK_SIGNATURE_INVALID"
    assert reason_of(expired) == "WEBHOOK_EXPIRED"
    assert (await usd(http, mesh, alice))["pending"] == "30.00"


async def test_a_signed_webhook_about_an_unknown_transfer_or_with_a_bad_body_is_refused(
    mesh: Mesh, http: httpx.AsyncClient
) -> None:
    unknown = await webhook(http, str(uuid.uuid4()), "SETTLED")
    body = json.dumps({"transfer_id": str(uuid.uuid4()), "status": "PAID", "bank_reference": "X"})
    malformed = await http.post(
        "/api/v1/webhooks/bank", content=body.encode(), headers=signed(body.encode())
    )

    assert (unknown.status_code, reason_of(unknown)) == (404, "BANK_TRANSFER_NOT_FOUND")
    assert (malformed.status_code, reason_of(malformed)) == (400, "VALIDATION_ERROR")


# -- withdrawing


async def test_a_withdrawal_holds_the_money_until_the_bank_pays_it_out(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "100.00")
    bob = await create_person(wallet_stub, http, mesh, "0")
    account = await link_account(http, mesh, alice)

    response = await bank_transfer(http, mesh, alice, "withdraw", account, "80.00", "out-1")
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "PENDING"
    held = await usd(http, mesh, alice)
    spend_it_again = await pay(http, mesh, alice, bob, "50.00", "double-spend")
    settled = await webhook(http, response.json()["transfer_id"], "SETTLED")

    assert held == {"available": "20.00", "pending": "-80.00", "posted": "100.00"}
    assert (spend_it_again.status_code, reason_of(spend_it_again)) == (422, "INSUFFICIENT_FUNDS")
    assert settled.status_code == 200 and settled.json()["status"] == "COMPLETED"
    assert await usd(http, mesh, alice) == {
        "available": "20.00",
        "pending": "0.00",
        "posted": "20.00",
    }
    await verified(http, mesh)


async def test_a_failed_withdrawal_gives_the_money_back(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "50.00")
    account = await link_account(http, mesh, alice)
    response = await bank_transfer(http, mesh, alice, "withdraw", account, "50.00", "out")

    failed = await webhook(http, response.json()["transfer_id"], "FAILED", reason="R02")

    assert failed.status_code == 200 and failed.json()["status"] == "FAILED"
    assert await usd(http, mesh, alice) == {
        "available": "50.00",
        "pending": "0.00",
        "posted": "50.00",
    }
    await verified(http, mesh)


async def test_a_withdrawal_beyond_the_balance_is_refused_and_replays_the_refusal(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "10.00")
    account = await link_account(http, mesh, alice)
    before = await verified(http, mesh)

    first = await bank_transfer(http, mesh, alice, "withdraw", account, "10.01", "too-much")
    again = await bank_transfer(http, mesh, alice, "withdraw", account, "10.01", "too-much")

    assert (first.status_code, reason_of(first)) == (422, "INSUFFICIENT_FUNDS")
    assert (again.status_code, reason_of(again)) == (422, "INSUFFICIENT_FUNDS")
    assert await usd(http, mesh, alice) == {
        "available": "10.00",
        "pending": "0.00",
        "posted": "10.00",
    }
    assert await verified(http, mesh) == before


# -- returns


async def test_a_returned_deposit_not_yet_spent_is_taken_back(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "5.00")
    deposit = await add_funds(http, mesh, alice, await link_account(http, mesh, alice), "20", "r")
    too_early = await webhook(http, deposit, "RETURNED")
    await webhook(http, deposit, "SETTLED")

    returned = await webhook(http, deposit, "RETURNED", reason="R10")
    again = await webhook(http, deposit, "RETURNED")
    late_settlement = await webhook(http, deposit, "SETTLED")

    assert (too_early.status_code, reason_of(too_early)) == (409, "SETTLEMENT_OUT_OF_ORDER")
    assert returned.status_code == again.status_code == late_settlement.status_code == 200
    assert {r.json()["status"] for r in (returned, again, late_settlement)} == {"REVERSED"}
    wallet = await wallet_of(http, mesh, alice)
    assert wallet["status"] == "ACTIVE"
    assert await usd(http, mesh, alice) == {
        "available": "5.00",
        "pending": "0.00",
        "posted": "5.00",
    }
    await verified(http, mesh)


async def test_a_returned_deposit_already_spent_is_owed_and_repaid_first_from_incoming_money(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    wallet_db: asyncpg.Pool,
    peers: Peers,
) -> None:
    carol = await create_person(wallet_stub, http, mesh, "0")
    bob = await create_person(wallet_stub, http, mesh, "100.00")
    account = await link_account(http, mesh, carol)
    deposit = await add_funds(http, mesh, carol, account, "100.00", "dep")
    assert (await webhook(http, deposit, "SETTLED")).status_code == 200
    assert (await pay(http, mesh, carol, bob, "60.00", "spend")).status_code == 200

    returned = await webhook(http, deposit, "RETURNED", reason="R10")
    transfers = await verified(http, mesh)
    again = await webhook(http, deposit, "RETURNED")

    assert returned.status_code == again.status_code == 200, returned.text
    assert returned.json()["status"] == again.json()["status"] == "REVERSED"
    assert await verified(http, mesh) == transfers
    wallet = await wallet_of(http, mesh, carol)
    assert wallet["status"] == "FROZEN"
    assert await usd(http, mesh, carol) == {
        "available": "0.00",
        "pending": "0.00",
        "posted": "0.00",
    }
    debt = await wallet_db.fetchrow(
        "SELECT debt_id, amount, repaid FROM bank_debts WHERE transfer_id = $1",
        uuid.UUID(deposit),
    )
    assert debt is not None and (debt["amount"], debt["repaid"]) == (6000, 0)
    receivable = await peers.lookup_transfer(debt["debt_id"])
    assert receivable is not None and receivable.amount == 6000
    clawback = await wallet_db.fetchrow(
        "SELECT type, amount, status FROM transactions WHERE ledger_transfer_id = $1",
        debt["debt_id"],
    )
    assert clawback is not None
    assert dict(clawback) == {"type": "CLAWBACK", "amount": -6000, "status": "PENDING"}
    change = await wallet_db.fetchrow(
        "SELECT new_status, actor_id, reason FROM wallet_status_changes"
        " WHERE wallet_id = $1 ORDER BY created_at DESC LIMIT 1",
        uuid.UUID(wallet["wallet_id"]),
    )
    assert (
        change is not None and change["new_status"] == 2 and "returned deposit" in change["reason"]
    )

    # Nothing leaves a frozen wallet.
    frozen = await bank_transfer(http, mesh, carol, "withdraw", account, "1.00", "out")
    assert (frozen.status_code, reason_of(frozen)) == (422, "WALLET_FROZEN")

    # Money still arrives, and repays the debt first.
    wallet_id = wallet_id_for(uuid.UUID(carol.user_id))
    assert (await pay(http, mesh, bob, carol, "30.00", "back-1")).status_code == 200
    await banking.repay_debts(wallet_db, peers, wallet_id, "USD")
    assert (await usd(http, mesh, carol))["available"] == "0.00"
    assert (
        await wallet_db.fetchval(
            "SELECT repaid FROM bank_debts WHERE debt_id = $1", debt["debt_id"]
        )
        == 3000
    )
    assert (await wallet_of(http, mesh, carol))["status"] == "FROZEN"

    assert (await pay(http, mesh, bob, carol, "50.00", "back-2")).status_code == 200
    await banking.repay_debts(wallet_db, peers, wallet_id, "USD")
    assert await usd(http, mesh, carol) == {
        "available": "20.00",
        "pending": "0.00",
        "posted": "20.00",
    }
    assert (
        await wallet_db.fetchval(
            "SELECT repaid FROM bank_debts WHERE debt_id = $1", debt["debt_id"]
        )
        == 6000
    )
    assert (
        await wallet_db.fetchval(
            "SELECT status FROM transactions WHERE ledger_transfer_id = $1", debt["debt_id"]
        )
        == "COMPLETED"
    )
    # The debt was the only reason for the freeze.
    assert (await wallet_of(http, mesh, carol))["status"] == "ACTIVE"
    assert [row for row in await history_of(http, mesh, carol) if row[0] != "P2P_IN"] == [
        ("CLAWBACK", "-60.00", "COMPLETED"),
        ("P2P_OUT", "-60.00", "COMPLETED"),
        ("DEPOSIT", "100.00", "REVERSED"),
    ]
    assert await banking.repay_debts(wallet_db, peers, wallet_id, "USD") == 0
    await verified(http, mesh)


async def test_a_returned_payout_gives_the_money_back(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "30.00")
    account = await link_account(http, mesh, alice)
    response = await bank_transfer(http, mesh, alice, "withdraw", account, "30.00", "out")
    await webhook(http, response.json()["transfer_id"], "SETTLED")

    returned = await webhook(http, response.json()["transfer_id"], "RETURNED", reason="R03")

    assert returned.status_code == 200 and returned.json()["status"] == "REVERSED"
    assert await usd(http, mesh, alice) == {
        "available": "30.00",
        "pending": "0.00",
        "posted": "30.00",
    }
    await verified(http, mesh)


# -- screening and budgets


async def budget_left(http: httpx.AsyncClient, mesh: Mesh, person: Person) -> str:
    return (await only_budget(http, mesh, person))["remaining_amount"]


async def test_a_withdrawal_is_budgeted_and_a_failed_or_returned_one_gives_the_budget_back(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await budgeted_person(wallet_stub, http, mesh, "100.00", "CASH_OUT", "50")
    account = await link_account(http, mesh, alice)

    first = await bank_transfer(http, mesh, alice, "withdraw", account, "40.00", "cash-1")
    beyond = await bank_transfer(http, mesh, alice, "withdraw", account, "20.00", "cash-2")
    left_after_first = await budget_left(http, mesh, alice)
    await webhook(http, first.json()["transfer_id"], "FAILED", reason="R02")
    await webhook(http, first.json()["transfer_id"], "FAILED", reason="R02")  # delivered twice
    left_after_failure = await budget_left(http, mesh, alice)
    second = await bank_transfer(http, mesh, alice, "withdraw", account, "50.00", "cash-3")
    await webhook(http, second.json()["transfer_id"], "SETTLED")
    left_after_payout = await budget_left(http, mesh, alice)
    await webhook(http, second.json()["transfer_id"], "RETURNED", reason="R03")
    await webhook(http, second.json()["transfer_id"], "RETURNED", reason="R03")

    assert first.status_code == 202, first.text
    assert (beyond.status_code, reason_of(beyond)) == (422, "BUDGET_EXCEEDED")
    assert left_after_first == "10.00"
    assert left_after_failure == "50.00"
    assert second.status_code == 202, second.text
    assert left_after_payout == "0.00"
    assert await budget_left(http, mesh, alice) == "50.00"
    assert await usd(http, mesh, alice) == {
        "available": "100.00",
        "pending": "0.00",
        "posted": "100.00",
    }
    await verified(http, mesh)


async def interrupted_withdrawal(
    http: httpx.AsyncClient,
    mesh: Mesh,
    wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    wallet_db: asyncpg.Pool,
    broken: type[Peers],
    peers: Peers,
) -> tuple[Person, banking.BankTransferCommand]:
    """A budgeted person's withdrawal of 40 USD made through ``broken`` peers
    (it raises Unavailable): the person and the command, to retry."""
    alice = await budgeted_person(wallet_stub, http, mesh, "100.00", "CASH_OUT", "50")
    account = await link_account(http, mesh, alice)
    cmd = banking.BankTransferCommand(alice.user_id, 4000, "USD", account, "interrupted")
    failing = mesh.peers(peers.cache, broken)
    try:
        with pytest.raises(Unavailable):
            await banking.withdraw(wallet_db, failing, cmd)
    finally:
        await failing.close()
    return alice, cmd


@pytest.mark.parametrize("retry", ["reconciler", "same key"])
async def test_a_withdrawal_whose_hold_answer_was_lost_is_finished_and_its_spend_counted_once(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    wallet_db: asyncpg.Pool,
    peers: Peers,
    retry: str,
) -> None:
    alice, cmd = await interrupted_withdrawal(http, mesh, wallet_stub, wallet_db, AnswerLost, peers)
    unfinished = await budget_of(http, mesh, alice)

    if retry == "reconciler":
        await banking.reconcile_stale_bank_transfers(wallet_db, peers, older_than_seconds=0)
    outcome = (await banking.withdraw(wallet_db, peers, cmd)).status
    again = (await banking.withdraw(wallet_db, peers, cmd)).status

    assert unfinished == ("0.00", "40.00")
    assert (outcome, again) == ("PENDING", "PENDING")
    assert await budget_of(http, mesh, alice) == ("40.00", "0.00")
    assert await usd(http, mesh, alice) == {
        "available": "60.00",
        "pending": "-40.00",
        "posted": "100.00",
    }
    await verified(http, mesh)


@pytest.mark.parametrize("reservation", ["held", "lapsed"])
async def test_a_withdrawal_that_never_reached_the_ledger_is_refused_and_frees_its_budget(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    wallet_db: asyncpg.Pool,
    peers: Peers,
    reservation: str,
) -> None:
    alice, cmd = await interrupted_withdrawal(http, mesh, wallet_stub, wallet_db, LedgerDown, peers)
    reserved = await budget_of(http, mesh, alice)
    if reservation == "lapsed":
        # As its ttl would, while the services were down: the reconciler
        # must still finish the transfer (and the ones after it).
        transfer_id = banking.bank_transfer_id(uuid.UUID(alice.user_id), cmd.idempotency_key)
        await peers.release(str(handlers.reservation_id_for(transfer_id)))

    await banking.reconcile_stale_bank_transfers(wallet_db, peers, older_than_seconds=0)

    assert reserved == ("0.00", "40.00")
    assert await budget_of(http, mesh, alice) == ("0.00", "0.00")
    with pytest.raises(FailedPrecondition) as replay:
        await banking.withdraw(wallet_db, peers, cmd)
    assert replay.value.reason == "REQUEST_ABANDONED"
    assert (await usd(http, mesh, alice))["available"] == "100.00"


async def test_a_withdrawal_retried_after_the_ledger_was_down_goes_through_once(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    wallet_db: asyncpg.Pool,
    peers: Peers,
) -> None:
    alice, cmd = await interrupted_withdrawal(http, mesh, wallet_stub, wallet_db, LedgerDown, peers)

    first, again = (
        await banking.withdraw(wallet_db, peers, cmd),
        await banking.withdraw(wallet_db, peers, cmd),
    )

    assert (first.status, again.status) == ("PENDING", "PENDING")
    assert await budget_of(http, mesh, alice) == ("40.00", "0.00")
    assert (await usd(http, mesh, alice))["available"] == "60.00"
    await verified(http, mesh)


async def test_the_reconciler_leaves_alone_a_withdrawal_an_attempt_is_at_work_on(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    wallet_db: asyncpg.Pool,
    peers: Peers,
) -> None:
    alice, cmd = await interrupted_withdrawal(http, mesh, wallet_stub, wallet_db, LedgerDown, peers)
    transfer_id = banking.bank_transfer_id(uuid.UUID(alice.user_id), cmd.idempotency_key)
    async with wallet_db.acquire() as conn:
        assert await banking._take_lease(conn, transfer_id) is not None  # another attempt

    await banking.reconcile_stale_bank_transfers(wallet_db, peers, older_than_seconds=0)
    with pytest.raises(Aborted) as concurrent:
        await banking.withdraw(wallet_db, peers, cmd)

    assert concurrent.value.reason == "REQUEST_IN_PROGRESS"
    status = await wallet_db.fetchval(
        "SELECT status FROM bank_transfers WHERE transfer_id = $1", transfer_id
    )
    assert status == "PROCESSING"
    assert await budget_of(http, mesh, alice) == ("0.00", "40.00")


class ReserveAnswerLost(Peers):
    """Peers whose budget makes every reservation but whose answer is lost."""

    async def reserve(self, *args: Any, **kwargs: Any) -> budget_pb2.Reservation:
        await super().reserve(*args, **kwargs)
        raise Unavailable("the budget's answer was lost", reason="DEPENDENCY_UNAVAILABLE")


async def test_a_withdrawal_whose_reservation_answer_was_lost_frees_it(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    wallet_db: asyncpg.Pool,
    peers: Peers,
) -> None:
    # Nothing recorded the reservation: the wallet named it, so it is freed.
    alice, _ = await interrupted_withdrawal(
        http, mesh, wallet_stub, wallet_db, ReserveAnswerLost, peers
    )
    reserved = await budget_of(http, mesh, alice)

    await banking.reconcile_stale_bank_transfers(wallet_db, peers, older_than_seconds=0)

    assert reserved == ("0.00", "40.00")
    assert await budget_of(http, mesh, alice) == ("0.00", "0.00")


class BudgetDown(Peers):
    """Peers whose budget service does not answer refunds."""

    async def refund_spend(
        self, reservation_id: str, amount: int, currency: str, reference: str
    ) -> None:
        raise Unavailable("the budget service is down", reason="DEPENDENCY_UNAVAILABLE")


async def test_a_failed_payout_while_the_budget_is_down_is_settled_and_its_budget_given_back_later(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    wallet_db: asyncpg.Pool,
    peers: Peers,
) -> None:
    alice = await budgeted_person(wallet_stub, http, mesh, "100.00", "CASH_OUT", "50")
    account = await link_account(http, mesh, alice)
    payout = await bank_transfer(http, mesh, alice, "withdraw", account, "40.00", "out")
    transfer_id = payout.json()["transfer_id"]
    down = mesh.peers(peers.cache, BudgetDown)
    try:
        failed = await banking.apply_bank_settlement(
            wallet_db, down, banking.SettlementCommand(transfer_id, "FAILED", "TEST-down")
        )
    finally:
        await down.close()
    still_spent = await budget_of(http, mesh, alice)

    given_back = await banking.give_owed_budgets_back(wallet_db, peers)
    nothing_left = await banking.give_owed_budgets_back(wallet_db, peers)

    assert failed.status == "FAILED"
    assert (await usd(http, mesh, alice))["available"] == "100.00"
    assert still_spent == ("40.00", "0.00")
    assert given_back >= 1 and nothing_left == 0
    assert await wallet_db.fetchval(
        "SELECT budget_given_back_at IS NOT NULL FROM bank_transfers WHERE transfer_id = $1",
        uuid.UUID(transfer_id),
    )
    assert await budget_of(http, mesh, alice) == ("0.00", "0.00")


async def test_a_blocked_user_cannot_withdraw_and_nothing_is_held(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    mallory = await create_person(wallet_stub, http, mesh, "30.00")
    account = await link_account(http, mesh, mallory)
    await block_user(mesh, mallory)

    declined = await bank_transfer(http, mesh, mallory, "withdraw", account, "30.00", "out")
    again = await bank_transfer(http, mesh, mallory, "withdraw", account, "30.00", "out")

    assert (declined.status_code, reason_of(declined)) == (422, "TRANSACTION_DECLINED")
    assert again.json() == declined.json()
    assert await usd(http, mesh, mallory) == {
        "available": "30.00",
        "pending": "0.00",
        "posted": "30.00",
    }


async def test_a_withdrawal_sent_to_review_goes_ahead_only_with_the_pin(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    wallet_db: asyncpg.Pool,
    peers: Peers,
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "15000.00")
    await set_pin(http, mesh, alice, "2468")
    account = await link_account(http, mesh, alice)
    # The mesh sends payments of 10,000 or more to review.

    no_pin = await bank_transfer(http, mesh, alice, "withdraw", account, "10000", "big")
    wrong_pin = await bank_transfer(
        http, mesh, alice, "withdraw", account, "10000", "big-2", pin="1357"
    )
    untouched = await usd(http, mesh, alice)
    with_pin = await bank_transfer(
        http, mesh, alice, "withdraw", account, "10000", "big-3", pin="2468"
    )

    assert (no_pin.status_code, reason_of(no_pin)) == (422, "PIN_REQUIRED")
    assert (wrong_pin.status_code, reason_of(wrong_pin)) == (403, "PIN_INCORRECT")
    # A wrong PIN is final for its key, at the wallet too (not only in the
    # gateway's stored answers): the right one needs a new key.
    with pytest.raises(PermissionDenied) as replayed:
        await banking.withdraw(
            wallet_db, peers,
            banking.BankTransferCommand(alice.user_id, 1_000_000, "USD", account, "big-2",
                                        pin="2468"),
        )  # fmt: skip
    assert replayed.value.reason == "PIN_INCORRECT"
    assert untouched["available"] == "15000.00"
    assert with_pin.status_code == 202, with_pin.text
    assert with_pin.json()["status"] == "PENDING"
    assert (await usd(http, mesh, alice))["available"] == "5000.00"
    case = await fraud_case(mesh, with_pin.json()["transfer_id"])
    assert (case.status, case.resolved_by) == (
        fraud_pb2.REVIEW_STATUS_APPROVED, f"payer-pin:{alice.user_id}",
    )  # fmt: skip
    await verified(http, mesh)


# -- the bank partner


async def test_the_relay_tells_the_bank_about_each_request_until_it_accepts(
    test_run: TestRun, mesh: Mesh, peers: Peers
) -> None:
    # A database of its own: no other relay reads this outbox.
    pool = await service_pool(test_run, "wallet", database="wallet_bank_relay")
    key = bytes(range(32))
    user_id = str(uuid.uuid4())
    try:
        await handlers.create_user(
            pool,
            handlers.CreateUserCommand(
                user_id=user_id, email=f"r{user_id[:8]}@example.com", phone="", username="",
                full_name="Relay Person", company_id="", role=1, default_currency="USD",
            ),
        )  # fmt: skip
        await handlers.create_wallet(pool, peers, user_id, "USD", 0, Decimal("1000"))
        linked = await banking.link_bank_account(
            pool,
            key,
            banking.LinkBankAccountCommand(user_id, ACCOUNT_NUMBER, ROUTING_NUMBER, "R. Person"),
        )
        deposit = await banking.add_funds(
            pool,
            peers,
            banking.BankTransferCommand(user_id, 2500, "", str(linked.bank_account_id), "r-1"),
        )
        calls: list[httpx.Request] = []

        def partner(request: httpx.Request) -> httpx.Response:
            calls.append(request)
            return httpx.Response(503 if len(calls) == 1 else 202, json={})

        async with httpx.AsyncClient(transport=httpx.MockTransport(partner)) as client:

            async def deliver() -> int:
                return await banking.deliver_due_bank_requests(
                    pool, client, "http://bank.test", key
                )

            assert await deliver() == 1  # refused by the bank
            assert await deliver() == 0  # not due again at once
            await pool.execute("UPDATE bank_requests SET next_attempt_at = now()")
            assert await deliver() == 1  # accepted
            assert await deliver() == 0  # and never sent again
    finally:
        rows = await pool.fetch("SELECT attempts, accepted_at, last_error FROM bank_requests")
        await pool.close()

    assert len(calls) == 2
    assert calls[1].url.path == "/v1/collections"
    sent = json.loads(calls[1].content)
    assert calls[1].headers["Idempotency-Key"] == sent["request_id"]
    assert sent == {
        "request_id": sent["request_id"],
        "transfer_id": str(deposit.transfer_id),
        "type": "COLLECTION",
        "amount": "25.00",
        "amount_minor": 2500,
        "currency": "USD",
        "account_number": ACCOUNT_NUMBER,
        "routing_number": ROUTING_NUMBER,
        "holder_name": "R. Person",
    }
    assert [(r["attempts"], r["accepted_at"] is not None, r["last_error"]) for r in rows] == [
        (2, True, None)
    ]


@dataclass
class Simulator:
    url: str
    log: Path


@pytest.fixture
def bank_simulator(mesh: Mesh, tmp_path: Path) -> Iterator[Simulator]:
    """deploy/local/bank_simulator.py as a process, reporting to the mesh's
    gateway at once and never failing."""
    port = free_port()
    log = tmp_path / "bank_simulator.log"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "deploy" / "local" / "bank_simulator.py")],
        cwd=ROOT,
        env={
            **os.environ,
            "MONETA_BANK_SIMULATOR_PORT": str(port),
            "MONETA_BANK_SIMULATOR_DELAY_SECONDS": "0.1",
            "MONETA_BANK_SIMULATOR_FAILURE_RATE": "0",
            "MONETA_GATEWAY_URL": mesh.gateway_url,
            "MONETA_BANK_WEBHOOK_SECRET": WEBHOOK_SECRET,
        },
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )
    simulator = Simulator(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{simulator.url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the bank simulator did not start"
            time.sleep(0.05)
        yield simulator
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_the_bank_simulator_settles_a_collection_with_a_signed_webhook(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    bank_simulator: Simulator,
) -> None:
    dave = await create_person(wallet_stub, http, mesh, "0")
    deposit = await add_funds(http, mesh, dave, await link_account(http, mesh, dave), "40", "sim")

    accepted = await http.post(
        f"{bank_simulator.url}/v1/collections",
        json={
            "request_id": str(uuid.uuid4()),
            "transfer_id": deposit,
            "type": "COLLECTION",
            "amount": "40.00",
            "currency": "USD",
        },
    )

    assert accepted.status_code == 202, accepted.text
    deadline = time.monotonic() + 15
    while (await usd(http, mesh, dave))["available"] != "40.00":
        assert time.monotonic() < deadline, bank_simulator.log.read_text()
        await asyncio.sleep(0.05)
    await verified(http, mesh)
