"""Group commit: many requests' writes applied by one statement and one commit.

A request's item waits while a batch is being applied; when that batch has
committed, every item that arrived meanwhile is applied together. Under light
load a batch is one item and costs what applying it alone did; under heavy
load many requests share one round trip, one commit (one WAL flush) and, on
a hot row, one lock acquisition. Nothing is delayed on purpose: the batch in
flight is the only wait.

``apply(conn, items)`` writes a batch in one statement (so atomically) and
returns one result per item, in order. A batch the database refuses as a
whole (a constraint, a deadlock, bad data) is applied again one item at a
time, so that one bad item fails its own caller only. A lost connection
fails the batch's callers, whose retries (idempotent, as every money write
here is) find what was committed. A caller that gives up before its batch
starts is dropped unapplied (unless the writer keeps abandoned items: a
record that must exist whoever waits for it); one that gives up later does
not stop its item. With ``key``, a batch holds at most one item per key:
a second waits for the next batch, where it finds what the first wrote.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import asyncpg
import structlog
from prometheus_client import Counter, Histogram

from services.common.db import DbConn
from services.common.errors import unavailable_from

log = structlog.get_logger("moneta.group_commit")

BATCH_SIZE = Histogram(
    "moneta_group_commit_batch_size",
    "Items applied by one statement and one commit, by writer.",
    ["writer"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)

REFUSED = Counter(
    "moneta_group_commit_refused_total",
    "Batches the database refused as a whole, applied again item by item, by writer.",
    ["writer"],
)

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(slots=True)
class _Waiting(Generic[Item, Result]):
    item: Item
    answer: asyncio.Future[Result]


class GroupCommit(Generic[Item, Result]):
    def __init__(
        self,
        pool: asyncpg.Pool,
        apply: Callable[[DbConn, Sequence[Item]], Awaitable[Sequence[Result]]],
        name: str,
        max_batch: int = 256,
        key: Callable[[Item], Hashable] | None = None,
        keep_abandoned: bool = False,
    ) -> None:
        self._pool = pool
        self._apply = apply
        self._name = name
        self._max_batch = max_batch
        self._key = key
        self._keep_abandoned = keep_abandoned
        self._queue: list[_Waiting[Item, Result]] = []
        self._writer: asyncio.Task[None] | None = None
        self._sizes = BATCH_SIZE.labels(name)
        self._refused = REFUSED.labels(name)

    @property
    def pool(self) -> asyncpg.Pool:
        """The pool batches are written through, for the caller's other work."""
        return self._pool

    async def submit(self, item: Item) -> Result:
        """The item's result, once the batch it was applied in has committed."""
        answer: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(item, answer))
        if self._writer is None:
            # A context of its own: the writer serves many requests, not the first one's.
            self._writer = asyncio.create_task(self._write_all(), context=contextvars.Context())
        return await answer

    async def _write_all(self) -> None:
        try:
            while self._queue:
                batch = self._next_batch()
                if not batch:
                    continue
                try:
                    await self._write(batch)
                except BaseException as exc:
                    for waiting in batch:
                        _answer(waiting, exc)
                    if not isinstance(exc, Exception):
                        raise
        finally:
            self._writer = None
            for waiting in self._queue:  # left only when the writer itself was cancelled
                _answer(waiting, asyncio.CancelledError())
            self._queue.clear()

    def _next_batch(self) -> list[_Waiting[Item, Result]]:
        """The oldest waiting items, up to ``max_batch``, one per key."""
        batch: list[_Waiting[Item, Result]] = []
        rest: list[_Waiting[Item, Result]] = []
        keys: set[Hashable] = set()
        for waiting in self._queue:
            if waiting.answer.done() and not self._keep_abandoned:
                continue
            if len(batch) >= self._max_batch:
                rest.append(waiting)
                continue
            if self._key is not None:
                key = self._key(waiting.item)
                if key in keys:
                    rest.append(waiting)
                    continue
                keys.add(key)
            batch.append(waiting)
        self._queue = rest
        return batch

    async def _write(self, batch: list[_Waiting[Item, Result]]) -> None:
        self._sizes.observe(len(batch))
        async with self._pool.acquire() as conn:
            try:
                results = await self._apply(conn, [w.item for w in batch])
            except asyncpg.PostgresError as exc:
                if len(batch) == 1 or unavailable_from(exc) is not None:
                    raise
                self._refused.inc()
                log.warning("batch_refused", writer=self._name, size=len(batch),
                            error=str(exc)[:200])  # fmt: skip
                for waiting in batch:
                    await self._write_alone(conn, waiting)
                return
        for waiting, result in zip(batch, results, strict=True):
            _answer(waiting, result)

    async def _write_alone(self, conn: DbConn, waiting: _Waiting[Item, Result]) -> None:
        try:
            (result,) = await self._apply(conn, [waiting.item])
        except asyncpg.PostgresError as exc:
            if unavailable_from(exc) is not None:
                raise
            _answer(waiting, exc)
        else:
            _answer(waiting, result)


def _answer(waiting: _Waiting[Item, Result], outcome: Result | BaseException) -> None:
    if waiting.answer.done():  # its caller gave up
        return
    if isinstance(outcome, asyncio.CancelledError):
        waiting.answer.cancel()
    elif isinstance(outcome, BaseException):
        waiting.answer.set_exception(outcome)
    else:
        waiting.answer.set_result(outcome)
