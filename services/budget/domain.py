"""The budget rules: pure, no I/O."""

from __future__ import annotations

import calendar
import enum
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.fx_rates import converted_amount, quoted_rate
from services.common.money import INT64_MAX, validate_currency

CATEGORIES = frozenset(
    {"ALL", "FLIGHT", "HOTEL", "CAR", "RAIL", "MEALS", "MERCHANT", "P2P", "CASH_OUT", "OTHER"}
)


class PeriodType(enum.IntEnum):
    WEEKLY = 1
    MONTHLY = 2
    QUARTERLY = 3
    YEARLY = 4
    ONE_TIME = 5


class Rollover(enum.IntEnum):
    RESET = 1
    ROLLOVER = 2


class Mode(enum.IntEnum):
    HARD = 1
    SOFT = 2


class ReservationStatus(enum.IntEnum):
    RESERVED = 1
    COMMITTED = 2
    RELEASED = 3
    EXPIRED = 4


@dataclass(frozen=True)
class BudgetState:
    budget_id: uuid.UUID
    currency: str
    total_amount: int
    used_amount: int
    reserved_amount: int
    mode: Mode

    @property
    def remaining(self) -> int:
        return self.total_amount - self.used_amount - self.reserved_amount


class BudgetExceeded(FailedPrecondition):
    default_reason = "BUDGET_EXCEEDED"


def validate_category(category: str) -> str:
    if category not in CATEGORIES:
        raise InvalidArgument(
            f"unknown category {category[:32]!r}",
            reason="UNKNOWN_CATEGORY",
            details={"allowed": ",".join(sorted(CATEGORIES))},
        )
    return category


@dataclass(frozen=True)
class ChargeLine:
    """What a spend puts on one budget: ``amount`` in the budget's currency,
    and the rate used from the spend's currency (None when the same)."""

    budget_id: uuid.UUID
    currency: str
    amount: int
    rate: Decimal | None = None


def counted_amount(
    amount: int, currency: str, budget_currency: str, rates: Mapping[str, Decimal]
) -> tuple[int, Decimal | None]:
    """A spend as a budget in ``budget_currency`` counts it, with the rate
    used: the mid-market cross rate of the wallet's rate source, the amount
    rounded UP to a whole minor unit so that no spend is ever under-counted."""
    if budget_currency == currency:
        return amount, None
    try:
        rate = quoted_rate(rates, currency, budget_currency, 0)
    except InvalidArgument as exc:
        raise FailedPrecondition(
            f"no rate converts {currency} spend to a {budget_currency} budget",
            reason="CURRENCY_CONVERSION_UNAVAILABLE",
            details={"currency": currency, "budget_currency": budget_currency},
        ) from exc
    counted = converted_amount(amount, currency, budget_currency, rate, ROUND_CEILING)
    if counted > INT64_MAX:
        raise InvalidArgument(
            "the converted amount is too large", reason="AMOUNT_TOO_LARGE",
            details={"budget_currency": budget_currency},
        )  # fmt: skip
    return counted, rate


def charge(
    budgets: Sequence[BudgetState], amount: int, currency: str, rates: Mapping[str, Decimal]
) -> list[ChargeLine]:
    """The lines a spend of ``amount`` puts on each applicable budget, or
    BUDGET_EXCEEDED when a hard one cannot take it. Every budget that applies
    must allow the spend; a budget in another currency counts it converted."""
    lines: list[ChargeLine] = []
    for budget in budgets:
        counted, rate = counted_amount(amount, currency, budget.currency, rates)
        if budget.mode == Mode.HARD and counted > budget.remaining:
            raise BudgetExceeded(
                "the spend exceeds the budget",
                details={
                    "budget_id": budget.budget_id,
                    "remaining_amount": max(budget.remaining, 0),
                    "spend_amount": counted,
                    "currency": budget.currency,
                },
            )
        lines.append(ChargeLine(budget.budget_id, budget.currency, counted, rate))
    return lines


class BudgetStatus(enum.IntEnum):
    ACTIVE = 1
    EXPIRED = 2
    SUSPENDED = 3


# ---------------------------------------------------------------- updates


@dataclass(frozen=True)
class BudgetChange:
    """What an update changes: only the fields that differ, old and new."""

    old_values: dict[str, int]
    new_values: dict[str, int]


def decide_update(
    state: BudgetState,
    status: BudgetStatus,
    *,
    new_total: int | None,
    new_status: BudgetStatus | None,
    reason: str,
) -> BudgetChange:
    """The change an UpdateBudget makes, or why it may not. A hard budget's
    total never goes below what is already used and reserved; an expired
    period stays as it closed."""
    if not reason.strip() or len(reason) > 500:
        raise InvalidArgument(
            "a reason of 1 to 500 characters is required", reason="INVALID_REASON"
        )
    if new_total is None and new_status is None:
        raise InvalidArgument("nothing to change", reason="NOTHING_TO_UPDATE")
    if new_total is not None and new_total <= 0:
        raise InvalidArgument("total_amount must be positive", reason="INVALID_AMOUNT")
    if status == BudgetStatus.EXPIRED:
        raise FailedPrecondition("an expired period cannot change", reason="BUDGET_EXPIRED")
    if new_status == BudgetStatus.EXPIRED:
        raise InvalidArgument(
            "a budget expires at its period's end, not by update", reason="INVALID_STATUS"
        )
    held = state.used_amount + state.reserved_amount
    if new_total is not None and state.mode == Mode.HARD and new_total < held:
        raise FailedPrecondition(
            "the total would be below what is already used and reserved",
            reason="TOTAL_BELOW_USED",
            details={"used_and_reserved": held, "currency": state.currency},
        )
    old: dict[str, int] = {}
    new: dict[str, int] = {}
    if new_total is not None and new_total != state.total_amount:
        old["total_amount"], new["total_amount"] = state.total_amount, new_total
    if new_status is not None and new_status != status:
        old["status"], new["status"] = int(status), int(new_status)
    return BudgetChange(old, new)


# ---------------------------------------------------------------- alerts


@dataclass(frozen=True)
class Alert:
    """An announcement a period owes: a threshold reached, or (threshold 100
    of kind EXCEEDED) a soft budget's total crossed."""

    kind: str  # THRESHOLD or EXCEEDED
    threshold: int


def alerts_due(
    before: tuple[int, int], after: tuple[int, int], thresholds: Sequence[int], mode: Mode
) -> list[Alert]:
    """The alerts that a change from ``before`` to ``after``, each (held,
    total) with held = used + reserved, crosses. Which were already announced
    is the store's business (a unique key), so this may name one again after
    a release and a new reservation; it is still announced once per period."""
    (held_before, total_before), (held_after, total_after) = before, after

    def reached(t: int, held: int, total: int) -> bool:
        return held * 100 >= t * total

    due = [
        Alert("THRESHOLD", t)
        for t in sorted(set(thresholds))
        if reached(t, held_after, total_after) and not reached(t, held_before, total_before)
    ]
    # Reaching 100% is a threshold; exceeding is going beyond the total.
    if mode == Mode.SOFT and held_after > total_after and held_before <= total_before:
        due.append(Alert("EXCEEDED", 100))
    return due


def percentage(held: int, total: int) -> float:
    return round(held * 100 / total, 2)


# ---------------------------------------------------------------- periods


def add_months(anchor: datetime, months: int) -> datetime:
    """``anchor`` moved by whole months, the day clamped to the month's last
    (Jan 31 + 1 month = Feb 28 or 29), the time of day kept."""
    month0 = anchor.month - 1 + months
    year, month = anchor.year + month0 // 12, month0 % 12 + 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def period_boundary(anchor: datetime, period_type: PeriodType, n: int) -> datetime:
    """The n-th period boundary of a series that started at ``anchor``;
    boundary 0 is the anchor. Computed from the anchor every time, so a
    month-end anchor keeps its day (Jan 31, Feb 28, Mar 31)."""
    if period_type == PeriodType.WEEKLY:
        return anchor + timedelta(weeks=n)
    if period_type == PeriodType.MONTHLY:
        return add_months(anchor, n)
    if period_type == PeriodType.QUARTERLY:
        return add_months(anchor, 3 * n)
    if period_type == PeriodType.YEARLY:
        return add_months(anchor, 12 * n)
    raise InvalidArgument("a one-time budget has no periods", reason="ONE_TIME_HAS_NO_PERIODS")


def first_period_end(start: datetime, period_type: PeriodType) -> datetime:
    return period_boundary(start, period_type, 1)


def first_period(
    period_type: PeriodType, start: datetime | None, end: datetime | None, now: datetime
) -> tuple[datetime, datetime]:
    """A new budget's first period: from ``start`` (default: today, 00:00
    UTC) to ``end`` (default: one period later; a ONE_TIME budget names its
    end)."""
    if start is None:
        start = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if end is not None:
        return start, end
    if period_type == PeriodType.ONE_TIME:
        raise InvalidArgument(
            "a ONE_TIME budget needs an end_date", reason="INVALID_PERIOD",
            details={"field": "end_date"},
        )  # fmt: skip
    return start, first_period_end(start, period_type)


def next_period(
    anchor: datetime, period_type: PeriodType, current_end: datetime
) -> tuple[datetime, datetime] | None:
    """The period after the one ending at ``current_end``: it starts there
    and ends at the first anchored boundary after it. None for ONE_TIME,
    which never rolls."""
    if period_type == PeriodType.ONE_TIME:
        return None
    # Estimate the index, then step past current_end (weeks: exact; months:
    # the clamp can only make a boundary earlier, never skip one).
    n = 1
    if period_type == PeriodType.WEEKLY:
        n = max((current_end - anchor) // timedelta(weeks=1), 0) + 1
    else:
        months = (current_end.year - anchor.year) * 12 + current_end.month - anchor.month
        step = {PeriodType.MONTHLY: 1, PeriodType.QUARTERLY: 3, PeriodType.YEARLY: 12}[period_type]
        n = max(months // step - 1, 1)
    while period_boundary(anchor, period_type, n) <= current_end:
        n += 1
    return current_end, period_boundary(anchor, period_type, n)


def next_period_total(
    rollover: Rollover, total: int, carried_over: int, used: int, reserved: int
) -> tuple[int, int]:
    """(total, carried_over) of the next period. RESET: the budget's own
    amount again; ROLLOVER: that plus what this period left unspent (spend
    still reserved counts as spent: it may yet be committed here)."""
    base = total - carried_over
    if base <= 0:  # an update set the total below the carry: the total is the base
        base, carried_over = total, 0
    if rollover == Rollover.RESET:
        return base, 0
    unspent = max(total - used - reserved, 0)
    return base + unspent, unspent


# ---------------------------------------------------------------- company policy


@dataclass(frozen=True)
class PolicyBudget:
    category: str
    currency: str
    total_amount: int
    period_type: PeriodType
    mode: Mode
    rollover: Rollover
    thresholds: tuple[int, ...]

    @property
    def key(self) -> str:
        """Names the entry within its company's policy: one budget per
        category, currency and period type."""
        return f"{self.category}:{self.currency}:{self.period_type.name}"


def validate_thresholds(thresholds: Sequence[int]) -> tuple[int, ...]:
    if len(thresholds) > 10 or any(not 1 <= t <= 1000 for t in thresholds):
        raise InvalidArgument(
            "thresholds are at most 10 percentages from 1 to 1000", reason="INVALID_THRESHOLDS"
        )
    return tuple(sorted(set(thresholds))) or (80, 100)


def validate_policy(entries: Sequence[PolicyBudget]) -> list[PolicyBudget]:
    """A company policy's entries, each valid and each key once. ONE_TIME is
    refused: a default budget given at sign-up needs a period to renew by."""
    if len(entries) > 50:
        raise InvalidArgument("a policy holds at most 50 budgets", reason="POLICY_TOO_LARGE")
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        validate_category(entry.category)
        validate_currency(entry.currency)
        if entry.total_amount <= 0:
            raise InvalidArgument(
                f"budgets[{i}].total_amount must be positive", reason="INVALID_AMOUNT"
            )
        if entry.period_type == PeriodType.ONE_TIME:
            raise InvalidArgument(
                f"budgets[{i}] is ONE_TIME: a default budget needs a period",
                reason="INVALID_PERIOD_TYPE",
            )
        validate_thresholds(entry.thresholds)
        if entry.key in seen:
            raise InvalidArgument(
                f"budgets[{i}] repeats {entry.key}", reason="DUPLICATE_POLICY_ENTRY"
            )
        seen.add(entry.key)
    return list(entries)


def default_budgets(
    entries: Sequence[PolicyBudget], now: datetime
) -> list[tuple[PolicyBudget, datetime, datetime]]:
    """The first period of each default budget a policy gives a new user:
    from the start of today (UTC) to the end of its first period."""
    start = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return [(e, start, first_period_end(start, e.period_type)) for e in entries]
