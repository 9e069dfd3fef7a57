"""Exchange rates: one rate source for every service that converts money.

The source is a table of units of each currency per 1 USD, read from the
environment (``MONETA_FX_RATES``), so that the wallet's exchange and the
budget's conversion of foreign spend use the same figures. Everything here is
pure and exact (``Decimal``, inexact results trapped where it matters).

Rounding, stated once: a rate is the table's cross rate (less a spread, for
the wallet's quotes) rounded DOWN to ``RATE_SIGNIFICANT_DIGITS`` significant
digits; an amount converts as ``floor(amount * rate)`` (what a customer
receives: never in their favour) or ``ceil(amount * rate)`` (what a budget
counts: a spend is never under-counted).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, Inexact, InvalidOperation, localcontext

from services.common.errors import Internal, InvalidArgument
from services.common.money import CURRENCY_EXPONENTS, exponent, validate_currency

# DEVELOPMENT DEFAULT: a fixed table; production points MONETA_FX_RATES at
# the treasury's current figures.
DEFAULT_FX_RATES = "USD:1,EUR:0.92,GBP:0.79,JPY:151.20,CHF:0.88,CAD:1.36,AUD:1.52,BHD:0.376"
RATE_SIGNIFICANT_DIGITS = 12
# Wide enough that the division for a cross rate loses nothing that the
# 12 digits kept could see, and that an int64 amount times a 12-digit rate
# is exact.
_PRECISION = 60


def parse_rate_table(text: str) -> dict[str, Decimal]:
    """``"USD:1,EUR:0.92,JPY:151.20"`` (units of each currency per 1 USD)
    as a table; ValueError names what is wrong."""
    table: dict[str, Decimal] = {}
    for item in text.split(","):
        code, sep, value = item.strip().partition(":")
        if not sep or code not in CURRENCY_EXPONENTS or code in table:
            raise ValueError(f"fx rate entry {item.strip()[:20]!r} is not CUR:rate")
        try:
            rate = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"fx rate for {code} is not a decimal") from None
        if not rate.is_finite() or rate <= 0:
            raise ValueError(f"fx rate for {code} must be positive")
        table[code] = rate
    return table


@functools.lru_cache(maxsize=4)
def configured_table(text: str) -> dict[str, Decimal]:
    """The table a service was configured with; a broken one is a bug of
    the deployment, reported as such (never as the caller's fault)."""
    try:
        return parse_rate_table(text)
    except ValueError as exc:
        raise Internal(
            f"the exchange rate table is misconfigured: {exc}", reason="FX_RATES_INVALID"
        ) from None


def quoted_rate(
    table: Mapping[str, Decimal], from_currency: str, to_currency: str, spread_bps: int
) -> Decimal:
    """Units of ``to_currency`` per unit of ``from_currency``: the cross
    rate through USD less the spread, rounded down to
    ``RATE_SIGNIFICANT_DIGITS`` significant digits."""
    for code in (from_currency, to_currency):
        validate_currency(code)
        if code not in table:
            raise InvalidArgument(
                f"{code} cannot be exchanged", reason="UNSUPPORTED_CURRENCY",
                details={"currency": code},
            )  # fmt: skip
    if from_currency == to_currency:
        raise InvalidArgument("the two currencies are the same", reason="SAME_CURRENCY")
    if not 0 <= spread_bps < 10_000:
        raise Internal("the fx spread is misconfigured", reason="FX_SPREAD_INVALID")
    with localcontext() as ctx:
        # Every step rounds toward zero (all values are positive), so the
        # rate is at most the exact one: rounding never favours the user.
        ctx.prec = _PRECISION
        ctx.rounding = ROUND_FLOOR
        exact = table[to_currency] / table[from_currency] * (10_000 - spread_bps) / 10_000
        quantum = Decimal(1).scaleb(exact.adjusted() - RATE_SIGNIFICANT_DIGITS + 1)
        return exact.quantize(quantum, rounding=ROUND_FLOOR).normalize()


def converted_amount(
    from_amount: int,
    from_currency: str,
    to_currency: str,
    rate: Decimal,
    rounding: str = ROUND_FLOOR,
) -> int:
    """``from_amount * rate``, from minor units of one currency to minor
    units of the other, rounded to a whole minor unit by ``rounding``
    (``ROUND_FLOOR`` or ``ROUND_CEILING``); exact (inexact results trapped)."""
    if rounding not in (ROUND_FLOOR, ROUND_CEILING):
        raise ValueError("rounding must be ROUND_FLOOR or ROUND_CEILING")
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        ctx.traps[Inexact] = True
        exact = (Decimal(from_amount) * rate).scaleb(
            exponent(to_currency) - exponent(from_currency)
        )
        return int(exact.to_integral_value(rounding=rounding))


def format_rate(rate: Decimal) -> str:
    """The rate as a plain decimal string (never in exponent form)."""
    return f"{rate:f}"
