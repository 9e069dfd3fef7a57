from __future__ import annotations

from decimal import Decimal

from pydantic import field_validator

from services.common.config import CommonSettings
from services.fraud.domain import DEFAULT_RULES, DEFAULT_WEIGHTS, DegradedPolicy, Rules

_R = DEFAULT_RULES


class FraudSettings(CommonSettings):
    """The fraud service's settings. The scoring figures default to
    ``domain.DEFAULT_RULES``; each can be overridden here."""

    fraud_port: int = 50054
    fraud_metrics_port: int = 9104
    # Payments of at least this many major units (of their own currency) go
    # to review: the payer confirms with their PIN.
    fraud_review_amount: Decimal = _R.review_amount or Decimal("10000")
    fraud_review_score: float = _R.review_score
    fraud_block_score: float = _R.block_score
    # Rule weights overriding the defaults, as JSON: {"VELOCITY_1M": 50}.
    fraud_rule_weights: dict[str, float] = {}
    fraud_velocity_short_seconds: int = _R.short_window_seconds
    fraud_velocity_short_limit: int = _R.short_window_limit
    fraud_velocity_long_seconds: int = _R.long_window_seconds
    fraud_velocity_long_limit: int = _R.long_window_limit
    fraud_unusual_amount_factor: float = _R.unusual_amount_factor
    fraud_typical_amounts_kept: int = _R.typical_amounts_kept
    fraud_typical_min_history: int = _R.typical_min_history
    fraud_new_user_amount: Decimal = _R.new_user_amount
    fraud_impossible_speed_kmh: float = _R.impossible_speed_kmh
    # Without Redis: "threshold" (review at or above the degraded amount,
    # by default the review amount), "review" (everything) or "allow".
    fraud_degraded_policy: DegradedPolicy = _R.degraded_policy
    fraud_degraded_review_amount: Decimal | None = None
    # How long Redis keeps a user's history after their last transaction.
    fraud_history_days: int = 180
    # After a Redis failure, how long scoring goes without it before trying again.
    fraud_redis_retry_seconds: float = 1.0
    # How often a replica looks for changed lists and a newer model.
    fraud_refresh_seconds: float = 1.0
    # Open review cases nobody resolved in this time become EXPIRED.
    fraud_review_expiry_seconds: int = 86_400

    @field_validator("fraud_rule_weights")
    @classmethod
    def _known_rules(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(DEFAULT_WEIGHTS))
        if unknown:
            raise ValueError(f"unknown rules {unknown}; known: {sorted(DEFAULT_WEIGHTS)}")
        return value

    def rules(self) -> Rules:
        return Rules(
            review_score=self.fraud_review_score,
            block_score=self.fraud_block_score,
            weights={**_R.weights, **self.fraud_rule_weights},
            short_window_seconds=self.fraud_velocity_short_seconds,
            short_window_limit=self.fraud_velocity_short_limit,
            long_window_seconds=self.fraud_velocity_long_seconds,
            long_window_limit=self.fraud_velocity_long_limit,
            unusual_amount_factor=self.fraud_unusual_amount_factor,
            typical_amounts_kept=self.fraud_typical_amounts_kept,
            typical_min_history=self.fraud_typical_min_history,
            new_user_amount=self.fraud_new_user_amount,
            impossible_speed_kmh=self.fraud_impossible_speed_kmh,
            review_amount=self.fraud_review_amount,
            degraded_policy=self.fraud_degraded_policy,
            degraded_review_amount=self.fraud_degraded_review_amount,
        )
