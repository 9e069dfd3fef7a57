"""The budget rules: a spend must fit every budget that applies to it; a hard
budget refuses what it cannot hold, a soft one only records it."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest

from services.budget.domain import (
    CATEGORIES,
    BudgetExceeded,
    BudgetState,
    ChargeLine,
    Mode,
    charge,
    validate_category,
)
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.fx_rates import DEFAULT_FX_RATES, parse_rate_table

RATES = parse_rate_table(DEFAULT_FX_RATES)


def amounts(lines: list[ChargeLine]) -> list[tuple[uuid.UUID, int]]:
    return [(line.budget_id, line.amount) for line in lines]


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

    assert amounts(charge([b], 6_000, "USD", RATES)) == [(b.budget_id, 6_000)]


def test_hard_budget_refuses_a_spend_above_remaining_with_budget_exceeded() -> None:
    b = budget(total=10_000, used=4_000, reserved=1_000)

    with pytest.raises(BudgetExceeded) as caught:
        charge([b], 5_001, "USD", RATES)

    assert caught.value.reason == "BUDGET_EXCEEDED"
    assert isinstance(caught.value, FailedPrecondition)


def test_budget_exceeded_names_the_budget_and_its_remaining_amount() -> None:
    b = budget(total=10_000, used=4_000, reserved=1_000)

    with pytest.raises(BudgetExceeded) as caught:
        charge([b], 5_001, "USD", RATES)

    assert caught.value.details == {
        "budget_id": str(b.budget_id),
        "remaining_amount": "5000",
        "spend_amount": "5001",
        "currency": "USD",
    }


def test_budget_exceeded_reports_zero_remaining_for_an_overspent_budget() -> None:
    # A hard budget lowered below what is already used has nothing left, not less.
    b = budget(total=1_000, used=1_500)

    with pytest.raises(BudgetExceeded) as caught:
        charge([b], 1, "USD", RATES)

    assert caught.value.details["remaining_amount"] == "0"


def test_soft_budget_lets_a_spend_above_remaining_through() -> None:
    b = budget(total=1_000, used=900, mode=Mode.SOFT)

    assert amounts(charge([b], 5_000, "USD", RATES)) == [(b.budget_id, 5_000)]


def test_every_applicable_budget_gets_a_line_for_the_whole_amount() -> None:
    monthly, flights = budget(total=50_000), budget(total=20_000)

    assert amounts(charge([monthly, flights], 7_500, "USD", RATES)) == [
        (monthly.budget_id, 7_500),
        (flights.budget_id, 7_500),
    ]


def test_one_hard_budget_that_cannot_hold_the_spend_refuses_it_for_all() -> None:
    roomy, tight = budget(total=50_000), budget(total=20_000, used=19_000)

    with pytest.raises(BudgetExceeded) as caught:
        charge([roomy, tight], 7_500, "USD", RATES)

    assert caught.value.details["budget_id"] == str(tight.budget_id)


def test_no_applicable_budget_means_no_lines() -> None:
    assert charge([], 7_500, "USD", RATES) == []


def test_spend_in_another_currency_counts_converted_at_the_mid_rate() -> None:
    b = budget(currency="EUR")

    [line] = charge([b], 10_000, "USD", RATES)  # USD 100.00

    assert (line.amount, line.currency, line.rate) == (9_200, "EUR", Decimal("0.92"))


def test_a_converted_spend_is_rounded_up_never_under_counted() -> None:
    [line] = charge([budget(currency="USD")], 1_000, "JPY", RATES)  # JPY 1000

    assert line.rate == Decimal("0.00661375661375")  # 1 / 151.20, 12 digits
    assert line.amount == 662  # USD 6.61375... counts as 6.62


def test_a_hard_budget_compares_the_converted_spend() -> None:
    b = budget(currency="EUR", total=9_199)

    with pytest.raises(BudgetExceeded) as caught:
        charge([b], 10_000, "USD", RATES)

    assert caught.value.details["spend_amount"] == "9200"
    assert caught.value.details["remaining_amount"] == "9199"


def test_a_currency_without_a_rate_is_currency_conversion_unavailable() -> None:
    b = budget(currency="EUR")

    with pytest.raises(FailedPrecondition) as caught:
        charge([b], 100, "SEK", RATES)

    assert caught.value.reason == "CURRENCY_CONVERSION_UNAVAILABLE"
    assert caught.value.details == {"currency": "SEK", "budget_currency": "EUR"}


@pytest.mark.parametrize("category", sorted(CATEGORIES))
def test_validate_category_accepts_known_categories(category: str) -> None:
    assert validate_category(category) == category


@pytest.mark.parametrize("category", ["", "flight", "TRAVEL", "FLIGHT "])
def test_validate_category_refuses_unknown_categories(category: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_category(category)

    assert caught.value.reason == "UNKNOWN_CATEGORY"
