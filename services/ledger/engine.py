"""Group commit, pipelined: concurrent CreateTransfers calls share database
transactions, and one batch is computed while the one before it is written.

Every call puts its transfers on one queue. The writer takes what is queued
(up to 8,000 transfers), applies it in arrival order, and answers each caller
with its own results once that batch has committed. While a batch commits,
new calls queue up, so under load batches grow by themselves and a hot
account pays one row update per batch, not one per transfer; when idle, a
lone call is committed at once.

A batch has two halves: reading and applying it in Python (prepare), then
writing and committing it in PostgreSQL (write). The writer overlaps them,
two batches deep: while batch N is written, batch N+1 is prepared. It does
so once a few hundred transfers are queued (``OVERLAP_FROM``); fewer wait
for N and join the batch after it, as many small calls would otherwise make
twice as many batches, each half as large. With nothing in flight and twice
that queued, it takes about half, so that the other half is prepared while
the first is written.

- N+1 starts from N's overlay: every account and transfer N read or wrote, as
  N leaves them. The rest it reads plainly, without locks and outside any
  transaction: N writes nothing outside its overlay, and every batch older
  than N has finished, so those reads see all they need.
- N+1 is written only after N has finished, and only if N committed exactly
  what N+1 assumed. If N's write was refused, N is applied again from fresh
  locked reads (the serial path, ``handlers.apply_items``), and so is N+1.
- A write is one statement, its own transaction, that checks what the batch
  rests on (``store.write_batch``): each account it looked at still has the
  balances, status and overdraft limit it started from; each transfer it
  changed, the status and amount reversed it read. If anything changed behind
  its back (another replica, CloseAccount, a second writer), nothing is
  written and the batch is applied again from fresh locked reads. So a batch
  never writes balances computed from a state that is gone.
- A refused write means another writer is on the same rows (a replica, say).
  Racing it again would mostly waste work, so the next batches are applied
  serially, their locks queueing behind the other writer's, before the
  writer overlaps again (``BACK_OFF_MAX``).
- Nobody is answered before their own batch commits. A transfer id that N
  created is EXISTS for N+1 only if N commits, since N+1 commits only then.
  The same id created by another replica at the same moment fails one of the
  two inserts (a unique violation), and that batch is applied again.

Why this cannot deadlock. The one wait PostgreSQL cannot see is N+1 waiting
in Python for N's outcome. While it waits, N+1 holds no lock and no open
transaction: its reads were plain and its write is not sent yet. Every batch
that does hold locks is either a write (one statement) or a serial redo, and
neither waits in Python for another batch. So no lock wait ever ends at a
batch that waits in Python, and every cycle of waits is made of lock waits
alone, which PostgreSQL detects and breaks (DeadlockDetected: the batch is
applied again). That is why N+1 reads without locks. Had it taken its reads
FOR UPDATE and then waited for N, cycles would close out of PostgreSQL's
sight: with two replicas A and B, each writing N while N+1 waits, A's N
updates a row of its overlay (one it never locked) that B's N+1 has locked;
B's N+1 waits for B's N, whose write needs a row A's N+1 has locked; A's N+1
waits for A's N. Deeper pipelines can close such cycles within one process.

Why two deep. The two halves use different resources, the Python thread and
the database, so two batches keep both busy; a third could only queue for
one of them. And at two, when N+1 is prepared, everything older than N is
committed, so one overlay (N's) is all it needs. A third batch would need
the overlays of both batches before it, and a refused write would redo two.

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
# Fewer queued transfers than this are not prepared beside a batch in
# flight: they wait and join the next batch. Preparing them would save less
# than a second batch costs (a statement, its plan, a commit), and small
# calls would otherwise make twice as many batches, each half as large.
OVERLAP_FROM = 256

# After a refused write (another writer changed rows the batch read: a
# replica on the same accounts, say), the next batches are applied serially,
# their locks queueing behind the other writer's instead of racing it: one
# batch after the first refusal, twice as many after each one in a row, at
# most this many; then the writer tries overlapping again.
BACK_OFF_MAX = 64

REDONE = Counter(
    "moneta_ledger_batches_redone_total",
    "Pipelined batches applied again from fresh locked reads, by why: stale (something"
    " they read changed before their write), predecessor (the batch before was redone),"
    " error (their write failed otherwise).",
    ["reason"],
)


@dataclass
class _Queued:
    item: handlers.BatchItem
    size: int
    done: asyncio.Future[list[TransferOutcome]]
    # Event-loop time after which the caller no longer waits.
    deadline: float | None = None


@dataclass
class _InFlight:
    """A batch being written, and what it leaves behind if it commits."""

    overlay: handlers.Overlay
    # True once it committed exactly as prepared; False if it was redone.
    committed_as_prepared: asyncio.Task[bool]


class TransferEngine:
    def __init__(
        self,
        pool: asyncpg.Pool,
        max_batch: int = MAX_BATCH,
        *,
        pipelined: bool = True,
        overlap_from: int = OVERLAP_FROM,
    ) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._pipelined = pipelined
        self._overlap_from = overlap_from
        self._queue: collections.deque[_Queued] = collections.deque()
        self._queued = 0  # transfers in the queue
        # Contention back-off: batches still to apply serially, and how many
        # the next refusal in a row sets.
        self._serial_left = 0
        self._serial_next = 1
        self._wake = asyncio.Event()
        # Batches applied again, by reason (the REDONE counter, per engine).
        self.redone: collections.Counter[str] = collections.Counter()
        # Batches prepared while the one before them was being written.
        self.overlapped = 0
        # Batches applied serially because writes were refused (contention).
        self.backed_off = 0

    @property
    def queued(self) -> int:
        """Transfers waiting for a batch."""
        return self._queued

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
        self._queued += size
        self._wake.set()
        # A caller that gives up (deadline, cancellation) cancels only its
        # wait: its request stays queued (the batch skips answering a
        # cancelled future), its transfers may still commit, and its retry
        # sees EXISTS. No shield: that is two more futures on every call.
        return await done

    def _take_batch(self, limit: int) -> list[_Queued]:
        """What the next transaction applies: the queue's head, and whatever
        follows it that fits in ``limit`` transfers. Requests whose caller
        gave up are dropped."""
        now = asyncio.get_running_loop().time()
        batch: list[_Queued] = []
        total = 0
        while self._queue and (not batch or total + self._queue[0].size <= limit):
            queued = self._queue.popleft()
            self._queued -= queued.size
            if queued.deadline is not None and queued.deadline <= now:
                DROPPED.inc(queued.size)
                _fail(queued, DeadlineExceeded("the request's deadline passed while it queued"))
                continue
            batch.append(queued)
            total += queued.size
        return batch

    async def run(self) -> None:
        """The writer. Runs until cancelled; one per process (two would race
        for the same accounts and redo each other's batches)."""
        if not self._pipelined:
            await self._run_serially()
            return
        older: _InFlight | None = None
        try:
            while True:
                if older is not None and older.committed_as_prepared.done():
                    older = None
                if not self._queue or (older and self._queued < self._overlap_from):
                    # Woken by a new call, or by the batch in flight finishing.
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if self._serial_left:
                    # Backing off: the batch in flight finishes first.
                    if older is not None:
                        await older.committed_as_prepared
                        continue
                    batch = self._take_batch(self._max_batch)
                    if batch:
                        self._serial_left -= 1
                        self.backed_off += 1
                        await self._commit(batch)
                    continue
                batch = self._take_batch(self._batch_limit(older is not None))
                if batch:
                    older = await self._prepare_and_write(batch, older)
        finally:
            if older is not None:
                older.committed_as_prepared.cancel()

    def _batch_limit(self, in_flight: bool) -> int:
        """How many transfers the next batch may take. With none in flight
        and enough queued for two batches worth overlapping, about half: the
        other half is prepared while the first is written, and callers fall
        into two groups that take turns. Otherwise all that fits."""
        if not in_flight and self._queued >= 2 * self._overlap_from:
            return min(self._max_batch, (self._queued + 1) // 2)
        return self._max_batch

    async def _prepare_and_write(
        self, batch: list[_Queued], older: _InFlight | None
    ) -> _InFlight | None:
        """Prepares ``batch`` (on ``older``'s overlay while that is being
        written), waits for ``older`` to finish, and starts writing the
        batch. Returns the batch in flight, or None if it was applied
        serially instead."""
        items = [q.item for q in batch]
        started = asyncio.get_running_loop().time()
        try:
            prepared = await handlers.prepare_items(
                self._pool, items, older.overlay if older else handlers.NO_OVERLAY
            )
        except Exception as exc:  # reading failed: the serial path answers
            log.warning("batch_prepare_failed", error=type(exc).__name__)
            prepared = None
        if older is not None:
            self.overlapped += 1
            # The one wait outside the database: this batch holds no lock now.
            if not await older.committed_as_prepared and prepared is not None:
                self._count_redo("predecessor")
                prepared = None
        if prepared is None:
            await self._commit(batch)
            return None
        task = asyncio.create_task(self._write(batch, prepared, started))
        return _InFlight(prepared.overlay, task)

    async def _write(
        self, batch: list[_Queued], prepared: handlers.PreparedBatch, started: float
    ) -> bool:
        """Writes a prepared batch and answers its callers; if the write is
        refused, applies the batch again serially. True if it committed as
        prepared."""
        try:
            await handlers.write_prepared(self._pool, prepared)
        except Exception as exc:
            stale = isinstance(exc, store.StaleBatch)
            self._count_redo("stale" if stale else "error")
            log.info("batch_redone", reason="stale" if stale else type(exc).__name__)
            # Another writer is on the same rows: queue behind it under locks
            # for a while rather than race it again.
            self._serial_left = self._serial_next
            self._serial_next = min(2 * self._serial_next, BACK_OFF_MAX)
            await self._commit(batch)
            return False
        finally:
            self._wake.set()
        self._serial_next = 1
        self._answer(batch, prepared.results, started)
        return True

    def _count_redo(self, reason: str) -> None:
        self.redone[reason] += 1
        REDONE.labels(reason).inc()

    async def _run_serially(self) -> None:
        """One batch at a time, each read under locks, applied and committed
        before the next is taken (MONETA_LEDGER_PIPELINE=false)."""
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._take_batch(self._max_batch)
            if batch:
                await self._commit(batch)

    async def _commit(self, batch: list[_Queued]) -> None:
        """Applies a batch serially: locked reads, apply, write, commit."""
        started = asyncio.get_running_loop().time()
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
        self._answer(batch, results, started)

    def _answer(
        self, batch: list[_Queued], results: list[list[TransferOutcome]], started: float
    ) -> None:
        BATCH_SIZE.observe(sum(q.size for q in batch))
        BATCH_SECONDS.observe(asyncio.get_running_loop().time() - started)
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
