"""Budget reservations against the real budget database of this test run:
creating budgets, reserving spend on every budget that applies, committing or
releasing it once, expiring what outlived its ttl, and never overspending a
hard budget, even under concurrent load."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.budget import handlers, store
from services.budget.domain import BudgetExceeded, Mode, ReservationStatus
from services.budget.handlers import ReservationWriter
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from services.common.fx_rates import DEFAULT_FX_RATES, parse_rate_table

DEFAULT_TTL = 900
RATES = parse_rate_table(DEFAULT_FX_RATES)
MONTHLY = 2
RESET = 1


def budget_values(user_id: str, **overrides: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "user_id": user_id,
        "wallet_id": "",
        "company_id": "",
        "category": "ALL",
        "currency": "USD",
        "total_amount": 10_000,
        "period_type": MONTHLY,
        "start_date": now - timedelta(days=1),
        "end_date": now + timedelta(days=30),
        "mode": int(Mode.HARD),
        "rollover": RESET,
        "thresholds": [80, 100],
    }
    values.update(overrides)
    return values


async def create_budget(pool: asyncpg.Pool, user_id: str, **overrides: Any) -> uuid.UUID:
    row = await handlers.create_budget(pool, budget_values(user_id, **overrides), "test")
    budget_id: uuid.UUID = row["budget_id"]
    return budget_id


def reserve_command(
    user_id: str,
    amount: int = 1_000,
    *,
    category: str = "FLIGHT",
    currency: str = "USD",
    reference: str | None = None,
    ttl_seconds: int = 0,
    reservation_id: str = "",
) -> handlers.ReserveCommand:
    return handlers.ReserveCommand(
        user_id=user_id,
        amount=amount,
        currency=currency,
        category=category,
        reference=reference or f"ref-{uuid.uuid4()}",
        ttl_seconds=ttl_seconds,
        reservation_id=reservation_id,
    )


async def reserve(pool: asyncpg.Pool, user_id: str, amount: int = 1_000, **kw: Any) -> str:
    row = await handlers.reserve(
        ReservationWriter(pool), reserve_command(user_id, amount, **kw), DEFAULT_TTL, RATES
    )
    return str(row["reservation_id"])


async def held(pool: asyncpg.Pool, budget_id: uuid.UUID) -> tuple[int, int]:
    """(used_amount, reserved_amount) of a budget, as stored."""
    row = await pool.fetchrow(
        "SELECT used_amount, reserved_amount FROM budgets WHERE budget_id = $1", budget_id
    )
    assert row is not None
    return row["used_amount"], row["reserved_amount"]


async def count_budgets(pool: asyncpg.Pool, user_id: str) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM budgets WHERE user_id = $1", uuid.UUID(user_id)
    )
    return count


async def count_history(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM budget_history")
    return count


async def count_reservations(pool: asyncpg.Pool, user_id: str) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM reservations WHERE user_id = $1", uuid.UUID(user_id)
    )
    return count


async def reservation_status(pool: asyncpg.Pool, reservation_id: str) -> ReservationStatus:
    status = await pool.fetchval(
        "SELECT status FROM reservations WHERE reservation_id = $1", uuid.UUID(reservation_id)
    )
    return ReservationStatus(status)


async def backdate_expiry(pool: asyncpg.Pool, reservation_id: str) -> None:
    """Puts a reservation past its ttl without waiting for it."""
    await pool.execute(
        "UPDATE reservations SET expires_at = now() - interval '1 second'"
        " WHERE reservation_id = $1",
        uuid.UUID(reservation_id),
    )


# ---------------------------------------------------------------- creating budgets


async def test_create_budget_stores_it_with_nothing_used_or_reserved(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id, total_amount=50_000)

    row = await handlers.get_budget(budget_pool, str(budget_id))

    assert (row["total_amount"], row["used_amount"], row["reserved_amount"]) == (50_000, 0, 0)


async def test_create_budget_records_a_created_history_entry(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id)

    actions = await budget_pool.fetch(
        "SELECT action, actor_id FROM budget_history WHERE budget_id = $1", budget_id
    )

    assert [(r["action"], r["actor_id"]) for r in actions] == [("CREATED", "test")]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"total_amount": 0}, "INVALID_AMOUNT"),
        ({"total_amount": -100}, "INVALID_AMOUNT"),
        ({"category": "SPACESHIP"}, "UNKNOWN_CATEGORY"),
        ({"currency": "XXX"}, "UNKNOWN_CURRENCY"),
        ({"user_id": "not-a-uuid"}, "INVALID_ID"),
        ({"wallet_id": "not-a-uuid"}, "INVALID_ID"),
    ],
    ids=["zero-total", "negative-total", "unknown-category", "unknown-currency", "bad-user",
         "bad-wallet"],
)  # fmt: skip
async def test_create_budget_refuses_invalid_values(
    budget_pool: asyncpg.Pool, user_id: str, overrides: dict[str, Any], reason: str
) -> None:
    values = {**budget_values(user_id), **overrides}

    with pytest.raises(InvalidArgument) as caught:
        await handlers.create_budget(budget_pool, values, "test")

    assert caught.value.reason == reason


@pytest.mark.parametrize(
    "end_offset", [timedelta(days=-1), timedelta(0)], ids=["end-before-start", "end-at-start"]
)
async def test_create_budget_refuses_a_period_that_does_not_end_after_it_starts(
    budget_pool: asyncpg.Pool, user_id: str, end_offset: timedelta
) -> None:
    start = datetime.now(UTC)
    values = budget_values(user_id, start_date=start, end_date=start + end_offset)

    with pytest.raises(InvalidArgument) as caught:
        await handlers.create_budget(budget_pool, values, "test")

    assert caught.value.reason == "INVALID_PERIOD"


@pytest.mark.parametrize(
    "overrides",
    [
        {"total_amount": 0},
        {"total_amount": -100},
        {"end_date": datetime.now(UTC) - timedelta(days=2)},
        {"category": "SPACESHIP"},
        {"currency": "XXX"},
    ],
    ids=[
        "zero-total",
        "negative-total",
        "end-before-start",
        "unknown-category",
        "unknown-currency",
    ],
)
async def test_refused_create_budget_writes_nothing(
    budget_pool: asyncpg.Pool, user_id: str, overrides: dict[str, Any]
) -> None:
    history_before = await count_history(budget_pool)

    with pytest.raises(InvalidArgument):
        await handlers.create_budget(budget_pool, budget_values(user_id, **overrides), "test")

    assert await count_budgets(budget_pool, user_id) == 0
    assert await count_history(budget_pool) == history_before


async def test_get_budget_of_an_unknown_id_is_budget_not_found(budget_pool: asyncpg.Pool) -> None:
    with pytest.raises(NotFound) as caught:
        await handlers.get_budget(budget_pool, str(uuid.uuid4()))

    assert caught.value.reason == "BUDGET_NOT_FOUND"


# ---------------------------------------------------------------- reserve, commit, release


async def test_reserve_holds_the_amount_on_the_budget(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id, total_amount=10_000)

    await reserve(budget_pool, user_id, 2_500)

    assert await held(budget_pool, budget_id) == (0, 2_500)


async def test_reserve_returns_a_reserved_reservation_naming_its_budgets(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id)

    row = await handlers.reserve(
        ReservationWriter(budget_pool), reserve_command(user_id, 2_500), DEFAULT_TTL, RATES
    )

    assert ReservationStatus(row["status"]) == ReservationStatus.RESERVED
    assert list(row["budget_ids"]) == [budget_id]
    assert (row["amount"], row["currency"]) == (2_500, "USD")


async def test_commit_moves_the_hold_from_reserved_to_used(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id)
    reservation_id = await reserve(budget_pool, user_id, 2_500)

    row = await handlers.commit(ReservationWriter(budget_pool), reservation_id)

    assert ReservationStatus(row["status"]) == ReservationStatus.COMMITTED
    assert await held(budget_pool, budget_id) == (2_500, 0)


async def test_release_frees_the_hold(budget_pool: asyncpg.Pool, user_id: str) -> None:
    budget_id = await create_budget(budget_pool, user_id)
    reservation_id = await reserve(budget_pool, user_id, 2_500)

    row = await handlers.release(ReservationWriter(budget_pool), reservation_id)

    assert ReservationStatus(row["status"]) == ReservationStatus.RELEASED
    assert await held(budget_pool, budget_id) == (0, 0)


async def test_released_amount_can_be_reserved_again(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id, total_amount=5_000)
    await handlers.release(
        ReservationWriter(budget_pool), await reserve(budget_pool, user_id, 5_000)
    )

    await reserve(budget_pool, user_id, 5_000)

    assert await held(budget_pool, budget_id) == (0, 5_000)


async def test_reserving_the_same_reference_twice_makes_one_reservation(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    await create_budget(budget_pool, user_id)

    first = await reserve(budget_pool, user_id, 2_500, reference=f"trip-{user_id}")
    second = await reserve(budget_pool, user_id, 2_500, reference=f"trip-{user_id}")

    assert second == first
    assert await count_reservations(budget_pool, user_id) == 1


@pytest.mark.parametrize("path", ["plain", "full"])
async def test_a_reservation_takes_the_id_its_caller_chose_once(
    budget_pool: asyncpg.Pool, user_id: str, path: str
) -> None:
    # The full path: spend in another currency than the budget's.
    currency = "USD" if path == "plain" else "EUR"
    budget_id = await create_budget(budget_pool, user_id)
    chosen = str(uuid.uuid4())

    first = await reserve(budget_pool, user_id, 2_500, currency=currency,
                          reference=f"trip-{user_id}", reservation_id=chosen)  # fmt: skip
    again = await reserve(budget_pool, user_id, 2_500, currency=currency,
                          reference=f"trip-{user_id}", reservation_id=chosen)  # fmt: skip
    with pytest.raises(AlreadyExists) as taken:
        await reserve(budget_pool, user_id, 100, currency=currency, reservation_id=chosen)
    with pytest.raises(InvalidArgument) as malformed:
        await reserve(budget_pool, user_id, 100, reservation_id="not-a-uuid")

    assert first == again == chosen
    assert taken.value.reason == "RESERVATION_ID_TAKEN"
    assert malformed.value.reason == "INVALID_ID"
    assert await count_reservations(budget_pool, user_id) == 1
    assert (await held(budget_pool, budget_id))[1] > 0


@pytest.mark.parametrize("budgeted", [True, False])
async def test_concurrent_twins_with_a_chosen_id_get_one_reservation(
    budget_pool: asyncpg.Pool, user_id: str, budgeted: bool
) -> None:
    # Twins (a retry while the first call still runs, two replicas): one
    # reservation, and both get it, never RESERVATION_ID_TAKEN.
    if budgeted:
        await create_budget(budget_pool, user_id)
    for i in range(20):
        chosen, reference = str(uuid.uuid4()), f"twin-{i}-{user_id}"
        answers = await asyncio.gather(
            *(reserve(budget_pool, user_id, 100, reference=reference, reservation_id=chosen)
              for _ in range(2))
        )  # fmt: skip
        assert answers == [chosen, chosen]
    assert await count_reservations(budget_pool, user_id) == 20


async def test_reserving_the_same_reference_twice_holds_the_budget_once(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id)

    for _ in range(2):
        await reserve(budget_pool, user_id, 2_500, reference=f"trip-{user_id}")

    assert await held(budget_pool, budget_id) == (0, 2_500)


async def test_same_reference_with_another_amount_is_reference_reused(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id)
    await reserve(budget_pool, user_id, 2_500, reference=f"trip-{user_id}")

    with pytest.raises(AlreadyExists) as caught:
        await reserve(budget_pool, user_id, 3_000, reference=f"trip-{user_id}")

    assert caught.value.reason == "REFERENCE_REUSED"
    assert await held(budget_pool, budget_id) == (0, 2_500)


async def test_same_reference_from_another_user_is_reference_reused(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    await reserve(budget_pool, user_id, 2_500, reference=f"trip-{user_id}")

    with pytest.raises(AlreadyExists) as caught:
        await reserve(budget_pool, str(uuid.uuid4()), 2_500, reference=f"trip-{user_id}")

    assert caught.value.reason == "REFERENCE_REUSED"


async def test_same_reference_replayed_after_commit_returns_the_committed_reservation(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id)
    reservation_id = await reserve(budget_pool, user_id, 2_500, reference=f"trip-{user_id}")
    await handlers.commit(ReservationWriter(budget_pool), reservation_id)

    replay = await handlers.reserve(
        ReservationWriter(budget_pool),
        reserve_command(user_id, 2_500, reference=f"trip-{user_id}"),
        DEFAULT_TTL,
        RATES,
    )

    assert ReservationStatus(replay["status"]) == ReservationStatus.COMMITTED
    assert await held(budget_pool, budget_id) == (2_500, 0)


async def test_commit_after_release_is_reservation_released(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    await create_budget(budget_pool, user_id)
    reservation_id = await reserve(budget_pool, user_id, 2_500)
    await handlers.release(ReservationWriter(budget_pool), reservation_id)

    with pytest.raises(FailedPrecondition) as caught:
        await handlers.commit(ReservationWriter(budget_pool), reservation_id)

    assert caught.value.reason == "RESERVATION_RELEASED"


async def test_commit_after_release_leaves_the_budget_untouched(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id)
    reservation_id = await reserve(budget_pool, user_id, 2_500)
    await handlers.release(ReservationWriter(budget_pool), reservation_id)

    with pytest.raises(FailedPrecondition):
        await handlers.commit(ReservationWriter(budget_pool), reservation_id)

    assert await held(budget_pool, budget_id) == (0, 0)


async def test_release_after_commit_is_reservation_committed(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id)
    reservation_id = await reserve(budget_pool, user_id, 2_500)
    await handlers.commit(ReservationWriter(budget_pool), reservation_id)

    with pytest.raises(FailedPrecondition) as caught:
        await handlers.release(ReservationWriter(budget_pool), reservation_id)

    assert caught.value.reason == "RESERVATION_COMMITTED"
    assert await held(budget_pool, budget_id) == (2_500, 0)


async def test_committing_twice_returns_the_same_reservation(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    await create_budget(budget_pool, user_id)
    reservation_id = await reserve(budget_pool, user_id, 2_500)

    first = await handlers.commit(ReservationWriter(budget_pool), reservation_id)
    second = await handlers.commit(ReservationWriter(budget_pool), reservation_id)

    assert dict(second) == dict(first)


async def test_committing_twice_counts_the_spend_once(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id)
    reservation_id = await reserve(budget_pool, user_id, 2_500)

    for _ in range(2):
        await handlers.commit(ReservationWriter(budget_pool), reservation_id)

    assert await held(budget_pool, budget_id) == (2_500, 0)


async def test_releasing_twice_frees_the_hold_once(budget_pool: asyncpg.Pool, user_id: str) -> None:
    budget_id = await create_budget(budget_pool, user_id)
    await reserve(budget_pool, user_id, 1_000)
    reservation_id = await reserve(budget_pool, user_id, 2_500)

    for _ in range(2):
        await handlers.release(ReservationWriter(budget_pool), reservation_id)

    assert await held(budget_pool, budget_id) == (0, 1_000)


async def test_concurrent_commits_of_one_reservation_count_the_spend_once(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id)
    reservation_id = await reserve(budget_pool, user_id, 2_500)

    await asyncio.gather(
        *(handlers.commit(ReservationWriter(budget_pool), reservation_id) for _ in range(10))
    )

    assert await held(budget_pool, budget_id) == (2_500, 0)


async def test_commit_of_an_unknown_reservation_is_reservation_not_found(
    budget_pool: asyncpg.Pool,
) -> None:
    with pytest.raises(NotFound) as caught:
        await handlers.commit(ReservationWriter(budget_pool), str(uuid.uuid4()))

    assert caught.value.reason == "RESERVATION_NOT_FOUND"


# ---------------------------------------------------------------- expiry


async def test_expire_reservations_releases_a_reservation_past_its_ttl(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    await create_budget(budget_pool, user_id)
    reservation_id = await reserve(budget_pool, user_id, 2_500)
    await backdate_expiry(budget_pool, reservation_id)

    await handlers.expire_reservations(budget_pool)

    assert await reservation_status(budget_pool, reservation_id) == ReservationStatus.EXPIRED


async def test_expire_reservations_frees_the_hold_of_an_expired_reservation(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id)
    reservation_id = await reserve(budget_pool, user_id, 2_500)
    await backdate_expiry(budget_pool, reservation_id)

    await handlers.expire_reservations(budget_pool)

    assert await held(budget_pool, budget_id) == (0, 0)


async def test_expire_reservations_leaves_a_reservation_within_its_ttl(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id)
    reservation_id = await reserve(budget_pool, user_id, 2_500)

    await handlers.expire_reservations(budget_pool)

    assert await reservation_status(budget_pool, reservation_id) == ReservationStatus.RESERVED
    assert await held(budget_pool, budget_id) == (0, 2_500)


async def test_commit_after_expiry_is_reservation_expired(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    await create_budget(budget_pool, user_id)
    reservation_id = await reserve(budget_pool, user_id, 2_500)
    await backdate_expiry(budget_pool, reservation_id)
    await handlers.expire_reservations(budget_pool)

    with pytest.raises(FailedPrecondition) as caught:
        await handlers.commit(ReservationWriter(budget_pool), reservation_id)

    assert caught.value.reason == "RESERVATION_EXPIRED"


async def test_commit_past_ttl_before_the_sweep_is_reservation_expired_and_frees_the_hold(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id)
    reservation_id = await reserve(budget_pool, user_id, 2_500)
    await backdate_expiry(budget_pool, reservation_id)

    with pytest.raises(FailedPrecondition) as caught:
        await handlers.commit(ReservationWriter(budget_pool), reservation_id)

    assert caught.value.reason == "RESERVATION_EXPIRED"
    assert await held(budget_pool, budget_id) == (0, 0)
    assert await reservation_status(budget_pool, reservation_id) == ReservationStatus.EXPIRED


async def test_ttl_over_a_day_is_invalid_ttl(budget_pool: asyncpg.Pool, user_id: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await reserve(budget_pool, user_id, 2_500, ttl_seconds=24 * 3600 + 1)

    assert caught.value.reason == "INVALID_TTL"


# ---------------------------------------------------------------- which budgets apply


async def test_spend_with_no_applicable_budget_is_reserved_with_no_budget_lines(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    row = await handlers.reserve(
        ReservationWriter(budget_pool), reserve_command(user_id, 2_500), DEFAULT_TTL, RATES
    )

    lines = await budget_pool.fetchval(
        "SELECT count(*) FROM reservation_lines WHERE reservation_id = $1", row["reservation_id"]
    )
    assert ReservationStatus(row["status"]) == ReservationStatus.RESERVED
    assert list(row["budget_ids"]) == []
    assert lines == 0


async def test_budget_of_category_all_applies_to_every_category(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id, category="ALL")

    for category in ("FLIGHT", "HOTEL", "MEALS"):
        await reserve(budget_pool, user_id, 1_000, category=category)

    assert await held(budget_pool, budget_id) == (0, 3_000)


async def test_flight_budget_does_not_apply_to_hotel_spend(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id, category="FLIGHT")

    row = await handlers.reserve(
        ReservationWriter(budget_pool),
        reserve_command(user_id, 2_500, category="HOTEL"),
        DEFAULT_TTL,
        RATES,
    )

    assert list(row["budget_ids"]) == []
    assert await held(budget_pool, budget_id) == (0, 0)


async def test_spend_is_held_on_both_its_category_budget_and_the_all_budget(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    overall = await create_budget(budget_pool, user_id, category="ALL")
    flights = await create_budget(budget_pool, user_id, category="FLIGHT")

    row = await handlers.reserve(
        ReservationWriter(budget_pool),
        reserve_command(user_id, 2_500, category="FLIGHT"),
        DEFAULT_TTL,
        RATES,
    )

    assert sorted(row["budget_ids"]) == sorted([overall, flights])
    assert await held(budget_pool, overall) == (0, 2_500)
    assert await held(budget_pool, flights) == (0, 2_500)


async def test_another_users_budget_does_not_apply(budget_pool: asyncpg.Pool, user_id: str) -> None:
    someone_else = str(uuid.uuid4())
    budget_id = await create_budget(budget_pool, someone_else)

    await reserve(budget_pool, user_id, 2_500)

    assert await held(budget_pool, budget_id) == (0, 0)


@pytest.mark.parametrize(
    ("start", "end"),
    [(timedelta(days=-30), timedelta(days=-1)), (timedelta(days=1), timedelta(days=30))],
    ids=["ended", "not-started"],
)
async def test_budget_outside_its_period_does_not_apply(
    budget_pool: asyncpg.Pool, user_id: str, start: timedelta, end: timedelta
) -> None:
    now = datetime.now(UTC)
    budget_id = await create_budget(
        budget_pool, user_id, total_amount=100, start_date=now + start, end_date=now + end
    )

    await reserve(budget_pool, user_id, 2_500)

    assert await held(budget_pool, budget_id) == (0, 0)


async def test_hard_budget_refuses_a_spend_above_remaining(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    await create_budget(budget_pool, user_id, total_amount=5_000)
    await reserve(budget_pool, user_id, 3_000)

    with pytest.raises(BudgetExceeded) as caught:
        await reserve(budget_pool, user_id, 2_001)

    assert caught.value.reason == "BUDGET_EXCEEDED"
    assert caught.value.details["remaining_amount"] == "2000"


async def test_refused_reservation_writes_nothing(budget_pool: asyncpg.Pool, user_id: str) -> None:
    budget_id = await create_budget(budget_pool, user_id, total_amount=5_000)

    with pytest.raises(BudgetExceeded):
        await reserve(budget_pool, user_id, 5_001)

    assert await count_reservations(budget_pool, user_id) == 0
    assert await held(budget_pool, budget_id) == (0, 0)


async def test_one_full_hard_budget_refuses_the_spend_on_every_budget(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    roomy = await create_budget(budget_pool, user_id, category="ALL", total_amount=100_000)
    await create_budget(budget_pool, user_id, category="FLIGHT", total_amount=1_000)

    with pytest.raises(BudgetExceeded):
        await reserve(budget_pool, user_id, 2_500, category="FLIGHT")

    assert await held(budget_pool, roomy) == (0, 0)


async def test_soft_budget_lets_a_spend_above_remaining_through(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id, total_amount=1_000, mode=int(Mode.SOFT))

    await reserve(budget_pool, user_id, 2_500)

    assert await held(budget_pool, budget_id) == (0, 2_500)


async def test_spend_in_another_currency_is_held_converted_with_the_rate_recorded(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id, currency="EUR")

    row = await handlers.reserve(
        ReservationWriter(budget_pool),
        reserve_command(user_id, 2_500, currency="USD"),
        DEFAULT_TTL,
        RATES,
    )

    assert (row["amount"], row["currency"]) == (2_500, "USD")  # the spend, as made
    assert list(row["line_amounts"]) == [2_300]  # EUR 23.00 at 0.92
    assert [str(r) for r in row["line_rates"]] == ["0.92"]
    assert await held(budget_pool, budget_id) == (0, 2_300)
    async with budget_pool.acquire() as conn:
        stored = await store.fetch_reservation(conn, reservation_id=row["reservation_id"])
    assert stored is not None
    assert [str(r) for r in stored["line_rates"]] == ["0.92"]


async def test_refunds_of_a_converted_spend_give_back_exactly_what_it_counted(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id, currency="USD")
    row = await handlers.reserve(
        ReservationWriter(budget_pool),
        reserve_command(user_id, 1_000, currency="JPY"),
        DEFAULT_TTL,
        RATES,
    )
    rid = str(row["reservation_id"])
    await handlers.commit(ReservationWriter(budget_pool), rid)
    assert await held(budget_pool, budget_id) == (662, 0)  # JPY 1000 counts USD 6.62

    await handlers.refund(budget_pool, rid, 333, "JPY", f"refund-1-{rid}")
    partly = await held(budget_pool, budget_id)
    await handlers.refund(budget_pool, rid, 667, "JPY", f"refund-2-{rid}")

    assert partly == (662 - 220, 0)  # floor(662 * 333 / 1000)
    assert await held(budget_pool, budget_id) == (0, 0)


async def test_a_currency_the_rate_source_lacks_is_refused_and_writes_nothing(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id, currency="EUR")

    with pytest.raises(FailedPrecondition) as caught:
        await reserve(budget_pool, user_id, 2_500, currency="SEK")

    assert caught.value.reason == "CURRENCY_CONVERSION_UNAVAILABLE"
    assert await held(budget_pool, budget_id) == (0, 0)
    assert await budget_pool.fetchval("SELECT count(*) FROM reservations WHERE user_id = $1",
                                      uuid.UUID(user_id)) == 0  # fmt: skip


# ---------------------------------------------------------------- concurrency and the last line


async def reserve_outcome(writer: ReservationWriter, cmd: handlers.ReserveCommand) -> str:
    """RESERVED, or the refusal's reason. A writer per call applies each
    reservation alone, as separate replicas would."""
    try:
        await handlers.reserve(writer, cmd, DEFAULT_TTL, RATES)
    except BudgetExceeded as exc:
        return exc.reason
    return "RESERVED"


async def test_concurrent_reserves_against_a_hard_budget_succeed_exactly_up_to_its_total(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    await create_budget(budget_pool, user_id, total_amount=5_000)

    outcomes = await asyncio.gather(
        *(
            reserve_outcome(ReservationWriter(budget_pool), reserve_command(user_id, 100))
            for _ in range(100)
        )
    )

    assert outcomes.count("RESERVED") == 50
    assert outcomes.count("BUDGET_EXCEEDED") == 50


async def test_concurrent_reserves_never_hold_more_than_a_hard_budgets_total(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id, total_amount=5_000)
    seen: list[int] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            used, reserved = await held(budget_pool, budget_id)
            seen.append(used + reserved)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.gather(
            *(
                reserve_outcome(ReservationWriter(budget_pool), reserve_command(user_id, 100))
                for _ in range(100)
            )
        )
    finally:
        done.set()
        await watcher

    assert max(seen) <= 5_000
    assert await held(budget_pool, budget_id) == (0, 5_000)
    assert await count_reservations(budget_pool, user_id) == 50


async def test_concurrent_reserves_of_one_reference_make_one_reservation(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id, total_amount=100_000)
    cmd = reserve_command(user_id, 1_000, reference=f"trip-{user_id}")

    rows = await asyncio.gather(
        *(
            handlers.reserve(ReservationWriter(budget_pool), cmd, DEFAULT_TTL, RATES)
            for _ in range(20)
        )
    )

    assert len({r["reservation_id"] for r in rows}) == 1
    assert await held(budget_pool, budget_id) == (0, 1_000)


async def _wait_until_blocked_on_locks(pool: asyncpg.Pool, count: int) -> None:
    """Polls until ``count`` backends of this database wait on a lock."""
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    while True:
        waiting: int = await pool.fetchval(query)
        if waiting >= count:
            return
        await asyncio.sleep(0.01)


async def test_retry_racing_its_original_returns_the_original_even_when_the_budget_is_tight(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id, total_amount=5_000)
    cmd = reserve_command(user_id, 3_000, reference=f"trip-{user_id}")
    # Hold the budget row so that every call has looked the reference up (and
    # found nothing) before any of them can reserve.
    async with budget_pool.acquire() as blocker:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM budgets WHERE budget_id = $1 FOR UPDATE", budget_id)
        calls = [
            asyncio.create_task(
                handlers.reserve(ReservationWriter(budget_pool), cmd, DEFAULT_TTL, RATES)
            )
            for _ in range(2)
        ]
        try:
            async with asyncio.timeout(10):
                await _wait_until_blocked_on_locks(budget_pool, 2)
        finally:
            await tx.rollback()
        results = await asyncio.gather(*calls, return_exceptions=True)

    refusals = [getattr(r, "reason", repr(r)) for r in results if isinstance(r, BaseException)]
    assert refusals == []
    assert len({r["reservation_id"] for r in results}) == 1  # type: ignore[index]


async def test_database_refuses_a_direct_update_that_overspends_a_hard_budget(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id, total_amount=5_000)
    await reserve(budget_pool, user_id, 3_000)

    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await budget_pool.execute(
            "UPDATE budgets SET used_amount = $2 WHERE budget_id = $1", budget_id, 2_001
        )

    assert caught.value.constraint_name == "budgets_hard_limit"


async def test_database_lets_a_soft_budget_be_overspent(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    budget_id = await create_budget(budget_pool, user_id, total_amount=5_000, mode=int(Mode.SOFT))

    await budget_pool.execute(
        "UPDATE budgets SET used_amount = $2 WHERE budget_id = $1", budget_id, 9_000
    )

    assert await held(budget_pool, budget_id) == (9_000, 0)


async def test_a_negative_ttl_is_refused_and_nothing_is_reserved(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    cmd = reserve_command(user_id, ttl_seconds=-1)

    with pytest.raises(InvalidArgument) as raised:
        await handlers.reserve(ReservationWriter(budget_pool), cmd, DEFAULT_TTL, RATES)

    assert raised.value.reason == "INVALID_TTL"
    async with budget_pool.acquire() as conn:
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM reservations WHERE reference = $1", cmd.reference
            )
            == 0
        )


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("mode", 7, "INVALID_MODE"),
        ("period_type", 9, "INVALID_PERIOD_TYPE"),
        ("rollover", 5, "INVALID_ROLLOVER"),
    ],
)
async def test_enum_values_outside_the_contract_are_refused_over_grpc(
    budget_pool: asyncpg.Pool, field: str, value: int, reason: str
) -> None:
    from moneta.budget.v1 import budget_pb2
    from services.budget.api import BudgetApi

    budget = budget_pb2.Budget(
        user_id=str(uuid.uuid4()), category="ALL", currency="USD", total_amount=100,
        period_type=budget_pb2.PERIOD_TYPE_MONTHLY,
    )  # fmt: skip
    budget.start_date.FromSeconds(1_700_000_000)
    budget.end_date.FromSeconds(1_800_000_000)
    setattr(budget, field, value)

    with pytest.raises(InvalidArgument) as raised:
        await BudgetApi(budget_pool, 60).CreateBudget(
            budget_pb2.CreateBudgetRequest(budget=budget), context=None
        )

    assert raised.value.reason == reason


async def test_a_timestamp_beyond_year_9999_is_refused_over_grpc(budget_pool: asyncpg.Pool) -> None:
    from moneta.budget.v1 import budget_pb2
    from services.budget.api import BudgetApi

    budget = budget_pb2.Budget(
        user_id=str(uuid.uuid4()), category="ALL", currency="USD", total_amount=100,
        period_type=budget_pb2.PERIOD_TYPE_MONTHLY,
    )  # fmt: skip
    budget.start_date.FromSeconds(1_700_000_000)
    budget.end_date.seconds = 2**40

    with pytest.raises(InvalidArgument) as raised:
        await BudgetApi(budget_pool, 60).CreateBudget(
            budget_pb2.CreateBudgetRequest(budget=budget), context=None
        )

    assert (raised.value.reason, raised.value.details) == (
        "INVALID_TIMESTAMP",
        {"field": "end_date"},
    )


# ---------------------------------------------------------------- idempotent creates


def _create_request(user_id: str, total: int, key: str) -> Any:
    from moneta.budget.v1 import budget_pb2

    budget = budget_pb2.Budget(
        user_id=user_id, category="ALL", currency="USD", total_amount=total,
        period_type=budget_pb2.PERIOD_TYPE_MONTHLY,
    )  # fmt: skip
    return budget_pb2.CreateBudgetRequest(budget=budget, idempotency_key=key)


class _Caller:
    """The servicer's view of who calls (the gateway's x-actor-id)."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-actor-id", "manager-1"),)


CALLER: Any = _Caller()


async def _budgets_of(pool: asyncpg.Pool, user_id: str) -> int:
    return int(
        await pool.fetchval("SELECT count(*) FROM budgets WHERE user_id = $1", uuid.UUID(user_id))
    )


async def test_a_retried_create_with_its_key_answers_the_same_budget(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    from services.budget.api import BudgetApi

    api = BudgetApi(budget_pool, 60)
    first = await api.CreateBudget(_create_request(user_id, 5_000, "k-1"), context=CALLER)
    again = await api.CreateBudget(_create_request(user_id, 5_000, "k-1"), context=CALLER)

    assert again.budget == first.budget
    assert await _budgets_of(budget_pool, user_id) == 1


async def test_concurrent_creates_with_one_key_make_one_budget(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    from services.budget.api import BudgetApi

    api = BudgetApi(budget_pool, 60)
    answers = await asyncio.gather(
        *(
            api.CreateBudget(_create_request(user_id, 5_000, "k-2"), context=CALLER)
            for _ in range(8)
        )
    )

    assert len({a.budget.budget_id for a in answers}) == 1
    assert await _budgets_of(budget_pool, user_id) == 1


async def test_a_key_reused_for_another_budget_is_refused_and_writes_nothing(
    budget_pool: asyncpg.Pool, user_id: str
) -> None:
    from services.budget.api import BudgetApi

    api = BudgetApi(budget_pool, 60)
    await api.CreateBudget(_create_request(user_id, 5_000, "k-3"), context=CALLER)

    with pytest.raises(AlreadyExists) as raised:
        await api.CreateBudget(_create_request(user_id, 9_000, "k-3"), context=CALLER)

    assert raised.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert await _budgets_of(budget_pool, user_id) == 1
