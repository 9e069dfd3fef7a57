from __future__ import annotations

from services.common.config import CommonSettings


class LedgerSettings(CommonSettings):
    ledger_port: int = 50051
    ledger_metrics_port: int = 9101
    # One batch is prepared while the one before it is written
    # (services/ledger/engine.py); false: one batch at a time, as before.
    ledger_pipeline: bool = True
