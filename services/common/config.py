"""Settings read from the environment once, at start.

Every variable is named ``MONETA_<FIELD>``. A missing or malformed value stops
the process with one line naming the variable, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "MONETA_"


def _require_scheme(value: str, schemes: tuple[str, ...], what: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"must be a {what} URL ({' or '.join(s + '://' for s in schemes)}host…)")
    return value


class CommonSettings(BaseSettings):
    """What every service reads. Services subclass it with their own fields."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    postgres_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    # Each service owns the database <db_prefix><service>, created when missing.
    db_prefix: str = "moneta_"
    db_pool_min: int = 1
    db_pool_max: int = 10
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    amqp_exchange: str = "moneta.events"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Prefixes every Redis key, so that deployments (and test runs) sharing a
    # Redis never collide.
    redis_prefix: str = "moneta:"

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    grpc_host: str = "0.0.0.0"
    # Lets several replicas of a service on one host share its port.
    grpc_reuse_port: bool = False
    metrics_host: str = "0.0.0.0"
    # How long a stopping service lets in-flight calls finish.
    shutdown_grace_seconds: float = 10.0
    # How often readiness re-checks the service's dependencies.
    readiness_interval_seconds: float = 2.0
    # Deadline for calls to peer services.
    peer_timeout_seconds: float = 2.0
    # A second, plaintext port answering only the health service, for
    # Kubernetes' gRPC probes (the kubelet cannot present a client
    # certificate). 0: health is answered on the service's own port only.
    grpc_health_port: int = 0

    # TLS in transit (PEM files). All empty: plaintext. Certificate and key:
    # the gRPC server speaks TLS and clients present them to their peers.
    # With a CA bundle as well: mutual TLS, every peer's certificate is
    # required and verified against it. See services/common/tls.py.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""

    @field_validator("postgres_url")
    @classmethod
    def _postgres_url(cls, value: str) -> str:
        return _require_scheme(value, ("postgresql", "postgres"), "PostgreSQL")

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: str) -> str:
        return _require_scheme(value, ("amqp", "amqps"), "AMQP")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        return _require_scheme(value, ("redis", "rediss"), "Redis")

    @field_validator("tls_cert_file", "tls_key_file", "tls_ca_file")
    @classmethod
    def _tls_file(cls, value: str) -> str:
        if value and not Path(value).is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @field_validator("tls_key_file")
    @classmethod
    def _tls_pair(cls, value: str, info: ValidationInfo) -> str:
        if bool(value) != bool(info.data.get("tls_cert_file")):
            raise ValueError("MONETA_TLS_CERT_FILE and MONETA_TLS_KEY_FILE go together")
        return value

    @field_validator("tls_ca_file")
    @classmethod
    def _tls_ca_needs_pair(cls, value: str, info: ValidationInfo) -> str:
        if value and not info.data.get("tls_key_file"):
            raise ValueError(
                "a CA bundle means mutual TLS: set MONETA_TLS_CERT_FILE and MONETA_TLS_KEY_FILE too"
            )
        return value

    def database_url(self, service: str) -> str:
        """The URL of the service's own database, derived from ``postgres_url``."""
        parts = urlsplit(self.postgres_url)
        return urlunsplit(parts._replace(path=f"/{self.db_prefix}{service}"))


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def load_settings(cls: type[SettingsT], program: str) -> SettingsT:
    """Reads the settings, or exits with one line naming the bad variable."""
    try:
        return cls()
    except ValidationError as exc:
        _exit_on_invalid(exc, program)


def _exit_on_invalid(exc: ValidationError, program: str) -> NoReturn:
    error = exc.errors()[0]
    field = str(error["loc"][0]) if error["loc"] else "?"
    # The value itself is not echoed: it may be a secret.
    sys.stderr.write(f"{program}: invalid setting {ENV_PREFIX}{field.upper()}: {error['msg']}\n")
    raise SystemExit(2)
