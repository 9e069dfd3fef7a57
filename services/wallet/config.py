from __future__ import annotations

from decimal import Decimal

from services.common.config import CommonSettings


class WalletSettings(CommonSettings):
    wallet_port: int = 50052
    wallet_metrics_port: int = 9102
    ledger_addr: str = "127.0.0.1:50051"
    budget_addr: str = "127.0.0.1:50053"
    fraud_addr: str = "127.0.0.1:50054"
    # The credit line of a company's funding account, in major units of each
    # currency: how far wallets can be funded beyond what the company
    # prefunded. Fixed when the account is first opened.
    company_credit_limit: Decimal = Decimal("1000000")
