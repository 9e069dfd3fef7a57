"""The pipelined Redis connection (services.common.resp) against the real
Redis: concurrent calls each get their own reply, scripts are loaded when
Redis does not know them, errors are redis-py's, and a lost, silent or
unreachable Redis fails the calls waiting on it without wedging the next."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.exceptions
import uvloop

from services.common.infra import redis_client
from services.common.resp import RespConnection, Script
from tests.conftest import TestRun
from tests.processes import free_port
from tests.tcp_proxy import TcpProxy


@pytest.fixture
async def connection(test_run: TestRun) -> AsyncIterator[RespConnection]:
    client = redis_client(test_run.settings.redis_url)
    connection = RespConnection.like(client)
    yield connection
    await connection.close()
    await client.aclose()


@pytest.fixture
def key(test_run: TestRun) -> str:
    return f"{test_run.redis_prefix}resp:{secrets.token_hex(4)}"


async def test_a_command_is_answered_with_its_reply(connection: RespConnection, key: str) -> None:
    assert await connection.call("SET", key, "v", "EX", 10) == b"OK"
    assert await connection.call("GET", key) == b"v"


async def test_concurrent_calls_are_each_answered_with_their_own_reply_in_order(
    connection: RespConnection, key: str
) -> None:
    replies = await asyncio.gather(*(connection.call("INCR", key) for _ in range(200)))
    await connection.call("DEL", key)

    assert replies == list(range(1, 201))


async def test_it_runs_on_uvloop_as_the_services_do(test_run: TestRun, key: str) -> None:
    async def scenario() -> list[Any]:
        connection = RespConnection.like(redis_client(test_run.settings.redis_url))
        try:
            return list(await asyncio.gather(*(connection.call("INCR", key) for _ in range(3))))
        finally:
            await connection.call("DEL", key)
            await connection.close()

    assert await asyncio.to_thread(uvloop.run, scenario()) == [1, 2, 3]


async def test_a_script_redis_does_not_know_is_loaded_and_run(
    connection: RespConnection, key: str
) -> None:
    # A source of its own, so that no earlier run has loaded it.
    script = Script(f"-- {secrets.token_hex(8)}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])")

    first = await connection.run(script, [key], [5])
    again = await connection.run(script, [key], [2])
    await connection.call("DEL", key)

    assert (first, again) == (5, 7)


async def test_an_error_reply_raises_and_the_connection_goes_on(
    connection: RespConnection, key: str
) -> None:
    await connection.call("SET", key, "not a number", "EX", 10)

    with pytest.raises(redis.exceptions.ResponseError):
        await connection.call("INCR", key)

    assert await connection.call("GET", key) == b"not a number"


async def test_the_client_database_is_the_connections(test_run: TestRun, key: str) -> None:
    url = test_run.settings.redis_url.rsplit("/", 1)[0] + "/3"
    client, db0 = redis_client(url), redis_client(test_run.settings.redis_url)
    connection = RespConnection.like(client)
    try:
        await connection.call("SET", key, "in db 3", "EX", 10)

        assert await client.get(key) == b"in db 3"
        assert await db0.get(key) is None
    finally:
        await client.delete(key)
        await connection.close()
        await client.aclose()
        await db0.aclose()


async def test_credentials_redis_refuses_fail_the_call(test_run: TestRun) -> None:
    parts = urlsplit(test_run.settings.redis_url)
    connection = RespConnection(
        parts.hostname or "127.0.0.1", parts.port or 6379, password="not-the-password"
    )

    with pytest.raises(redis.exceptions.AuthenticationError):
        await connection.call("PING")


async def test_a_lost_connection_fails_the_waiting_calls_and_the_next_call_connects_again(
    test_run: TestRun, key: str
) -> None:
    parts = urlsplit(test_run.settings.redis_url)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379).start()
    connection = RespConnection("127.0.0.1", proxy.port, timeout=5.0)
    try:
        await connection.call("PING")
        waiting = asyncio.ensure_future(connection.call("BLPOP", key, 5))  # held by Redis
        await asyncio.sleep(0.05)
        proxy.cut()

        with pytest.raises(redis.exceptions.ConnectionError):
            await waiting
        assert await connection.call("PING") == b"PONG"
    finally:
        await connection.close()
        await proxy.stop()


async def test_a_silent_redis_times_out_and_the_next_call_connects_again() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connection = RespConnection("127.0.0.1", port, timeout=0.2)
    try:
        started = time.monotonic()
        with pytest.raises(redis.exceptions.TimeoutError):
            await connection.call("PING")
        assert time.monotonic() - started < 1.0

        with pytest.raises(redis.exceptions.TimeoutError):
            await connection.call("PING")
        assert len(accepted) == 2  # the timed-out connection was given up
    finally:
        await connection.close()
        for writer in accepted:
            writer.close()
        server.close()


async def test_an_unreachable_redis_fails_at_once() -> None:
    connection = RespConnection("127.0.0.1", free_port())
    started = time.monotonic()

    with pytest.raises(redis.exceptions.ConnectionError):
        await connection.call("PING")

    assert time.monotonic() - started < 1.0
