"""Money as an integer of minor units plus an ISO 4217 code.

Decimal strings appear only at the edges (HTTP, events) and are parsed exactly
with ``decimal.Decimal``: an amount with more decimals than its currency has is
refused, never rounded.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation, localcontext

from services.common.errors import InvalidArgument

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

# Minor-unit exponents. ISO 4217 active codes that Moneta supports, plus BTC.
CURRENCY_EXPONENTS: dict[str, int] = {
    "AED": 2,
    "ARS": 2,
    "AUD": 2,
    "BHD": 3,
    "BRL": 2,
    "BTC": 8,
    "CAD": 2,
    "CHF": 2,
    "CLP": 0,
    "CNY": 2,
    "COP": 2,
    "CZK": 2,
    "DKK": 2,
    "EGP": 2,
    "EUR": 2,
    "GBP": 2,
    "HKD": 2,
    "HUF": 2,
    "IDR": 2,
    "ILS": 2,
    "INR": 2,
    "ISK": 0,
    "JOD": 3,
    "JPY": 0,
    "KES": 2,
    "KRW": 0,
    "KWD": 3,
    "MAD": 2,
    "MXN": 2,
    "MYR": 2,
    "NGN": 2,
    "NOK": 2,
    "NZD": 2,
    "OMR": 3,
    "PHP": 2,
    "PKR": 2,
    "PLN": 2,
    "QAR": 2,
    "RON": 2,
    "SAR": 2,
    "SEK": 2,
    "SGD": 2,
    "THB": 2,
    "TND": 3,
    "TRY": 2,
    "TWD": 2,
    "UAH": 2,
    "USD": 2,
    "VND": 0,
    "ZAR": 2,
}

_DECIMAL_RE = re.compile(r"^-?[0-9]{1,20}(\.[0-9]{1,18})?$")


def validate_currency(code: str) -> str:
    """The code itself, or INVALID_ARGUMENT with reason UNKNOWN_CURRENCY."""
    if code not in CURRENCY_EXPONENTS:
        raise InvalidArgument(
            f"unknown currency {code[:8]!r}",
            reason="UNKNOWN_CURRENCY",
            details={"currency": code[:8]},
        )
    return code


def exponent(currency: str) -> int:
    return CURRENCY_EXPONENTS[validate_currency(currency)]


def to_minor_units(amount: str | int | Decimal, currency: str) -> int:
    """Parses a decimal amount in major units ("420.50") into minor units.

    Refuses (INVALID_ARGUMENT) anything that is not a plain decimal number, an
    amount with more decimals than the currency has (AMOUNT_PRECISION), and an
    amount beyond int64 minor units (AMOUNT_OUT_OF_RANGE). Floats are refused
    by type: they cannot carry money exactly.
    """
    exp = exponent(currency)
    if isinstance(amount, bool | float):
        raise InvalidArgument(
            "amounts must be decimal strings or integers", reason="INVALID_AMOUNT"
        )
    if isinstance(amount, str):
        if not _DECIMAL_RE.match(amount.strip()):
            raise InvalidArgument(
                f"{amount[:32]!r} is not a decimal amount", reason="INVALID_AMOUNT"
            )
        try:
            value = Decimal(amount.strip())
        except InvalidOperation as exc:  # pragma: no cover - the regex already guards
            raise InvalidArgument("not a decimal amount", reason="INVALID_AMOUNT") from exc
    else:
        value = Decimal(amount)
    if not value.is_finite():
        raise InvalidArgument("amount must be a finite number", reason="INVALID_AMOUNT")
    # Enough precision for every digit: the default 28 would round a long
    # amount silently instead of refusing it.
    with localcontext() as ctx:
        ctx.prec = len(value.as_tuple().digits) + exp + 2
        scaled = value.scaleb(exp)
        whole = scaled.to_integral_value()
    if scaled != whole:
        raise InvalidArgument(
            f"{currency} has {exp} decimal places; {value} has more",
            reason="AMOUNT_PRECISION",
            details={"currency": currency, "decimals": exp},
        )
    minor = int(whole)
    if not INT64_MIN <= minor <= INT64_MAX:
        raise InvalidArgument("amount is out of range", reason="AMOUNT_OUT_OF_RANGE")
    return minor


def to_major_units(minor: int, currency: str) -> str:
    """Formats minor units as a decimal string with exactly the currency's decimals."""
    exp = exponent(currency)
    value = Decimal(minor).scaleb(-exp)
    return f"{value:.{exp}f}"


def require_positive(amount: int, what: str = "amount") -> int:
    if amount <= 0:
        raise InvalidArgument(f"{what} must be greater than zero", reason="INVALID_AMOUNT")
    if amount > INT64_MAX:
        raise InvalidArgument(f"{what} is out of range", reason="AMOUNT_OUT_OF_RANGE")
    return amount
