"""python -m services.wallet [serve|migrate]"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from moneta.wallet.v1 import wallet_pb2_grpc
from services.common import outbox
from services.common.db import create_pool, pool_check
from services.common.infra import redis_client
from services.common.runner import run_service
from services.common.server import GrpcService, configured_service
from services.wallet import banking, fx, handlers, merchants
from services.wallet.api import SERVICE_NAME, WalletApi
from services.wallet.balance_cache import BalanceCache
from services.wallet.config import WalletSettings
from services.wallet.peers import Peers

MIGRATIONS = Path(__file__).parent / "migrations"


@asynccontextmanager
async def start(settings: WalletSettings) -> AsyncIterator[GrpcService]:
    pool = await create_pool(
        settings.database_url("wallet"), settings.db_pool_min, settings.db_pool_max
    )
    redis = redis_client(settings.redis_url)
    peers = Peers(
        settings.ledger_addr,
        settings.budget_addr,
        settings.fraud_addr,
        settings.peer_timeout_seconds,
        BalanceCache(redis, settings.redis_prefix),
    )
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
            ],
        )
    finally:
        await peers.close()
        await redis.aclose()
        await pool.close()


if __name__ == "__main__":
    run_service("wallet", WalletSettings, start, MIGRATIONS)
