"""python -m services.ledger [serve|migrate]"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from moneta.ledger.v1 import ledger_pb2_grpc
from services.common.db import create_pool, pool_check
from services.common.runner import run_service
from services.common.server import GrpcService, configured_service
from services.ledger import engine as engine_module
from services.ledger import handlers, store
from services.ledger.api import SERVICE_NAME, LedgerApi
from services.ledger.config import LedgerSettings
from services.ledger.engine import TransferEngine

MIGRATIONS = Path(__file__).parent / "migrations"


@asynccontextmanager
async def start(settings: LedgerSettings) -> AsyncIterator[GrpcService]:
    pool = await create_pool(
        settings.database_url("ledger"), settings.db_pool_min, settings.db_pool_max
    )
    try:
        engine = TransferEngine(pool, pipelined=settings.ledger_pipeline)
        api = LedgerApi(pool, engine)

        async def sweep() -> None:
            await engine_module.sweep_expired_holds(pool, engine)

        async def partitions() -> None:
            # Months are added well ahead, so entries never land in the
            # default partition (which would block adding their month).
            while True:
                async with pool.acquire() as conn:
                    await store.ensure_entry_partitions(conn, months_ahead=3)
                await asyncio.sleep(6 * 3600)

        yield configured_service(
            settings,
            name="ledger",
            port=settings.ledger_port,
            register=lambda server: ledger_pb2_grpc.add_LedgerServiceServicer_to_server(
                api, server
            ),
            service_names=[SERVICE_NAME],
            dependencies={"postgres": pool_check(pool)},
            metrics_port=settings.ledger_metrics_port,
            background=[engine.run, sweep, partitions],
        )
    finally:
        await pool.close()


async def verify(settings: LedgerSettings) -> int:
    """python -m services.ledger verify: checks the ledger's invariants and
    prints what it found as JSON; exits 1 when anything is wrong."""
    pool = await create_pool(settings.database_url("ledger"), 1, 2)
    try:
        discrepancies, counts = await handlers.verify_ledger(pool)
    finally:
        await pool.close()
    report = {"ok": not discrepancies, "discrepancies": discrepancies, "checked": counts}
    print(json.dumps(report, indent=2, default=str))
    return 0 if not discrepancies else 1


if __name__ == "__main__":
    run_service("ledger", LedgerSettings, start, MIGRATIONS, {"verify": verify})
