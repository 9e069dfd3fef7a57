"""A stand-in for Moneta's bank partner, for local development.

It accepts the wallet's collection (money in) and payout (money out)
requests and, after a delay, reports each one to the gateway's webhook with a
valid signature: SETTLED, or FAILED for a configurable share of them. A
delivery the gateway does not accept is retried with backoff. POST
/v1/returns/{transfer_id} plays a bank that returns a settled transfer.

    .venv/bin/python deploy/local/bank_simulator.py        (make run starts it)

Settings (environment):
    MONETA_BANK_SIMULATOR_PORT            8090
    MONETA_BANK_SIMULATOR_DELAY_SECONDS   5
    MONETA_BANK_SIMULATOR_FAILURE_RATE    0.1
    MONETA_GATEWAY_URL                    http://127.0.0.1:8080
    MONETA_BANK_WEBHOOK_SECRET            the gateway's development default
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import structlog
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, Field

from services.common.logging import configure_logging
from services.gateway.config import GatewaySettings

log = structlog.get_logger("moneta.bank_simulator")

WEBHOOK_PATH = "/api/v1/webhooks/bank"
# Deliveries the gateway does not accept are retried this often, backing off
# from 1 s to at most a minute.
MAX_DELIVERY_ATTEMPTS = 30
FAILURE_REASONS = ("R01 insufficient funds", "R02 account closed", "R03 no account")


@dataclass(frozen=True)
class SimulatorSettings:
    port: int
    delay_seconds: float
    failure_rate: float
    gateway_url: str
    webhook_secret: str

    @staticmethod
    def from_env(env: Mapping[str, str]) -> SimulatorSettings:
        default_secret = GatewaySettings.model_fields["bank_webhook_secret"].default
        settings = SimulatorSettings(
            port=int(env.get("MONETA_BANK_SIMULATOR_PORT", "8090")),
            delay_seconds=float(env.get("MONETA_BANK_SIMULATOR_DELAY_SECONDS", "5")),
            failure_rate=float(env.get("MONETA_BANK_SIMULATOR_FAILURE_RATE", "0.1")),
            gateway_url=env.get("MONETA_GATEWAY_URL", "http://127.0.0.1:8080").rstrip("/"),
            webhook_secret=env.get("MONETA_BANK_WEBHOOK_SECRET", default_secret),
        )
        if not 0.0 <= settings.failure_rate <= 1.0 or settings.delay_seconds < 0:
            raise SystemExit("bank simulator: the failure rate is 0 to 1, the delay at least 0")
        return settings


class BankRequest(BaseModel):
    """A collection or payout, as the wallet's relay sends it."""

    request_id: str = Field(min_length=1, max_length=64)
    transfer_id: str = Field(min_length=1, max_length=64)
    type: Literal["COLLECTION", "PAYOUT"]
    amount: str
    currency: str
    account_number: str = ""
    routing_number: str = ""
    holder_name: str = ""


def sign(secret: str, body: bytes, at: int) -> str:
    """The X-Moneta-Signature header: t=<unix seconds>,v1=<hex HMAC-SHA256
    of "<t>.<raw body>">."""
    digest = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={digest}"


def create_app(settings: SimulatorSettings) -> FastAPI:
    # request_id → transfer_id: a request sent twice is settled once.
    accepted: dict[str, str] = {}
    tasks: set[asyncio.Task[None]] = set()
    client = httpx.AsyncClient(timeout=5.0)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info(
            "bank_simulator_started",
            port=settings.port,
            gateway=settings.gateway_url,
            delay_seconds=settings.delay_seconds,
            failure_rate=settings.failure_rate,
        )
        yield
        for task in tasks:
            task.cancel()
        await client.aclose()

    app = FastAPI(title="Moneta bank simulator", lifespan=lifespan)

    def later(outcome: dict[str, Any], delay: float) -> None:
        task = asyncio.create_task(deliver(outcome, delay))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def deliver(outcome: dict[str, Any], delay: float) -> None:
        await asyncio.sleep(delay)
        body = json.dumps(outcome).encode()
        for attempt in range(1, MAX_DELIVERY_ATTEMPTS + 1):
            headers = {
                "Content-Type": "application/json",
                # Signed afresh each time: an old signature expires.
                "X-Moneta-Signature": sign(settings.webhook_secret, body, int(time.time())),
            }
            try:
                response = await client.post(
                    settings.gateway_url + WEBHOOK_PATH, content=body, headers=headers
                )
                if response.is_success:
                    log.info("webhook_delivered", attempt=attempt, **outcome)
                    return
                error = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            log.warning("webhook_failed", attempt=attempt, error=error, **outcome)
            await asyncio.sleep(min(2.0 ** (attempt - 1), 60.0))
        log.error("webhook_given_up", **outcome)

    def settle(request: BankRequest) -> dict[str, str]:
        if request.request_id in accepted:
            return {"request_id": request.request_id, "status": "ACCEPTED", "duplicate": "true"}
        accepted[request.request_id] = request.transfer_id
        failed = random.random() < settings.failure_rate  # noqa: S311 - a simulation, not a secret
        outcome = {
            "transfer_id": request.transfer_id,
            "status": "FAILED" if failed else "SETTLED",
            "bank_reference": f"SIM-{uuid.uuid4().hex[:12].upper()}",
        }
        if failed:
            outcome["reason"] = random.choice(FAILURE_REASONS)  # noqa: S311
        log.info(
            "bank_request_accepted",
            request_id=request.request_id,
            type=request.type,
            amount=request.amount,
            currency=request.currency,
            will_report=outcome["status"],
        )
        later(outcome, settings.delay_seconds)
        return {"request_id": request.request_id, "status": "ACCEPTED"}

    @app.post("/v1/collections", status_code=202)
    async def collect(request: BankRequest) -> dict[str, str]:
        """Money in: collect from the account, then report."""
        return settle(request)

    @app.post("/v1/payouts", status_code=202)
    async def pay_out(request: BankRequest) -> dict[str, str]:
        """Money out: pay the account, then report."""
        return settle(request)

    @app.post("/v1/returns/{transfer_id}", status_code=202)
    async def return_transfer(transfer_id: str) -> dict[str, str]:
        """Plays a bank returning a settled transfer (a reversed deposit, a
        bounced payout): reports RETURNED at once."""
        later(
            {
                "transfer_id": transfer_id,
                "status": "RETURNED",
                "bank_reference": f"SIM-RET-{uuid.uuid4().hex[:8].upper()}",
                "reason": "R10 customer advises not authorized",
            },
            0.0,
        )
        return {"transfer_id": transfer_id, "status": "RETURN_SCHEDULED"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    settings = SimulatorSettings.from_env(os.environ)
    configure_logging(
        "bank-simulator",
        os.environ.get("MONETA_LOG_LEVEL", "INFO"),
        os.environ.get("MONETA_LOG_FORMAT", "json"),
    )
    # Every delivery is logged once, by the simulator itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    uvicorn.run(
        create_app(settings),
        host="127.0.0.1",
        port=settings.port,
        log_config=None,
        access_log=False,
    )


if __name__ == "__main__":
    main()
