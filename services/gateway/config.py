from __future__ import annotations

from pydantic import field_validator, model_validator

from services.common.config import CommonSettings

# Clearly a development default: the gateway logs a warning when it runs on it.
DEV_JWT_SECRET = "moneta-dev-only-insecure-jwt-secret"  # noqa: S105 - a marked dev default

# What a token may be signed with: HMAC with the shared secret, or a public
# key from the JWKS. "none" is not among them and can never be configured.
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class GatewaySettings(CommonSettings):
    gateway_port: int = 8080
    http_host: str = "0.0.0.0"
    ledger_addr: str = "127.0.0.1:50051"
    wallet_addr: str = "127.0.0.1:50052"
    budget_addr: str = "127.0.0.1:50053"
    fraud_addr: str = "127.0.0.1:50054"

    # -- tokens
    jwt_secret: str = DEV_JWT_SECRET
    jwt_issuer: str = "moneta"
    jwt_audience: str = "moneta-api"
    # Comma-separated; a token whose header names any other is refused.
    jwt_algorithms: str = "HS256"
    # Public keys for RS*/PS*/ES*/EdDSA: a JWKS file, or a URL fetched again
    # every jwt_jwks_refresh_seconds (and at most that often when a token
    # names a key id the set does not hold yet).
    jwt_jwks_file: str = ""
    jwt_jwks_url: str = ""
    jwt_jwks_refresh_seconds: float = 300.0
    # Clock skew tolerated on exp and nbf.
    jwt_leeway_seconds: int = 5

    # Signs the bank partner's webhooks (HMAC-SHA256). DEVELOPMENT DEFAULT.
    bank_webhook_secret: str = "moneta-dev-only-bank-webhook-secret"  # noqa: S105
    # Requests larger than this are refused before they are read.
    max_body_bytes: int = 64 * 1024
    # Deeper JSON (objects and arrays inside each other) is refused unparsed.
    max_json_depth: int = 32

    # -- idempotency of money-moving requests (Redis)
    idempotency_ttl_seconds: int = 24 * 3600
    # How long a first request holds its key while it runs; a duplicate
    # arriving meanwhile waits up to idempotency_wait_seconds for its answer.
    idempotency_lease_seconds: float = 30.0
    idempotency_wait_seconds: float = 5.0

    # Proxies (comma-separated IPs, or *) whose X-Forwarded-For names the
    # client: behind an ingress, its address, or every client shares one
    # per-IP bucket.
    forwarded_allow_ips: str = "127.0.0.1"

    # -- rate limits: token buckets in Redis, per user and per client IP
    rate_limit_enabled: bool = True
    rate_limit_user_per_second: float = 50.0
    rate_limit_user_burst: int = 100
    rate_limit_ip_per_second: float = 500.0
    rate_limit_ip_burst: int = 1000

    # -- upstreams
    # Attempts of a read (Get*/List*/Verify*) whose upstream did not answer.
    upstream_read_attempts: int = 3
    # Consecutive transport failures (UNAVAILABLE, DEADLINE_EXCEEDED) that
    # open an upstream's circuit, and how long it stays open before one
    # probe call is let through.
    breaker_failure_threshold: int = 5
    breaker_cooldown_seconds: float = 5.0

    @field_validator("jwt_secret")
    @classmethod
    def _secret_length(cls, value: str) -> str:
        if len(value) < 32:
            raise ValueError("must be at least 32 characters (HS256 needs 256 bits)")
        return value

    @field_validator("jwt_algorithms")
    @classmethod
    def _known_algorithms(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",") if n.strip()]
        unknown = [n for n in names if n not in HMAC_ALGORITHMS | KEY_ALGORITHMS]
        if not names or unknown:
            raise ValueError(
                f"must name algorithms among {', '.join(sorted(HMAC_ALGORITHMS | KEY_ALGORITHMS))}"
                + (f"; {unknown[0][:16]!r} is not one" if unknown else "")
            )
        return ",".join(names)

    @field_validator(
        "rate_limit_user_per_second",
        "rate_limit_ip_per_second",
        "rate_limit_user_burst",
        "rate_limit_ip_burst",
        "breaker_failure_threshold",
        "upstream_read_attempts",
        "max_body_bytes",
        "max_json_depth",
    )
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than zero")
        return value

    @model_validator(mode="after")
    def _keys_for_the_algorithms(self) -> GatewaySettings:
        if set(self.algorithms) & KEY_ALGORITHMS and not (self.jwt_jwks_file or self.jwt_jwks_url):
            raise ValueError(
                "jwt_algorithms names public-key algorithms: set MONETA_JWT_JWKS_FILE or "
                "MONETA_JWT_JWKS_URL"
            )
        return self

    @property
    def algorithms(self) -> tuple[str, ...]:
        return tuple(self.jwt_algorithms.split(","))

    @property
    def uses_dev_secret(self) -> bool:
        return self.jwt_secret == DEV_JWT_SECRET and bool(set(self.algorithms) & HMAC_ALGORITHMS)
