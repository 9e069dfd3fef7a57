"""Pure budget rules beyond reservations: period boundaries by calendar
arithmetic anchored on the start date, the next period's total by rollover
policy, which alerts a change crosses, what an update may change, and what a
company policy may hold."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.budget.domain import (
    Alert,
    BudgetState,
    BudgetStatus,
    Mode,
    PeriodType,
    PolicyBudget,
    Rollover,
    alerts_due,
    decide_update,
    default_budgets,
    first_period,
    next_period,
    next_period_total,
    period_boundary,
    validate_policy,
)
from services.common.errors import FailedPrecondition, InvalidArgument


def at(y: int, m: int, d: int) -> datetime:
    return datetime(y, m, d, 9, 30, tzinfo=UTC)


# ---------------------------------------------------------------- periods


def test_weekly_periods_count_whole_weeks_from_the_start() -> None:
    assert period_boundary(at(2024, 1, 3), PeriodType.WEEKLY, 2) == at(2024, 1, 17)


def test_monthly_periods_anchored_on_a_month_end_keep_the_anchor_day() -> None:
    anchor = at(2024, 1, 31)
    boundaries = [period_boundary(anchor, PeriodType.MONTHLY, n) for n in (1, 2, 3)]
    assert boundaries == [at(2024, 2, 29), at(2024, 3, 31), at(2024, 4, 30)]


def test_quarterly_periods_are_three_calendar_months() -> None:
    assert period_boundary(at(2024, 11, 30), PeriodType.QUARTERLY, 1) == at(2025, 2, 28)


def test_yearly_period_from_a_leap_day_ends_on_the_last_of_february() -> None:
    assert period_boundary(at(2024, 2, 29), PeriodType.YEARLY, 1) == at(2025, 2, 28)


def test_next_monthly_period_starts_at_the_end_and_ends_at_the_next_anchored_boundary() -> None:
    anchor = at(2024, 1, 31)
    assert next_period(anchor, PeriodType.MONTHLY, at(2024, 2, 29)) == (
        at(2024, 2, 29),
        at(2024, 3, 31),
    )


def test_next_period_after_a_custom_first_end_snaps_back_to_the_anchored_calendar() -> None:
    anchor = at(2024, 1, 10)
    assert next_period(anchor, PeriodType.MONTHLY, at(2024, 1, 20)) == (
        at(2024, 1, 20),
        at(2024, 2, 10),
    )


def test_next_weekly_period_is_one_week_on() -> None:
    anchor = at(2024, 1, 1)
    assert next_period(anchor, PeriodType.WEEKLY, at(2024, 1, 15)) == (
        at(2024, 1, 15),
        at(2024, 1, 22),
    )


def test_one_time_budget_never_rolls() -> None:
    assert next_period(at(2024, 1, 1), PeriodType.ONE_TIME, at(2024, 6, 1)) is None


def test_reset_gives_the_next_period_the_budgets_own_amount() -> None:
    assert next_period_total(Rollover.RESET, 10_000, 0, used=3_000, reserved=0) == (10_000, 0)


def test_rollover_adds_what_the_period_left_unspent() -> None:
    assert next_period_total(Rollover.ROLLOVER, 10_000, 0, used=3_000, reserved=1_000) == (
        16_000,
        6_000,
    )


def test_rollover_carries_only_the_last_periods_unspent_amount_not_the_one_before() -> None:
    # A 16,000 period that carried 6,000 and spent nothing carries 16,000.
    assert next_period_total(Rollover.ROLLOVER, 16_000, 6_000, used=0, reserved=0) == (
        26_000,
        16_000,
    )


def test_overspent_soft_period_carries_nothing() -> None:
    assert next_period_total(Rollover.ROLLOVER, 10_000, 0, used=12_000, reserved=0) == (10_000, 0)


# ---------------------------------------------------------------- alerts


def test_crossing_a_threshold_is_due() -> None:
    assert alerts_due((7_000, 10_000), (8_000, 10_000), [80, 100], Mode.HARD) == [
        Alert("THRESHOLD", 80)
    ]


def test_a_change_below_every_threshold_is_due_nothing() -> None:
    assert alerts_due((1_000, 10_000), (7_999, 10_000), [80, 100], Mode.HARD) == []


def test_one_change_can_cross_several_thresholds() -> None:
    assert alerts_due((0, 10_000), (10_000, 10_000), [80, 100], Mode.HARD) == [
        Alert("THRESHOLD", 80),
        Alert("THRESHOLD", 100),
    ]


def test_going_beyond_a_soft_budgets_total_is_exceeded() -> None:
    assert Alert("EXCEEDED", 100) in alerts_due(
        (9_000, 10_000), (10_001, 10_000), [80, 100], Mode.SOFT
    )


def test_a_lower_total_can_cross_a_threshold() -> None:
    assert alerts_due((5_000, 10_000), (5_000, 6_000), [80], Mode.HARD) == [Alert("THRESHOLD", 80)]


# ---------------------------------------------------------------- updates


def state(
    *, total: int = 10_000, used: int = 0, reserved: int = 0, mode: Mode = Mode.HARD
) -> BudgetState:
    return BudgetState(uuid.uuid4(), "USD", total, used, reserved, mode)


def test_update_names_only_the_fields_it_changes() -> None:
    change = decide_update(
        state(), BudgetStatus.ACTIVE, new_total=20_000, new_status=BudgetStatus.ACTIVE, reason="r"
    )
    assert (change.old_values, change.new_values) == (
        {"total_amount": 10_000},
        {"total_amount": 20_000},
    )


def test_hard_budgets_total_cannot_go_below_used_and_reserved() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        decide_update(
            state(used=4_000, reserved=2_000),
            BudgetStatus.ACTIVE,
            new_total=5_999,
            new_status=None,
            reason="cut",
        )
    assert caught.value.reason == "TOTAL_BELOW_USED"


def test_soft_budgets_total_may_go_below_used() -> None:
    change = decide_update(
        state(used=4_000, mode=Mode.SOFT),
        BudgetStatus.ACTIVE,
        new_total=1_000,
        new_status=None,
        reason="cut",
    )
    assert change.new_values == {"total_amount": 1_000}


@pytest.mark.parametrize(
    ("total", "status", "reason", "code"),
    [
        (None, None, "r", "NOTHING_TO_UPDATE"),
        (0, None, "r", "NOTHING_TO_UPDATE"),
        (-5, None, "r", "INVALID_AMOUNT"),
        (100, None, " ", "INVALID_REASON"),
        (None, BudgetStatus.EXPIRED, "r", "INVALID_STATUS"),
    ],
)
def test_update_refuses_bad_input(
    total: int | None, status: BudgetStatus | None, reason: str, code: str
) -> None:
    new_total = None if total == 0 else total  # the wire's 0 means unchanged
    with pytest.raises(InvalidArgument) as caught:
        decide_update(
            state(), BudgetStatus.ACTIVE, new_total=new_total, new_status=status, reason=reason
        )
    assert caught.value.reason == code


def test_an_expired_period_cannot_be_updated() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        decide_update(state(), BudgetStatus.EXPIRED, new_total=1, new_status=None, reason="r")
    assert caught.value.reason == "BUDGET_EXPIRED"


# ---------------------------------------------------------------- company policy


def entry(**overrides: object) -> PolicyBudget:
    values: dict[str, object] = {
        "category": "MEALS",
        "currency": "USD",
        "total_amount": 50_000,
        "period_type": PeriodType.MONTHLY,
        "mode": Mode.HARD,
        "rollover": Rollover.RESET,
        "thresholds": (80, 100),
    }
    values.update(overrides)
    return PolicyBudget(**values)  # type: ignore[arg-type]


def test_a_valid_policy_is_accepted() -> None:
    entries = [entry(), entry(category="FLIGHT")]
    assert validate_policy(entries) == entries


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (entry(category="SPACE"), "UNKNOWN_CATEGORY"),
        (entry(currency="XXX"), "UNKNOWN_CURRENCY"),
        (entry(total_amount=0), "INVALID_AMOUNT"),
        (entry(period_type=PeriodType.ONE_TIME), "INVALID_PERIOD_TYPE"),
        (entry(thresholds=(0,)), "INVALID_THRESHOLDS"),
    ],
)
def test_a_policy_with_an_invalid_entry_is_refused(bad: PolicyBudget, code: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_policy([entry(category="HOTEL"), bad])
    assert caught.value.reason == code


def test_a_policy_naming_one_budget_twice_is_refused() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_policy([entry(), entry(total_amount=1)])
    assert caught.value.reason == "DUPLICATE_POLICY_ENTRY"


def test_default_budgets_start_today_and_end_after_one_period() -> None:
    now = datetime(2024, 5, 17, 15, 45, tzinfo=UTC)
    [(_, start, end)] = default_budgets([entry()], now)
    midnight = datetime(2024, 5, 17, tzinfo=UTC)
    assert (start, end) == (midnight, midnight.replace(month=6))
    assert end - start == timedelta(days=31)


# ---------------------------------------------------------------- a new budget's first period

NOON_31_JAN = datetime(2026, 1, 31, 12, 30, tzinfo=UTC)


def test_a_new_budget_without_dates_starts_today_and_runs_one_period() -> None:
    start, end = first_period(PeriodType.MONTHLY, None, None, NOON_31_JAN)

    assert (start, end) == (datetime(2026, 1, 31, tzinfo=UTC), datetime(2026, 2, 28, tzinfo=UTC))


def test_a_new_budget_keeps_the_dates_it_names() -> None:
    start = datetime(2026, 3, 1, tzinfo=UTC)
    end = datetime(2026, 3, 10, tzinfo=UTC)

    assert first_period(PeriodType.WEEKLY, start, end, NOON_31_JAN) == (start, end)


def test_a_named_start_without_an_end_runs_one_period_from_it() -> None:
    start = datetime(2026, 3, 1, tzinfo=UTC)

    assert first_period(PeriodType.WEEKLY, start, None, NOON_31_JAN) == (
        start,
        start + timedelta(weeks=1),
    )


def test_a_one_time_budget_must_name_its_end() -> None:
    with pytest.raises(InvalidArgument) as caught:
        first_period(PeriodType.ONE_TIME, None, None, NOON_31_JAN)

    assert caught.value.reason == "INVALID_PERIOD"
