"""The budget rules: a spend must fit every budget that applies to it; a hard
budget refuses what it cannot hold, a soft one only records it."""

from __future__ import annotations

import uuid

import pytest

from services.budget.domain import (
    CATEGORIES,
    BudgetExceeded,
    BudgetState,
    Mode,
    charge,
    validate_category,
)
from services.common.errors import FailedPrecondition, InvalidArgument


def budget(
    *,
    total: int = 10_000,
    used: int = 0,
    reserved: int = 0,
    mode: Mode = Mode.HARD,
    currency: str = "USD",
) -> BudgetState:
    return BudgetState(
        budget_id=uuid.uuid4(),
        currency=currency,
        total_amount=total,
        used_amount=used,
        reserved_amount=reserved,
        mode=mode,
    )


def test_remaining_is_total_less_used_and_reserved() -> None:
    assert budget(total=10_000, used=2_500, reserved=1_500).remaining == 6_000


def test_hard_budget_charges_a_spend_that_fits() -> None:
    b = budget(total=10_000, used=4_000)

    assert charge([b], 6_000, "USD") == [(b.budget_id, 6_000)]


def test_hard_budget_refuses_a_spend_above_remaining_with_budget_exceeded() -> None:
    b = budget(total=10_000, used=4_000, reserved=1_000)

    with pytest.raises(BudgetExceeded) as caught:
        charge([b], 5_001, "USD")

    assert caught.value.reason == "BUDGET_EXCEEDED"
    assert isinstance(caught.value, FailedPrecondition)


def test_budget_exceeded_names_the_budget_and_its_remaining_amount() -> None:
    b = budget(total=10_000, used=4_000, reserved=1_000)

    with pytest.raises(BudgetExceeded) as caught:
        charge([b], 5_001, "USD")

    assert caught.value.details == {
        "budget_id": str(b.budget_id),
        "remaining_amount": "5000",
        "currency": "USD",
    }


def test_budget_exceeded_reports_zero_remaining_for_an_overspent_budget() -> None:
    # A hard budget lowered below what is already used has nothing left, not less.
    b = budget(total=1_000, used=1_500)

    with pytest.raises(BudgetExceeded) as caught:
        charge([b], 1, "USD")

    assert caught.value.details["remaining_amount"] == "0"


def test_soft_budget_lets_a_spend_above_remaining_through() -> None:
    b = budget(total=1_000, used=900, mode=Mode.SOFT)

    assert charge([b], 5_000, "USD") == [(b.budget_id, 5_000)]


def test_every_applicable_budget_gets_a_line_for_the_whole_amount() -> None:
    monthly, flights = budget(total=50_000), budget(total=20_000)

    assert charge([monthly, flights], 7_500, "USD") == [
        (monthly.budget_id, 7_500),
        (flights.budget_id, 7_500),
    ]


def test_one_hard_budget_that_cannot_hold_the_spend_refuses_it_for_all() -> None:
    roomy, tight = budget(total=50_000), budget(total=20_000, used=19_000)

    with pytest.raises(BudgetExceeded) as caught:
        charge([roomy, tight], 7_500, "USD")

    assert caught.value.details["budget_id"] == str(tight.budget_id)


def test_no_applicable_budget_means_no_lines() -> None:
    assert charge([], 7_500, "USD") == []


def test_budget_in_another_currency_refuses_with_currency_conversion_unavailable() -> None:
    b = budget(currency="EUR")

    with pytest.raises(FailedPrecondition) as caught:
        charge([b], 100, "USD")

    assert caught.value.reason == "CURRENCY_CONVERSION_UNAVAILABLE"
    assert caught.value.details == {"budget_id": str(b.budget_id)}


def test_soft_budget_in_another_currency_also_refuses() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        charge([budget(currency="EUR", mode=Mode.SOFT)], 100, "USD")

    assert caught.value.reason == "CURRENCY_CONVERSION_UNAVAILABLE"


@pytest.mark.parametrize("category", sorted(CATEGORIES))
def test_validate_category_accepts_known_categories(category: str) -> None:
    assert validate_category(category) == category


@pytest.mark.parametrize("category", ["", "flight", "TRAVEL", "FLIGHT "])
def test_validate_category_refuses_unknown_categories(category: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_category(category)

    assert caught.value.reason == "UNKNOWN_CATEGORY"
