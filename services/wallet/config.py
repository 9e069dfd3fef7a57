from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

from pydantic import field_validator
from pydantic_settings import NoDecode

from services.common.config import CommonSettings
from services.common.fx_rates import DEFAULT_FX_RATES

CONSUMERS = ("user_created", "booking_created", "booking_cancelled")


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
    # Fraud scoring: how long a payment waits for its score, and what the
    # wallet does when none comes in time (the fraud service down or slow):
    # "limit" refuses payments at or above fraud_review_amount and lets
    # smaller ones through, "refuse" refuses every one, "allow" lets every
    # one through. Each is logged and counted
    # (moneta_wallet_fraud_unavailable_total).
    fraud_timeout_seconds: float = 1.0
    fraud_unavailable_policy: Literal["limit", "refuse", "allow"] = "limit"
    # The fraud service's step-up amount (the same variable), in major units.
    fraud_review_amount: Decimal = Decimal("10000")

    # Banking. The key (AES-256-GCM, base64 of 32 bytes) encrypts linked bank
    # account numbers at rest. DEVELOPMENT DEFAULT: set a real key anywhere else.
    bank_account_key: str = "ZGV2LW9ubHktbW9uZXRhLWJhbmstYWNjb3VudC1rZXk="
    # Where the bank partner (locally, deploy/local/bank_simulator.py) takes
    # collection and payout requests.
    bank_partner_url: str = "http://127.0.0.1:8090"

    # Currency exchange: units of each currency per 1 USD, and the spread the
    # platform keeps, in basis points.
    fx_rates: str = DEFAULT_FX_RATES
    fx_spread_bps: int = 50
    fx_quote_ttl_seconds: int = 30
    # How long a merchant's QR payment request stays payable.
    qr_ttl_seconds: int = 900

    # Event consumers (python -m services.wallet consume): which of them this
    # process runs (comma-separated), its health and metrics ports, and how
    # it consumes: messages in flight, seconds before each retry (then the
    # parking queue), a handler's time limit, deliveries of one message
    # (crashes included) before the broker parks it.
    events_consumers: Annotated[tuple[str, ...], NoDecode] = CONSUMERS
    events_port: int = 50055
    events_metrics_port: int = 9105
    consumer_prefetch: int = 32
    consumer_retry_delays: Annotated[tuple[float, ...], NoDecode] = (1.0, 10.0, 60.0)
    consumer_handler_timeout_seconds: float = 30.0
    consumer_delivery_limit: int = 20
    consumer_reconnect_seconds: float = 2.0
    # How long the inbox remembers an applied event (pruned hourly).
    consumer_inbox_retention_days: int = 30

    @field_validator("events_consumers", mode="before")
    @classmethod
    def _consumer_names(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(n.strip() for n in value.split(",") if n.strip())
        if isinstance(value, tuple | list):
            unknown = [n for n in value if n not in CONSUMERS]
            if unknown or not value:
                raise ValueError(f"must be a comma list of {', '.join(CONSUMERS)}")
        return value

    @field_validator("consumer_retry_delays", mode="before")
    @classmethod
    def _delays(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(d.strip() for d in value.split(",") if d.strip())
        return value

    @field_validator("consumer_retry_delays")
    @classmethod
    def _positive_delays(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < d <= 86400 for d in value):
            raise ValueError("each delay must be above 0 and at most 86400 seconds")
        return value
