from __future__ import annotations

from services.common.config import CommonSettings


class LedgerSettings(CommonSettings):
    ledger_port: int = 50051
    ledger_metrics_port: int = 9101
