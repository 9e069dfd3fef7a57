"""Group commit: concurrent CreateTransfers calls share database transactions.

Every call puts its transfers on one queue. A writer takes everything queued
(up to 8,000 transfers), applies it in arrival order in one transaction, and
answers each caller with its own results once that transaction has committed.
A process runs a few writers (``MONETA_LEDGER_WRITERS``), so that one batch is
prepared while another is in the database. While it commits, new calls queue up, so under load
batches grow by themselves and a hot account pays one row update per batch,
not one per transfer; when idle, a lone call is committed at once.

Nothing is answered OK before its batch commits. If the process dies
mid-batch, the transaction rolls back: nothing of the batch is visible, and
the clients' retries with the same ids apply exactly once.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import structlog
from prometheus_client import Counter, Histogram

from services.common.errors import DeadlineExceeded, Unavailable, unavailable_from
from services.ledger import handlers, store
from services.ledger.domain import MAX_BATCH, TransferOutcome, TransferSpec

log = structlog.get_logger("moneta.ledger.engine")

BATCH_SIZE = Histogram(
    "moneta_ledger_batch_transfers",
    "Transfers committed per database transaction.",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 8000),
)
DROPPED = Counter(
    "moneta_ledger_dropped_transfers_total",
    "Transfers dropped unapplied because their caller's deadline passed while they queued.",
)
BATCH_SECONDS = Histogram(
    "moneta_ledger_batch_commit_seconds",
    "Time to apply and commit one batch.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


@dataclass
class _Queued:
    item: handlers.BatchItem
    size: int
    done: asyncio.Future[list[TransferOutcome]]
    # Event-loop time after which the caller no longer waits.
    deadline: float | None = None


class TransferEngine:
    def __init__(self, pool: asyncpg.Pool, max_batch: int = MAX_BATCH) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._queue: collections.deque[_Queued] = collections.deque()
        self._wake = asyncio.Event()

    async def submit(
        self, specs: Sequence[TransferSpec], deadline: float | None = None
    ) -> list[TransferOutcome]:
        """Applies one request's transfers; answers after their batch commits.

        A request still queued when its caller's ``deadline`` passes is
        dropped, never applied: so a caller that timed out knows its
        transfers either committed within about one batch of the deadline or
        never will, and can settle its own books (the wallet's reconciler
        relies on it)."""
        if not specs:
            return []
        return await self._enqueue(list(specs), len(specs), deadline)

    async def expire(self, hold_ids: Sequence[uuid.UUID]) -> None:
        """Releases holds whose timeout has passed, in the same order as
        every other write."""
        if hold_ids:
            await self._enqueue(handlers.ExpireHolds(list(hold_ids)), len(hold_ids))

    async def _enqueue(
        self, item: handlers.BatchItem, size: int, deadline: float | None = None
    ) -> list[TransferOutcome]:
        done: asyncio.Future[list[TransferOutcome]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(item, size, done, deadline))
        self._wake.set()
        # A caller that gives up (deadline, cancellation) does not cancel the
        # batch: its transfers may still commit, and its retry sees EXISTS.
        return await asyncio.shield(done)

    def _take_batch(self) -> list[_Queued]:
        """What the next transaction applies: the queue's head, and whatever
        follows it that fits. Requests whose caller gave up are dropped."""
        now = asyncio.get_running_loop().time()
        batch: list[_Queued] = []
        total = 0
        while self._queue and (not batch or total + self._queue[0].size <= self._max_batch):
            queued = self._queue.popleft()
            if queued.deadline is not None and queued.deadline <= now:
                DROPPED.inc(queued.size)
                _fail(queued, DeadlineExceeded("the request's deadline passed while it queued"))
                continue
            batch.append(queued)
            total += queued.size
        return batch

    async def run(self) -> None:
        """A writer. Runs until cancelled. With more than one, a batch is
        prepared in Python while the previous one is in PostgreSQL; their
        locks (transfers, then accounts, in id order) keep them apart."""
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._take_batch()
            if batch:
                await self._commit(batch)

    async def _commit(self, batch: list[_Queued]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            results = await handlers.apply_items(self._pool, [q.item for q in batch])
        except Exception as exc:
            unavailable = unavailable_from(exc)
            if unavailable is not None:
                # The database is unreachable: every caller gets UNAVAILABLE
                # and may retry with the same ids.
                log.warning("batch_failed", error=str(exc))
                for queued in batch:
                    _fail(queued, unavailable)
                return
            if len(batch) == 1:
                _fail(batch[0], exc)
                return
            # One request must not sink the others: apply them one by one.
            log.warning("batch_split", error=type(exc).__name__, requests=len(batch))
            for queued in batch:
                await self._commit([queued])
            return
        BATCH_SIZE.observe(sum(q.size for q in batch))
        BATCH_SECONDS.observe(loop.time() - started)
        for queued, result in zip(batch, results, strict=True):
            if not queued.done.done():
                queued.done.set_result(result)


def _fail(queued: _Queued, exc: BaseException) -> None:
    if not queued.done.done():
        queued.done.set_exception(exc)


async def sweep_expired_holds(
    pool: asyncpg.Pool, engine: TransferEngine, every_seconds: float = 1.0, limit: int = 1000
) -> None:
    """Expires holds whose timeout has passed, releasing their money."""
    while True:
        due: list[uuid.UUID] = []
        try:
            async with pool.acquire() as conn:
                due = await store.due_holds(conn, limit)
            await engine.expire(due)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, Unavailable) as exc:
            log.warning("hold_sweep_failed", error=str(exc))
        if len(due) < limit:  # caught up: wait for more to fall due
            await asyncio.sleep(every_seconds)
