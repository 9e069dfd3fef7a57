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
    # How long a payment flagged for review waits for the payer's PIN.
    review_hold_seconds: int = 900

    # Banking. The key (AES-256-GCM, base64 of 32 bytes) encrypts linked bank
    # account numbers at rest. DEVELOPMENT DEFAULT: set a real key anywhere else.
    bank_account_key: str = "ZGV2LW9ubHktbW9uZXRhLWJhbmstYWNjb3VudC1rZXk="
    # Where the bank partner (locally, deploy/local/bank_simulator.py) takes
    # collection and payout requests.
    bank_partner_url: str = "http://127.0.0.1:8090"

    # Currency exchange: units of each currency per 1 USD, and the spread the
    # platform keeps, in basis points.
    fx_rates: str = "USD:1,EUR:0.92,GBP:0.79,JPY:151.20,CHF:0.88,CAD:1.36,AUD:1.52,BHD:0.376"
    fx_spread_bps: int = 50
    fx_quote_ttl_seconds: int = 30
    # How long a merchant's QR payment request stays payable.
    qr_ttl_seconds: int = 900
