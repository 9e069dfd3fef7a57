"""The gateway's edge parsing: decimal amounts (string or JSON number) become
exact minor units or INVALID_ARGUMENT naming the field; a recipient string is
classified as a user id, an email, a phone number or a username."""

from __future__ import annotations

import uuid

import pytest

from services.common.errors import InvalidArgument
from services.gateway.deps import parse_amount
from services.gateway.routes_wallets import recipient_of


def refusal(value: object, currency: str = "USD", field: str = "amount") -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        parse_amount(value, currency, field)  # type: ignore[arg-type]
    return caught.value


def test_decimal_string_becomes_minor_units() -> None:
    assert parse_amount("12.50", "USD") == 1250


def test_decimal_string_with_fewer_decimals_than_the_currency_is_exact() -> None:
    assert parse_amount("12.5", "USD") == 1250


def test_float_becomes_the_minor_units_it_was_written_as() -> None:
    assert parse_amount(12.5, "USD") == 1250


def test_float_that_binary_rounding_would_skew_is_parsed_as_written() -> None:
    # 0.29 * 100 is 28.999999999999996 in binary floating point.
    assert parse_amount(0.29, "USD") == 29


def test_integer_is_major_units() -> None:
    assert parse_amount(12, "USD") == 1200


def test_integer_in_a_zero_decimal_currency_is_unchanged() -> None:
    assert parse_amount(10, "JPY") == 10


def test_three_decimal_currency_takes_three_decimals() -> None:
    assert parse_amount("1.234", "KWD") == 1234


def test_more_decimals_than_the_currency_has_is_amount_precision() -> None:
    error = refusal("1.001", "USD")

    assert error.reason == "AMOUNT_PRECISION"
    assert error.details["field"] == "amount"


def test_float_with_more_decimals_than_the_currency_has_is_amount_precision() -> None:
    assert refusal(0.1 + 0.2, "USD").reason == "AMOUNT_PRECISION"


def test_decimals_in_a_zero_decimal_currency_are_amount_precision() -> None:
    assert refusal("10.5", "JPY").reason == "AMOUNT_PRECISION"


def test_refusal_names_the_field_it_was_given() -> None:
    assert refusal("1.001", "USD", field="initial_balance").details["field"] == "initial_balance"


@pytest.mark.parametrize("value", ["1e3", "abc", "", " ", "12.", ".5", "1,000.00", "$5", "0x10"])
def test_string_that_is_not_a_plain_decimal_is_invalid_amount(value: str) -> None:
    error = refusal(value)

    assert error.reason == "INVALID_AMOUNT"
    assert error.details["field"] == "amount"


def test_amount_beyond_int64_minor_units_is_out_of_range() -> None:
    assert refusal("99999999999999999999", "USD").reason == "AMOUNT_OUT_OF_RANGE"


@pytest.mark.parametrize("value", [float("inf"), float("-inf")], ids=["inf", "-inf"])
def test_infinite_float_is_invalid_amount(value: float) -> None:
    assert refusal(value).reason == "INVALID_AMOUNT"


def test_nan_float_is_invalid_amount() -> None:
    assert refusal(float("nan")).reason == "INVALID_AMOUNT"


def test_unknown_currency_is_refused_with_unknown_currency() -> None:
    assert refusal("1.00", "XXX").reason == "UNKNOWN_CURRENCY"


def test_uuid_recipient_is_a_user_id() -> None:
    user_id = str(uuid.uuid4())

    recipient = recipient_of(user_id)

    assert recipient.WhichOneof("by") == "user_id"
    assert recipient.user_id == user_id


def test_uppercase_uuid_recipient_is_a_canonical_user_id() -> None:
    user_id = str(uuid.uuid4())

    assert recipient_of(user_id.upper()).user_id == user_id


def test_recipient_with_an_at_sign_is_an_email() -> None:
    recipient = recipient_of("a@b.co")

    assert recipient.WhichOneof("by") == "email"
    assert recipient.email == "a@b.co"


def test_recipient_starting_with_plus_is_a_phone() -> None:
    recipient = recipient_of("+15551234567")

    assert recipient.WhichOneof("by") == "phone"
    assert recipient.phone == "+15551234567"


def test_any_other_recipient_is_a_username() -> None:
    recipient = recipient_of("bob")

    assert recipient.WhichOneof("by") == "username"
    assert recipient.username == "bob"


def test_recipient_is_stripped_of_surrounding_spaces() -> None:
    assert recipient_of("  a@b.co ").email == "a@b.co"
