"""python -m services.fraud [serve|migrate|train]"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from moneta.fraud.v1 import fraud_pb2_grpc
from services.common.db import create_pool, pool_check
from services.common.infra import redis_client
from services.common.runner import run_service
from services.common.server import GrpcService, configured_service
from services.fraud.api import SERVICE_NAME, FraudApi
from services.fraud.config import FraudSettings
from services.fraud.handlers import FraudService
from services.fraud.store import VelocityStore
from services.fraud.training import train_command

MIGRATIONS = Path(__file__).parent / "migrations"


@asynccontextmanager
async def start(settings: FraudSettings) -> AsyncIterator[GrpcService]:
    pool = await create_pool(
        settings.database_url("fraud"), settings.db_pool_min, settings.db_pool_max
    )
    redis = redis_client(settings.redis_url)
    rules = settings.rules()
    velocity = VelocityStore(
        redis,
        settings.redis_prefix,
        rules,
        history_days=settings.fraud_history_days,
        retry_seconds=settings.fraud_redis_retry_seconds,
    )
    try:
        service = FraudService(pool, velocity, rules)
        # Without a stored model the service scores on its rules alone
        # (model_version "rules-only") until `train` stores one.
        await service.refresh()
        api = FraudApi(service)

        async def keep_fresh() -> None:
            await service.keep_fresh(settings.fraud_refresh_seconds)

        async def expire_reviews() -> None:
            await service.expire_reviews_forever(settings.fraud_review_expiry_seconds, 60.0)

        yield configured_service(
            settings,
            name="fraud",
            port=settings.fraud_port,
            register=lambda server: fraud_pb2_grpc.add_FraudServiceServicer_to_server(api, server),
            service_names=[SERVICE_NAME],
            # Not Redis: without it the service still scores, degraded.
            dependencies={"postgres": pool_check(pool)},
            metrics_port=settings.fraud_metrics_port,
            background=[keep_fresh, expire_reviews],
        )
    finally:
        await velocity.close()
        await redis.aclose()
        await pool.close()


if __name__ == "__main__":
    run_service("fraud", FraudSettings, start, MIGRATIONS, commands={"train": train_command})
