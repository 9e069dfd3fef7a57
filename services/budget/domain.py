"""The budget rules: pure, no I/O."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.errors import FailedPrecondition, InvalidArgument

CATEGORIES = frozenset(
    {"ALL", "FLIGHT", "HOTEL", "CAR", "RAIL", "MEALS", "MERCHANT", "P2P", "OTHER"}
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


def charge(
    budgets: Sequence[BudgetState], amount: int, currency: str
) -> list[tuple[uuid.UUID, int]]:
    """The lines a spend of ``amount`` puts on each applicable budget, or
    BUDGET_EXCEEDED when a hard one cannot take it. Every budget that applies
    must allow the spend."""
    lines: list[tuple[uuid.UUID, int]] = []
    for budget in budgets:
        if budget.currency != currency:
            # Conversion with the wallet's rate source lands with the budget
            # service proper; until then refuse rather than let spend through.
            raise FailedPrecondition(
                f"a {budget.currency} budget applies to this {currency} spend",
                reason="CURRENCY_CONVERSION_UNAVAILABLE",
                details={"budget_id": budget.budget_id},
            )
        if budget.mode == Mode.HARD and amount > budget.remaining:
            raise BudgetExceeded(
                "the spend exceeds the budget",
                details={
                    "budget_id": budget.budget_id,
                    "remaining_amount": max(budget.remaining, 0),
                    "currency": budget.currency,
                },
            )
        lines.append((budget.budget_id, amount))
    return lines
