"""The soak: the whole mesh under a mixed load at a steady rate for a long
while, to show what time does to it: errors, latency and memory.

    make soak                            (10 minutes at 200 requests/s)
    make soak SOAK_ARGS="--minutes 2"    (python -m bench.soak --help)

The mesh is the fault tests' (tests/chaos/mesh.py: ledger, wallet, budget,
fraud, the wallet's event consumers, the gateway), on a private PostgreSQL
and Redis when this machine has them, and the machine's RabbitMQ with an
exchange of its own. The load is open loop: requests arrive on a fixed
schedule whether or not earlier ones were answered, and latency counts
from each request's due time; beyond 400 in flight an arrival is not sent
and counts as an error. Each request is sent once; those left without an
answer are asked again at the end only to learn their outcome. The mix:
P2P transfers (45%), balance reads (30%), history pages (10%), deposits
each settled by the bank's signed webhook (10%, two requests), budget
changes (5%); and a few booking, cancellation and new-user events a second
through RabbitMQ beside.

Reported (bench/results/soak.json): the error rate (answers that are
neither 2xx nor 4xx, and requests with no answer; target 0), p50/p99 per
30 s window, each process's resident memory after the warm-up and at the
end (target: growth under 10%), and the fault tests' invariants checked on
everything the load did (exit status 1 if one is broken).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httptools
import orjson
import uvloop

from bench.common import machine, percentile, write_results
from services.common.config import CommonSettings
from tests.chaos.infra import PrivateInfra, missing_binaries
from tests.chaos.invariants import check
from tests.chaos.load import (
    Attempt,
    Client,
    Journal,
    Operation,
    Person,
    Population,
    populate,
    settle_unsettled,
)
from tests.chaos.load import Publisher as EventPublisher
from tests.chaos.mesh import Mesh, build_mesh, delete_mesh_topology

TARGET_ERROR_RATE = 0.0
TARGET_RSS_GROWTH_PERCENT = 10.0
WINDOW_SECONDS = 30.0
# Arrivals by kind (weights), at the offered rate.
MIX = {"p2p": 45, "balance": 30, "history": 10, "deposit": 10, "budget": 5}
EVENTS_PER_SECOND = 4.0
# Beyond this many requests in flight an arrival is not sent (and counts
# as an error): an overloaded mesh shows as errors, not as a client queue.
MAX_IN_FLIGHT = 400


# ---------------------------------------------------------------- a lean client


class LeanResponse:
    __slots__ = ("content", "status_code")

    def __init__(self, status_code: int, content: bytes) -> None:
        self.status_code = status_code
        self.content = content

    def json(self) -> Any:
        return orjson.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


class _Exchange:
    """One request and its answer on a keep-alive connection."""

    def __init__(self) -> None:
        self.body = bytearray()
        self.done = False
        self.parser = httptools.HttpResponseParser(self)

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        self.done = True


class LeanHttp:
    """Keep-alive HTTP/1.1 with just what the load needs, so that the load
    generator takes as little of the machine as it can: httpx's pool looks
    at every connection it holds on every request, which at a few hundred
    connections cost more CPU than the services it was measuring."""

    def __init__(self, base_url: str, timeout: float) -> None:
        address = urlsplit(base_url)
        self._host, self._port = address.hostname or "127.0.0.1", address.port or 80
        self._timeout = timeout
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def request(self, method: str, url: str, **kwargs: Any) -> LeanResponse:
        """As httpx's: ``json``, ``content``, ``params`` and ``headers``."""
        unknown = set(kwargs) - {"json", "content", "params", "headers"}
        assert not unknown, unknown
        body = (
            orjson.dumps(kwargs["json"])
            if kwargs.get("json") is not None
            else (kwargs.get("content") or b"")
        )
        params = kwargs.get("params")
        path = f"{url}?{urlencode(params)}" if params else url
        fields = {"Content-Type": "application/json", **(kwargs.get("headers") or {})}
        head = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        raw = (
            f"{method} {path} HTTP/1.1\r\nHost: gateway\r\nContent-Length: {len(body)}\r\n"
            f"{head}\r\n"
        ).encode() + body
        return await asyncio.wait_for(self._send(raw), self._timeout)

    async def _send(self, raw: bytes) -> LeanResponse:
        while self._idle:
            connection = self._idle.pop()
            try:
                return await self._exchange(connection, raw)
            except ConnectionError:  # closed while idle: try the next
                connection[1].close()
        return await self._exchange(await asyncio.open_connection(self._host, self._port), raw)

    async def _exchange(
        self, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], raw: bytes
    ) -> LeanResponse:
        reader, writer = connection
        exchange = _Exchange()
        try:
            writer.write(raw)
            while not exchange.done:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("closed by the server")
                exchange.parser.feed_data(data)
        except BaseException:
            writer.close()
            raise
        self._idle.append(connection)
        return LeanResponse(exchange.parser.get_status_code(), bytes(exchange.body))

    async def aclose(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


# ---------------------------------------------------------------- the soak


@dataclass
class Sample:
    due: float
    kind: str
    status: int | None
    latency: float  # seconds from the due time to the answer


@dataclass
class Soak:
    mesh: Mesh
    population: Population
    client: Client
    rate: float
    rng: random.Random = field(default_factory=lambda: random.Random(11))
    samples: list[Sample] = field(default_factory=list)
    dropped: int = 0
    started: float = 0.0
    # How long arrivals were offered; and until the last answer came.
    offered_seconds: float = 0.0
    seconds: float = 0.0
    events: Counter[str] = field(default_factory=Counter)
    _busy: set[str] = field(default_factory=set)
    _in_flight: set[asyncio.Task[None]] = field(default_factory=set)
    _booked: list[Operation] = field(default_factory=list)

    async def run(self, seconds: float, tick: Callable[[float], Awaitable[None]]) -> None:
        """Offers ``rate`` requests a second for ``seconds``; ``tick`` runs
        every WINDOW_SECONDS (and at the end) with the time elapsed. Times
        are perf_counter's (uvloop's clock counts whole milliseconds)."""
        self.started = start = time.perf_counter()
        self.offered_seconds = seconds
        kinds, weights = list(MIX), list(MIX.values())
        events = asyncio.create_task(self._events(seconds))
        next_tick = start + WINDOW_SECONDS
        arrivals = 0
        while (due := start + arrivals / self.rate) < start + seconds:
            arrivals += 1
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            if time.perf_counter() >= next_tick:
                await tick(next_tick - start)
                next_tick += WINDOW_SECONDS
            if len(self._in_flight) >= MAX_IN_FLIGHT:
                self.dropped += 1
                continue
            kind = self.rng.choices(kinds, weights)[0]
            task = asyncio.create_task(self._one(kind, due))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        await events
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=60)
        self.seconds = time.perf_counter() - start
        await tick(self.seconds)

    def windows(self) -> list[dict[str, Any]]:
        """The figures of each WINDOW_SECONDS of arrivals."""
        windows = []
        at = 0.0
        while at < self.offered_seconds:
            end = min(at + WINDOW_SECONDS, self.offered_seconds)
            inside = [s for s in self.samples if at <= s.due - self.started < end]
            windows.append({"from_s": at, **window_figures(inside, end - at)})
            at += WINDOW_SECONDS
        return windows

    async def _one(self, kind: str, due: float) -> None:
        try:
            attempt = await getattr(self, f"_{kind}")()
        except Exception:  # a fault of the load itself: counted, it does not stop
            attempt = Attempt(None, None, time.monotonic(), 0.0)
        self.samples.append(Sample(due, kind, attempt.status, time.perf_counter() - due))

    # -- what arrives

    def _sender(self) -> Person:
        """An idle sender if there is one: a sender's payments one at a time
        keep its answers' balances exact (the invariants check them)."""
        idle = [s for s in self.population.senders if s.user_id not in self._busy]
        return self.rng.choice(idle or self.population.senders)

    async def _p2p(self) -> Attempt:
        sender = self._sender()
        to = self.rng.choice(self.population.receivers)
        self._busy.add(sender.user_id)
        try:
            op = await self.client.p2p(sender, to, self.rng.randint(50, 500))
        finally:
            self._busy.discard(sender.user_id)
        return op.attempts[0]

    def mark_overlapping_payments(self) -> None:
        """Marks ``concurrent`` the payments whose answer another payment of
        the same sender may have moved: those in flight at the same time, and
        every one after a payment left unanswered (it may complete whenever)."""
        by_sender: dict[str, list[Operation]] = {}
        for op in self.client.journal.of("p2p"):
            by_sender.setdefault(op.user, []).append(op)
        for ops in by_sender.values():
            ops.sort(key=lambda op: op.attempts[0].started)
            busy_until, holder = float("-inf"), None
            for op in ops:
                first = op.attempts[0]
                if first.started < busy_until:
                    op.detail["concurrent"] = True
                    if holder is not None:
                        holder.detail["concurrent"] = True
                end = first.started + first.seconds if op.clean else float("inf")
                if end > busy_until:
                    busy_until, holder = end, op

    async def _balance(self) -> Attempt:
        person = self.rng.choice(self.population.everyone)
        return await self.client.request(
            "GET", f"/api/v1/wallets/{person.user_id}", headers=self.mesh.auth(person.user_id)
        )

    async def _history(self) -> Attempt:
        person = self.rng.choice(self.population.senders + self.population.receivers)
        return await self.client.request(
            "GET",
            f"/api/v1/wallet/{person.user_id}/transactions",
            params={"page_size": 20},
            headers=self.mesh.auth(person.user_id),
        )

    async def _deposit(self) -> Attempt:
        person = self.rng.choice(self.population.depositors)
        deposit = await self.client.deposit(person, self.rng.randint(100, 5000))
        if deposit.succeeded:
            outcome = "FAILED" if self.rng.random() < 0.1 else "SETTLED"
            settled = await self.client.bank_settles(deposit, outcome)
            if not settled.succeeded:
                return settled.attempts[0]
        return deposit.attempts[0]

    async def _budget(self) -> Attempt:
        person = self.rng.choice(self.population.senders)
        op = await self.client.change_budget(person, self.rng.randint(40_000_00, 90_000_00))
        return op.attempts[0]

    async def _events(self, seconds: float) -> None:
        """Bookings, cancellations of charged ones, new users: by RabbitMQ."""
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            await asyncio.sleep(1 / EVENTS_PER_SECOND)
            roll = self.rng.random()
            with contextlib.suppress(Exception):
                if roll < 0.2:
                    await self.client.onboard()
                    self.events["onboard"] += 1
                elif roll < 0.4 and (charged := await self._charged()):
                    booking = self.rng.choice(charged)
                    self._booked.remove(booking)
                    await self.client.cancel(booking, None)
                    self.events["cancel"] += 1
                else:
                    person = self.rng.choice(self.population.bookers)
                    self._booked.append(await self.client.book(person, self.rng.randint(100, 3000)))
                    self.events["booking"] += 1

    async def _charged(self) -> list[Operation]:
        import asyncpg

        conn = await asyncpg.connect(self.mesh.database_url("wallet"))
        try:
            rows = await conn.fetch(
                "SELECT booking_id FROM bookings WHERE status = 'CHARGED'"
                " AND booking_id = ANY($1::text[])",
                [op.detail["booking_id"] for op in self._booked],
            )
        finally:
            await conn.close()
        ids = {r["booking_id"] for r in rows}
        return [op for op in self._booked if op.detail["booking_id"] in ids]


# ---------------------------------------------------------------- figures


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def window_figures(samples: list[Sample], seconds: float) -> dict[str, Any]:
    """Rate, p50, p99 and errors of ``samples`` that arrived over ``seconds``."""
    latencies = [s.latency * 1000 for s in samples]
    return {
        "requests": len(samples),
        "per_second": round(len(samples) / seconds, 1) if seconds else 0.0,
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "errors": sum(1 for s in samples if is_error(s.status)),
    }


def is_error(status: int | None) -> bool:
    """Neither a success nor a refusal of the request: no answer, or 5xx."""
    return status is None or status >= 500


# ---------------------------------------------------------------- the run


async def soak(minutes: float, rate: float, warmup: float, workdir: Path) -> dict[str, Any]:
    settings = CommonSettings()
    run = uuid.uuid4().hex[:8]
    have = [s for s in ("postgres", "redis") if not missing_binaries(s)]
    infra = PrivateInfra.start(postgres="postgres" in have, redis="redis" in have, rabbitmq=False)
    mesh = build_mesh(
        workdir,
        infra_env=infra.env({"MONETA_POSTGRES_URL": settings.postgres_url,
                             "MONETA_REDIS_URL": settings.redis_url,
                             "MONETA_AMQP_URL": settings.amqp_url}),
        db_prefix=f"moneta_soak_{run}_",
        redis_prefix=f"moneta-soak:{run}:",
        exchange=f"moneta.events.soak.{run}",
        MONETA_LOG_LEVEL="WARNING",
        # The wallets are funded from the platform's credit line.
        MONETA_COMPANY_CREDIT_LIMIT="1000000000",
        **({} if "postgres" in have else {"MONETA_DB_POOL_MAX": "6"}),
    )  # fmt: skip
    try:
        await asyncio.to_thread(mesh.start)
        return await _measure(mesh, minutes, rate, warmup, infra_private=have)
    finally:
        await asyncio.to_thread(mesh.stop)
        with contextlib.suppress(Exception):
            await delete_mesh_topology(mesh)
        infra.close()


async def _measure(
    mesh: Mesh, minutes: float, rate: float, warmup: float, infra_private: list[str]
) -> dict[str, Any]:
    load_before = list(os.getloadavg())
    population = await populate(
        mesh, senders=40, receivers=20, depositors=10, bookers=10,
        sender_balance=100_000_00, sender_budget=50_000_00,
    )  # fmt: skip
    journal = Journal()
    http = LeanHttp(mesh.gateway_url, timeout=10.0)
    try:
        publisher = EventPublisher(mesh)
        client = Client(mesh, http, publisher, journal)
        client.give_up_at = 0.0  # one attempt each: the soak counts, it does not retry
        load = Soak(mesh, population, client, rate)
        seconds = minutes * 60
        memory: dict[str, dict[str, int]] = {}

        async def tick(elapsed: float) -> None:
            rss = {name: rss_bytes(pid) for name, pid in mesh.pids().items()}
            if elapsed >= warmup and "after_warmup" not in memory:
                memory["after_warmup"] = rss
            memory["end"] = rss
            recent = [s for s in load.samples if s.due >= load.started + elapsed - WINDOW_SECONDS]
            w = window_figures(recent, WINDOW_SECONDS)
            print(f"{elapsed:6.0f}s  {w['per_second']:6.1f}/s  p50 {w['p50_ms']:7.2f} ms"
                  f"  p99 {w['p99_ms']:8.2f} ms  errors {w['errors']}", flush=True)  # fmt: skip

        await load.run(seconds, tick)
        windows = load.windows()
        load.mark_overlapping_payments()
        # Every request left without an answer is asked again (its key), then
        # the invariants are checked on all that the load moved.
        unanswered = len(journal.unsettled())
        left = await settle_unsettled(client, population, seconds=600.0)
        report = await check(mesh, population, journal, client, quiet_seconds=180.0)
        await publisher.close()
    finally:
        await http.aclose()

    statuses = Counter(s.status for s in load.samples)
    # An arrival the load could not even send (too many in flight) was not
    # served either: it counts as an error.
    errors = sum(count for status, count in statuses.items() if is_error(status)) + load.dropped
    total = len(load.samples) + load.dropped
    growth = {
        name: round(100.0 * (memory["end"][name] - before) / before, 1)
        for name, before in memory.get("after_warmup", {}).items()
        if before and name in memory["end"]
    }
    by_kind = {
        kind: window_figures([s for s in load.samples if s.kind == kind], load.seconds)
        for kind in MIX
    }
    return {
        "machine": machine(),
        "settings": {
            "minutes": minutes,
            "offered_per_second": rate,
            "warmup_seconds": warmup,
            "mix": MIX,
            "events_per_second": EVENTS_PER_SECOND,
            "private_servers": infra_private,
        },
        "requests": total,
        "dropped_arrivals": load.dropped,
        "unanswered_then_retried": unanswered,
        "unanswered_after_retries": len(left),
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))},
        "errors": errors,
        "error_rate": errors / total if total else 0.0,
        "overall": window_figures(load.samples, load.seconds),
        # Other work on the machine shows in the tails: its load before and after.
        "load_average": {"before": load_before, "after": list(os.getloadavg())},
        "by_kind": by_kind,
        "windows": windows,
        "events_published": dict(load.events),
        "rss_bytes": memory,
        "rss_growth_percent": growth,
        "invariants": {
            "ok": not report.problems,
            "problems": report.problems[:50],
            "figures": {k: v for k, v in report.figures.items() if k != "journal"},
        },
        "headlines": [
            {
                # The offered rate in the name: a soak below the target rate
                # must not read as the target met.
                "metric": f"soak error rate (non-4xx) at {rate:g}/s for {minutes:g} min",
                "value": errors / total if total else 0.0,
                "unit": "",
                "target": TARGET_ERROR_RATE,
                "better": "lower",
            },
            {
                "metric": f"soak worst 30 s window p99 at {rate:g}/s",
                "unit": "ms",
                "better": "lower",
                "value": max((w["p99_ms"] for w in windows), default=0.0),
                "target": None,
            },
            *(
                {
                    "metric": f"soak RSS growth at {rate:g}/s, {name}",
                    "value": value,
                    "unit": "%",
                    "target": TARGET_RSS_GROWTH_PERCENT,
                    "better": "lower",
                }
                for name, value in growth.items()
            ),
        ],
        "series": [
            {
                "name": "soak p99 per 30 s window",
                "x_label": "seconds",
                "y_label": "p99 ms",
                "points": [[w["from_s"], w["p99_ms"]] for w in windows],
            },
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    parser.add_argument("--rate", type=float, default=200.0, help="requests a second (200)")
    parser.add_argument(
        "--warmup", type=float, default=None,
        help="seconds before the first memory figure (default: 60, or a quarter of a short run)",
    )  # fmt: skip
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else min(60.0, args.minutes * 60 / 4)
    with tempfile.TemporaryDirectory(prefix="moneta-soak-") as logs:
        results = uvloop.run(soak(args.minutes, args.rate, warmup, Path(logs)))
    path = write_results("soak", results)
    print(f"error rate {results['error_rate']:.4%} ({results['errors']} of {results['requests']}),"
          f" overall p99 {results['overall']['p99_ms']} ms")  # fmt: skip
    for name, value in results["rss_growth_percent"].items():
        print(f"  {name:10s} RSS {value:+.1f}%")
    print(f"invariants: {'ok' if results['invariants']['ok'] else 'BROKEN'}; written {path}")
    if not results["invariants"]["ok"]:
        for problem in results["invariants"]["problems"][:20]:
            print("  ", problem)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
