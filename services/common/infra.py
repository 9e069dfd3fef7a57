"""Redis and RabbitMQ connections, with their readiness checks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aio_pika
import redis.asyncio as aioredis
from aio_pika.abc import AbstractRobustConnection


def redis_client(url: str) -> aioredis.Redis:
    """A pooled asyncio client. Short timeouts: Redis holds caches and
    counters, and a slow Redis must degrade a request, not stall it."""
    return aioredis.from_url(
        url,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        health_check_interval=10,
        retry_on_timeout=False,
    )


def redis_check(client: aioredis.Redis) -> Callable[[], Awaitable[object]]:
    async def check() -> None:
        await client.ping()

    return check


async def amqp_connect(url: str) -> AbstractRobustConnection:
    """A robust connection: it reconnects and restores its channels, queues
    and consumers by itself after a broker restart."""
    return await aio_pika.connect_robust(url, client_properties={"connection_name": "moneta"})


def amqp_check(connection: AbstractRobustConnection) -> Callable[[], Awaitable[object]]:
    async def check() -> None:
        if connection.is_closed:
            raise ConnectionError("AMQP connection is closed")

    return check
