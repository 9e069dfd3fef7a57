"""The pipelined writer against the real PostgreSQL: a batch prepared on the
overlay of the batch before it, and written only if nothing it read changed.

First the write's check on its own (prepare, change something behind the
batch's back, write), then the engine: another writer holds an account
locked, so that the engine's write waits for it while the test changes the
account and commits; then random histories through the pipeline against the
same requests applied serially in memory; then two pipelined writers, a
serial one and CloseAccount on the same accounts at once.

These tests use a database of their own, so that VerifyLedger checks exactly
what they wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime

import asyncpg
import pytest

from services.common.db import DbConn
from services.common.errors import FailedPrecondition
from services.ledger import handlers, store
from services.ledger.domain import (
    MAX_BATCH,
    LedgerBatch,
    TransferCode,
    TransferOutcome,
    TransferSpec,
    TransferType,
    apply_batch,
)
from services.ledger.engine import TransferEngine
from tests.conftest import TestRun, service_pool
from tests.integration.test_ledger_store import (
    new_id,
    open_accounts,
    post,
    transfer,
    wallet_spec,
    world_spec,
)

OK = TransferCode.OK


@pytest.fixture(scope="module")
async def pool(test_run: TestRun) -> AsyncIterator[asyncpg.Pool]:
    pool = await service_pool(test_run, "ledger", database="ledger_pipeline")
    yield pool
    await pool.close()


async def funded(pool: asyncpg.Pool, amount: int, wallets: int = 1) -> list[str]:
    """The outside world, and wallets holding ``amount`` each."""
    world, *ids = await open_accounts(pool, world_spec(), *(wallet_spec() for _ in range(wallets)))
    codes = await post(pool, *(transfer(world, w, amount) for w in ids))
    assert codes == [OK] * wallets
    return [world, *ids]


async def posted(pool: asyncpg.Pool, *account_ids: str) -> list[int]:
    states, _ = await handlers.get_balances(pool, account_ids, None)
    return [s.posted for s in states]


async def stored(pool: asyncpg.Pool, *specs: TransferSpec) -> int:
    return len(await handlers.lookup_transfers(pool, [s.id for s in specs]))


async def verified(pool: asyncpg.Pool) -> list[dict[str, object]]:
    discrepancies, _ = await handlers.verify_ledger(pool)
    return discrepancies


def codes(outcomes: Sequence[TransferOutcome]) -> list[TransferCode]:
    return [o.code for o in outcomes]


async def prepare(
    pool: asyncpg.Pool, *specs: TransferSpec, on: handlers.PreparedBatch | None = None
) -> handlers.PreparedBatch:
    """One request prepared as the pipeline does, on ``on``'s overlay."""
    overlay = on.overlay if on is not None else handlers.NO_OVERLAY
    return await handlers.prepare_items(pool, [list(specs)], overlay)


async def move(conn: DbConn, *specs: TransferSpec) -> None:
    """What another writer's batch does, on ``conn`` (in its transaction):
    lock the accounts, apply, write."""
    ids = sorted({uuid.UUID(a) for s in specs for a in (s.debit_account_id, s.credit_account_id)})
    accounts = await store.lock_accounts(conn, ids)
    now = datetime.now(UTC)
    result = apply_batch(specs, accounts, {}, now)
    assert codes(result.outcomes) == [OK] * len(specs)
    await store.write_batch(conn, result, now)


# ---------------------------------------------------------------- the write's check


async def test_a_batch_whose_account_another_writer_changed_since_it_read_it_writes_nothing(
    pool: asyncpg.Pool,
) -> None:
    world, payer, payee, elsewhere, bystander = await funded(pool, 100, wallets=4)
    spend, unrelated = transfer(payer, payee, 50), transfer(world, bystander, 5)
    prepared = await prepare(pool, spend, unrelated)
    assert codes(prepared.results[0]) == [OK, OK]
    async with pool.acquire() as conn, conn.transaction():
        await move(conn, transfer(payer, elsewhere, 60))

    with pytest.raises(store.StaleBatch, match="accounts unchanged 3 of 4"):
        await handlers.write_prepared(pool, prepared)

    assert await stored(pool, spend, unrelated) == 0
    assert await posted(pool, payer, payee, bystander) == [40, 100, 100]
    assert await verified(pool) == []


async def test_a_batch_whose_account_was_closed_since_it_read_it_writes_nothing(
    pool: asyncpg.Pool,
) -> None:
    world, empty = await open_accounts(pool, world_spec(), wallet_spec())
    credit = transfer(world, empty, 10)
    prepared = await prepare(pool, credit)
    await handlers.close_account(pool, empty, "closed behind the batch's back")

    with pytest.raises(store.StaleBatch):
        await handlers.write_prepared(pool, prepared)

    assert await stored(pool, credit) == 0
    assert await posted(pool, empty) == [0]


async def test_a_batch_whose_transfer_was_reversed_since_it_read_it_writes_nothing(
    pool: asyncpg.Pool,
) -> None:
    world, wallet = await open_accounts(pool, world_spec(), world_spec())
    original = transfer(world, wallet, 100)
    assert await post(pool, original) == [OK]

    def reversal() -> TransferSpec:
        return TransferSpec(new_id(), "", "", 100, "", type=TransferType.REVERSAL,
                            reverses_id=original.id)  # fmt: skip

    prepared = await prepare(pool, late := reversal())
    assert await post(pool, reversal()) == [OK]

    with pytest.raises(store.StaleBatch, match="transfers unchanged 0 of 1"):
        await handlers.write_prepared(pool, prepared)

    assert await stored(pool, late) == 0
    assert await posted(pool, wallet) == [0]
    assert await verified(pool) == []


async def test_a_batch_on_its_predecessors_overlay_commits_after_it(pool: asyncpg.Pool) -> None:
    _, payer, first, second = await funded(pool, 100, wallets=3)
    spend = transfer(payer, first, 30)
    older = await prepare(pool, spend)
    younger = await prepare(pool, transfer(payer, second, 60), spend, on=older)
    # The younger batch sees what the older one leaves: 70 left, and the
    # older's transfer stored.
    assert codes(younger.results[0]) == [OK, TransferCode.EXISTS]

    await handlers.write_prepared(pool, older)
    await handlers.write_prepared(pool, younger)

    assert await posted(pool, payer, first, second) == [10, 130, 160]
    assert await stored(pool, spend) == 1
    assert await verified(pool) == []


async def test_a_batch_written_before_its_predecessor_is_refused(pool: asyncpg.Pool) -> None:
    _, payer, first, second = await funded(pool, 100, wallets=3)
    older = await prepare(pool, transfer(payer, first, 30))
    younger = await prepare(pool, transfer(payer, second, 30), on=older)

    with pytest.raises(store.StaleBatch):
        await handlers.write_prepared(pool, younger)
    await handlers.write_prepared(pool, older)

    assert await posted(pool, payer, first, second) == [70, 130, 100]


# ---------------------------------------------------------------- the engine


def eager_engine(pool: asyncpg.Pool, max_batch: int = MAX_BATCH) -> TransferEngine:
    """An engine that prepares every batch beside the one in flight, however
    small (by default it waits for a few hundred transfers)."""
    return TransferEngine(pool, max_batch, overlap_from=1)


@contextlib.asynccontextmanager
async def running(engine: TransferEngine) -> AsyncIterator[TransferEngine]:
    task = asyncio.create_task(engine.run())
    try:
        yield engine
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def another_writer(pool: asyncpg.Pool, *account_ids: str) -> AsyncIterator[DbConn]:
    """Another writer mid-transaction (a replica, CloseAccount) holding the
    accounts locked; it commits when the block ends."""
    async with pool.acquire() as conn, conn.transaction():
        await store.lock_accounts(conn, [uuid.UUID(a) for a in account_ids])
        yield conn


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "never happened"
        await asyncio.sleep(0.005)


async def a_write_waits_for_a_lock(pool: asyncpg.Pool) -> None:
    async def waiting() -> bool:
        found = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE '%WITH changed_transfers AS%'"
        )
        return bool(found)

    await eventually(waiting)


async def submitted_while(
    engine: TransferEngine,
    pool: asyncpg.Pool,
    request: Sequence[TransferSpec],
    account: str,
    meanwhile: Callable[[DbConn], Awaitable[object]],
) -> list[TransferOutcome]:
    """Submits ``request``, whose write then waits for ``account``: another
    writer holds it, does ``meanwhile`` and commits."""
    async with another_writer(pool, account) as other:
        answer = asyncio.create_task(engine.submit(request))
        await a_write_waits_for_a_lock(pool)
        await meanwhile(other)
    return await answer


async def test_a_write_waiting_for_an_account_another_writer_then_changes_is_redone(
    pool: asyncpg.Pool,
) -> None:
    _, payer, payee, elsewhere = await funded(pool, 100, wallets=3)
    engine = eager_engine(pool)
    async with running(engine):
        outcomes = await submitted_while(
            engine, pool, [transfer(payer, payee, 50)], payer,
            lambda replica: move(replica, transfer(payer, elsewhere, 60)),
        )  # fmt: skip

    # Applied again from fresh reads: 40 left, not enough.
    assert codes(outcomes) == [TransferCode.INSUFFICIENT_FUNDS]
    assert engine.redone == {"stale": 1}
    assert await posted(pool, payer, payee, elsewhere) == [40, 100, 160]
    assert await verified(pool) == []


async def test_after_a_refused_write_the_next_batch_queues_behind_other_writers_under_locks(
    pool: asyncpg.Pool,
) -> None:
    _, payer, payee, elsewhere = await funded(pool, 100, wallets=3)
    engine = eager_engine(pool)
    async with running(engine):
        await submitted_while(
            engine, pool, [transfer(payer, payee, 10)], payer,
            lambda replica: move(replica, transfer(payer, elsewhere, 10)),
        )  # fmt: skip
        after = [await engine.submit([transfer(payer, payee, 10)]) for _ in range(2)]

    # One batch applied serially, then back to preparing without locks.
    assert (engine.redone, engine.backed_off) == ({"stale": 1}, 1)
    assert [codes(a) for a in after] == [[OK], [OK]]
    assert await posted(pool, payer, payee, elsewhere) == [60, 130, 110]


async def test_a_write_waiting_for_an_account_rewritten_unchanged_commits_on_its_new_version(
    pool: asyncpg.Pool,
) -> None:
    # A failed linked chain rewrites its accounts with the balances they had:
    # a new row version, the same values. The write checks values, and
    # updates the version it locked.
    _, payer, payee = await funded(pool, 100, wallets=2)
    engine = eager_engine(pool)
    async with running(engine):
        outcomes = await submitted_while(
            engine, pool, [transfer(payer, payee, 30)], payer,
            lambda replica: replica.execute(
                "UPDATE accounts SET debits_posted = debits_posted WHERE id = $1",
                uuid.UUID(payer),
            ),
        )  # fmt: skip

    assert codes(outcomes) == [OK]
    assert engine.redone == {}
    assert await posted(pool, payer, payee) == [70, 130]
    assert await verified(pool) == []


async def test_a_write_waiting_for_an_account_that_is_then_closed_is_redone(
    pool: asyncpg.Pool,
) -> None:
    world, empty = await open_accounts(pool, world_spec(), wallet_spec())
    engine = eager_engine(pool)
    async with running(engine):
        outcomes = await submitted_while(
            engine, pool, [transfer(world, empty, 10)], empty,
            lambda closer: store.mark_closed(closer, uuid.UUID(empty), "closed behind its back"),
        )  # fmt: skip

    assert codes(outcomes) == [TransferCode.ACCOUNT_CLOSED]
    assert engine.redone == {"stale": 1}
    assert await posted(pool, empty) == [0]


async def test_a_batch_prepared_on_a_predecessor_that_is_redone_is_redone_too(
    pool: asyncpg.Pool,
) -> None:
    _, payer, first, second, elsewhere = await funded(pool, 100, wallets=4)
    engine = eager_engine(pool)
    async with running(engine):
        async with another_writer(pool, payer) as replica:
            older = asyncio.create_task(engine.submit([transfer(payer, first, 30)]))
            await a_write_waits_for_a_lock(pool)
            younger = asyncio.create_task(engine.submit([transfer(payer, second, 30)]))

            async def prepared_on_the_older() -> bool:
                return engine.overlapped == 1

            await eventually(prepared_on_the_older)
            # The younger batch saw 70 left and answered OK, in memory.
            await move(replica, transfer(payer, elsewhere, 60))
        answers = [codes(await older), codes(await younger)]

    # From fresh reads: 40 left, then 10.
    assert answers == [[OK], [TransferCode.INSUFFICIENT_FUNDS]]
    assert engine.redone == {"stale": 1, "predecessor": 1}
    assert await posted(pool, payer, first, second, elsewhere) == [10, 130, 100, 160]
    assert await verified(pool) == []


async def test_a_transfer_the_predecessor_created_is_exists_only_if_the_predecessor_commits(
    pool: asyncpg.Pool,
) -> None:
    _, payer, payee, elsewhere = await funded(pool, 100, wallets=3)
    spend = transfer(payer, payee, 50)
    engine = eager_engine(pool)
    async with running(engine):
        async with another_writer(pool, payer) as replica:
            older = asyncio.create_task(engine.submit([spend]))
            await a_write_waits_for_a_lock(pool)
            # A retry: EXISTS on the older batch's overlay, and touching no account.
            younger = asyncio.create_task(engine.submit([spend]))

            async def prepared_on_the_older() -> bool:
                return engine.overlapped == 1

            await eventually(prepared_on_the_older)
            await move(replica, transfer(payer, elsewhere, 60))
        answers = [codes(await older), codes(await younger)]

    assert answers == [[TransferCode.INSUFFICIENT_FUNDS]] * 2
    assert engine.redone == {"stale": 1, "predecessor": 1}
    assert await stored(pool, spend) == 0


async def test_small_calls_arriving_while_a_batch_is_written_wait_and_share_the_next_batch(
    pool: asyncpg.Pool,
) -> None:
    world, payer, payee = await funded(pool, 100, wallets=2)
    later = [transfer(world, payee, 1) for _ in range(3)]
    engine = TransferEngine(pool)
    async with running(engine):
        async with another_writer(pool, payer):
            first = asyncio.create_task(engine.submit([transfer(payer, payee, 1)]))
            await a_write_waits_for_a_lock(pool)
            rest = [asyncio.create_task(engine.submit([t])) for t in later]

            async def all_queued() -> bool:
                return engine.queued == len(later)

            await eventually(all_queued)
        answers = [codes(await task) for task in (first, *rest)]

    assert answers == [[OK]] * 4
    assert engine.overlapped == 0
    moments = await pool.fetchval(
        "SELECT count(DISTINCT created_at) FROM transfers WHERE id = ANY($1::uuid[])",
        [uuid.UUID(t.id) for t in later],
    )
    assert moments == 1


# ---------------------------------------------------------------- random histories


class History:
    """Random requests over a few accounts: payments that may exceed the
    payer's money, holds, posts (whole or part) and voids of them,
    reversals, retries of earlier transfers (as they were, or changed), and
    linked chains."""

    def __init__(self, rng: random.Random, world: str, wallets: Sequence[str]) -> None:
        self.rng = rng
        self.world = world
        self.wallets = list(wallets)
        self.sent: list[TransferSpec] = []
        self.holds: list[TransferSpec] = []
        self.payments: list[TransferSpec] = []

    def request(self) -> list[TransferSpec]:
        size = self.rng.randint(1, 4)
        chained = size > 1 and self.rng.random() < 0.3
        specs = [self.transfer(linked=chained and i < size - 1) for i in range(size)]
        self.sent.extend(specs)
        return specs

    def transfer(self, *, linked: bool) -> TransferSpec:
        rng, roll = self.rng, self.rng.random()
        if roll < 0.1 and self.sent:
            again = rng.choice(self.sent)
            if rng.random() < 0.5:
                return replace(again, linked=linked)
            return replace(again, amount=again.amount + 1, linked=linked)
        if roll < 0.25 and self.holds:
            hold = rng.choice(self.holds)
            kind = rng.choice([TransferType.POST_PENDING, TransferType.VOID_PENDING])
            amount = rng.choice([0, rng.randint(1, hold.amount)])
            return TransferSpec(new_id(), "", "", amount, "", type=kind,
                                pending_id=hold.id, linked=linked)  # fmt: skip
        if roll < 0.35 and self.payments:
            original = rng.choice(self.payments)
            amount = rng.choice([0, rng.randint(1, original.amount)])
            return TransferSpec(new_id(), "", "", amount, "", type=TransferType.REVERSAL,
                                reverses_id=original.id, linked=linked)  # fmt: skip
        debit, credit = rng.sample([self.world, *self.wallets], 2)
        spec = transfer(debit, credit, rng.randint(1, 400), linked=linked)
        if roll < 0.5:
            spec = replace(spec, type=TransferType.PENDING)
            self.holds.append(spec)
        else:
            self.payments.append(spec)
        return spec


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_pipelined_batches_answer_as_one_serial_batch_would(
    pool: asyncpg.Pool, seed: int
) -> None:
    world, *wallets = await funded(pool, 500, wallets=5)
    history = History(random.Random(seed), world, wallets)
    requests = [history.request() for _ in range(150)]
    ids = [uuid.UUID(a) for a in (world, *wallets)]
    async with pool.acquire() as conn:
        before = await store.read_accounts(conn, ids)
    serial = LedgerBatch(before, {}, datetime.now(UTC))
    expected = [codes(serial.apply(r)) for r in requests]
    after = serial.result().accounts_after

    # Small batches: about forty of them, each prepared while the one
    # before it is written.
    engine = eager_engine(pool, max_batch=12)
    async with running(engine):
        answers = await asyncio.gather(*(engine.submit(r) for r in requests))

    assert [codes(a) for a in answers] == expected
    assert engine.overlapped >= 20 and engine.redone == {}
    states, _ = await handlers.get_balances(pool, [str(i) for i in ids], None)
    assert [s.balances() for s in states] == [after[i].balances() for i in ids]
    assert await verified(pool) == []


# ---------------------------------------------------------------- writers at once


async def test_pipelined_writers_a_serial_one_and_closing_on_the_same_accounts_keep_the_books(
    pool: asyncpg.Pool,
) -> None:
    world, *hot = await funded(pool, 5_000, wallets=8)
    closable = await open_accounts(pool, *(wallet_spec() for _ in range(8)))
    engines = [eager_engine(pool), eager_engine(pool)]
    rng = random.Random(11)
    answered: list[tuple[TransferSpec, TransferCode]] = []

    async def client(turn: int) -> None:
        for _ in range(25):
            batch = []
            for _ in range(rng.randint(1, 12)):
                if rng.random() < 0.1:
                    batch.append(transfer(world, rng.choice(closable), 1))
                else:
                    debit, credit = rng.sample(hot, 2)
                    batch.append(transfer(debit, credit, rng.randint(1, 1_500)))
            if turn % 3 == 2:
                outcomes = await handlers.create_transfers(pool, batch)
            else:
                outcomes = await engines[turn % 3].submit(batch)
            answered.extend((s, o.code) for s, o in zip(batch, outcomes, strict=True))

    async def closer() -> None:
        for account in closable:
            await asyncio.sleep(rng.random() / 20)
            with contextlib.suppress(FailedPrecondition):  # credited first
                await handlers.close_account(pool, account, "closing under load")

    async with running(engines[0]), running(engines[1]):
        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(12)), closer()), 60)

    assert sum((e.redone for e in engines), Counter()).total() > 0
    refused = Counter(code for _, code in answered if code != OK)
    assert set(refused) <= {TransferCode.INSUFFICIENT_FUNDS, TransferCode.ACCOUNT_CLOSED}
    net: Counter[str] = Counter()
    for spec, code in answered:
        if code == OK:
            net[spec.credit_account_id] += spec.amount
            net[spec.debit_account_id] -= spec.amount
    accounts = [*hot, *closable]
    found = await posted(pool, *accounts)
    assert found == [net[a] + (5_000 if a in hot else 0) for a in accounts]
    # A closed account was empty when closed and was credited nothing after.
    rows = await handlers.lookup_accounts(pool, closable)
    assert {r["credits_posted"] for r in rows if r["status"] == 2} <= {0}
    assert await verified(pool) == []
