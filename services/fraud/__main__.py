"""python -m services.fraud [serve|migrate]"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from moneta.fraud.v1 import fraud_pb2_grpc
from services.common.db import create_pool, pool_check
from services.common.runner import run_service
from services.common.server import GrpcService, configured_service
from services.fraud.api import SERVICE_NAME, FraudApi
from services.fraud.config import FraudSettings

MIGRATIONS = Path(__file__).parent / "migrations"


@asynccontextmanager
async def start(settings: FraudSettings) -> AsyncIterator[GrpcService]:
    pool = await create_pool(
        settings.database_url("fraud"), settings.db_pool_min, settings.db_pool_max
    )
    try:
        # Contract methods not implemented yet answer UNIMPLEMENTED.
        api = FraudApi(pool, settings.fraud_review_amount)  # type: ignore[abstract]
        yield configured_service(
            settings,
            name="fraud",
            port=settings.fraud_port,
            register=lambda server: fraud_pb2_grpc.add_FraudServiceServicer_to_server(api, server),
            service_names=[SERVICE_NAME],
            dependencies={"postgres": pool_check(pool)},
            metrics_port=settings.fraud_metrics_port,
        )
    finally:
        await pool.close()


if __name__ == "__main__":
    run_service("fraud", FraudSettings, start, MIGRATIONS)
