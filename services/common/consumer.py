"""Event consumers over RabbitMQ: the topology, retries with growing delays,
a parking queue, and the inbox that makes a redelivery harmless.

Topology, per consumer (queues named after ``queue_prefix`` and the
consumer's name):

    exchange (topic, durable) ──routing key──▶ <prefix>.<name>   quorum, the work queue
    <prefix>.<name>.retry.<ms>ms   quorum, message TTL <ms>, dead-letters back to the work queue
    <prefix>.<name>.parked         quorum, where messages end and wait for a person

A message is acknowledged only after its effect has committed. A failure
sends a copy to the next retry queue (the attempt counted in the
``x-moneta-attempt`` header) and then acknowledges the original; after the
last retry, or at once for a message that can never succeed (not JSON, a
missing or mistyped field, an unknown event type, a refusal that is final),
the copy goes to the parking queue with ``x-moneta-reason`` (a code) and
``x-moneta-error`` (the detail). A message that kills its consumer again and
again is parked by the broker itself (the work queue's delivery limit).

Delivery is at least once, so each consumer records the ``event_id``s it has
applied in an inbox table, in the transaction of the effect where the effect
ends in one (``Inbox.record``), and in any case once the handler returns.
A redelivered event already in the inbox is acknowledged and ignored. The
effects themselves are idempotent by business key, so a crash between two
steps converges when the event comes again.

The service's migrations create the inbox:

    CREATE TABLE inbox (
        consumer   text        NOT NULL,
        event_id   uuid        NOT NULL,
        event_type text        NOT NULL,
        applied_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (consumer, event_id)
    );
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

import aio_pika
import aio_pika.abc
import asyncpg
import structlog
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from services.common.db import DbConn
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, MonetaError
from services.common.logging import request_id_var

log = structlog.get_logger("moneta.consumer")

ATTEMPT_HEADER = "x-moneta-attempt"
REASON_HEADER = "x-moneta-reason"
ERROR_HEADER = "x-moneta-error"
CONSUMER_HEADER = "x-moneta-consumer"

MESSAGES = Counter(
    "moneta_consumer_messages_total",
    "Messages consumed, by consumer and outcome (applied, duplicate, retried, parked).",
    ["consumer", "outcome"],
)
HANDLING_SECONDS = Histogram(
    "moneta_consumer_handling_seconds", "Time to apply an event, by consumer.", ["consumer"]
)

# Refusals that no retry can change: the event asks for something invalid,
# taken or refused for good.
_FINAL_ERRORS = (InvalidArgument, AlreadyExists, FailedPrecondition)
_MAX_ERROR_TEXT = 1000
_BROKER_CALL_SECONDS = 3.0


class AlreadyApplied(Exception):
    """The event is in the inbox already: another delivery of it applied it
    first. Raised inside the effect's transaction, it rolls the effect back."""


class Rejected(Exception):
    """A message that can never be applied: parked at once with ``reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------- messages


class EventData(BaseModel):
    """Base of an event's ``data`` model: unknown fields are ignored (a
    producer may add some), known ones are checked."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    event_id: uuid.UUID
    event_type: str
    timestamp: datetime
    data: dict[str, Any]


D = TypeVar("D", bound=EventData)


@dataclass(frozen=True)
class Event(Generic[D]):
    event_id: uuid.UUID
    event_type: str
    timestamp: datetime
    data: D
    # 0 on the first delivery, then the number of retries so far.
    attempt: int
    # No retry is left after this attempt: what waits for something else to
    # happen first (a booking, a wallet) must decide now.
    final_attempt: bool


def invalid(reason: str, message: str) -> PydanticCustomError:
    """A validation error of an event's field whose reason code is
    ``reason`` (UPPER_SNAKE): raise it from a validator."""
    return PydanticCustomError("moneta_reason", message, {"reason": reason})


def _reason(error: Mapping[str, Any]) -> str:
    kind = str(error["type"])
    if kind == "moneta_reason":
        return str(error["ctx"]["reason"])
    if kind == "missing":
        return "MISSING_FIELD"
    if kind in ("json_invalid", "json_type"):
        return "INVALID_JSON"
    if kind.endswith(("_type", "_parsing")):
        return "WRONG_TYPE"
    return "INVALID_VALUE"


def _rejection(exc: ValidationError, prefix: str = "") -> Rejected:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"])
    detail = f"{prefix}{where}: {first['msg']}" if where else f"{prefix}{first['msg']}"
    return Rejected(_reason(first), detail)


def parse_event(
    body: bytes, event_type: str, model: type[D], attempt: int, final_attempt: bool
) -> Event[D]:
    """The event in ``body``, checked, or Rejected with the reason."""
    try:
        envelope = _Envelope.model_validate_json(body)
    except ValidationError as exc:
        raise _rejection(exc) from None
    if envelope.event_type != event_type:
        raise Rejected(
            "UNKNOWN_EVENT_TYPE",
            f"event_type {envelope.event_type[:64]!r} is not {event_type!r}",
        )
    try:
        data = model.model_validate(envelope.data)
    except ValidationError as exc:
        raise _rejection(exc, "data.") from None
    return Event(
        event_id=envelope.event_id,
        event_type=envelope.event_type,
        timestamp=envelope.timestamp,
        data=data,
        attempt=attempt,
        final_attempt=final_attempt,
    )


# ---------------------------------------------------------------- inbox


class Inbox:
    """An event's place in the consumer's inbox, handed to its handler."""

    def __init__(self, consumer: str, event_id: uuid.UUID, event_type: str) -> None:
        self.consumer = consumer
        self.event_id = event_id
        self.event_type = event_type

    async def record(self, conn: DbConn) -> None:
        """Records the event as applied, in the caller's transaction (the one
        that completes its effect). AlreadyApplied when another delivery of
        the event recorded it first (a concurrent one waits for that one's
        transaction): the caller's transaction must then roll back."""
        if not await self.add(conn):
            raise AlreadyApplied(str(self.event_id))

    async def add(self, conn: DbConn) -> bool:
        """Records the event as applied; False when it was already."""
        inserted = await conn.fetchval(
            "INSERT INTO inbox (consumer, event_id, event_type) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING RETURNING true",
            self.consumer,
            self.event_id,
            self.event_type,
        )
        return inserted is not None

    async def applied(self, conn: DbConn) -> bool:
        found = await conn.fetchval(
            "SELECT 1 FROM inbox WHERE consumer = $1 AND event_id = $2",
            self.consumer,
            self.event_id,
        )
        return found is not None


async def prune_inbox(pool: asyncpg.Pool, older_than: timedelta, batch: int = 5000) -> int:
    """Forgets events applied longer ago than ``older_than``, a batch per
    statement; returns how many. Only an inbox's recent past needs keeping:
    brokers redeliver within minutes, publishers retry within hours, and an
    older repeat still finds the effects' own business keys (a booking's
    transfer id, a user's onboarding)."""
    removed = 0
    while True:
        async with pool.acquire() as conn:
            status = await conn.execute(
                "DELETE FROM inbox WHERE ctid IN"
                " (SELECT ctid FROM inbox WHERE applied_at < now() - $1::interval LIMIT $2)",
                older_than,
                batch,
            )
        deleted = int(status.split()[-1])
        removed += deleted
        if deleted < batch:
            return removed


async def prune_inbox_forever(
    pool: asyncpg.Pool, retention_days: int, every_seconds: float = 3600.0
) -> None:
    while True:
        try:
            removed = await prune_inbox(pool, timedelta(days=retention_days))
            if removed:
                log.info("inbox_pruned", removed=removed, retention_days=retention_days)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("inbox_prune_failed", error=str(exc))
        await asyncio.sleep(every_seconds)


Handler = Callable[[Event[Any], Inbox], Awaitable[None]]


@dataclass(frozen=True)
class Consumer:
    """One kind of event, its queue and what applying it means."""

    name: str
    routing_key: str
    event_type: str
    data_model: type[EventData]
    handle: Handler


@dataclass(frozen=True)
class ConsumerSettings:
    amqp_url: str
    exchange: str
    # Queues are named <queue_prefix>.<consumer name>[.retry.<ms>ms|.parked].
    queue_prefix: str
    prefetch: int = 32
    # Seconds before each retry; their number is the number of retries.
    retry_delays: Sequence[float] = (1.0, 10.0, 60.0)
    handler_timeout_seconds: float = 30.0
    # Deliveries of one message (crashes included) before the broker parks it.
    delivery_limit: int = 20
    reconnect_interval_seconds: float = 2.0
    drain_seconds: float = 10.0
    connection_name: str = "moneta-consumers"


@dataclass(frozen=True)
class QueueNames:
    work: str
    retries: tuple[str, ...]
    parked: str

    @property
    def all(self) -> tuple[str, ...]:
        return (self.work, *dict.fromkeys(self.retries), self.parked)


def queue_names(prefix: str, consumer: str, retry_delays: Sequence[float]) -> QueueNames:
    """Retry queues are named by their delay, so that changing the delays
    declares new queues instead of clashing with the old ones' TTL."""
    work = f"{prefix}.{consumer}"
    return QueueNames(
        work=work,
        retries=tuple(f"{work}.retry.{round(d * 1000)}ms" for d in retry_delays),
        parked=f"{work}.parked",
    )


# Quorum queues dead-letter at least once only with reject-publish overflow.
_QUORUM = {"x-queue-type": "quorum"}
_SAFE_DEAD_LETTERS = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


# ---------------------------------------------------------------- runtime


@dataclass
class _Bound:
    consumer: Consumer
    names: QueueNames
    queue: aio_pika.abc.AbstractQueue
    tag: str


@dataclass
class ConsumerRuntime:
    """Runs consumers until cancelled; on cancellation stops taking
    messages, lets those in flight finish (``drain_seconds`` at most) and
    closes. A lost connection is restored by aio_pika's robust connection:
    messages unacknowledged then come again and the inbox tells them."""

    settings: ConsumerSettings
    pool: asyncpg.Pool
    consumers: Sequence[Consumer]
    _connection: aio_pika.abc.AbstractRobustConnection | None = None
    _publisher: aio_pika.abc.AbstractChannel | None = None
    _bound: list[_Bound] = field(default_factory=list)
    _in_flight: dict[tuple[str, uuid.UUID], asyncio.Task[Any]] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _consuming: bool = False

    def names(self, consumer: Consumer) -> QueueNames:
        return queue_names(self.settings.queue_prefix, consumer.name, self.settings.retry_delays)

    async def run(self) -> None:
        connection = await self._connect()
        self._connection = connection
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self.settings.prefetch)
            self._publisher = await connection.channel(publisher_confirms=True)
            exchange = await channel.declare_exchange(
                self.settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            for consumer in self.consumers:
                self._bound.append(await self._declare_and_consume(channel, exchange, consumer))
            self._consuming = True
            log.info("consuming", consumers=[c.name for c in self.consumers])
            await asyncio.Future()  # until cancelled
        except asyncio.CancelledError:
            await self._drain()
            raise
        finally:
            self._consuming = False
            self._bound.clear()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), _BROKER_CALL_SECONDS)

    async def check(self) -> None:
        """Readiness: connected and consuming."""
        connection = self._connection
        if not self._consuming or connection is None or not connection.connected.is_set():
            raise ConnectionError("not consuming from RabbitMQ")

    async def _connect(self) -> aio_pika.abc.AbstractRobustConnection:
        delay = 0.25
        while True:
            try:
                return await aio_pika.connect_robust(
                    self.settings.amqp_url,
                    reconnect_interval=self.settings.reconnect_interval_seconds,
                    client_properties={"connection_name": self.settings.connection_name},
                )
            except (OSError, aio_pika.exceptions.AMQPError) as exc:
                log.warning(
                    "amqp_unreachable", error=f"{type(exc).__name__}: {exc}", retry_in=delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _declare_and_consume(
        self,
        channel: aio_pika.abc.AbstractChannel,
        exchange: aio_pika.abc.AbstractExchange,
        consumer: Consumer,
    ) -> _Bound:
        names = self.names(consumer)
        await channel.declare_queue(names.parked, durable=True, arguments=dict(_QUORUM))
        for name, delay in dict(
            zip(names.retries, self.settings.retry_delays, strict=True)
        ).items():
            await channel.declare_queue(
                name,
                durable=True,
                arguments={
                    **_QUORUM,
                    **_SAFE_DEAD_LETTERS,
                    "x-message-ttl": round(delay * 1000),
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": names.work,
                },
            )
        queue = await channel.declare_queue(
            names.work,
            durable=True,
            arguments={
                **_QUORUM,
                **_SAFE_DEAD_LETTERS,
                "x-delivery-limit": self.settings.delivery_limit,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": names.parked,
            },
        )
        await queue.bind(exchange, routing_key=consumer.routing_key)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            # Handled in a task of our own, not the channel's: a lost
            # channel must not cancel an effect half-way, and a drain waits
            # for it.
            task = asyncio.create_task(self._process(consumer, names, message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        tag = await queue.consume(on_message, no_ack=False)
        return _Bound(consumer, names, queue, tag)

    async def _drain(self) -> None:
        self._consuming = False
        for bound in self._bound:
            # A robust channel waits for the broker to come back: not for ever.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(bound.queue.cancel(bound.tag), _BROKER_CALL_SECONDS)
        if self._tasks:
            log.info("draining", in_flight=len(self._tasks))
            await asyncio.wait(set(self._tasks), timeout=self.settings.drain_seconds)
        log.info("drained", left=len(self._tasks))

    async def _process(
        self, consumer: Consumer, names: QueueNames, message: aio_pika.abc.AbstractIncomingMessage
    ) -> None:
        attempt = _attempt(message.headers)
        final = attempt >= len(self.settings.retry_delays)
        try:
            event = parse_event(
                message.body, consumer.event_type, consumer.data_model, attempt, final
            )
        except Rejected as bad:
            await self._settle(message, consumer, names, _Outcome("parked", bad.reason, str(bad)))
            return
        request_id_var.set(f"event-{event.event_id}")
        key = (consumer.name, event.event_id)
        earlier = self._in_flight.get(key)
        if earlier is not None:
            # The same event is still being applied (its delivery was lost
            # with a connection): let that finish first, then the inbox tells.
            with contextlib.suppress(BaseException):
                await asyncio.shield(earlier)
        current = asyncio.current_task()
        assert current is not None
        self._in_flight[key] = current
        try:
            outcome = await self._apply(consumer, event)
        finally:
            if self._in_flight.get(key) is current:
                del self._in_flight[key]
        if outcome.kind == "failed":
            outcome = (
                _Outcome("parked", "RETRIES_EXHAUSTED", f"{outcome.reason}: {outcome.error}")
                if final
                else _Outcome("retried", outcome.reason, outcome.error)
            )
        await self._settle(message, consumer, names, outcome)

    async def _apply(self, consumer: Consumer, event: Event[Any]) -> _Outcome:
        """Applies the event once: applied, duplicate, parked (a final
        refusal) or failed (worth a retry)."""
        inbox = Inbox(consumer.name, event.event_id, event.event_type)
        started = asyncio.get_running_loop().time()
        try:
            async with self.pool.acquire() as conn:
                if await inbox.applied(conn):
                    return _Outcome("duplicate")
            await asyncio.wait_for(
                consumer.handle(event, inbox), self.settings.handler_timeout_seconds
            )
            async with self.pool.acquire() as conn:
                # For an effect that ended without a transaction to share
                # (it had happened already): recorded now.
                await inbox.add(conn)
        except AlreadyApplied:
            return _Outcome("duplicate")
        except Rejected as refused:
            return _Outcome("parked", refused.reason, str(refused))
        except _FINAL_ERRORS as refused:
            return _Outcome("parked", refused.reason, refused.message)
        except MonetaError as exc:
            return _Outcome("failed", exc.reason, exc.message)
        except TimeoutError:
            return _Outcome("failed", "HANDLER_TIMEOUT", "the handler did not finish in time")
        except Exception as exc:
            return _Outcome("failed", "HANDLER_ERROR", f"{type(exc).__name__}: {exc}")
        finally:
            HANDLING_SECONDS.labels(consumer.name).observe(
                asyncio.get_running_loop().time() - started
            )
        return _Outcome("applied")

    async def _settle(
        self,
        message: aio_pika.abc.AbstractIncomingMessage,
        consumer: Consumer,
        names: QueueNames,
        outcome: _Outcome,
    ) -> None:
        """Sends the copy on (to a retry queue or the parking queue) when
        there is one, then acknowledges. If a step fails the message is
        handed back (or, with its channel gone, comes back by itself). Each
        step is bounded: a connection lost half-way can leave a call
        unanswered."""
        attempt = _attempt(message.headers)
        fields = {"consumer": consumer.name, "message_id": message.message_id, "attempt": attempt}
        try:
            if outcome.kind in ("retried", "parked"):
                queue = names.retries[attempt] if outcome.kind == "retried" else names.parked
                next_attempt = attempt + 1 if outcome.kind == "retried" else attempt
                await asyncio.wait_for(
                    self._forward(message, consumer, queue, next_attempt, outcome),
                    _BROKER_CALL_SECONDS,
                )
            await asyncio.wait_for(message.ack(), _BROKER_CALL_SECONDS)
        except Exception as exc:
            log.warning("event_not_settled", outcome=outcome.kind, error=repr(exc), **fields)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(message.nack(requeue=True), _BROKER_CALL_SECONDS)
            return
        MESSAGES.labels(consumer.name, outcome.kind).inc()
        if outcome.kind == "applied":
            log.info("event_applied", **fields)
        elif outcome.kind == "duplicate":
            log.info("event_already_applied", **fields)
        elif outcome.kind == "retried":
            log.warning(
                "event_retry_scheduled", reason=outcome.reason, error=outcome.error, **fields
            )
        else:
            log.error("event_parked", reason=outcome.reason, error=outcome.error, **fields)

    async def _forward(
        self,
        message: aio_pika.abc.AbstractIncomingMessage,
        consumer: Consumer,
        queue: str,
        attempt: int,
        outcome: _Outcome,
    ) -> None:
        assert self._publisher is not None
        headers = _headers_without(message, ("x-death", "x-first-death", "x-last-death"))
        headers.update(
            {
                ATTEMPT_HEADER: attempt,
                REASON_HEADER: outcome.reason,
                ERROR_HEADER: outcome.error[:_MAX_ERROR_TEXT],
                CONSUMER_HEADER: consumer.name,
            }
        )
        await self._publisher.default_exchange.publish(
            _copy(message, headers),
            routing_key=queue,
            mandatory=True,  # a missing queue is an error, not a silent drop
        )


@dataclass(frozen=True)
class _Outcome:
    # applied, duplicate, failed, retried or parked
    kind: str
    reason: str = ""
    error: str = ""


def _copy(
    message: aio_pika.abc.AbstractIncomingMessage, headers: dict[str, Any]
) -> aio_pika.Message:
    return aio_pika.Message(
        message.body,
        headers=headers,
        message_id=message.message_id,
        type=message.type,
        content_type=message.content_type,
        timestamp=message.timestamp,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def _headers_without(
    message: aio_pika.abc.AbstractIncomingMessage, prefixes: tuple[str, ...]
) -> dict[str, Any]:
    return {k: v for k, v in (message.headers or {}).items() if not k.startswith(prefixes)}


def _attempt(headers: Mapping[str, Any] | None) -> int:
    value = (headers or {}).get(ATTEMPT_HEADER, 0)
    return value if isinstance(value, int) and value >= 0 else 0


async def redrive_parked(amqp_url: str, queues: Sequence[QueueNames]) -> dict[str, int]:
    """Moves the messages parked now back to their work queues, as first
    deliveries (attempt 0, the parking headers gone): for after the cause was
    fixed. A message that fails again is parked again. Returns how many moved,
    by work queue."""
    moved: dict[str, int] = {}
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for names in queues:
            parked = await channel.declare_queue(names.parked, passive=True)
            waiting = parked.declaration_result.message_count or 0
            moved[names.work] = 0
            for _ in range(waiting):  # those parked now, not those parked again meanwhile
                message = await parked.get(no_ack=False, fail=False)
                if message is None:
                    break
                headers = _headers_without(
                    message, ("x-moneta-", "x-death", "x-first-death", "x-last-death")
                )
                await channel.default_exchange.publish(
                    _copy(message, headers), routing_key=names.work, mandatory=True
                )
                await message.ack()
                moved[names.work] += 1
    return moved
