"""Reserve, Commit and Release group-committed through one shared writer, as
the service runs them: many requests to a statement and a commit, with the
same answers and the same guarantees as one at a time."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest
from prometheus_client import REGISTRY

from services.budget import handlers, store
from services.budget.domain import ReservationStatus
from services.budget.handlers import ReservationWriter
from services.common.db import DbConn
from tests.integration.test_budget_reservations import (
    DEFAULT_TTL,
    RATES,
    create_budget,
    held,
    reserve_command,
    reserve_outcome,
)


def batches_written() -> tuple[float, float]:
    """(batches, items) the reservation writers have written in this process."""
    labels = {"writer": "budget_reservations"}
    count = REGISTRY.get_sample_value("moneta_group_commit_batch_size_count", labels) or 0.0
    total = REGISTRY.get_sample_value("moneta_group_commit_batch_size_sum", labels) or 0.0
    return count, total


async def test_concurrent_reserves_through_one_writer_share_commits_and_never_overspend(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id, total_amount=5_000)
    writer = ReservationWriter(budget_pool)
    batches_before, items_before = batches_written()

    outcomes = await asyncio.gather(
        *(reserve_outcome(writer, reserve_command(user_id, 100)) for _ in range(100))
    )

    assert outcomes.count("RESERVED") == 50
    assert outcomes.count("BUDGET_EXCEEDED") == 50
    assert await held(budget_pool, budget_id) == (0, 5_000)
    batches, items = batches_written()
    assert items - items_before == 100
    assert batches - batches_before < 100 / 4  # many to a commit, not one each


async def test_a_hot_budget_reserved_committed_and_released_at_once_adds_up(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id, total_amount=1_000_000)
    writer = ReservationWriter(budget_pool)

    async def spend(i: int) -> str:
        row = await handlers.reserve(writer, reserve_command(user_id, 100 + i), DEFAULT_TTL, RATES)
        settle = handlers.commit if i % 2 == 0 else handlers.release
        await settle(writer, str(row["reservation_id"]))
        return str(row["reservation_id"])

    ids = await asyncio.gather(*(spend(i) for i in range(60)))

    committed = sum(100 + i for i in range(0, 60, 2))
    assert await held(budget_pool, budget_id) == (committed, 0)
    statuses = await budget_pool.fetch(
        "SELECT status, count(*) AS n FROM reservations WHERE user_id = $1 GROUP BY status",
        uuid.UUID(user_id),
    )
    assert {ReservationStatus(r["status"]): r["n"] for r in statuses} == {
        ReservationStatus.COMMITTED: 30,
        ReservationStatus.RELEASED: 30,
    }
    assert len(set(ids)) == 60


async def test_a_retried_commit_in_the_same_batch_answers_the_same_and_counts_once(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id)
    writer = ReservationWriter(budget_pool)
    row = await handlers.reserve(writer, reserve_command(user_id, 2_500), DEFAULT_TTL, RATES)
    rid = str(row["reservation_id"])

    answers = await asyncio.gather(*(handlers.commit(writer, rid) for _ in range(10)))

    assert {a["status"] for a in answers} == {ReservationStatus.COMMITTED}
    assert {a["amount"] for a in answers} == {2_500}
    assert await held(budget_pool, budget_id) == (2_500, 0)


async def test_a_batch_the_database_refuses_is_applied_one_item_at_a_time(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id, total_amount=100_000)
    writer = ReservationWriter(budget_pool)
    # Settling to RESERVED is refused by the database itself: it fails the
    # whole statement, as a constraint would.
    bad = store.Settle(uuid.uuid4(), ReservationStatus.RESERVED, datetime.now(UTC))

    results = await asyncio.gather(
        *(handlers.reserve(writer, reserve_command(user_id, 1_000), DEFAULT_TTL, RATES)
          for _ in range(5)),
        writer.settle(bad),
        *(handlers.reserve(writer, reserve_command(user_id, 1_000), DEFAULT_TTL, RATES)
          for _ in range(5)),
        return_exceptions=True,
    )  # fmt: skip

    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1
    assert isinstance(refused[0], asyncpg.RaiseError)
    assert all(r["status"] == ReservationStatus.RESERVED for r in results if isinstance(r, dict))
    assert await held(budget_pool, budget_id) == (0, 10_000)


async def test_a_caller_that_gives_up_before_its_batch_starts_reserves_nothing(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id, total_amount=100_000)
    writer = ReservationWriter(budget_pool)
    blocker = await budget_pool.acquire()
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM budgets WHERE budget_id = $1 FOR UPDATE", budget_id)
        first = asyncio.create_task(
            handlers.reserve(writer, reserve_command(user_id, 1_000), DEFAULT_TTL, RATES)
        )
        await asyncio.sleep(0.2)  # the first batch is in flight, waiting on the lock
        gave_up = asyncio.create_task(
            handlers.reserve(writer, reserve_command(user_id, 7_000), DEFAULT_TTL, RATES)
        )
        await asyncio.sleep(0.05)
        gave_up.cancel()
        await tx.rollback()
    finally:
        await budget_pool.release(blocker)

    await first
    with pytest.raises(asyncio.CancelledError):
        await gave_up
    assert await held(budget_pool, budget_id) == (0, 1_000)


async def test_two_writers_batching_over_the_same_budgets_never_deadlock(
    budget_pool: asyncpg.Pool,
) -> None:
    # Two replicas' writers, each with batches that touch both users' budgets
    # in opposite orders: the batches lock in id order first, so neither ever
    # waits for the other while holding what the other needs.
    users = [str(uuid.uuid4()), str(uuid.uuid4())]
    budgets = [await create_budget(budget_pool, u, total_amount=10_000_000) for u in users]
    writers = [ReservationWriter(budget_pool), ReservationWriter(budget_pool)]
    refused = (
        REGISTRY.get_sample_value(
            "moneta_group_commit_refused_total", {"writer": "budget_reservations"}
        )
        or 0.0
    )

    async def spend(writer: ReservationWriter, user: str, amount: int) -> None:
        row = await handlers.reserve(writer, reserve_command(user, amount), DEFAULT_TTL, RATES)
        await handlers.commit(writer, str(row["reservation_id"]))

    # Two connections open already, so that both writers' batches run at once.
    opened = [await budget_pool.acquire(), await budget_pool.acquire()]
    for conn in opened:
        await budget_pool.release(conn)
    for _ in range(12):
        await asyncio.gather(
            *(spend(writers[i % 2], users[(i // 2 + i) % 2], 100 + i) for i in range(200))
        )

    assert sum([(await held(budget_pool, b))[0] for b in budgets]) == 12 * sum(
        100 + i for i in range(200)
    )
    assert (await held(budget_pool, budgets[0]))[1] == (await held(budget_pool, budgets[1]))[1] == 0
    assert (REGISTRY.get_sample_value(
        "moneta_group_commit_refused_total", {"writer": "budget_reservations"}
    ) or 0.0) == refused  # fmt: skip


async def test_a_settled_reservation_is_answered_as_it_is_stored_batched_or_alone(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    # Two budgets, one in another currency: two lines, one with a rate.
    await create_budget(budget_pool, user_id, currency="EUR", total_amount=10**9)
    await create_budget(budget_pool, user_id, currency="USD", total_amount=10**9)
    writer = ReservationWriter(budget_pool)
    rows = [
        await handlers.reserve(writer, reserve_command(user_id, 100), DEFAULT_TTL, RATES)
        for _ in range(4)
    ]
    ids = [str(r["reservation_id"]) for r in rows]

    batched = await asyncio.gather(*(handlers.commit(writer, rid) for rid in ids[:3]))
    alone = await handlers.release(writer, ids[3])
    retried = await handlers.commit(writer, ids[0])

    stored = []
    async with budget_pool.acquire() as conn:
        for rid in ids:
            row = await store.fetch_reservation(conn, reservation_id=uuid.UUID(rid))
            assert row is not None
            stored.append(row)
    for answer, row in zip([*batched, alone, retried], [*stored, stored[0]], strict=True):
        assert dict(answer) == dict(row)
        assert len(row["budget_ids"]) == 2
    assert [str(r) for r in stored[0]["line_rates"] if r is not None] == ["0.92"]
    assert [s["status"] for s in stored] == [ReservationStatus.COMMITTED] * 3 + [
        ReservationStatus.RELEASED
    ]


async def test_a_batch_reads_no_table_through_once_its_plans_are_cached(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    # PL/pgSQL caches a plan per connection: one made while the tables are
    # small (as here) must still not scan them through, since it stays cached
    # as they grow. A batch's own locks and its settles read by key.
    await create_budget(budget_pool, user_id, total_amount=10**9)
    writer = ReservationWriter(budget_pool)
    ids = [
        (await handlers.reserve(writer, reserve_command(user_id, 100), DEFAULT_TTL, RATES))[
            "reservation_id"
        ]
        for _ in range(20)
    ]
    tables = ("budgets", "reservations", "reservation_lines")

    async def sequential_scans(conn: DbConn) -> int:
        await conn.execute("SELECT pg_stat_force_next_flush()")
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        return int(await conn.fetchval(
            "SELECT sum(seq_scan) FROM pg_stat_user_tables WHERE relname = ANY ($1)", tables
        ))  # fmt: skip

    async def commit_in_pairs(conn: DbConn, rids: list[uuid.UUID]) -> None:
        for i in range(0, len(rids), 2):
            now = datetime.now(UTC)
            settles = [store.Settle(r, ReservationStatus.COMMITTED, now) for r in rids[i : i + 2]]
            await store.apply_reservation_ops(conn, settles)

    async with budget_pool.acquire() as conn:
        # Six batches first: from the sixth run on, PL/pgSQL may keep a generic plan.
        await commit_in_pairs(conn, ids[:12])
        before = await sequential_scans(conn)
        await commit_in_pairs(conn, ids[12:])
        assert await sequential_scans(conn) == before
