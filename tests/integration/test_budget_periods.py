"""Budgets over time, against the real budget database of this test run:
updates with an audit history, threshold and exceeded alerts written to the
outbox with the change that caused them, periods closed and rolled over by
policy, company policies, and filtered, paged lists."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from services.budget import handlers
from services.budget.domain import (
    BudgetExceeded,
    BudgetStatus,
    Mode,
    PeriodType,
    PolicyBudget,
    Rollover,
)
from services.budget.handlers import ReservationWriter
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from tests import conftest
from tests.integration.test_budget_reservations import (
    DEFAULT_TTL,
    RATES,
    backdate_expiry,
    budget_values,
    reserve_command,
)


@pytest.fixture(scope="module")
async def budget_pool(test_run: conftest.TestRun) -> AsyncIterator[asyncpg.Pool]:
    # A database of its own: the period sweeper, run with dates years ahead,
    # closes every period it finds, and must not reach other tests' budgets.
    pool = await conftest.service_pool(test_run, "budget", database="budget_periods")
    yield pool
    await pool.close()


async def create(pool: asyncpg.Pool, user_id: str, **overrides: Any) -> asyncpg.Record:
    return await handlers.create_budget(pool, budget_values(user_id, **overrides), "creator")


async def reserve(pool: asyncpg.Pool, user_id: str, amount: int, **kw: Any) -> str:
    row = await handlers.reserve(
        ReservationWriter(pool), reserve_command(user_id, amount, **kw), DEFAULT_TTL, RATES
    )
    return str(row["reservation_id"])


async def events(pool: asyncpg.Pool, budget_id: uuid.UUID) -> list[tuple[str, dict[str, Any]]]:
    rows = await pool.fetch(
        "SELECT event_type, envelope FROM outbox WHERE aggregate_id = $1 ORDER BY id",
        str(budget_id),
    )
    return [(r["event_type"], r["envelope"]["data"]) for r in rows]


async def history(pool: asyncpg.Pool, budget_id: uuid.UUID) -> list[asyncpg.Record]:
    rows, _ = await handlers.list_budget_history(pool, str(budget_id), 100, "")
    return rows


async def count_rows(pool: asyncpg.Pool, table: str) -> int:
    n: int = await pool.fetchval(f"SELECT count(*) FROM {table}")
    return n


# ---------------------------------------------------------------- UpdateBudget


async def test_update_changes_the_total_and_records_old_and_new_values_and_the_actor(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget = await create(budget_pool, user_id, total_amount=10_000)

    after = await handlers.update_budget(
        budget_pool,
        str(budget["budget_id"]),
        total_amount=15_000,
        status=None,
        reason="promotion",
        actor="manager-7",
    )

    assert after["total_amount"] == 15_000
    newest = (await history(budget_pool, budget["budget_id"]))[0]
    assert (newest["action"], newest["reason"], newest["actor_id"]) == (
        "UPDATED",
        "promotion",
        "manager-7",
    )
    assert (newest["old_values"], newest["new_values"]) == (
        {"total_amount": 10_000},
        {"total_amount": 15_000},
    )


async def test_suspended_budget_no_longer_applies_to_spend(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget = await create(budget_pool, user_id, total_amount=1_000)
    await handlers.update_budget(
        budget_pool,
        str(budget["budget_id"]),
        total_amount=None,
        status=BudgetStatus.SUSPENDED,
        reason="on leave",
        actor="m",
    )

    row = await handlers.reserve(
        ReservationWriter(budget_pool), reserve_command(user_id, 5_000), DEFAULT_TTL, RATES
    )

    assert list(row["budget_ids"]) == []


async def test_hard_total_below_used_and_reserved_is_refused_and_writes_nothing(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget = await create(budget_pool, user_id, total_amount=10_000)
    await reserve(budget_pool, user_id, 6_000)
    before = await count_rows(budget_pool, "budget_history")

    with pytest.raises(FailedPrecondition) as caught:
        await handlers.update_budget(
            budget_pool,
            str(budget["budget_id"]),
            total_amount=5_999,
            status=None,
            reason="cut",
            actor="m",
        )

    assert caught.value.reason == "TOTAL_BELOW_USED"
    assert (await handlers.get_budget(budget_pool, str(budget["budget_id"])))[
        "total_amount"
    ] == 10_000
    assert await count_rows(budget_pool, "budget_history") == before


async def test_update_without_a_reason_is_invalid_and_writes_nothing(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget = await create(budget_pool, user_id)
    before = await count_rows(budget_pool, "budget_history")

    with pytest.raises(InvalidArgument) as caught:
        await handlers.update_budget(
            budget_pool, str(budget["budget_id"]), total_amount=1, status=None, reason="", actor="m"
        )

    assert caught.value.reason == "INVALID_REASON"
    assert await count_rows(budget_pool, "budget_history") == before


async def test_update_of_an_unknown_budget_is_budget_not_found(budget_pool: asyncpg.Pool) -> None:
    with pytest.raises(NotFound):
        await handlers.update_budget(
            budget_pool, str(uuid.uuid4()), total_amount=1, status=None, reason="r", actor="m"
        )


async def test_history_lists_newest_first_in_pages(budget_pool: asyncpg.Pool, user_id: str) -> None:
    budget = await create(budget_pool, user_id, total_amount=10_000)
    for total in (11_000, 12_000, 13_000):
        await handlers.update_budget(
            budget_pool,
            str(budget["budget_id"]),
            total_amount=total,
            status=None,
            reason=f"to {total}",
            actor="m",
        )

    first, token = await handlers.list_budget_history(budget_pool, str(budget["budget_id"]), 2, "")
    second, last_token = await handlers.list_budget_history(
        budget_pool, str(budget["budget_id"]), 2, token
    )

    assert [r["reason"] for r in first] == ["to 13000", "to 12000"]
    assert [r["reason"] for r in second] == ["to 11000", ""]
    assert [r["action"] for r in second] == ["UPDATED", "CREATED"]
    assert last_token == ""


async def test_history_with_a_forged_page_token_is_invalid(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget = await create(budget_pool, user_id)
    with pytest.raises(InvalidArgument) as caught:
        await handlers.list_budget_history(budget_pool, str(budget["budget_id"]), 2, "@@@")
    assert caught.value.reason == "INVALID_PAGE_TOKEN"


# ---------------------------------------------------------------- alerts


async def test_crossing_a_threshold_adds_budget_threshold_reached_to_the_outbox(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget = await create(budget_pool, user_id, total_amount=10_000)

    await reserve(budget_pool, user_id, 8_000)

    assert await events(budget_pool, budget["budget_id"]) == [
        (
            "BudgetThresholdReached",
            {
                "budget_id": str(budget["budget_id"]),
                "wallet_id": "",
                "user_id": user_id,
                "threshold_percentage": 80,
                "used_amount": "80.00",
                "total_amount": "100.00",
                "currency": "USD",
            },
        )
    ]


async def test_a_threshold_is_announced_once_per_period_even_when_crossed_again(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget = await create(budget_pool, user_id, total_amount=10_000)
    first = await reserve(budget_pool, user_id, 8_500)
    await handlers.release(ReservationWriter(budget_pool), first)

    await reserve(budget_pool, user_id, 9_000)

    assert [
        e[1]["threshold_percentage"] for e in await events(budget_pool, budget["budget_id"])
    ] == [80]


async def test_crossing_a_soft_budgets_total_adds_budget_exceeded(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget = await create(budget_pool, user_id, total_amount=10_000, mode=int(Mode.SOFT))

    await reserve(budget_pool, user_id, 12_550)

    exceeded = [
        d for t, d in await events(budget_pool, budget["budget_id"]) if t == "BudgetExceeded"
    ]
    assert exceeded == [
        {
            "budget_id": str(budget["budget_id"]),
            "wallet_id": "",
            "user_id": user_id,
            "exceeded_amount": "25.50",
            "threshold_percentage": 125.5,
            "currency": "USD",
        }
    ]


async def test_a_refused_spend_on_a_hard_budget_adds_budget_exceeded_and_no_reservation(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget = await create(budget_pool, user_id, total_amount=10_000)

    with pytest.raises(BudgetExceeded):
        await reserve(budget_pool, user_id, 10_001, reference=f"r-{user_id}")
    with pytest.raises(BudgetExceeded):  # the caller's retry: the same event
        await reserve(budget_pool, user_id, 10_001, reference=f"r-{user_id}")

    assert await events(budget_pool, budget["budget_id"]) == [
        (
            "BudgetExceeded",
            {
                "budget_id": str(budget["budget_id"]),
                "wallet_id": "",
                "user_id": user_id,
                "exceeded_amount": "0.01",
                "threshold_percentage": 100.01,
                "currency": "USD",
            },
        )
    ]
    assert (
        await budget_pool.fetchval(
            "SELECT count(*) FROM reservations WHERE user_id = $1", uuid.UUID(user_id)
        )
        == 0
    )


async def test_a_refused_reservation_in_an_unsupported_currency_writes_nothing(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    await create(budget_pool, user_id)
    before = await count_rows(budget_pool, "outbox")

    with pytest.raises(InvalidArgument) as caught:
        await reserve(budget_pool, user_id, 100, currency="XYZ")

    assert caught.value.reason == "UNKNOWN_CURRENCY"
    assert await count_rows(budget_pool, "outbox") == before


async def test_commit_of_an_expired_reservation_is_refused_and_charges_nothing(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget = await create(budget_pool, user_id)
    rid = await reserve(budget_pool, user_id, 1_000)
    await backdate_expiry(budget_pool, rid)

    with pytest.raises(FailedPrecondition) as caught:
        await handlers.commit(ReservationWriter(budget_pool), rid)

    assert caught.value.reason == "RESERVATION_EXPIRED"
    row = await handlers.get_budget(budget_pool, str(budget["budget_id"]))
    assert (row["used_amount"], row["reserved_amount"]) == (0, 0)


async def test_create_with_an_unknown_period_type_is_invalid_and_writes_nothing(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await create(budget_pool, user_id, period_type=9)
    assert caught.value.reason == "INVALID_PERIOD_TYPE"
    rows, _ = await handlers.list_budgets(budget_pool, user_id=user_id)
    assert rows == []


# ---------------------------------------------------------------- periods


async def periods(pool: asyncpg.Pool, first_id: uuid.UUID) -> list[asyncpg.Record]:
    """Every period of the budget that began with ``first_id``, in order."""
    return list(
        await pool.fetch(
            """
            WITH RECURSIVE chain AS (
                SELECT * FROM budgets WHERE budget_id = $1
                UNION ALL
                SELECT b.* FROM budgets b JOIN chain c ON b.previous_budget_id = c.budget_id
            )
            SELECT budget_id, start_date, end_date, total_amount, used_amount, status
              FROM chain ORDER BY start_date
            """,
            first_id,
        )
    )


async def monthly_budget_from(
    pool: asyncpg.Pool, user_id: str, rollover: Rollover
) -> asyncpg.Record:
    start = datetime(2030, 1, 31, tzinfo=UTC)
    return await create(
        pool,
        user_id,
        total_amount=10_000,
        rollover=int(rollover),
        start_date=start,
        end_date=datetime(2030, 2, 28, tzinfo=UTC),
    )


async def spend_in(pool: asyncpg.Pool, budget_id: uuid.UUID, amount: int) -> None:
    """Books spend on a future period directly: Reserve only sees the current one."""
    await pool.execute(
        "UPDATE budgets SET used_amount = used_amount + $2 WHERE budget_id = $1", budget_id, amount
    )


async def test_reset_budget_rolls_over_twice_into_periods_of_the_same_total(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    first = await monthly_budget_from(budget_pool, user_id, Rollover.RESET)
    await spend_in(budget_pool, first["budget_id"], 3_000)

    await handlers.roll_over_periods(budget_pool, datetime(2030, 3, 1, tzinfo=UTC))
    second = (await periods(budget_pool, first["budget_id"]))[1]
    await spend_in(budget_pool, second["budget_id"], 9_000)
    await handlers.roll_over_periods(budget_pool, datetime(2030, 4, 1, tzinfo=UTC))

    chain = await periods(budget_pool, first["budget_id"])
    assert [
        (p["start_date"].date().isoformat(), p["end_date"].date().isoformat()) for p in chain
    ] == [
        ("2030-01-31", "2030-02-28"),
        ("2030-02-28", "2030-03-31"),
        ("2030-03-31", "2030-04-30"),
    ]
    assert [p["total_amount"] for p in chain] == [10_000, 10_000, 10_000]
    assert [p["used_amount"] for p in chain] == [3_000, 9_000, 0]  # past periods stay readable
    assert [BudgetStatus(p["status"]) for p in chain] == [
        BudgetStatus.EXPIRED,
        BudgetStatus.EXPIRED,
        BudgetStatus.ACTIVE,
    ]


async def test_rollover_budget_rolls_over_twice_carrying_each_periods_unspent_amount(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    first = await monthly_budget_from(budget_pool, user_id, Rollover.ROLLOVER)
    await spend_in(budget_pool, first["budget_id"], 3_000)

    await handlers.roll_over_periods(budget_pool, datetime(2030, 3, 1, tzinfo=UTC))
    second = (await periods(budget_pool, first["budget_id"]))[1]
    await spend_in(budget_pool, second["budget_id"], 15_000)
    await handlers.roll_over_periods(budget_pool, datetime(2030, 4, 1, tzinfo=UTC))

    chain = await periods(budget_pool, first["budget_id"])
    assert [p["total_amount"] for p in chain] == [10_000, 17_000, 12_000]
    assert [BudgetStatus(p["status"]) for p in chain][-1] == BudgetStatus.ACTIVE


async def test_rollover_writes_expired_and_rolled_over_history(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    first = await monthly_budget_from(budget_pool, user_id, Rollover.RESET)

    await handlers.roll_over_periods(budget_pool, datetime(2030, 3, 1, tzinfo=UTC))

    second = (await periods(budget_pool, first["budget_id"]))[1]
    closed = [(h["action"], h["actor_id"]) for h in await history(budget_pool, first["budget_id"])]
    opened = [h["action"] for h in await history(budget_pool, second["budget_id"])]
    assert closed[:2] == [("ROLLED_OVER", "system"), ("EXPIRED", "system")]
    assert opened == ["ROLLED_OVER"]


async def test_sweeping_again_at_the_same_moment_opens_no_second_period(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    first = await monthly_budget_from(budget_pool, user_id, Rollover.RESET)
    await handlers.roll_over_periods(budget_pool, datetime(2030, 3, 1, tzinfo=UTC))

    await handlers.roll_over_periods(budget_pool, datetime(2030, 3, 1, tzinfo=UTC))

    assert len(await periods(budget_pool, first["budget_id"])) == 2


async def test_one_time_budget_expires_at_its_end_without_a_next_period(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    first = await create(
        budget_pool,
        user_id,
        period_type=int(PeriodType.ONE_TIME),
        start_date=datetime(2031, 1, 1, tzinfo=UTC),
        end_date=datetime(2031, 2, 1, tzinfo=UTC),
    )

    await handlers.roll_over_periods(budget_pool, datetime(2031, 2, 2, tzinfo=UTC))

    chain = await periods(budget_pool, first["budget_id"])
    assert [BudgetStatus(p["status"]) for p in chain] == [BudgetStatus.EXPIRED]


# ---------------------------------------------------------------- company policy


def policy_entry(**overrides: Any) -> PolicyBudget:
    values: dict[str, Any] = {
        "category": "MEALS",
        "currency": "USD",
        "total_amount": 50_000,
        "period_type": PeriodType.MONTHLY,
        "mode": Mode.HARD,
        "rollover": Rollover.RESET,
        "thresholds": (80, 100),
    }
    values.update(overrides)
    return PolicyBudget(**values)


async def test_company_policy_is_stored_and_read_back(budget_pool: asyncpg.Pool) -> None:
    company = str(uuid.uuid4())
    entries = [policy_entry(), policy_entry(category="FLIGHT", thresholds=(50,))]

    await handlers.set_company_policy(budget_pool, company, entries, "admin")
    stored, updated_at = await handlers.get_company_policy(budget_pool, company)

    assert stored == entries
    assert updated_at is not None


async def test_an_invalid_company_policy_is_refused_and_writes_nothing(
    budget_pool: asyncpg.Pool,
) -> None:
    company = str(uuid.uuid4())

    with pytest.raises(InvalidArgument) as caught:
        await handlers.set_company_policy(
            budget_pool, company, [policy_entry(), policy_entry(category="YACHT")], "admin"
        )

    assert caught.value.reason == "UNKNOWN_CATEGORY"
    assert await handlers.get_company_policy(budget_pool, company) == ([], None)


async def test_applying_a_company_policy_twice_creates_each_default_budget_once(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    company = str(uuid.uuid4())
    await handlers.set_company_policy(
        budget_pool, company, [policy_entry(), policy_entry(category="FLIGHT")], "admin"
    )

    created = await handlers.apply_company_policy(budget_pool, user_id, company, "")
    again = await handlers.apply_company_policy(budget_pool, user_id, company, "")

    assert sorted(r["category"] for r in created) == ["FLIGHT", "MEALS"]
    assert again == []
    rows, _ = await handlers.list_budgets(budget_pool, user_id=user_id)
    assert len(rows) == 2


# ---------------------------------------------------------------- ListBudgets


async def test_list_budgets_filters_by_company_and_status_in_pages(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    company = str(uuid.uuid4())
    ids = [
        (await create(budget_pool, str(uuid.uuid4()), company_id=company))["budget_id"]
        for _ in range(3)
    ]
    await create(budget_pool, user_id)  # another company's: not listed
    await handlers.update_budget(
        budget_pool,
        str(ids[1]),
        total_amount=None,
        status=BudgetStatus.SUSPENDED,
        reason="r",
        actor="m",
    )

    page, token = await handlers.list_budgets(
        budget_pool, company_id=company, status=BudgetStatus.ACTIVE, page_size=1
    )
    rest, end = await handlers.list_budgets(
        budget_pool, company_id=company, status=BudgetStatus.ACTIVE, page_size=1, page_token=token
    )

    assert [r["budget_id"] for r in page + rest] == [ids[0], ids[2]]
    assert end == ""


async def test_list_budgets_without_a_user_or_company_is_invalid(
    budget_pool: asyncpg.Pool,
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await handlers.list_budgets(budget_pool)
    assert caught.value.reason == "MISSING_FILTER"


# ---------------------------------------------------------------- through the servicer


class FakeContext:
    """The servicer reads only the caller's metadata."""

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return [("x-actor-id", "manager-42")]


async def test_servicer_updates_and_lists_history_and_policies_through_the_contract(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    from moneta.budget.v1 import budget_pb2 as pb
    from services.budget.api import BudgetApi

    api = BudgetApi(budget_pool, 60)
    ctx: Any = FakeContext()
    budget = await create(budget_pool, user_id)
    bid = str(budget["budget_id"])
    company = str(uuid.uuid4())

    updated = await api.UpdateBudget(
        pb.UpdateBudgetRequest(budget_id=bid, total_amount=20_000, reason="raise"), ctx
    )
    listed = await api.ListBudgetHistory(pb.ListBudgetHistoryRequest(budget_id=bid), ctx)
    policy = await api.SetCompanyPolicy(
        pb.SetCompanyPolicyRequest(
            policy=pb.CompanyPolicy(
                company_id=company,
                budgets=[
                    pb.PolicyBudget(
                        category="HOTEL",
                        currency="EUR",
                        total_amount=1_000,
                        period_type=pb.PERIOD_TYPE_WEEKLY,
                    )
                ],
            )
        ),
        ctx,
    )
    read = await api.GetCompanyPolicy(pb.GetCompanyPolicyRequest(company_id=company), ctx)
    budgets = await api.ListBudgets(pb.ListBudgetsRequest(user_id=user_id), ctx)

    assert updated.budget.total_amount == 20_000
    assert (listed.history[0].actor_id, json.loads(listed.history[0].new_values)) == (
        "manager-42",
        {"total_amount": 20_000},
    )
    assert list(read.policy.budgets) == list(policy.policy.budgets)
    assert list(read.policy.budgets[0].thresholds) == [80, 100]
    assert [b.budget_id for b in budgets.budgets] == [bid]
