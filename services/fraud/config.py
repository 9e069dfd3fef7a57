from __future__ import annotations

from services.common.config import CommonSettings


class FraudSettings(CommonSettings):
    fraud_port: int = 50054
    fraud_metrics_port: int = 9104
