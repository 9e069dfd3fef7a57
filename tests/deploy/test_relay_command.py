"""The image's `relay` command (`python -m services.wallet relay`): a
service's outbox relay as a process of its own publishes what the outbox
holds, and stops cleanly on SIGTERM. Real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import aio_pika
import asyncpg
import orjson
import pytest

from services.common.outbox import add_event
from tests.conftest import TestRun, service_pool
from tests.processes import die_with_parent

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


async def test_the_relay_command_publishes_the_outbox_and_stops_on_sigterm(
    test_run: TestRun, tmp_path: Path
) -> None:
    prefix = f"{test_run.db_prefix}relay_"
    pool = await service_pool(test_run, "wallet", database="relay_wallet")
    connection = await aio_pika.connect(test_run.settings.amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            test_run.amqp_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, routing_key="relay.test.#")
        event_id = uuid.uuid4()
        async with pool.acquire() as conn:
            await add_event(
                conn,
                event_id=event_id,
                event_type="RelayTested",
                routing_key="relay.test.happened",
                aggregate_id="relay",
                data={"n": 1},
            )

        log = tmp_path / "relay.log"
        with log.open("wb") as output:
            relay = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "services.wallet",
                "relay",
                cwd=ROOT,
                env={**os.environ, **test_run.env(), "MONETA_DB_PREFIX": prefix},
                stdout=output,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        try:
            message = await _next_message(queue, seconds=20)
            assert message.message_id == str(event_id)
            assert orjson.loads(message.body)["data"] == {"n": 1}
            # Marked published once the broker confirmed (just after delivery).
            await _until_published(pool, event_id, seconds=10)
        finally:
            relay.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(relay.wait(), 15)
        assert code == 0, log.read_text()[-2000:]
    finally:
        await connection.close()
        await pool.close()


async def _next_message(
    queue: aio_pika.abc.AbstractQueue, seconds: float
) -> aio_pika.abc.AbstractIncomingMessage:
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        message = await queue.get(fail=False)
        if message is not None:
            await message.ack()
            return message
        await asyncio.sleep(0.05)
    raise AssertionError(f"nothing published in {seconds}s")


async def _until_published(pool: asyncpg.Pool, event_id: uuid.UUID, seconds: float) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    query = "SELECT published_at IS NOT NULL FROM outbox WHERE event_id = $1"
    while not await pool.fetchval(query, event_id):
        assert asyncio.get_running_loop().time() < deadline, "never marked published"
        await asyncio.sleep(0.05)


def test_a_service_without_an_outbox_has_no_relay_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.ledger", "relay"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "relay" not in result.stderr.split("[", 1)[1]
