"""The runtime's RabbitMQ and Redis clients against the real servers."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest

from services.common.infra import amqp_check, amqp_connect, redis_check, redis_client
from tests.conftest import TestRun


async def test_robust_amqp_connection_publishes_with_confirms_and_delivers(
    test_run: TestRun,
) -> None:
    connection = await amqp_connect(test_run.settings.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            f"{test_run.amqp_exchange}.probe", aio_pika.ExchangeType.TOPIC, auto_delete=True
        )
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, routing_key="probe.#")

        await exchange.publish(
            aio_pika.Message(b'{"hello": 1}', delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key="probe.sent",
        )
        message = await queue.get(timeout=5, fail=True)

        assert message is not None and message.body == b'{"hello": 1}'
        await message.ack()
        await amqp_check(connection)()
    finally:
        await connection.close()

    with pytest.raises(ConnectionError):
        await amqp_check(connection)()


async def test_redis_client_answers_and_its_check_fails_fast_when_redis_is_unreachable(
    test_run: TestRun,
) -> None:
    client = redis_client(test_run.settings.redis_url)
    key = f"{test_run.redis_prefix}probe"
    try:
        await client.set(key, "1", ex=10)
        assert await client.get(key) == b"1"
        await redis_check(client)()
    finally:
        await client.delete(key)
        await client.aclose()

    unreachable = redis_client("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(Exception):  # noqa: B017 - any connection error will do
            await asyncio.wait_for(redis_check(unreachable)(), 2.0)
    finally:
        await unreachable.aclose()
