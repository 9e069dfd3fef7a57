"""python -m services.wallet [serve|migrate|consume|redrive]"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import redis.asyncio as aioredis
import structlog

from moneta.wallet.v1 import wallet_pb2_grpc
from services.common import outbox
from services.common.consumer import prune_inbox_forever, redrive_parked
from services.common.db import create_pool, pool_check
from services.common.infra import redis_client
from services.common.runner import migrate_when_ready, run_service
from services.common.server import GrpcService, configured_service, serve
from services.wallet import banking, fx, handlers, merchants
from services.wallet.api import SERVICE_NAME, WalletApi
from services.wallet.balance_cache import BalanceCache
from services.wallet.config import WalletSettings
from services.wallet.consumers import consumer_queues, consumer_runtime
from services.wallet.peers import Peers

MIGRATIONS = Path(__file__).parent / "migrations"
log = structlog.get_logger("moneta.wallet")
# Readiness of the consumers' process (``consume``): connected and consuming.
CONSUMERS_HEALTH_NAME = "moneta.events"


def _peers(settings: WalletSettings, redis: aioredis.Redis) -> Peers:
    return Peers(
        settings.ledger_addr,
        settings.budget_addr,
        settings.fraud_addr,
        settings.peer_timeout_seconds,
        BalanceCache(redis, settings.redis_prefix),
        tls=settings,
    )


@asynccontextmanager
async def start(settings: WalletSettings) -> AsyncIterator[GrpcService]:
    pool = await create_pool(
        settings.database_url("wallet"), settings.db_pool_min, settings.db_pool_max
    )
    redis = redis_client(settings.redis_url)
    peers = _peers(settings, redis)
    try:
        api = WalletApi(pool, peers, settings)

        async def reconcile() -> None:
            await handlers.reconcile_forever(pool, peers)

        async def reconcile_merchant_payments() -> None:
            await merchants.reconcile_forever(pool, peers)

        async def reconcile_exchanges() -> None:
            await fx.reconcile_forever(pool, peers)

        async def relay_bank_requests() -> None:
            await banking.bank_request_relay(pool, settings, peers)

        async def relay_events() -> None:
            await outbox.relay_outbox(pool, settings.amqp_url, settings.amqp_exchange)

        async def retry_cache_invalidations() -> None:
            await peers.cache.retry_pending_forever()

        yield configured_service(
            settings,
            name="wallet",
            port=settings.wallet_port,
            register=lambda server: wallet_pb2_grpc.add_WalletServiceServicer_to_server(
                api, server
            ),
            service_names=[SERVICE_NAME],
            dependencies={"postgres": pool_check(pool)},
            metrics_port=settings.wallet_metrics_port,
            background=[
                reconcile,
                reconcile_merchant_payments,
                reconcile_exchanges,
                relay_bank_requests,
                relay_events,
                retry_cache_invalidations,
            ],
        )
    finally:
        await peers.close()
        await redis.aclose()
        await pool.close()


@asynccontextmanager
async def start_consumers(settings: WalletSettings) -> AsyncIterator[GrpcService]:
    """The wallet's event consumers (``MONETA_EVENTS_CONSUMERS``) in a
    process of their own: gRPC health on ``events_port``, metrics on
    ``events_metrics_port``; SIGTERM stops taking messages and lets those in
    flight finish."""
    pool = await create_pool(
        settings.database_url("wallet"), settings.db_pool_min, settings.db_pool_max
    )
    redis = redis_client(settings.redis_url)
    peers = _peers(settings, redis)
    try:
        runtime = consumer_runtime(settings, pool, peers, settings.events_consumers)

        async def prune_inbox() -> None:
            await prune_inbox_forever(pool, settings.consumer_inbox_retention_days)

        yield configured_service(
            settings,
            name="wallet-consumers",
            port=settings.events_port,
            register=lambda server: None,
            service_names=[CONSUMERS_HEALTH_NAME],
            dependencies={"postgres": pool_check(pool), "rabbitmq": runtime.check},
            metrics_port=settings.events_metrics_port,
            background=[runtime.run, prune_inbox],
        )
    finally:
        await peers.close()
        await redis.aclose()
        await pool.close()


async def consume(settings: WalletSettings) -> int:
    await migrate_when_ready(settings.database_url("wallet"), MIGRATIONS)
    async with start_consumers(settings) as service:
        await serve(service)
    return 0


async def redrive(settings: WalletSettings) -> int:
    """Puts the parked messages of the consumers in ``MONETA_EVENTS_CONSUMERS``
    back on their work queues (once their cause is fixed)."""
    moved = await redrive_parked(
        settings.amqp_url,
        [consumer_queues(settings, name) for name in settings.events_consumers],
    )
    for queue, count in moved.items():
        log.info("parked_messages_redriven", queue=queue, count=count)
    return 0


if __name__ == "__main__":
    run_service(
        "wallet", WalletSettings, start, MIGRATIONS, {"consume": consume, "redrive": redrive}
    )
