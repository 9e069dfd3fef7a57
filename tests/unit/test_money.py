"""Money at the edges: decimal strings parsed exactly into minor units, and
minor units formatted back with exactly the currency's decimals."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.errors import InvalidArgument
from services.common.money import (
    CURRENCY_EXPONENTS,
    INT64_MAX,
    require_positive,
    to_major_units,
    to_minor_units,
    validate_currency,
)

INT64_MIN = -(2**63)


def refusal_reason(amount: object, currency: str) -> str:
    with pytest.raises(InvalidArgument) as caught:
        to_minor_units(amount, currency)  # type: ignore[arg-type]
    return caught.value.reason


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("amount", "currency", "minor"),
    [
        ("420.50", "USD", 42050),
        ("420.5", "USD", 42050),
        ("0.01", "EUR", 1),
        ("1", "JPY", 1),
        ("1000", "KRW", 1000),
        ("0.001", "BHD", 1),
        ("1.234", "KWD", 1234),
        ("0.00000001", "BTC", 1),
        ("21000000", "BTC", 2_100_000_000_000_000),
        ("0", "USD", 0),
        ("-12.34", "USD", -1234),
        ("92233720368547758.07", "USD", INT64_MAX),
    ],
)
def test_decimal_string_becomes_exact_minor_units(amount: str, currency: str, minor: int) -> None:
    assert to_minor_units(amount, currency) == minor


def test_integer_amount_is_whole_major_units() -> None:
    assert to_minor_units(7, "USD") == 700


def test_decimal_amount_is_parsed_exactly() -> None:
    assert to_minor_units(Decimal("0.10"), "USD") == 10


def test_surrounding_whitespace_is_ignored() -> None:
    assert to_minor_units(" 1.00 ", "USD") == 100


@pytest.mark.parametrize(
    ("amount", "currency"),
    [("420.505", "USD"), ("0.5", "JPY"), ("0.0001", "BHD"), ("0.000000001", "BTC")],
)
def test_more_decimals_than_the_currency_has_are_refused(amount: str, currency: str) -> None:
    assert refusal_reason(amount, currency) == "AMOUNT_PRECISION"


def test_trailing_zeros_beyond_the_currency_decimals_are_accepted() -> None:
    assert to_minor_units("1.500", "USD") == 150


def test_precision_refusal_names_the_currency_and_its_decimals() -> None:
    with pytest.raises(InvalidArgument) as caught:
        to_minor_units("1.001", "USD")
    assert caught.value.details == {"currency": "USD", "decimals": "2"}


def test_excess_decimals_on_a_long_amount_are_refused_not_rounded() -> None:
    assert refusal_reason("12345678901.000000000000000001", "USD") == "AMOUNT_PRECISION"


@pytest.mark.parametrize("amount", [0.1, 1.0, float("nan")])
def test_floats_are_refused(amount: float) -> None:
    assert refusal_reason(amount, "USD") == "INVALID_AMOUNT"


def test_booleans_are_refused() -> None:
    assert refusal_reason(True, "USD") == "INVALID_AMOUNT"


@pytest.mark.parametrize(
    "amount",
    [
        "",
        " ",
        "abc",
        "1e3",
        "1E3",
        ".5",
        "5.",
        "+1",
        "1,000.00",
        "1_000",
        "$1",
        "1.2.3",
        "NaN",
        "Infinity",
        "0x10",
        "1 000",
        "--1",
        "1.0000000000000000000",
    ],
)
def test_junk_strings_are_refused(amount: str) -> None:
    assert refusal_reason(amount, "USD") == "INVALID_AMOUNT"


@pytest.mark.parametrize("amount", ["\u0664\u0662", "\uff14\uff12"])
def test_non_ascii_digits_are_refused(amount: str) -> None:
    assert refusal_reason(amount, "USD") == "INVALID_AMOUNT"


@pytest.mark.parametrize("amount", ["Infinity", "-Infinity", "NaN", "sNaN"])
def test_non_finite_decimals_are_refused(amount: str) -> None:
    assert refusal_reason(Decimal(amount), "USD") == "INVALID_AMOUNT"


@pytest.mark.parametrize("currency", ["usd", "XXX", "", "US", "EURO", "USD "])
def test_unknown_currency_is_refused(currency: str) -> None:
    assert refusal_reason("1.00", currency) == "UNKNOWN_CURRENCY"


def test_unknown_currency_is_refused_when_formatting() -> None:
    with pytest.raises(InvalidArgument) as caught:
        to_major_units(100, "XXX")
    assert caught.value.reason == "UNKNOWN_CURRENCY"


def test_validate_currency_returns_a_known_code() -> None:
    assert validate_currency("BHD") == "BHD"


@pytest.mark.parametrize(
    ("amount", "currency"),
    [
        ("92233720368547758.08", "USD"),
        ("-92233720368547758.09", "USD"),
        ("9223372036854775808", "JPY"),
        ("92233720368.54775808", "BTC"),
        (2**63, "JPY"),
    ],
)
def test_amount_beyond_int64_minor_units_is_refused(amount: str | int, currency: str) -> None:
    assert refusal_reason(amount, currency) == "AMOUNT_OUT_OF_RANGE"


def test_int64_min_minor_units_round_trip() -> None:
    assert to_minor_units(to_major_units(INT64_MIN, "USD"), "USD") == INT64_MIN


# ---------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    ("minor", "currency", "text"),
    [
        (42050, "USD", "420.50"),
        (1, "USD", "0.01"),
        (0, "USD", "0.00"),
        (-5, "EUR", "-0.05"),
        (1, "JPY", "1"),
        (1, "BHD", "0.001"),
        (1, "BTC", "0.00000001"),
        (INT64_MAX, "USD", "92233720368547758.07"),
        (INT64_MAX, "BTC", "92233720368.54775807"),
    ],
)
def test_minor_units_format_with_exactly_the_currency_decimals(
    minor: int, currency: str, text: str
) -> None:
    assert to_major_units(minor, currency) == text


# ---------------------------------------------------------------- positivity


@pytest.mark.parametrize("amount", [0, -1])
def test_require_positive_refuses_zero_and_negatives(amount: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        require_positive(amount)
    assert caught.value.reason == "INVALID_AMOUNT"


def test_require_positive_refuses_beyond_int64() -> None:
    with pytest.raises(InvalidArgument) as caught:
        require_positive(INT64_MAX + 1)
    assert caught.value.reason == "AMOUNT_OUT_OF_RANGE"


def test_require_positive_returns_the_amount() -> None:
    assert require_positive(INT64_MAX) == INT64_MAX


# ---------------------------------------------------------------- properties


@given(
    minor=st.integers(min_value=INT64_MIN, max_value=INT64_MAX),
    currency=st.sampled_from(sorted(CURRENCY_EXPONENTS)),
)
def test_formatting_then_parsing_gives_back_the_minor_units(minor: int, currency: str) -> None:
    assert to_minor_units(to_major_units(minor, currency), currency) == minor


@given(
    minor=st.integers(min_value=INT64_MIN, max_value=INT64_MAX),
    currency=st.sampled_from(sorted(CURRENCY_EXPONENTS)),
)
def test_formatted_amount_has_exactly_the_currency_decimals(minor: int, currency: str) -> None:
    text = to_major_units(minor, currency)
    decimals = len(text.partition(".")[2])
    assert decimals == CURRENCY_EXPONENTS[currency]
