"""The wallet's booking charges and refunds (which the events consumers
drive), against the real mesh: its ledger, budget and fraud, its database."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import httpx
import pytest

from moneta.budget.v1 import budget_pb2, budget_pb2_grpc
from moneta.wallet.v1 import wallet_pb2_grpc
from services.common.db import create_pool
from services.common.errors import FailedPrecondition, NotFound
from services.common.infra import redis_client
from services.wallet import bookings
from services.wallet.balance_cache import BalanceCache
from services.wallet.peers import Peers
from tests.conftest import TestRun
from tests.e2e.conftest import Mesh, Person, create_person


@pytest.fixture
async def wallet_db(test_run: TestRun, mesh: Mesh) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(test_run.database_url("wallet"), 1, 4)
    yield pool
    await pool.close()


@pytest.fixture
async def peers(mesh: Mesh, test_run: TestRun) -> AsyncIterator[Peers]:
    """Peers as the wallet process has them: the same balance cache."""
    redis = redis_client(test_run.settings.redis_url)
    peers = mesh.peers(BalanceCache(redis, test_run.redis_prefix))
    yield peers
    await peers.close()
    await redis.aclose()


async def balance(http: httpx.AsyncClient, mesh: Mesh, person: Person) -> str:
    body = (await http.get(f"/api/v1/wallets/{person.user_id}", headers=mesh.admin())).json()
    return str(body["balance"])


def charge(person: Person, amount: int, booking_id: str | None = None) -> bookings.BookingCharge:
    return bookings.BookingCharge(
        booking_id=booking_id or f"bk-{uuid.uuid4()}", user_id=person.user_id, amount=amount,
        currency="USD", category="HOTEL", description="Hotel Lisboa, 2 nights",
    )  # fmt: skip


async def test_a_booking_is_charged_once_however_often_it_arrives(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    wallet_db: asyncpg.Pool, peers: Peers,
) -> None:  # fmt: skip
    alice = await create_person(wallet_stub, http, mesh, "500.00")
    booking = charge(alice, 420_50)

    first = await bookings.charge_booking(wallet_db, peers, booking)
    again = await bookings.charge_booking(wallet_db, peers, booking)

    assert (first.status, again.status) == ("CHARGED", "CHARGED")
    assert await balance(http, mesh, alice) == "79.50"
    history = (
        await http.get(f"/api/v1/wallet/{alice.user_id}/transactions", headers=mesh.admin())
    ).json()["transactions"]
    assert [(t["type"], t["amount"]) for t in history][:1] == [("BOOKING", "-420.50")]


async def test_a_booking_the_wallet_cannot_pay_fails_moves_nothing_and_is_announced(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    wallet_db: asyncpg.Pool, peers: Peers,
) -> None:  # fmt: skip
    alice = await create_person(wallet_stub, http, mesh, "10.00")
    booking = charge(alice, 20_00)

    outcome = await bookings.charge_booking(wallet_db, peers, booking)

    assert (outcome.status, outcome.reason) == ("FAILED", "INSUFFICIENT_FUNDS")
    assert await balance(http, mesh, alice) == "10.00"
    async with wallet_db.acquire() as conn:
        announced = await conn.fetchval(
            "SELECT count(*) FROM outbox WHERE event_type = 'BookingPaymentFailed'"
            " AND aggregate_id = $1",
            booking.booking_id,
        )
    assert announced == 1


async def test_a_booking_over_a_hard_budget_is_refused(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    wallet_db: asyncpg.Pool, peers: Peers,
) -> None:  # fmt: skip
    alice = await create_person(wallet_stub, http, mesh, "1000.00")
    now = datetime.now(UTC)
    budget = budget_pb2.Budget(user_id=alice.user_id, category="HOTEL", currency="USD",
                               total_amount=300_00, period_type=budget_pb2.PERIOD_TYPE_MONTHLY)  # fmt: skip
    budget.start_date.FromDatetime(now - timedelta(days=1))
    budget.end_date.FromDatetime(now + timedelta(days=30))
    async with grpc.aio.insecure_channel(mesh.grpc_addrs["budget"]) as channel:
        await budget_pb2_grpc.BudgetServiceStub(channel).CreateBudget(
            budget_pb2.CreateBudgetRequest(budget=budget)
        )

    outcome = await bookings.charge_booking(wallet_db, peers, charge(alice, 400_00))

    assert (outcome.status, outcome.reason) == ("FAILED", "BUDGET_EXCEEDED")
    assert await balance(http, mesh, alice) == "1000.00"


async def test_cancellations_refund_in_parts_never_more_than_was_paid(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    wallet_db: asyncpg.Pool, peers: Peers,
) -> None:  # fmt: skip
    alice = await create_person(wallet_stub, http, mesh, "500.00")
    booking = charge(alice, 400_00)
    await bookings.charge_booking(wallet_db, peers, booking)

    part = await bookings.refund_booking(wallet_db, peers, booking.booking_id, "c-1", 100_00)
    same = await bookings.refund_booking(wallet_db, peers, booking.booking_id, "c-1", 100_00)
    with pytest.raises(FailedPrecondition) as too_much:
        await bookings.refund_booking(wallet_db, peers, booking.booking_id, "c-2", 300_01)
    rest = await bookings.refund_booking(wallet_db, peers, booking.booking_id, "c-3", None)
    with pytest.raises(FailedPrecondition) as nothing_left:
        await bookings.refund_booking(wallet_db, peers, booking.booking_id, "c-4", None)

    assert (part, same, rest) == (100_00, 100_00, 300_00)
    assert too_much.value.reason == "REFUND_EXCEEDS_PAID"
    assert nothing_left.value.reason == "ALREADY_REFUNDED"
    assert await balance(http, mesh, alice) == "500.00"
    verify = (await http.get("/api/v1/admin/ledger/verify", headers=mesh.admin())).json()
    assert verify["ok"]


async def test_a_cancellation_before_its_booking_is_not_found_so_it_can_be_retried(
    mesh: Mesh, wallet_db: asyncpg.Pool, peers: Peers
) -> None:
    with pytest.raises(NotFound) as raised:
        await bookings.refund_booking(wallet_db, peers, f"bk-{uuid.uuid4()}", "c-early", None)

    assert raised.value.reason == "BOOKING_NOT_FOUND"
