"""The consumer runtime (services/common/consumer.py) on the real RabbitMQ
and PostgreSQL: a test consumer whose effect is a plain row insert, so that
anything applied twice shows as two rows. It checks envelopes with the
wallet's real BookingCreated model."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import orjson
import pytest
from prometheus_client import REGISTRY

from services.common.consumer import (
    ATTEMPT_HEADER,
    ERROR_HEADER,
    REASON_HEADER,
    Consumer,
    ConsumerRuntime,
    ConsumerSettings,
    Event,
    Inbox,
    redrive_parked,
)
from services.common.db import create_pool
from services.wallet.consumers import BookingCreated
from tests.conftest import TestRun, service_pool
from tests.tcp_proxy import TcpProxy

DELAYS = (0.2, 0.4, 0.8)


def envelope(data: dict[str, Any], event_id: str | None = None, **fields: Any) -> bytes:
    return orjson.dumps(
        {
            "event_id": event_id or str(uuid.uuid4()),
            "event_type": "BookingCreated",
            "timestamp": "2024-01-15T10:30:00Z",
            "data": data,
            **fields,
        }
    )


def booking(amount: str = "12.50", **overrides: Any) -> dict[str, Any]:
    return {
        "booking_id": f"bk-{uuid.uuid4()}",
        "user_id": str(uuid.uuid4()),
        "amount": amount,
        "currency": "USD",
        "category": "HOTEL",
        "description": "Hotel Lisboa",
        **overrides,
    }


@dataclass
class Harness:
    """A consumer under test: its runtime, its database, what it did."""

    name: str
    pool: asyncpg.Pool
    # The database itself, past any proxy: what the test reads from.
    database: str
    runtime: ConsumerRuntime
    channel: aio_pika.abc.AbstractChannel
    exchange: aio_pika.abc.AbstractExchange
    calls: dict[str, int] = field(default_factory=dict)
    # booking id → failures to raise before succeeding (-1: always)
    failures: dict[str, int] = field(default_factory=dict)
    handler_seconds: float = 0.0
    task: asyncio.Task[None] | None = None

    async def publish(self, *bodies: bytes) -> None:
        """Publishes, with confirms, many at a time."""
        for start in range(0, len(bodies), 200):
            await asyncio.gather(
                *(
                    self.exchange.publish(
                        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=self.name,
                    )
                    for body in bodies[start : start + 200]
                )
            )

    def settled(self, *outcomes: str) -> int:
        kinds = outcomes or ("applied", "duplicate", "retried", "parked")
        return int(
            sum(
                REGISTRY.get_sample_value(
                    "moneta_consumer_messages_total", {"consumer": self.name, "outcome": o}
                )
                or 0
                for o in kinds
            )
        )

    def counts(self) -> dict[str, int]:
        return {o: self.settled(o) for o in ("applied", "duplicate", "retried", "parked")}

    async def wait_for(self, condition: Callable[[], bool], seconds: float = 15.0) -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        while not condition():
            assert asyncio.get_running_loop().time() < deadline, (
                f"timed out: {self.counts()}, {len(self.runtime._tasks)} in flight"
            )
            await asyncio.sleep(0.05)

    async def effects(self) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.database)
        try:
            return list(
                await conn.fetch("SELECT booking_id, amount FROM effects WHERE consumer = $1",
                                 self.name)
            )  # fmt: skip
        finally:
            await conn.close()

    async def parked(self, expected: int, seconds: float = 10.0) -> list[aio_pika.IncomingMessage]:
        queue = await self.channel.get_queue(self.runtime.names(self.runtime.consumers[0]).parked)
        found: list[aio_pika.IncomingMessage] = []
        deadline = asyncio.get_running_loop().time() + seconds
        while len(found) < expected and asyncio.get_running_loop().time() < deadline:
            message = await queue.get(fail=False, no_ack=True)
            if message is None:
                await asyncio.sleep(0.05)
            else:
                found.append(message)  # type: ignore[arg-type]
        return found


@pytest.fixture(scope="module")
async def database(test_run: TestRun) -> AsyncIterator[str]:
    pool = await service_pool(test_run, "wallet", "consumer_it")
    async with pool.acquire() as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS effects (id bigint GENERATED ALWAYS AS IDENTITY,"
            " consumer text NOT NULL, booking_id text NOT NULL, amount bigint NOT NULL)"
        )
    await pool.close()
    yield test_run.database_url("consumer_it")


@pytest.fixture
async def harness_factory(test_run: TestRun, database: str) -> AsyncIterator[Callable[..., Any]]:
    made: list[Harness] = []
    connection = await aio_pika.connect_robust(test_run.settings.amqp_url)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.declare_exchange(
        test_run.amqp_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )

    async def make(
        amqp_url: str = test_run.settings.amqp_url, db_url: str = database, prefetch: int = 32
    ) -> Harness:
        name = f"it{uuid.uuid4().hex[:10]}"
        pool = await create_pool(db_url, 1, 10)
        harness: Harness

        async def apply(event: Event[Any], inbox: Inbox) -> None:
            data: BookingCreated = event.data
            harness.calls[data.booking_id] = harness.calls.get(data.booking_id, 0) + 1
            left = harness.failures.get(data.booking_id, 0)
            if left:
                harness.failures[data.booking_id] = left - 1
                raise RuntimeError(f"boom on {data.booking_id}")
            await asyncio.sleep(harness.handler_seconds)
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO effects (consumer, booking_id, amount) VALUES ($1, $2, $3)",
                    name, data.booking_id, data.charge().amount,
                )  # fmt: skip
                await inbox.record(conn)

        runtime = ConsumerRuntime(
            ConsumerSettings(
                amqp_url=amqp_url,
                exchange=test_run.amqp_exchange,
                queue_prefix=f"{test_run.amqp_exchange}.it",
                prefetch=prefetch,
                retry_delays=DELAYS,
                reconnect_interval_seconds=0.3,
                drain_seconds=5.0,
                connection_name=f"moneta-test-{name}",
            ),
            pool,
            [Consumer(name, name, "BookingCreated", BookingCreated, apply)],
        )
        harness = Harness(name, pool, database, runtime, channel, exchange)
        harness.task = asyncio.create_task(runtime.run())
        made.append(harness)
        await harness.wait_for(lambda: runtime._consuming)
        return harness

    yield make

    for harness in made:
        assert harness.task is not None
        harness.task.cancel()
        await asyncio.gather(harness.task, return_exceptions=True)
        await harness.pool.close()
        for queue in harness.runtime.names(harness.runtime.consumers[0]).all:
            await channel.queue_delete(queue)
    await connection.close()


async def test_an_event_delivered_twice_is_applied_once(harness_factory: Any) -> None:
    harness: Harness = await harness_factory()
    event_id = str(uuid.uuid4())
    body = envelope(booking(), event_id)

    await harness.publish(body)
    await harness.publish(body)
    await harness.wait_for(lambda: harness.settled() == 2)

    assert len(await harness.effects()) == 1
    assert (harness.settled("applied"), harness.settled("duplicate")) == (1, 1)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "INVALID_JSON"),
        (envelope({k: v for k, v in booking().items() if k != "amount"}), "MISSING_FIELD"),
        (envelope(booking(amount=12.5)), "WRONG_TYPE"),  # type: ignore[arg-type]
        (envelope(booking(user_id="someone")), "WRONG_TYPE"),
        (envelope(booking(currency="XYZ")), "UNKNOWN_CURRENCY"),
        (envelope(booking(amount="-5.00")), "NEGATIVE_AMOUNT"),
        (envelope(booking(amount="0.00")), "INVALID_AMOUNT"),
        (envelope(booking(amount="1.001")), "AMOUNT_PRECISION"),
        (envelope(booking(category="SPACESHIP")), "INVALID_VALUE"),
        (envelope(booking(), event_type="BookingExploded"), "UNKNOWN_EVENT_TYPE"),
        (envelope(booking(), event_id="not-a-uuid"), "WRONG_TYPE"),
        (orjson.dumps({"event_id": str(uuid.uuid4()), "event_type": "BookingCreated"}),
         "MISSING_FIELD"),
    ],
)  # fmt: skip
async def test_a_poison_message_is_parked_at_once_with_its_reason(
    harness_factory: Any, body: bytes, reason: str
) -> None:
    harness: Harness = await harness_factory()

    await harness.publish(body)
    parked = await harness.parked(1)

    assert len(parked) == 1
    headers = parked[0].headers
    assert (headers[REASON_HEADER], headers[ATTEMPT_HEADER]) == (reason, 0)
    assert headers[ERROR_HEADER]
    assert parked[0].body == body
    assert harness.calls == {}
    assert harness.settled("retried") == 0


async def test_a_failing_event_is_retried_with_growing_delays_then_parked_with_its_error(
    harness_factory: Any,
) -> None:
    harness: Harness = await harness_factory()
    data = booking()
    harness.failures[data["booking_id"]] = -1
    started = asyncio.get_running_loop().time()

    await harness.publish(envelope(data))
    parked = await harness.parked(1, seconds=15)

    assert len(parked) == 1
    headers = parked[0].headers
    assert headers[REASON_HEADER] == "RETRIES_EXHAUSTED"
    assert f"boom on {data['booking_id']}" in str(headers[ERROR_HEADER])
    assert headers[ATTEMPT_HEADER] == len(DELAYS)
    assert harness.calls[data["booking_id"]] == len(DELAYS) + 1
    assert asyncio.get_running_loop().time() - started >= sum(DELAYS)
    assert await harness.effects() == []


async def test_a_parked_event_redriven_after_its_cause_is_fixed_is_applied(
    harness_factory: Any, test_run: TestRun
) -> None:
    harness: Harness = await harness_factory()
    data = booking()
    harness.failures[data["booking_id"]] = -1
    await harness.publish(envelope(data))
    await harness.wait_for(lambda: harness.settled("parked") == 1)

    harness.failures.clear()  # the cause, fixed
    names = harness.runtime.names(harness.runtime.consumers[0])
    moved = await redrive_parked(test_run.settings.amqp_url, [names])
    await harness.wait_for(lambda: harness.settled("applied") == 1)

    assert moved == {names.work: 1}
    assert [r["booking_id"] for r in await harness.effects()] == [data["booking_id"]]
    assert harness.calls[data["booking_id"]] == len(DELAYS) + 2


async def test_a_passing_failure_is_applied_by_a_retry(harness_factory: Any) -> None:
    harness: Harness = await harness_factory()
    data = booking()
    harness.failures[data["booking_id"]] = 2

    await harness.publish(envelope(data))
    await harness.wait_for(lambda: harness.settled("applied") == 1)

    assert [r["booking_id"] for r in await harness.effects()] == [data["booking_id"]]
    assert (harness.settled("retried"), harness.settled("parked")) == (2, 0)


async def test_a_database_outage_during_consumption_is_survived_by_retry(
    harness_factory: Any, test_run: TestRun, database: str
) -> None:
    parts = urlsplit(database)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    try:
        harness: Harness = await harness_factory(db_url=proxy.url(database))
        proxy.go_dark()
        bookings = [booking(amount=f"{i}.00") for i in range(1, 21)]
        await harness.publish(*(envelope(data) for data in bookings))
        await harness.wait_for(lambda: harness.settled("retried") >= 20)
        proxy.restore()
        await harness.wait_for(lambda: harness.settled("applied") == 20)
    finally:
        await proxy.stop()

    assert sorted(r["amount"] for r in await harness.effects()) == [i * 100 for i in range(1, 21)]
    assert harness.settled("parked") == 0


async def burst_survives(harness: Harness, break_connection: Callable[[], Any]) -> None:
    """Publishes 1,000 events, breaks the consumer's connection twice while
    they are being applied, and checks each was applied exactly once."""
    harness.handler_seconds = 0.002
    bookings = [booking(amount=f"{1 + i % 50}.{i % 100:02d}") for i in range(1000)]
    await harness.publish(*(envelope(data) for data in bookings))
    for mark in (250, 600):
        await harness.wait_for(lambda m=mark: harness.settled() >= m, seconds=60)  # type: ignore[misc]
        await break_connection()
    # An event applied whose acknowledgement the break lost comes again and
    # is settled as a duplicate: the database is the judge.
    deadline = asyncio.get_running_loop().time() + 60
    while len(await harness.effects()) < 1000:
        assert asyncio.get_running_loop().time() < deadline, harness.counts()
        await asyncio.sleep(0.2)
    await harness.wait_for(lambda: not harness.runtime._tasks)
    await asyncio.sleep(0.5)  # anything redelivered late would show now

    effects = await harness.effects()
    assert len(effects) == 1000
    assert {r["booking_id"] for r in effects} == {b["booking_id"] for b in bookings}
    expected = sum(BookingCreated.model_validate(b).charge().amount for b in bookings)
    assert sum(r["amount"] for r in effects) == expected
    assert harness.settled("parked") == 0


async def test_a_burst_survives_broken_broker_connections_losing_and_doubling_nothing(
    harness_factory: Any, test_run: TestRun
) -> None:
    parts = urlsplit(test_run.settings.amqp_url)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    try:
        harness: Harness = await harness_factory(amqp_url=proxy.url(test_run.settings.amqp_url))

        async def cut() -> None:
            await harness.wait_for(lambda: proxy.connections > 0)  # reconnected
            assert proxy.cut() >= 1

        await burst_survives(harness, cut)
    finally:
        await proxy.stop()
    assert proxy.cuts >= 2


async def test_stopping_lets_the_event_in_flight_finish_and_acknowledges_it(
    harness_factory: Any,
) -> None:
    harness: Harness = await harness_factory()
    harness.handler_seconds = 1.0
    data = booking()

    await harness.publish(envelope(data))
    await harness.wait_for(lambda: data["booking_id"] in harness.calls)
    assert harness.task is not None
    harness.task.cancel()
    await asyncio.gather(harness.task, return_exceptions=True)

    assert [r["booking_id"] for r in await harness.effects()] == [data["booking_id"]]
    queue = await harness.channel.declare_queue(
        harness.runtime.names(harness.runtime.consumers[0]).work, passive=True
    )
    assert queue.declaration_result.message_count == 0
    assert harness.settled("applied") == 1


@pytest.mark.skipif(
    os.environ.get("MONETA_CHAOS") != "1",
    reason="starts and restarts a RabbitMQ node of its own: `make chaos-consumer`",
)
async def test_a_burst_survives_a_real_broker_restart(harness_factory: Any) -> None:
    # A private node (the machine's own broker is shared: never restarted).
    infra = pytest.importorskip("tests.chaos.infra")
    broker = infra.PrivateRabbitMQ.create()
    await asyncio.to_thread(broker.start)
    publisher = await aio_pika.connect_robust(broker.url, reconnect_interval=0.3)
    try:
        harness: Harness = await harness_factory(amqp_url=broker.url)
        harness.channel = await publisher.channel(publisher_confirms=True)
        harness.exchange = await harness.channel.declare_exchange(
            harness.runtime.settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )

        async def restart_broker() -> None:
            await asyncio.to_thread(broker.stop)
            await asyncio.to_thread(broker.start)

        await burst_survives(harness, restart_broker)
    finally:
        await publisher.close()
        await asyncio.to_thread(broker.close)


async def test_the_inbox_forgets_only_events_older_than_its_retention(database: str) -> None:
    from datetime import timedelta

    from services.common.consumer import prune_inbox
    from services.common.db import create_pool

    pool = await create_pool(database, 1, 2)
    consumer = f"prune-{uuid.uuid4().hex[:8]}"
    try:
        async with pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO inbox (consumer, event_id, event_type, applied_at)"
                " SELECT $1, gen_random_uuid(), 'BookingCreated', now() - make_interval(days => d)"
                " FROM unnest($2::int[]) AS d",
                consumer,
                [45, 40, 31, 29, 1, 0],
            )
        removed = await prune_inbox(pool, timedelta(days=30), batch=2)
        left = await pool.fetchval("SELECT count(*) FROM inbox WHERE consumer = $1", consumer)
    finally:
        await pool.close()

    assert removed == 3  # the other tests here record only recent events
    assert left == 3
