"""Exchange quotes (the rate, the spread, the rounding) and merchants' QR
payment requests (signing, verifying, tampering, expiry), as pure logic."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from services.common.errors import FailedPrecondition, Internal, InvalidArgument, MonetaError
from services.common.fx_rates import (
    RATE_SIGNIFICANT_DIGITS,
    converted_amount,
    format_rate,
    parse_rate_table,
    quoted_rate,
)
from services.wallet.config import WalletSettings
from services.wallet.fx import quote_terms
from services.wallet.merchants import (
    PaymentRequest,
    ensure_unexpired,
    open_signing_key,
    public_key_of,
    read_qr,
    seal_signing_key,
    sign_payment_request,
)

TABLE = parse_rate_table("USD:1,EUR:0.92,JPY:151.20,BHD:0.376")
SPREAD_BPS = 50


def refusal(call: object, *args: object) -> MonetaError:
    with pytest.raises(MonetaError) as caught:
        call(*args)  # type: ignore[operator]
    return caught.value


# ---------------------------------------------------------------- quotes


def test_usd_to_jpy_rate_is_the_table_rate_less_the_spread() -> None:
    terms = quote_terms(TABLE, "USD", "JPY", 10_000, SPREAD_BPS)  # 100.00 USD

    assert format_rate(terms.rate) == "150.444"  # 151.20 * 0.995, exact
    assert terms.to_amount == 15_044  # 15,044.4 yen, rounded down


def test_jpy_to_usd_rate_is_rounded_down_to_twelve_significant_digits() -> None:
    terms = quote_terms(TABLE, "JPY", "USD", 10_000, SPREAD_BPS)  # 10,000 yen

    # 0.995 / 151.20 = 0.0065806878306878...
    assert format_rate(terms.rate) == "0.00658068783068"
    assert terms.to_amount == 6_580  # 65.8068... USD, rounded down to the cent


def test_usd_to_bhd_converts_into_three_decimal_minor_units() -> None:
    whole = quote_terms(TABLE, "USD", "BHD", 10_000, SPREAD_BPS)  # 100.00 USD
    cent = quote_terms(TABLE, "USD", "BHD", 1, SPREAD_BPS)  # 0.01 USD

    assert format_rate(whole.rate) == "0.37412"
    assert whole.to_amount == 37_412  # 37.412 BHD, exact
    assert cent.to_amount == 3  # 0.0037412 BHD is 3.7412 fils: 3


def test_bhd_to_usd_rounds_down_to_the_cent() -> None:
    terms = quote_terms(TABLE, "BHD", "USD", 1_000, SPREAD_BPS)  # 1.000 BHD

    assert format_rate(terms.rate) == "2.64627659574"
    assert terms.to_amount == 264


def test_the_spread_lowers_the_rate_the_user_gets() -> None:
    mid = quoted_rate(TABLE, "EUR", "JPY", 0)
    quoted = quoted_rate(TABLE, "EUR", "JPY", SPREAD_BPS)

    assert quoted < mid
    assert quoted == pytest.approx(mid * Decimal("0.995"), rel=Decimal("1e-11"))


def test_rate_never_exceeds_the_exact_cross_rate() -> None:
    for a in TABLE:
        for b in TABLE:
            if a == b:
                continue
            exact = Fraction(TABLE[b]) / Fraction(TABLE[a]) * Fraction(9_950, 10_000)
            rate = quoted_rate(TABLE, a, b, SPREAD_BPS)
            assert Fraction(rate) <= exact
            assert len(rate.as_tuple().digits) <= RATE_SIGNIFICANT_DIGITS


@given(
    amount=st.integers(min_value=1, max_value=10**15),
    pair=st.sampled_from(
        [("USD", "JPY"), ("JPY", "USD"), ("USD", "BHD"), ("BHD", "JPY"), ("EUR", "BHD")]
    ),
)
def test_to_amount_is_the_floor_of_amount_times_rate_and_never_favours_the_user(
    amount: int, pair: tuple[str, str]
) -> None:
    source, target = pair
    scale = {"USD": 2, "JPY": 0, "BHD": 3, "EUR": 2}
    rate = quoted_rate(TABLE, source, target, SPREAD_BPS)
    exact = Fraction(amount) * Fraction(rate) * Fraction(10) ** (scale[target] - scale[source])

    to_amount = converted_amount(amount, source, target, rate)

    assert to_amount <= exact < to_amount + 1


def test_an_int64_amount_is_converted_exactly() -> None:
    amount = 2**62
    rate = quoted_rate(TABLE, "JPY", "USD", SPREAD_BPS)

    assert (
        converted_amount(amount, "JPY", "USD", rate) == (amount * Fraction(rate) * 100).__floor__()
    )


def test_an_amount_that_buys_less_than_one_minor_unit_is_refused() -> None:
    error = refusal(quote_terms, TABLE, "JPY", "USD", 1, SPREAD_BPS)

    assert isinstance(error, InvalidArgument)
    assert error.reason == "AMOUNT_TOO_SMALL"


@pytest.mark.parametrize(
    ("source", "target", "reason"),
    [
        ("USD", "USD", "SAME_CURRENCY"),
        ("USD", "SEK", "UNSUPPORTED_CURRENCY"),
        ("XXX", "USD", "UNKNOWN_CURRENCY"),
    ],
)
def test_a_pair_that_cannot_be_quoted_is_refused(source: str, target: str, reason: str) -> None:
    error = refusal(quote_terms, TABLE, source, target, 100, SPREAD_BPS)

    assert isinstance(error, InvalidArgument)
    assert error.reason == reason


def test_a_zero_amount_is_refused() -> None:
    assert refusal(quote_terms, TABLE, "USD", "JPY", 0, SPREAD_BPS).reason == "INVALID_AMOUNT"


def test_the_default_rate_table_parses() -> None:
    table = parse_rate_table(WalletSettings.model_fields["fx_rates"].default)

    assert table["USD"] == 1 and table["JPY"] == Decimal("151.20")


@pytest.mark.parametrize(
    "text", ["USD:1,EUR", "USD:1,EUR:0", "USD:1,XXX:2", "USD:x", "USD:1,USD:1"]
)
def test_a_malformed_rate_table_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate_table(text)


# ---------------------------------------------------------------- QR codes

MERCHANT = uuid.UUID("11111111-2222-4333-8444-555555555555")
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def payment_request(**changes: object) -> PaymentRequest:
    fields: dict[str, object] = {
        "merchant_id": MERCHANT,
        "amount": 1250,
        "currency": "USD",
        "reference": "order-42",
        "expires_at": int((NOW + timedelta(minutes=15)).timestamp()),
    }
    fields.update(changes)
    return PaymentRequest(**fields)  # type: ignore[arg-type]


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_a_signed_request_verifies_with_the_merchants_key() -> None:
    request = payment_request()
    payload = sign_payment_request(request, KEY)

    assert read_qr(payload).verified(public_key_of(KEY)) == request


def test_a_tampered_amount_fails_the_signature() -> None:
    body, signature = sign_payment_request(payment_request(), KEY).split(".")
    fields = json.loads(unb64(body))
    fields["amount"] = 1
    tampered = f"{b64(json.dumps(fields).encode())}.{signature}"

    error = refusal(read_qr(tampered).verified, public_key_of(KEY))

    assert isinstance(error, InvalidArgument)
    assert error.reason == "QR_SIGNATURE_INVALID"


def test_a_request_signed_by_another_key_fails_the_signature() -> None:
    payload = sign_payment_request(payment_request(), Ed25519PrivateKey.generate())

    assert refusal(read_qr(payload).verified, public_key_of(KEY)).reason == "QR_SIGNATURE_INVALID"


def test_a_tampered_signature_fails() -> None:
    body, signature = sign_payment_request(payment_request(), KEY).split(".")
    raw = bytearray(unb64(signature))
    raw[0] ^= 1

    error = refusal(read_qr(f"{body}.{b64(bytes(raw))}").verified, public_key_of(KEY))

    assert error.reason == "QR_SIGNATURE_INVALID"


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "no-dot",
        "a.b.c",
        "!!!.abc",
        f"{b64(b'{}')}\n.{b64(b'sig')}",
        f"{b64(b'not json')}.{b64(b'sig')}",
        f"{b64(b'[1, 2]')}.{b64(b'sig')}",
        f"{b64(json.dumps({'v': 1}).encode())}.{b64(b'sig')}",
        "A" * 5000 + ".x",
    ],
)
def test_a_payload_that_is_not_a_payment_request_is_malformed(payload: str) -> None:
    error = refusal(read_qr, payload)

    assert isinstance(error, InvalidArgument)
    assert error.reason == "QR_MALFORMED"


@pytest.mark.parametrize(
    "change",
    [
        {"amount": 0},
        {"amount": True},
        {"amount": "12.50"},
        {"currency": "XXX"},
        {"reference": ""},
        {"merchant_id": "not-a-uuid"},
        {"expires_at": 1.5},
        {"v": True},
    ],
)
def test_a_signed_request_with_bad_fields_is_malformed(change: dict[str, object]) -> None:
    fields = {
        "v": 1,
        "merchant_id": str(MERCHANT),
        "amount": 1250,
        "currency": "USD",
        "reference": "r",
        "expires_at": 2_000_000_000,
        **change,
    }
    body = b64(json.dumps(fields).encode())
    payload = f"{body}.{b64(KEY.sign(b'moneta.qr.v1.' + body.encode()))}"

    assert refusal(read_qr, payload).reason == "QR_MALFORMED"


def test_a_request_is_payable_until_its_expiry() -> None:
    request = payment_request(expires_at=int(NOW.timestamp()) + 1)

    ensure_unexpired(request, NOW)  # one second left: fine
    error = refusal(ensure_unexpired, request, NOW + timedelta(seconds=1))

    assert isinstance(error, FailedPrecondition)
    assert error.reason == "QR_EXPIRED"


def test_the_signing_key_is_sealed_for_its_merchant_only() -> None:
    key_b64 = WalletSettings.model_fields["bank_account_key"].default
    sealed = seal_signing_key(key_b64, MERCHANT, KEY)

    opened = open_signing_key(key_b64, MERCHANT, sealed)
    error = refusal(open_signing_key, key_b64, uuid.uuid4(), sealed)

    assert public_key_of(opened) == public_key_of(KEY)
    assert bytes(range(32)) not in sealed
    assert isinstance(error, Internal)
    assert error.reason == "KEY_UNREADABLE"
