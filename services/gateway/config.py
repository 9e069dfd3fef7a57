from __future__ import annotations

from pydantic import field_validator

from services.common.config import CommonSettings

# Clearly a development default: the gateway logs a warning when it runs on it.
DEV_JWT_SECRET = "moneta-dev-only-insecure-jwt-secret"  # noqa: S105 - a marked dev default


class GatewaySettings(CommonSettings):
    gateway_port: int = 8080
    http_host: str = "0.0.0.0"
    ledger_addr: str = "127.0.0.1:50051"
    wallet_addr: str = "127.0.0.1:50052"
    budget_addr: str = "127.0.0.1:50053"
    fraud_addr: str = "127.0.0.1:50054"
    jwt_secret: str = DEV_JWT_SECRET
    jwt_issuer: str = "moneta"
    jwt_audience: str = "moneta-api"
    # Signs the bank partner's webhooks (HMAC-SHA256). DEVELOPMENT DEFAULT.
    bank_webhook_secret: str = "moneta-dev-only-bank-webhook-secret"  # noqa: S105
    # Requests larger than this are refused before they are read.
    max_body_bytes: int = 64 * 1024

    @field_validator("jwt_secret")
    @classmethod
    def _secret_length(cls, value: str) -> str:
        if len(value) < 32:
            raise ValueError("must be at least 32 characters (HS256 needs 256 bits)")
        return value

    @property
    def uses_dev_secret(self) -> bool:
        return self.jwt_secret == DEV_JWT_SECRET
