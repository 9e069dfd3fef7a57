from __future__ import annotations

from pydantic import Field

from services.common.config import CommonSettings


class LedgerSettings(CommonSettings):
    ledger_port: int = 50051
    ledger_metrics_port: int = 9101
    # Batches in flight at once per process (each on its own connection).
    ledger_writers: int = Field(default=1, ge=1, le=8)
