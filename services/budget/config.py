from __future__ import annotations

from services.common.config import CommonSettings


class BudgetSettings(CommonSettings):
    budget_port: int = 50053
    budget_metrics_port: int = 9103
    # How long a reservation holds spend when the caller names no ttl.
    reservation_ttl_seconds: int = 300
    # How often expired reservations are released.
    reservation_sweep_seconds: float = 5.0
    # How often ended periods are closed and the next ones opened.
    period_sweep_seconds: float = 30.0
