from __future__ import annotations

from pydantic import field_validator

from services.common.config import CommonSettings
from services.common.fx_rates import DEFAULT_FX_RATES, parse_rate_table


class BudgetSettings(CommonSettings):
    budget_port: int = 50053
    budget_metrics_port: int = 9103
    # How long a reservation holds spend when the caller names no ttl.
    reservation_ttl_seconds: int = 300
    # How often expired reservations are released.
    reservation_sweep_seconds: float = 5.0
    # How often ended periods are closed and the next ones opened.
    period_sweep_seconds: float = 30.0
    # Spend in another currency than a budget's is converted with this table,
    # the wallet's rate source (the same MONETA_FX_RATES).
    fx_rates: str = DEFAULT_FX_RATES

    @field_validator("fx_rates")
    @classmethod
    def _fx_rates(cls, value: str) -> str:
        parse_rate_table(value)
        return value
