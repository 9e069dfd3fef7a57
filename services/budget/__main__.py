"""python -m services.budget [serve|migrate]"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from moneta.budget.v1 import budget_pb2_grpc
from services.budget import handlers
from services.budget.api import SERVICE_NAME, BudgetApi
from services.budget.config import BudgetSettings
from services.common import outbox
from services.common.db import create_pool, pool_check
from services.common.runner import run_service
from services.common.server import GrpcService, configured_service

MIGRATIONS = Path(__file__).parent / "migrations"


@asynccontextmanager
async def start(settings: BudgetSettings) -> AsyncIterator[GrpcService]:
    pool = await create_pool(
        settings.database_url("budget"), settings.db_pool_min, settings.db_pool_max
    )
    try:
        api = BudgetApi(pool, settings.reservation_ttl_seconds, settings.fx_rates)

        async def sweep() -> None:
            await handlers.sweep_expired_reservations(pool, settings.reservation_sweep_seconds)

        async def roll_over() -> None:
            await handlers.sweep_ended_periods(pool, settings.period_sweep_seconds)

        async def relay_events() -> None:
            await outbox.relay_outbox(pool, settings.amqp_url, settings.amqp_exchange)

        yield configured_service(
            settings,
            name="budget",
            port=settings.budget_port,
            register=lambda server: budget_pb2_grpc.add_BudgetServiceServicer_to_server(
                api, server
            ),
            service_names=[SERVICE_NAME],
            dependencies={"postgres": pool_check(pool)},
            metrics_port=settings.budget_metrics_port,
            background=[sweep, roll_over, relay_events],
        )
    finally:
        await pool.close()


if __name__ == "__main__":
    run_service("budget", BudgetSettings, start, MIGRATIONS)
