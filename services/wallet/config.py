from __future__ import annotations

from services.common.config import CommonSettings


class WalletSettings(CommonSettings):
    wallet_port: int = 50052
    wallet_metrics_port: int = 9102
    ledger_addr: str = "127.0.0.1:50051"
    budget_addr: str = "127.0.0.1:50053"
    fraud_addr: str = "127.0.0.1:50054"
