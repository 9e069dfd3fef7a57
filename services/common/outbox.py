"""The transactional outbox: events written in the same database
transaction as the change that causes them, published afterwards.

A service adds an event with ``add_event`` inside its transaction. Its relay
(``relay_outbox``) publishes unpublished events in order, as persistent
messages with publisher confirms, and marks each published once the broker
has confirmed it. Delivery is at least once: a relay that dies between the
confirm and the mark publishes that event again, with the same ``event_id``,
so consumers de-duplicate by it. One relay at a time per database (an
advisory lock), so events leave in the order they were written.

Each service's migrations create the table:

    CREATE TABLE outbox (
        id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        event_id     uuid        NOT NULL UNIQUE,
        event_type   text        NOT NULL,
        routing_key  text        NOT NULL,
        aggregate_id text        NOT NULL,
        envelope     jsonb       NOT NULL,
        created_at   timestamptz NOT NULL DEFAULT now(),
        published_at timestamptz
    );
    CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
import orjson
import pamqp.commands
import structlog
from prometheus_client import Counter

from services.common.db import DbConn

log = structlog.get_logger("moneta.outbox")

PUBLISHED = Counter("moneta_outbox_published_total", "Events published, by type.", ["event_type"])
_RELAY_LOCK_KEY = 0x4F5554424F58  # "OUTBOX"


def envelope(event_id: uuid.UUID, event_type: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """The wire form every Moneta event shares."""
    return {
        "event_id": str(event_id),
        "event_type": event_type,
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "data": dict(data),
    }


@dataclass(frozen=True)
class OutboxEvent:
    event_id: uuid.UUID
    event_type: str
    routing_key: str
    aggregate_id: str
    data: Mapping[str, Any]


async def add_event(
    conn: DbConn,
    *,
    event_id: uuid.UUID,
    event_type: str,
    routing_key: str,
    aggregate_id: str,
    data: Mapping[str, Any],
) -> None:
    """Adds an event to the outbox, in the caller's transaction. Adding the
    same ``event_id`` again (a retried change) adds nothing."""
    await add_events(conn, [OutboxEvent(event_id, event_type, routing_key, aggregate_id, data)])


async def add_events(conn: DbConn, events: Sequence[OutboxEvent]) -> None:
    """Adds events in order, in one statement, in the caller's transaction
    (as ``add_event``)."""
    if not events:
        return
    await conn.execute(
        """
        INSERT INTO outbox (event_id, event_type, routing_key, aggregate_id, envelope)
        SELECT i, t, r, a, e::jsonb
          FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[])
               WITH ORDINALITY AS u(i, t, r, a, e, n)
         ORDER BY n
        ON CONFLICT (event_id) DO NOTHING
        """,
        [e.event_id for e in events],
        [e.event_type for e in events],
        [e.routing_key for e in events],
        [e.aggregate_id for e in events],
        [orjson.dumps(envelope(e.event_id, e.event_type, e.data)).decode() for e in events],
    )


async def publish_pending(
    pool: asyncpg.Pool, channel: aio_pika.abc.AbstractChannel, exchange: str, limit: int = 200
) -> int:
    """Publishes the oldest unpublished events, in order, if this relay holds
    the database's relay lock; returns how many it published.

    The batch's messages are written one after another and their broker
    confirms awaited together: one round trip to the broker per batch, not
    per event. If any is not confirmed, none is marked published and the
    whole batch goes again (at least once: consumers de-duplicate by
    ``event_id``)."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _RELAY_LOCK_KEY):
            return 0
        rows = await conn.fetch(
            """
            SELECT id, event_id, event_type, routing_key, envelope::text AS body FROM outbox
             WHERE published_at IS NULL ORDER BY id LIMIT $1
            """,
            limit,
        )
        if not rows:
            return 0
        underlay = await channel.get_underlay_channel()
        # Tasks start in the order they were made, and the channel writes
        # each message under a FIFO lock: the broker gets them in order.
        confirms = [
            asyncio.ensure_future(
                underlay.basic_publish(
                    row["body"].encode(),
                    exchange=exchange,
                    routing_key=row["routing_key"],
                    # Unroutable (no queue bound) is no failure for an event.
                    mandatory=False,
                    properties=aio_pika.Message(
                        b"",
                        message_id=str(row["event_id"]),
                        type=row["event_type"],
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ).properties,
                )
            )
            for row in rows
        ]
        answers = await asyncio.gather(*confirms, return_exceptions=True)
        for row, answer in zip(rows, answers, strict=True):
            if isinstance(answer, BaseException):
                raise answer
            if not isinstance(answer, pamqp.commands.Basic.Ack):
                raise RuntimeError(f"the broker refused event {row['event_id']}: {answer!r}")
        for row in rows:
            PUBLISHED.labels(row["event_type"]).inc()
        await conn.execute(
            "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])",
            [row["id"] for row in rows],
        )
    return len(rows)


async def relay_outbox(
    pool: asyncpg.Pool, amqp_url: str, exchange_name: str, idle_seconds: float = 0.2
) -> None:
    """Publishes the outbox until cancelled, reconnecting to the broker as
    needed."""
    while True:
        try:
            connection = await aio_pika.connect_robust(
                amqp_url, client_properties={"connection_name": "moneta-outbox"}
            )
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                await channel.declare_exchange(
                    exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
                )
                while True:
                    if await publish_pending(pool, channel, exchange_name) == 0:
                        await asyncio.sleep(idle_seconds)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # broker or database away: wait and start again
            log.warning("outbox_relay_interrupted", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(1.0)
