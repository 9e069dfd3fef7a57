"""The outbox relay against the real RabbitMQ: events leave in the order they
were written, each marked published only once the broker confirmed it."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import aio_pika
import asyncpg
import pytest

from services.common import outbox
from tests import conftest


@pytest.fixture
async def pool(test_run: conftest.TestRun) -> AsyncIterator[asyncpg.Pool]:
    # Any service's database has the outbox table; one of the run's own.
    pool = await conftest.service_pool(test_run, "budget", database="outbox_relay")
    yield pool
    await pool.close()


@pytest.fixture
async def channel(test_run: conftest.TestRun) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect_robust(test_run.settings.amqp_url)
    async with connection:
        yield await connection.channel(publisher_confirms=True)


async def unpublished(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
    return count


async def test_events_are_published_in_order_once_each_and_marked(
    pool: asyncpg.Pool, channel: aio_pika.abc.AbstractChannel, test_run: conftest.TestRun
) -> None:
    name = f"{test_run.amqp_exchange}.outbox"
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, auto_delete=True)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, routing_key="#")
    events = [
        outbox.OutboxEvent(uuid.uuid4(), "Thing", f"thing.{i % 3}", str(i), {"n": i})
        for i in range(450)
    ]
    async with pool.acquire() as conn:
        await outbox.add_events(conn, events)

    sent = [await outbox.publish_pending(pool, channel, name) for _ in range(4)]

    assert sent == [200, 200, 50, 0]
    assert await unpublished(pool) == 0
    received = []
    for _ in range(450):
        message = await queue.get(timeout=5, no_ack=True)
        assert message is not None
        received.append((message.message_id, message.type, json.loads(message.body)))
    assert [r[0] for r in received] == [str(e.event_id) for e in events]
    assert {r[1] for r in received} == {"Thing"}
    assert [r[2]["data"]["n"] for r in received] == list(range(450))
    assert await queue.get(fail=False) is None


async def test_a_batch_the_broker_refuses_stays_unpublished(
    pool: asyncpg.Pool, channel: aio_pika.abc.AbstractChannel
) -> None:
    async with pool.acquire() as conn:
        await outbox.add_events(
            conn, [outbox.OutboxEvent(uuid.uuid4(), "Thing", "thing", "1", {}) for _ in range(3)]
        )
    before = await unpublished(pool)

    with pytest.raises(aio_pika.exceptions.AMQPError):
        await outbox.publish_pending(pool, channel, f"moneta.no-such-exchange.{uuid.uuid4()}")

    assert before >= 3
    assert await unpublished(pool) == before
