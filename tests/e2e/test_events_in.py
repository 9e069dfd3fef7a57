"""The wallet's event consumers as a real process (`python -m services.wallet
consume`) against the mesh, fed through the run's RabbitMQ exchange. Its
connections to RabbitMQ and PostgreSQL go through proxies the tests can
break."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import grpc
import httpx
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from moneta.budget.v1 import budget_pb2, budget_pb2_grpc
from moneta.common.v1.money_pb2 import Money
from moneta.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from moneta.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.common.consumer import ATTEMPT_HEADER, REASON_HEADER, queue_names
from services.common.db import create_pool
from services.wallet.config import CONSUMERS
from tests.conftest import ROOT, TestRun
from tests.e2e.conftest import Mesh, free_port
from tests.processes import die_with_parent
from tests.tcp_proxy import TcpProxy

RETRY_DELAYS = (0.3, 0.6, 1.2, 2.4)


@dataclass
class Consumers:
    """The consumers' process, the proxies in front of its connections, and
    a way to feed it."""

    process: subprocess.Popen[bytes]
    metrics_url: str
    amqp: TcpProxy
    postgres: TcpProxy
    exchange: aio_pika.abc.AbstractExchange
    channel: aio_pika.abc.AbstractChannel
    wallet_db: asyncpg.Pool
    queue_prefix: str

    async def publish(self, routing_key: str, *bodies: bytes) -> None:
        for start in range(0, len(bodies), 200):
            await asyncio.gather(
                *(
                    self.exchange.publish(
                        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=routing_key,
                    )
                    for body in bodies[start : start + 200]
                )
            )

    async def settled(self, consumer: str, outcome: str) -> int:
        async with httpx.AsyncClient() as client:
            text = (await client.get(self.metrics_url)).text
        for family in text_string_to_metric_families(text):
            if family.name == "moneta_consumer_messages":
                return int(
                    sum(
                        s.value
                        for s in family.samples
                        if s.name.endswith("_total")
                        and s.labels == {"consumer": consumer, "outcome": outcome}
                    )
                )
        return 0


def event(event_type: str, data: dict[str, Any], event_id: str | None = None) -> bytes:
    return orjson.dumps(
        {
            "event_id": event_id or str(uuid.uuid4()),
            "event_type": event_type,
            "timestamp": "2024-01-15T10:30:00Z",
            "data": data,
        }
    )


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)


def _wait_serving(address: str, proc: subprocess.Popen[bytes], log: Any, seconds: float) -> None:
    import time

    deadline = time.monotonic() + seconds
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"consumers exited:\n{log.read_text()[-3000:]}")
            try:
                answer = stub.Check(
                    health_pb2.HealthCheckRequest(service="moneta.events"), timeout=1
                )
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"the consumers were not ready in {seconds}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
async def consumers(
    mesh: Mesh, test_run: TestRun, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Consumers]:
    amqp_url = test_run.settings.amqp_url
    db_url = test_run.settings.postgres_url
    amqp_parts, db_parts = urlsplit(amqp_url), urlsplit(db_url)
    amqp = await TcpProxy(amqp_parts.hostname or "127.0.0.1", amqp_parts.port or 5672).start()
    postgres = await TcpProxy(db_parts.hostname or "127.0.0.1", db_parts.port or 5432).start()
    health_port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        **test_run.env(),
        "MONETA_AMQP_URL": amqp.url(amqp_url),
        "MONETA_POSTGRES_URL": postgres.url(db_url),
        "MONETA_GRPC_HOST": "127.0.0.1",
        "MONETA_LOG_FORMAT": "json",
        "MONETA_READINESS_INTERVAL_SECONDS": "0.5",
        "MONETA_SHUTDOWN_GRACE_SECONDS": "5",
        "MONETA_EVENTS_PORT": str(health_port),
        "MONETA_EVENTS_METRICS_PORT": str(metrics_port),
        "MONETA_CONSUMER_RETRY_DELAYS": ",".join(str(d) for d in RETRY_DELAYS),
        "MONETA_CONSUMER_RECONNECT_SECONDS": "0.3",
        **{f"MONETA_{n.upper()}_ADDR": a for n, a in mesh.grpc_addrs.items()},
    }
    log = tmp_path_factory.mktemp("consumers") / "consumers.log"
    process = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything runs
        [sys.executable, "-m", "services.wallet", "consume"],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )
    connection = await aio_pika.connect_robust(amqp_url)
    wallet_db = await create_pool(test_run.database_url("wallet"), 1, 4)
    try:
        await asyncio.to_thread(_wait_serving, f"127.0.0.1:{health_port}", process, log, 60)
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            test_run.amqp_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        yield Consumers(
            process, f"http://127.0.0.1:{metrics_port}/metrics", amqp, postgres, exchange,
            channel, wallet_db, f"{test_run.amqp_exchange}.wallet",
        )  # fmt: skip
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 15) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        cleanup = await connection.channel()
        for name in CONSUMERS:
            for queue in queue_names(f"{test_run.amqp_exchange}.wallet", name, RETRY_DELAYS).all:
                await cleanup.queue_delete(queue)
        await connection.close()
        await wallet_db.close()
        await amqp.stop()
        await postgres.stop()


@pytest.fixture(scope="module")
async def stubs(mesh: Mesh) -> AsyncIterator[dict[str, Any]]:
    channels = {n: grpc.aio.insecure_channel(a) for n, a in mesh.grpc_addrs.items()}
    yield {
        "wallet": wallet_pb2_grpc.WalletServiceStub(channels["wallet"]),
        "budget": budget_pb2_grpc.BudgetServiceStub(channels["budget"]),
        "ledger": ledger_pb2_grpc.LedgerServiceStub(channels["ledger"]),
    }
    for channel in channels.values():
        await channel.close()


def user_created(user_id: str, **fields: Any) -> dict[str, Any]:
    handle = f"u{user_id[:8]}"
    return {"user_id": user_id, "email": f"{handle}@example.com", "username": handle,
            "full_name": f"Person {handle}", "role": "user", **fields}  # fmt: skip


async def onboarded_wallet(
    consumers: Consumers, stubs: dict[str, Any], funds: str, currency: str = "USD"
) -> wallet_pb2.Wallet:
    """A user made by a UserCreated event, their wallet funded by an
    adjustment."""
    user_id = str(uuid.uuid4())
    await consumers.publish(
        "user.created", event("UserCreated", user_created(user_id, default_currency=currency))
    )
    wallet = await wallet_of(stubs, user_id)
    await stubs["wallet"].PostTransaction(
        wallet_pb2.PostTransactionRequest(
            wallet_id=wallet.wallet_id,
            amount=Money(amount=int(Decimal(funds) * 100), currency=currency),
            direction=wallet_pb2.DIRECTION_CREDIT, description="test funds",
            idempotency_key=f"fund-{user_id}",
        )
    )  # fmt: skip
    return await wallet_of(stubs, user_id)


async def wallet_of(stubs: dict[str, Any], user_id: str) -> wallet_pb2.Wallet:
    found: list[wallet_pb2.Wallet] = []

    async def exists() -> bool:
        try:
            answer = await stubs["wallet"].GetWallet(wallet_pb2.GetWalletRequest(user_id=user_id))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return False
        found.append(answer.wallet)
        return True

    await eventually(exists)
    return found[-1]


async def count(pool: asyncpg.Pool, sql: str, *args: Any) -> int:
    async with pool.acquire() as conn:
        return int(await conn.fetchval(sql, *args))


async def test_a_user_created_twice_gets_one_wallet_and_the_default_budgets_once(
    consumers: Consumers, stubs: dict[str, Any]
) -> None:
    company_id, user_id = str(uuid.uuid4()), str(uuid.uuid4())
    policy = budget_pb2.CompanyPolicy(
        company_id=company_id,
        budgets=[
            budget_pb2.PolicyBudget(category="HOTEL", currency="EUR", total_amount=1000_00,
                                    period_type=budget_pb2.PERIOD_TYPE_MONTHLY),
            budget_pb2.PolicyBudget(category="FLIGHT", currency="EUR", total_amount=5000_00,
                                    period_type=budget_pb2.PERIOD_TYPE_QUARTERLY),
        ],
    )  # fmt: skip
    await stubs["budget"].SetCompanyPolicy(budget_pb2.SetCompanyPolicyRequest(policy=policy))
    data = user_created(user_id, company_id=company_id, default_currency="EUR")
    first_id, second_id = uuid.uuid4(), uuid.uuid4()
    first = event("UserCreated", data, str(first_id))
    duplicates_before = await consumers.settled("user_created", "duplicate")

    # The same event twice, then the same user in an event of its own.
    await consumers.publish(
        "user.created", first, first, event("UserCreated", data, str(second_id))
    )
    wallet = await wallet_of(stubs, user_id)

    async def all_three_settled() -> bool:
        # Both events applied (the second one finding the user onboarded),
        # the repeat of the first one seen as a duplicate.
        inbox = await count(
            consumers.wallet_db,
            "SELECT count(*) FROM inbox WHERE consumer = 'user_created' AND event_id = ANY($1)",
            [first_id, second_id],
        )
        return inbox == 2 and await consumers.settled("user_created", "duplicate") > (
            duplicates_before
        )

    await eventually(all_three_settled)
    budgets = (
        await stubs["budget"].ListBudgets(budget_pb2.ListBudgetsRequest(user_id=user_id))
    ).budgets
    assert sorted((b.category, b.currency, b.total_amount) for b in budgets) == [
        ("FLIGHT", "EUR", 5000_00),
        ("HOTEL", "EUR", 1000_00),
    ]
    assert {b.wallet_id for b in budgets} == {wallet.wallet_id}
    assert (wallet.currency, wallet.balance) == ("EUR", 0)
    announced = await count(
        consumers.wallet_db,
        "SELECT count(*) FROM outbox WHERE event_type = 'WalletCreated' AND aggregate_id = $1",
        wallet.wallet_id,
    )
    assert announced == 1


async def test_a_burst_of_bookings_through_broken_broker_connections_charges_each_once(
    consumers: Consumers, stubs: dict[str, Any]
) -> None:
    wallets = [await onboarded_wallet(consumers, stubs, "2000.00") for _ in range(4)]
    bookings = [
        {"booking_id": f"burst-{uuid.uuid4()}", "user_id": wallets[i % 4].user_id,
         "amount": f"{1 + i % 20}.{(i * 7) % 100:02d}", "currency": "USD",
         "category": ("FLIGHT", "HOTEL", "CAR", "RAIL", "OTHER")[i % 5],
         "description": f"booking {i}"}
        for i in range(1000)
    ]  # fmt: skip
    ids = [b["booking_id"] for b in bookings]

    async def decided() -> int:
        return await count(
            consumers.wallet_db,
            "SELECT count(*) FROM bookings WHERE booking_id = ANY($1) AND status <> 'PROCESSING'",
            ids,
        )

    await consumers.publish("booking.created", *(event("BookingCreated", b) for b in bookings))

    async def connected() -> bool:
        return consumers.amqp.connections > 0

    for mark in (250, 600):
        await eventually(lambda m=mark: _at_least(decided(), m), seconds=120)  # type: ignore[misc]
        await eventually(connected)  # again, after the first break
        assert consumers.amqp.cut() >= 1
    await eventually(lambda: _at_least(decided(), 1000), seconds=120)

    async with consumers.wallet_db.acquire() as conn:
        rows = await conn.fetch(
            "SELECT b.user_id, b.amount, b.status, b.failure_reason,"
            "       (SELECT count(*) FROM transactions t"
            "         WHERE t.type = 'BOOKING' AND t.reference_id = b.booking_id) AS debits,"
            "       (SELECT count(*) FROM outbox o WHERE o.event_type = 'BookingPaymentFailed'"
            "         AND o.aggregate_id = b.booking_id) AS refusals"
            "  FROM bookings b WHERE b.booking_id = ANY($1)",
            ids,
        )
    assert len(rows) == 1000
    charged = [r for r in rows if r["status"] == "CHARGED"]
    failed = [r for r in rows if r["status"] == "FAILED"]
    assert charged and failed  # 2,000.00 each does not cover ~2,600.00 of bookings
    assert all(r["debits"] == 1 and r["refusals"] == 0 for r in charged)
    assert all(r["debits"] == 0 and r["refusals"] == 1 for r in failed)
    assert {r["failure_reason"] for r in failed} == {"INSUFFICIENT_FUNDS"}
    for wallet in wallets:
        after = await wallet_of(stubs, wallet.user_id)
        spent = sum(r["amount"] for r in charged if str(r["user_id"]) == wallet.user_id)
        assert wallet.balance - after.balance == spent
    verify = await stubs["ledger"].VerifyLedger(ledger_pb2.VerifyLedgerRequest())
    assert verify.ok, verify.discrepancies


async def _at_least(value: Awaitable[int], wanted: int) -> bool:
    return await value >= wanted


async def test_a_cancellation_before_its_booking_is_refunded_once_the_booking_arrives(
    consumers: Consumers, stubs: dict[str, Any]
) -> None:
    wallet = await onboarded_wallet(consumers, stubs, "500.00")
    booking_id = f"early-{uuid.uuid4()}"
    retried_before = await consumers.settled("booking_cancelled", "retried")

    await consumers.publish(
        "booking.cancelled",
        event("BookingCancelled", {"booking_id": booking_id, "user_id": wallet.user_id,
                                   "refund_amount": None, "reason": "trip cancelled"}),
    )  # fmt: skip
    await eventually(
        lambda: _at_least(consumers.settled("booking_cancelled", "retried"), retried_before + 1)
    )
    await consumers.publish(
        "booking.created",
        event("BookingCreated", {"booking_id": booking_id, "user_id": wallet.user_id,
                                 "amount": "120.00", "currency": "USD", "category": "RAIL",
                                 "description": "Lisbon to Porto"}),
    )  # fmt: skip

    async def refunded() -> bool:
        return (
            await count(
                consumers.wallet_db,
                "SELECT count(*) FROM bookings WHERE booking_id = $1 AND refunded = amount",
                booking_id,
            )
            == 1
        )

    await eventually(refunded)
    assert (await wallet_of(stubs, wallet.user_id)).balance == 500_00
    announced = await count(
        consumers.wallet_db,
        "SELECT count(*) FROM outbox WHERE event_type = 'BookingRefunded' AND aggregate_id = $1",
        booking_id,
    )
    assert announced == 1


async def test_a_poison_booking_is_parked_with_its_reason_and_moves_nothing(
    consumers: Consumers,
) -> None:
    booking_id = f"poison-{uuid.uuid4()}"
    await consumers.publish(
        "booking.created",
        event("BookingCreated", {"booking_id": booking_id, "user_id": str(uuid.uuid4()),
                                 "amount": "10.00", "currency": "XYZ", "category": "CAR"}),
    )  # fmt: skip
    parked = await consumers.channel.get_queue(
        queue_names(consumers.queue_prefix, "booking_created", RETRY_DELAYS).parked
    )
    found: list[Any] = []

    async def arrived() -> bool:
        message = await parked.get(fail=False, no_ack=True)
        if message is not None and orjson.loads(message.body)["data"]["booking_id"] == booking_id:
            found.append(message)
        return bool(found)

    await eventually(arrived, seconds=10)
    assert (found[0].headers[REASON_HEADER], found[0].headers[ATTEMPT_HEADER]) == (
        "UNKNOWN_CURRENCY",
        0,
    )
    assert (
        await count(
            consumers.wallet_db, "SELECT count(*) FROM bookings WHERE booking_id = $1", booking_id
        )
        == 0
    )


async def test_a_database_outage_during_consumption_is_survived_by_retry(
    consumers: Consumers, stubs: dict[str, Any]
) -> None:
    wallet = await onboarded_wallet(consumers, stubs, "100.00")
    bookings = [
        {"booking_id": f"outage-{uuid.uuid4()}", "user_id": wallet.user_id, "amount": "5.00",
         "currency": "USD", "category": "OTHER"}
        for _ in range(10)
    ]  # fmt: skip
    retried_before = await consumers.settled("booking_created", "retried")

    consumers.postgres.go_dark()
    try:
        await consumers.publish("booking.created", *(event("BookingCreated", b) for b in bookings))
        await eventually(
            lambda: _at_least(consumers.settled("booking_created", "retried"), retried_before + 10)
        )
    finally:
        consumers.postgres.restore()

    async def all_charged() -> bool:
        return (
            await count(
                consumers.wallet_db,
                "SELECT count(*) FROM bookings WHERE booking_id = ANY($1) AND status = 'CHARGED'",
                [b["booking_id"] for b in bookings],
            )
            == 10
        )

    await eventually(all_charged)
    assert (await wallet_of(stubs, wallet.user_id)).balance == 50_00


async def test_a_wallet_status_change_is_announced_on_its_routing_key(
    consumers: Consumers, stubs: dict[str, Any]
) -> None:
    wallet = await onboarded_wallet(consumers, stubs, "1.00")
    queue = await consumers.channel.declare_queue(exclusive=True)
    await queue.bind(consumers.exchange, routing_key="wallet.status_changed")

    await stubs["wallet"].UpdateWalletStatus(
        wallet_pb2.UpdateWalletStatusRequest(
            wallet_id=wallet.wallet_id, status=wallet_pb2.WALLET_STATUS_FROZEN, reason="audit"
        ),
        metadata=(("x-actor-id", "admin-7"),),
    )
    found: list[dict[str, Any]] = []

    async def announced() -> bool:
        message = await queue.get(fail=False, no_ack=True)
        if message is not None:
            body = orjson.loads(message.body)
            if body["data"]["wallet_id"] == wallet.wallet_id:
                found.append(body)
        return bool(found)

    await eventually(announced, seconds=10)
    assert found[0]["event_type"] == "WalletStatusChanged"
    assert found[0]["data"] == {
        "wallet_id": wallet.wallet_id, "user_id": wallet.user_id, "old_status": "ACTIVE",
        "new_status": "FROZEN", "reason": "audit", "actor_id": "admin-7",
    }  # fmt: skip


async def test_a_booking_before_its_user_waits_for_the_wallet(
    consumers: Consumers, stubs: dict[str, Any]
) -> None:
    user_id, booking_id = str(uuid.uuid4()), f"first-{uuid.uuid4()}"
    retried_before = await consumers.settled("booking_created", "retried")

    await consumers.publish(
        "booking.created",
        event("BookingCreated", {"booking_id": booking_id, "user_id": user_id,
                                 "amount": "30.00", "currency": "USD", "category": "CAR"}),
    )  # fmt: skip
    await eventually(
        lambda: _at_least(consumers.settled("booking_created", "retried"), retried_before + 1)
    )
    await consumers.publish("user.created", event("UserCreated", user_created(user_id)))

    async def decided() -> bool:
        return (
            await count(
                consumers.wallet_db,
                "SELECT count(*) FROM bookings WHERE booking_id = $1 AND status = 'FAILED'"
                " AND failure_reason = 'INSUFFICIENT_FUNDS'",
                booking_id,
            )
            == 1
        )

    # The new wallet is empty: the booking is refused for want of funds, not
    # for want of a wallet.
    await eventually(decided)
