from __future__ import annotations

from decimal import Decimal

from services.common.config import CommonSettings


class FraudSettings(CommonSettings):
    fraud_port: int = 50054
    fraud_metrics_port: int = 9104
    # Payments of at least this many major units (of their own currency) go
    # to review: the payer confirms with their PIN. The fraud service's
    # trained model and rules will refine this.
    fraud_review_amount: Decimal = Decimal("10000")
