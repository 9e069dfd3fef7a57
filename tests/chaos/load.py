"""A mixed load on the mesh, as its clients make it, with a journal of
every request and every answer, so that the invariants can be checked
against what the clients were told.

The population is split so that each user's balance follows from the
journal alone: senders only send (P2P, below the review amount), receivers
only receive, a reviewer sends payments that wait for a PIN that never
comes (their holds expire), depositors add funds and cash some out (and
the test, playing the bank, settles or fails each with a signed webhook), bookers
are charged and refunded by booking events. Admins change the senders'
P2P budgets meanwhile, and new users arrive by UserCreated events.

A client that gets no answer, a 5xx, 429, or "still in progress" retries
the same request with the same idempotency key (or event id) until it gets
a definitive answer, as a real client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import aio_pika
import asyncpg
import grpc
import httpx
import orjson

from moneta.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from tests.chaos.mesh import BANK_WEBHOOK_SECRET, REVIEW_AMOUNT, Mesh

CURRENCY = "USD"
SENDER_BALANCE = 1000_00
REVIEWER_BALANCE = 1000_00
BOOKER_BALANCE = 500_00
SENDER_BUDGET = 600_00
BOOKER_BUDGET = 400_00
# Reasons of a 409 that mean "not yet", not "no".
_NOT_YET = frozenset({"REQUEST_IN_PROGRESS", "IDEMPOTENCY_KEY_IN_USE"})


def major(minor: int) -> str:
    sign = "-" if minor < 0 else ""
    return f"{sign}{abs(minor) // 100}.{abs(minor) % 100:02d}"


def minor(amount: str) -> int:
    negative = amount.startswith("-")
    whole, _, cents = amount.lstrip("-").partition(".")
    value = int(whole) * 100 + int((cents + "00")[:2])
    return -value if negative else value


# ---------------------------------------------------------------- the journal


@dataclass
class Attempt:
    status: int | None  # None: no answer at all (refused, reset, timed out)
    body: Any
    started: float
    seconds: float

    @property
    def reason(self) -> str:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return str(self.body["error"].get("reason", ""))
        return ""

    @property
    def definitive(self) -> bool:
        """An answer a client may act on: a success, or a refusal that a
        retry would repeat."""
        if self.status is None or self.status >= 500 or self.status == 429:
            return False
        return not (self.status == 409 and self.reason in _NOT_YET)


@dataclass
class Operation:
    kind: str  # p2p, review, deposit, settle, budget, booking, cancel, onboard
    key: str
    user: str
    amount: int = 0
    detail: dict[str, Any] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def answer(self) -> Attempt | None:
        """The first definitive answer, if any."""
        return next((a for a in self.attempts if a.definitive), None)

    @property
    def settled(self) -> bool:
        return self.answer is not None

    @property
    def succeeded(self) -> bool:
        answer = self.answer
        return answer is not None and answer.status is not None and answer.status < 300

    def trail(self) -> list[tuple[float, int | None, str, float]]:
        """Each attempt: when (s since the first), status, reason, seconds."""
        first = self.attempts[0].started if self.attempts else 0.0
        return [(round(a.started - first, 2), a.status, a.reason, round(a.seconds, 3))
                for a in self.attempts]  # fmt: skip

    @property
    def clean(self) -> bool:
        """Answered definitively at the first attempt."""
        return bool(self.attempts) and self.attempts[0].definitive


@dataclass
class Journal:
    operations: list[Operation] = field(default_factory=list)

    def of(self, *kinds: str) -> list[Operation]:
        return [op for op in self.operations if op.kind in kinds]

    def unsettled(self) -> list[Operation]:
        return [op for op in self.operations if not op.settled]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for op in self.operations:
            entry = out.setdefault(op.kind, {"total": 0, "ok": 0, "refused": 0, "unsettled": 0,
                                             "retried": 0})  # fmt: skip
            entry["total"] += 1
            entry["retried"] += len(op.attempts) > 1
            if not op.settled:
                entry["unsettled"] += 1
            elif op.succeeded:
                entry["ok"] += 1
            else:
                entry["refused"] += 1
        return out


# ---------------------------------------------------------------- who is who


@dataclass(frozen=True)
class Person:
    user_id: str
    email: str
    initial: int
    bank_account_id: str = ""
    budget_id: str = ""


@dataclass
class Population:
    senders: list[Person]
    receivers: list[Person]
    reviewer: Person
    depositors: list[Person]
    bookers: list[Person]
    # Users that UserCreated events asked for (filled by the load).
    onboarded: list[str] = field(default_factory=list)

    @property
    def everyone(self) -> list[Person]:
        return [*self.senders, *self.receivers, self.reviewer, *self.depositors, *self.bookers]


async def _create_person(
    http: httpx.AsyncClient, wallet: wallet_pb2_grpc.WalletServiceStub, mesh: Mesh, initial: int
) -> Person:
    user_id = str(uuid.uuid4())
    handle = f"c{user_id[:8]}"
    await wallet.CreateUser(
        wallet_pb2.CreateUserRequest(
            user=wallet_pb2.User(
                user_id=user_id, email=f"{handle}@example.com", username=handle,
                full_name=f"Chaos {handle}", role=wallet_pb2.ROLE_USER, default_currency=CURRENCY,
            )
        ),
        timeout=10,
    )  # fmt: skip
    response = await http.post(
        "/api/v1/wallets",
        json={"user_id": user_id, "currency": CURRENCY, "initial_balance": major(initial)},
        headers=mesh.admin(),
    )
    assert response.status_code == 201, response.text
    return Person(user_id, f"{handle}@example.com", initial)


async def _with_budget(
    http: httpx.AsyncClient, mesh: Mesh, person: Person, category: str, total: int
) -> Person:
    response = await http.post(
        "/api/v1/budgets",
        json={"user_id": person.user_id, "total_amount": major(total), "currency": CURRENCY,
              "period_type": "MONTHLY", "category": category, "mode": "HARD"},
        headers=mesh.admin(),
    )  # fmt: skip
    assert response.status_code == 201, response.text
    return Person(
        person.user_id, person.email, person.initial, budget_id=response.json()["budget_id"]
    )


async def _with_bank_account(http: httpx.AsyncClient, mesh: Mesh, person: Person) -> Person:
    response = await http.post(
        "/api/v1/wallet/bank-accounts",
        json={"user_id": person.user_id, "account_number": "000123456789",
              "routing_number": "021000021", "holder_name": "Chaos Holder"},
        headers=mesh.auth(person.user_id),
    )  # fmt: skip
    assert response.status_code == 201, response.text
    return Person(person.user_id, person.email, person.initial,
                  bank_account_id=response.json()["bank_account_id"])  # fmt: skip


async def populate(
    mesh: Mesh,
    senders: int = 8,
    receivers: int = 4,
    depositors: int = 3,
    bookers: int = 3,
    sender_balance: int = SENDER_BALANCE,
    sender_budget: int = SENDER_BUDGET,
) -> Population:
    async with (
        httpx.AsyncClient(base_url=mesh.gateway_url, timeout=30.0) as http,
        grpc.aio.insecure_channel(mesh.grpc_addr("wallet")) as channel,
    ):
        wallet = wallet_pb2_grpc.WalletServiceStub(channel)

        async def people(count: int, initial: int) -> list[Person]:
            return list(
                await asyncio.gather(
                    *(_create_person(http, wallet, mesh, initial) for _ in range(count))
                )
            )

        sending = await people(senders, sender_balance)
        sending = list(
            await asyncio.gather(
                *(_with_budget(http, mesh, p, "P2P", sender_budget) for p in sending)
            )
        )
        booking = await people(bookers, BOOKER_BALANCE)
        booking = list(
            await asyncio.gather(
                *(_with_budget(http, mesh, p, "HOTEL", BOOKER_BUDGET) for p in booking)
            )
        )
        depositing = await people(depositors, 0)
        depositing = list(
            await asyncio.gather(*(_with_bank_account(http, mesh, p) for p in depositing))
        )
        return Population(
            senders=sending,
            receivers=await people(receivers, 0),
            reviewer=(await people(1, REVIEWER_BALANCE))[0],
            depositors=depositing,
            bookers=booking,
        )


# ---------------------------------------------------------------- the clients


def signed_webhook(body: bytes) -> dict[str, str]:
    at = int(time.time())
    digest = hmac.new(
        BANK_WEBHOOK_SECRET.encode(), f"{at}.".encode() + body, hashlib.sha256
    ).hexdigest()
    return {"Content-Type": "application/json", "X-Moneta-Signature": f"t={at},v1={digest}"}


def event_envelope(event_id: str, event_type: str, data: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "event_id": event_id,
            "event_type": event_type,
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "data": data,
        }
    )


class Publisher:
    """Publishes events to the mesh's exchange with confirms, reconnecting
    and publishing again (the same event, the same id) until the broker
    confirms: at least once, as the booking and user services would."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._lock = asyncio.Lock()

    async def _ready(self) -> aio_pika.abc.AbstractExchange:
        async with self._lock:
            if self._exchange is None or self._connection is None or self._connection.is_closed:
                self._connection = await aio_pika.connect(self._mesh.amqp_url, timeout=5)
                channel = await self._connection.channel(publisher_confirms=True)
                self._exchange = await channel.declare_exchange(
                    self._mesh.exchange, aio_pika.ExchangeType.TOPIC, durable=True
                )
            return self._exchange

    async def publish(self, routing_key: str, body: bytes) -> None:
        exchange = await self._ready()
        await exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                             content_type="application/json"),
            routing_key=routing_key,
            timeout=5,
        )  # fmt: skip

    async def reset(self) -> None:
        async with self._lock:
            if self._connection is not None:
                with contextlib.suppress(Exception):
                    await self._connection.close()
            self._connection = None
            self._exchange = None

    async def close(self) -> None:
        await self.reset()


class HttpLike(Protocol):
    """Another HTTP client with httpx's ``request`` (the soak's lean one):
    it raises OSError or TimeoutError when no answer comes."""

    async def request(self, method: str, url: str, **kwargs: Any) -> Any: ...


class Client:
    """Requests with their journal, each retried until definitive."""

    def __init__(
        self,
        mesh: Mesh,
        http: httpx.AsyncClient | HttpLike,
        publisher: Publisher,
        journal: Journal,
    ) -> None:
        self.mesh = mesh
        self.http = http
        self.publisher = publisher
        self.journal = journal
        # No retry starts after this (time.monotonic); None: retry forever.
        self.give_up_at: float | None = None

    async def request(self, method: str, url: str, **kwargs: Any) -> Attempt:
        started = time.monotonic()
        try:
            response = await self.http.request(method, url, **kwargs)
        except (httpx.HTTPError, OSError, TimeoutError):
            return Attempt(None, None, started, time.monotonic() - started)
        try:
            body = response.json()
        except ValueError:
            body = response.text
        return Attempt(response.status_code, body, started, time.monotonic() - started)

    async def settle(self, op: Operation, send: Callable[[], Awaitable[Attempt]]) -> Operation:
        """Sends until a definitive answer (or the give-up time)."""
        self.journal.operations.append(op)
        delay = 0.1
        while True:
            attempt = await send()
            op.attempts.append(attempt)
            if attempt.definitive:
                return op
            now = time.monotonic()
            if self.give_up_at is not None and now >= self.give_up_at:
                return op
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 1.0)

    # -- money

    def p2p_request(self, sender: Person, to: Person, amount: int, key: str) -> dict[str, Any]:
        return {
            "method": "POST",
            "url": "/api/v1/transfers",
            "json": {"sender_id": sender.user_id, "recipient": to.email, "amount": major(amount),
                     "currency": CURRENCY, "idempotency_key": key},
            "headers": self.mesh.auth(sender.user_id),
        }  # fmt: skip

    async def p2p(
        self, sender: Person, to: Person, amount: int, kind: str = "p2p", key: str | None = None
    ) -> Operation:
        key = key or f"{kind}-{uuid.uuid4()}"
        request = self.p2p_request(sender, to, amount, key)
        op = Operation(kind, key, sender.user_id, amount, {"to": to.user_id})
        return await self.settle(op, lambda: self.request(**request))

    def bank_request(
        self, person: Person, amount: int, key: str, kind: str = "deposit"
    ) -> dict[str, Any]:
        """A deposit (add funds) or a withdrawal (cash-out) request."""
        return {
            "method": "POST",
            "url": "/api/v1/wallet/add-funds" if kind == "deposit" else "/api/v1/wallet/withdraw",
            "json": {"user_id": person.user_id, "amount": major(amount),
                     "bank_account_id": person.bank_account_id, "idempotency_key": key},
            "headers": self.mesh.auth(person.user_id),
        }  # fmt: skip

    async def deposit(self, person: Person, amount: int, kind: str = "deposit") -> Operation:
        """A deposit, or (``kind`` "withdrawal") a cash-out."""
        key = f"{kind}-{uuid.uuid4()}"
        request = self.bank_request(person, amount, key, kind)
        op = Operation(kind, key, person.user_id, amount)
        return await self.settle(op, lambda: self.request(**request))

    async def bank_settles(self, transfer: Operation, outcome: str) -> Operation:
        """The bank's webhook for a deposit or a withdrawal: SETTLED or FAILED."""
        answer = transfer.answer
        assert answer is not None and isinstance(answer.body, dict)
        transfer_id = answer.body["transfer_id"]
        op = Operation("settle", transfer_id, transfer.user, transfer.amount,
                       {"outcome": outcome, "of": transfer.kind})  # fmt: skip
        return await self.settle(op, lambda: self.webhook(transfer_id, outcome))

    async def webhook(self, transfer_id: str, outcome: str) -> Attempt:
        """One delivery of the bank's webhook, signed now."""
        body = json.dumps({"transfer_id": transfer_id, "status": outcome,
                           "bank_reference": f"CHAOS-{transfer_id[:8]}"}).encode()  # fmt: skip
        return await self.request(
            "POST", "/api/v1/webhooks/bank", content=body, headers=signed_webhook(body)
        )

    async def change_budget(self, person: Person, total: int) -> Operation:
        op = Operation("budget", f"budget-{uuid.uuid4()}", person.user_id, total,
                       {"budget_id": person.budget_id})  # fmt: skip
        headers = self.mesh.admin()
        return await self.settle(
            op,
            lambda: self.request(
                "PUT", f"/api/v1/budgets/{person.budget_id}",
                json={"total_amount": major(total), "reason": "chaos load"}, headers=headers,
            ),
        )  # fmt: skip

    async def balance(self, person: Person) -> dict[str, int]:
        """The person's balance as the gateway answers it (available,
        pending, posted), read until it answers."""
        while True:
            attempt = await self.request(
                "GET", f"/api/v1/wallets/{person.user_id}", headers=self.mesh.admin()
            )
            if attempt.status == 200:
                for b in attempt.body["balances"]:
                    if b["currency"] == CURRENCY:
                        return {k: minor(b[k]) for k in ("available", "pending", "posted")}
                return {"available": 0, "pending": 0, "posted": 0}
            await asyncio.sleep(0.2)

    # -- events

    async def publish(self, op: Operation, routing_key: str, body: bytes) -> Operation:
        async def send() -> Attempt:
            started = time.monotonic()
            try:
                await self.publisher.publish(routing_key, body)
            except Exception:  # whatever a broken connection raises (aiormq has many)
                await self.publisher.reset()
                return Attempt(None, None, started, time.monotonic() - started)
            return Attempt(200, None, started, time.monotonic() - started)

        return await self.settle(op, send)

    async def book(self, person: Person, amount: int) -> Operation:
        event_id, booking_id = str(uuid.uuid4()), f"bk-{uuid.uuid4()}"
        body = event_envelope(event_id, "BookingCreated", {
            "booking_id": booking_id, "user_id": person.user_id, "amount": major(amount),
            "currency": CURRENCY, "category": "HOTEL", "description": "Chaos Hotel",
        })  # fmt: skip
        op = Operation("booking", event_id, person.user_id, amount, {"booking_id": booking_id})
        return await self.publish(op, "booking.created", body)

    async def cancel(self, booking: Operation, refund: int | None) -> Operation:
        event_id = str(uuid.uuid4())
        body = event_envelope(event_id, "BookingCancelled", {
            "booking_id": booking.detail["booking_id"], "user_id": booking.user,
            "refund_amount": major(refund) if refund is not None else None, "reason": "chaos",
        })  # fmt: skip
        op = Operation("cancel", event_id, booking.user, refund or 0,
                       {"booking_id": booking.detail["booking_id"]})  # fmt: skip
        return await self.publish(op, "booking.cancelled", body)

    async def onboard(self) -> Operation:
        event_id, user_id = str(uuid.uuid4()), str(uuid.uuid4())
        body = event_envelope(event_id, "UserCreated", {
            "user_id": user_id, "email": f"o{user_id[:12]}@example.com",
            "full_name": "Onboarded by event", "role": "user", "default_currency": CURRENCY,
        })  # fmt: skip
        return await self.publish(Operation("onboard", event_id, user_id), "user.created", body)


# ---------------------------------------------------------------- the load


@dataclass(frozen=True)
class LoadShape:
    """How hard each kind of client works: the pause (seconds) between one
    client's requests."""

    sender_pause: float = 0.02
    deposit_pause: float = 0.2
    booking_pause: float = 0.25
    budget_pause: float = 0.4
    onboard_pause: float = 1.0
    # None: no payments for review. Their holds expire after REVIEW_SECONDS,
    # but the wallet marks them expired only on its reconciler's next round
    # (every 10 s), which a check of the reviewer's balance waits for.
    review_pause: float | None = 0.6


class MixedLoad:
    """Runs the load until ``stop``; every client then finishes the request
    it is in (retrying it until definitive, at most until ``drain``'s
    deadline)."""

    def __init__(
        self,
        mesh: Mesh,
        population: Population,
        shape: LoadShape | None = None,
        seed: int = 7,
    ) -> None:
        self.mesh = mesh
        self.population = population
        self.shape = shape or LoadShape()
        self.journal = Journal()
        self.rng = random.Random(seed)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._http: httpx.AsyncClient | None = None
        self._publisher: Publisher | None = None
        self.client: Client | None = None
        self.started_at = 0.0

    async def __aenter__(self) -> MixedLoad:
        self._http = httpx.AsyncClient(
            base_url=self.mesh.gateway_url,
            timeout=httpx.Timeout(5.0),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=100),
        )
        self._publisher = Publisher(self.mesh)
        self.client = Client(self.mesh, self._http, self._publisher, self.journal)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        assert self._http is not None and self._publisher is not None
        await self._http.aclose()
        await self._publisher.close()

    def start(self) -> None:
        p, shape = self.population, self.shape
        self.started_at = time.monotonic()
        workers: list[Callable[[], Coroutine[Any, Any, None]]] = [
            *(self._sender(s, shape.sender_pause) for s in p.senders),
            *([self._reviewer(shape.review_pause)] if shape.review_pause is not None else []),
            *(self._depositor(d, shape.deposit_pause) for d in p.depositors),
            self._booker(shape.booking_pause),
            self._budgets(shape.budget_pause),
            self._onboarding(shape.onboard_pause),
        ]
        self._tasks = [asyncio.create_task(w()) for w in workers]

    async def drain(self, seconds: float = 30.0) -> None:
        """Stops new requests; waits for those in flight to settle."""
        assert self.client is not None
        self._stop.set()
        self.client.give_up_at = time.monotonic() + seconds
        await asyncio.wait_for(asyncio.gather(*self._tasks), seconds + 15)
        self.client.give_up_at = None

    async def settle_unsettled(self, seconds: float = 30.0) -> list[Operation]:
        """Retries every request still without a definitive answer; returns
        those that stay without one."""
        assert self.client is not None
        return await settle_unsettled(self.client, self.population, seconds)

    # -- the clients

    def _sender(self, sender: Person, pause: float) -> Callable[[], Coroutine[Any, Any, None]]:
        async def run() -> None:
            assert self.client is not None
            rng = random.Random(self.rng.random())
            while not self._stop.is_set():
                to = rng.choice(self.population.receivers)
                await self.client.p2p(sender, to, rng.randint(50, 500))
                await asyncio.sleep(pause)

        return run

    def _reviewer(self, pause: float) -> Callable[[], Coroutine[Any, Any, None]]:
        async def run() -> None:
            assert self.client is not None
            rng = random.Random(self.rng.random())
            amount = REVIEW_AMOUNT * 100 + 10_00
            while not self._stop.is_set():
                to = rng.choice(self.population.receivers)
                await self.client.p2p(self.population.reviewer, to, amount, kind="review")
                await asyncio.sleep(pause)

        return run

    def _depositor(self, person: Person, pause: float) -> Callable[[], Coroutine[Any, Any, None]]:
        async def run() -> None:
            assert self.client is not None
            rng = random.Random(self.rng.random())
            while not self._stop.is_set():
                # One in four a cash-out (refused, INSUFFICIENT_FUNDS, when
                # the settled deposits do not cover it).
                kind = "withdrawal" if rng.random() < 0.25 else "deposit"
                transfer = await self.client.deposit(person, rng.randint(100, 2000), kind)
                if transfer.succeeded:
                    outcome = "FAILED" if rng.random() < 0.15 else "SETTLED"
                    await self.client.bank_settles(transfer, outcome)
                await asyncio.sleep(pause)

        return run

    def _booker(self, pause: float) -> Callable[[], Coroutine[Any, Any, None]]:
        async def run() -> None:
            assert self.client is not None
            rng = random.Random(self.rng.random())
            booked: list[Operation] = []
            while not self._stop.is_set():
                charged = await self._charged(booked) if rng.random() < 0.4 else []
                if charged:
                    # A cancellation of a booking the wallet charged (as the
                    # booking service would learn): in full, or in part.
                    booking = rng.choice(charged)
                    booked.remove(booking)
                    await self.client.cancel(booking, rng.choice([None, booking.amount // 2]))
                else:
                    person = rng.choice(self.population.bookers)
                    booked.append(await self.client.book(person, rng.randint(100, 3000)))
                await asyncio.sleep(pause)

        return run

    async def _charged(self, booked: list[Operation]) -> list[Operation]:
        """Those of ``booked`` that the wallet has charged (none while its
        database does not answer)."""
        try:
            conn = await asyncpg.connect(self.mesh.database_url("wallet"), timeout=2)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return []
        try:
            rows = await conn.fetch(
                "SELECT booking_id FROM bookings WHERE status = 'CHARGED'"
                " AND booking_id = ANY($1::text[])",
                [op.detail["booking_id"] for op in booked],
            )
        except (OSError, asyncpg.PostgresError):
            return []
        finally:
            with contextlib.suppress(Exception):
                await conn.close()
        ids = {r["booking_id"] for r in rows}
        return [op for op in booked if op.detail["booking_id"] in ids]

    def _budgets(self, pause: float) -> Callable[[], Coroutine[Any, Any, None]]:
        async def run() -> None:
            assert self.client is not None
            rng = random.Random(self.rng.random())
            while not self._stop.is_set():
                person = rng.choice(self.population.senders)
                await self.client.change_budget(person, rng.randint(400_00, 900_00))
                await asyncio.sleep(pause)

        return run

    def _onboarding(self, pause: float) -> Callable[[], Coroutine[Any, Any, None]]:
        async def run() -> None:
            assert self.client is not None
            while not self._stop.is_set():
                op = await self.client.onboard()
                self.population.onboarded.append(op.user)
                await asyncio.sleep(pause)

        return run


async def settle_unsettled(
    client: Client, population: Population, seconds: float = 30.0, at_once: int = 32
) -> list[Operation]:
    """Retries every request of the client's journal still without a
    definitive answer (the same request, the same key; ``at_once`` at a
    time), then sends the bank's webhook for deposits answered only now;
    returns the requests that stay without an answer."""
    deadline = time.monotonic() + seconds
    left = client.journal.unsettled()
    gate = asyncio.Semaphore(at_once)

    async def retry(op: Operation) -> None:
        async with gate:
            await _retry(client, population, op)

    while left and time.monotonic() < deadline:
        client.give_up_at = time.monotonic()  # one more attempt each
        await asyncio.gather(*(retry(op) for op in left))
        left = [op for op in left if not op.settled]
        if left:
            await asyncio.sleep(0.5)
    client.give_up_at = None
    told = {op.key for op in client.journal.of("settle")}
    open_deposits = [
        op for op in client.journal.of("deposit", "withdrawal")
        if op.succeeded and op.answer is not None and op.answer.body["transfer_id"] not in told
    ]  # fmt: skip
    await asyncio.gather(*(client.bank_settles(op, "SETTLED") for op in open_deposits))
    return left


async def _retry(client: Client, population: Population, op: Operation) -> None:
    """Sends an unsettled request again, the same way."""
    people = {person.user_id: person for person in population.everyone}
    send: Callable[[], Awaitable[Attempt]]
    if op.kind in ("p2p", "review"):
        request = client.p2p_request(people[op.user], people[op.detail["to"]], op.amount, op.key)
        send = lambda: client.request(**request)  # noqa: E731
    elif op.kind in ("deposit", "withdrawal"):
        request = client.bank_request(people[op.user], op.amount, op.key, op.kind)
        send = lambda: client.request(**request)  # noqa: E731
    elif op.kind == "settle":
        send = lambda: client.webhook(op.key, op.detail["outcome"])  # noqa: E731
    else:
        return  # events: their publisher retries them in place
    client.journal.operations.remove(op)
    await client.settle(op, send)


# ---------------------------------------------------------------- replays


async def replay(load: MixedLoad, sample: int = 200) -> list[str]:
    """Sends money-moving requests of the journal again, with their keys:
    every one that needed retries, and ``sample`` of the others. Each must
    answer what it answered first; a held payment may have expired since
    (REVIEW_EXPIRED), and a deposit may have settled or failed since, which
    its answer may tell once the gateway's stored answers are gone (the
    wallet answers from the transfer as it is). Returns the differences."""
    assert load.client is not None
    c, people = load.client, {p.user_id: p for p in load.population.everyone}
    again = Client(c.mesh, c.http, c.publisher, Journal())
    settled = {op.key: op.detail["outcome"] for op in load.journal.of("settle") if op.succeeded}
    differences: list[str] = []

    async def one(op: Operation) -> None:
        first = op.answer
        if first is None:
            return
        if op.kind in ("deposit", "withdrawal"):
            request = c.bank_request(people[op.user], op.amount, op.key, op.kind)
        else:
            request = c.p2p_request(people[op.user], people[op.detail["to"]], op.amount, op.key)
        second = (
            await again.settle(
                Operation(op.kind, op.key, op.user), lambda: again.request(**request)
            )
        ).answer
        if second is None:
            differences.append(f"{op.kind} {op.key}: no answer to the replay")
        elif not (
            _same_answer(first, second)
            or _expired_since(op, second)
            or _settled_since(op, first, second, settled)
        ):
            differences.append(
                f"{op.kind} {op.key}: first {first.status} {first.body}, replay {second.status} {second.body}"
            )

    operations = load.journal.of("p2p", "review", "deposit", "withdrawal")
    retried = [op for op in operations if not op.clean]
    clean = [op for op in operations if op.clean]
    chosen = retried + load.rng.sample(clean, min(sample, len(clean)))
    for start in range(0, len(chosen), 50):
        await asyncio.gather(*(one(op) for op in chosen[start : start + 50]))
    return differences


def _settled_since(op: Operation, first: Attempt, second: Attempt, settled: dict[str, str]) -> bool:
    """A bank transfer answered as the bank's webhook left it."""
    if op.kind not in ("deposit", "withdrawal") or first.status != 202 or second.status != 202:
        return False
    transfer_id = first.body["transfer_id"]
    now = {"SETTLED": "COMPLETED", "FAILED": "FAILED"}.get(settled.get(transfer_id, ""))
    return bool(second.body["transfer_id"] == transfer_id and second.body["status"] == now)


def _expired_since(op: Operation, second: Attempt) -> bool:
    """A payment held for review that nobody confirmed is refused now."""
    return op.kind == "review" and second.status == 422 and second.reason == "REVIEW_EXPIRED"


def _same_answer(first: Attempt, second: Attempt) -> bool:
    if first.status != second.status:
        return False
    if first.status is not None and first.status < 300:
        keys = ("transfer_id", "status", "sender_balance", "currency")
        return all(first.body.get(k) == second.body.get(k) for k in keys)
    return first.reason == second.reason
