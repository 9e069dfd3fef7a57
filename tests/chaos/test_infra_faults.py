"""Faults of the servers under the mesh, on private servers started for
these tests (tests/chaos/infra.py), under the mixed load: RabbitMQ
restarted, PostgreSQL restarted, Redis stopped and frozen. Slow: only with
MONETA_CHAOS=1 (make chaos)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aio_pika
import asyncpg
import httpx
import orjson
import pytest

from tests.chaos.infra import PrivateInfra
from tests.chaos.invariants import account_of, settle_and_check
from tests.chaos.load import MixedLoad, Population
from tests.chaos.mesh import (
    FORGET_STORED_IN_PROGRESS,
    REVIEW_AMOUNT,
    Mesh,
    ReadinessWatch,
    forget_stored_in_progress_answers,
    wait_for_leases_to_lapse,
)

pytestmark = [pytest.mark.chaos(slow=True), pytest.mark.timeout(600)]


# ---------------------------------------------------------------- RabbitMQ


PROBE_QUEUE = "chaos.outgoing"


@pytest.fixture
async def outgoing(private_mesh: Mesh) -> AsyncIterator[datetime]:
    """A durable queue that takes every event published to the mesh's
    exchange from now on, whatever the broker goes through; yields when."""
    connection = await aio_pika.connect(private_mesh.amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            private_mesh.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(
            PROBE_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(exchange, routing_key="#")
    finally:
        await connection.close()
    yield datetime.now(UTC)
    connection = await aio_pika.connect(private_mesh.amqp_url)
    try:
        await (await connection.channel()).queue_delete(PROBE_QUEUE)
    finally:
        await connection.close()


async def probed_event_ids(mesh: Mesh, quiet_seconds: float = 2.0) -> set[str]:
    """Every event id in the probe queue, read until it stays empty a while."""
    ids: set[str] = set()
    connection = await aio_pika.connect(mesh.amqp_url)
    try:
        queue = await (await connection.channel()).declare_queue(PROBE_QUEUE, passive=True)
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < quiet_seconds:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.1)
                continue
            quiet_since = time.monotonic()
            ids.add(str(orjson.loads(message.body)["event_id"]))
    finally:
        await connection.close()
    return ids


async def outbox_events(
    mesh: Mesh, since: datetime, seconds: float = 60.0
) -> dict[str, dict[str, str]]:
    """Each outbox's events written since ``since`` (id → when written and
    published), once every event in it is published."""
    found: dict[str, dict[str, str]] = {}
    deadline = time.monotonic() + seconds
    for service in ("wallet", "budget"):
        conn = await asyncpg.connect(mesh.database_url(service))
        try:
            while await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"):
                assert time.monotonic() < deadline, f"the {service} outbox is not draining"
                await asyncio.sleep(0.5)
            found[service] = {
                str(r["event_id"]): f"{r['event_type']} written {r['created_at']:%T.%f}"
                f" published {r['published_at']:%T.%f}"
                for r in await conn.fetch(
                    "SELECT event_id, event_type, created_at, published_at FROM outbox"
                    " WHERE created_at > $1",
                    since,
                )
            }
        finally:
            await conn.close()
    return found


async def test_a_rabbitmq_restart_loses_no_event_and_applies_none_twice(
    private_infra: PrivateInfra,
    private_mesh: Mesh,
    outgoing: datetime,
    private_population: Population,
) -> None:
    broker = private_infra.rabbitmq
    assert broker is not None
    watch = ReadinessWatch(private_mesh)
    watch.start()
    async with MixedLoad(private_mesh, private_population) as load:
        load.start()
        await asyncio.sleep(3.0)
        stopped = datetime.now(UTC)
        await asyncio.to_thread(broker.stop)
        await asyncio.sleep(2.0)  # publishers and consumers meet a dead broker
        await asyncio.to_thread(broker.start)
        started = datetime.now(UTC)
        await asyncio.sleep(5.0)

        report = await settle_and_check(load, quiet_seconds=120.0)
    await watch.stop()

    # Counted at the other end: every event the services' outboxes hold
    # reached the exchange (at least once; a relay that died between the
    # broker's confirm and its own mark sends one again).
    published = await outbox_events(private_mesh, since=outgoing)
    received = await probed_event_ids(private_mesh)
    for service, events in published.items():
        lost = sorted(events[e] for e in set(events) - received)
        assert not lost, (
            f"{len(lost)} {service} events never arrived (broker stopped {stopped:%T.%f},"
            f" started {started:%T.%f}):\n" + "\n".join(lost[:10])
        )
    assert watch.went_unready("consumers")
    assert watch.ready_again_at("consumers") is not None
    events = report.figures["events"]
    assert events["booking"]["published"] > 0 and events["cancel"]["published"] > 0


# ---------------------------------------------------------------- PostgreSQL


async def test_a_postgres_restart_is_survived_without_restarting_a_service(
    private_infra: PrivateInfra, private_mesh: Mesh, private_population: Population
) -> None:
    database = private_infra.postgres
    assert database is not None
    pids = private_mesh.pids()
    watch = ReadinessWatch(private_mesh)
    watch.start()
    async with MixedLoad(private_mesh, private_population) as load:
        load.start()
        await asyncio.sleep(3.0)
        await asyncio.to_thread(database.stop)
        stopped_at = time.monotonic()
        await asyncio.sleep(4.0)
        await asyncio.to_thread(database.start)
        started_at = time.monotonic()
        await asyncio.sleep(8.0)
        await load.drain(seconds=5.0)
        # Attempts cut off by the restart could not give their payment's
        # lease back: retries wait for it (30 s).
        await wait_for_leases_to_lapse(private_mesh)
        if FORGET_STORED_IN_PROGRESS:
            await forget_stored_in_progress_answers(private_mesh)

        await settle_and_check(load, quiet_seconds=120.0)
    await watch.stop()

    assert private_mesh.pids() == pids, "a service had to be restarted"
    for name in ("ledger", "wallet", "budget", "fraud", "consumers", "gateway"):
        assert watch.went_unready(name), f"{name} never said it was not ready"
        again = watch.ready_again_at(name)
        assert again is not None and again > stopped_at, f"{name} did not become ready again"
        assert again - started_at < 15.0, f"{name} took {again - started_at:.1f}s to recover"
    # The load went on after the restart: money moved again.
    moved_after = [
        a for op in load.journal.of("p2p") for a in op.attempts
        if a.started > started_at and a.status == 200
    ]  # fmt: skip
    assert moved_after


async def test_while_postgres_is_down_requests_are_answered_unavailable(
    private_infra: PrivateInfra, private_mesh: Mesh, private_population: Population
) -> None:
    database = private_infra.postgres
    assert database is not None
    person = private_population.senders[0]
    async with httpx.AsyncClient(base_url=private_mesh.gateway_url, timeout=10.0) as http:
        await asyncio.to_thread(database.stop)
        try:
            answers = [
                await http.get(f"/api/v1/wallets/{person.user_id}", headers=private_mesh.admin())
                for _ in range(5)
            ]
        finally:
            await asyncio.to_thread(database.start)
    assert {a.status_code for a in answers} == {503}, [a.text for a in answers]


# ---------------------------------------------------------------- Redis


async def burst(mesh: Mesh, user_id: str, requests: int) -> list[int]:
    """``requests`` reads by one user at once: their statuses."""
    headers = mesh.auth(user_id)
    async with httpx.AsyncClient(base_url=mesh.gateway_url, timeout=10.0) as http:
        answers = await asyncio.gather(
            *(http.get(f"/api/v1/wallets/{user_id}", headers=headers) for _ in range(requests))
        )
    return [a.status_code for a in answers]


async def test_without_redis_money_still_moves_right_and_scoring_and_limits_degrade(
    private_infra: PrivateInfra, private_mesh: Mesh, private_population: Population
) -> None:
    cache = private_infra.redis
    assert cache is not None
    p = private_population
    # Under the review amount, at or over the amount reviewed without Redis.
    amount = (REVIEW_AMOUNT - 20) * 100
    async with MixedLoad(private_mesh, private_population) as load:
        assert load.client is not None
        load.start()
        await asyncio.sleep(2.0)
        # With Redis: one user's burst beyond their limit is refused in part,
        # and the payment is scored in full. The bucket refills while the
        # gateway answers (50 a second): on a busy machine one burst of 160
        # can be answered slowly enough to find a token each time, so the
        # burst goes on until refused, up to 960 requests.
        limited: list[int] = []
        while 429 not in limited and len(limited) < 960:
            limited += await burst(private_mesh, p.receivers[0].user_id, 160)
        scored = await load.client.p2p(p.reviewer, p.receivers[1], amount, kind="p2p")
        await asyncio.to_thread(cache.stop)
        try:
            await asyncio.sleep(2.0)
            # Rate limits fail open; fraud, without its velocity store,
            # sends what it cannot judge to review; balances come from the
            # ledger (the load's own checks see every answer).
            unlimited = await burst(private_mesh, p.receivers[2].user_id, 160)
            degraded = await load.client.p2p(p.reviewer, p.receivers[1], amount, kind="review")
            await asyncio.sleep(3.0)
        finally:
            await asyncio.to_thread(cache.start)
        await asyncio.sleep(4.0)

        await settle_and_check(load, quiet_seconds=120.0)

    assert 429 in limited, sorted(set(limited))
    assert set(unlimited) == {200}, sorted(set(unlimited))
    assert scored.answer is not None and scored.answer.body["status"] == "COMPLETED", scored.trail()
    assert degraded.answer is not None, degraded.trail()
    assert degraded.answer.body["status"] == "PENDING_REVIEW", degraded.answer.body


async def test_a_balance_read_after_a_partition_from_redis_heals_is_current(
    private_infra: PrivateInfra, private_mesh: Mesh, private_population: Population
) -> None:
    partition = private_infra.redis_proxy
    assert partition is not None
    sender, recipient = private_population.senders[0], private_population.receivers[0]
    async with MixedLoad(private_mesh, private_population) as load:
        assert load.client is not None
        before = await load.client.balance(sender)  # cached now
        partition.go_dark()
        try:
            paid = await load.client.p2p(sender, recipient, 1_00)
        finally:
            partition.restore()
        after = await load.client.balance(sender)

    assert paid.succeeded, paid.trail()
    conn = await asyncpg.connect(private_mesh.database_url("ledger"))
    try:
        in_ledger = await conn.fetchval(
            "SELECT credits_posted - debits_posted FROM accounts WHERE id = $1",
            account_of(sender.user_id),
        )
    finally:
        await conn.close()
    assert in_ledger == before["posted"] - 1_00
    assert after["posted"] == in_ledger, (before, after, in_ledger)
