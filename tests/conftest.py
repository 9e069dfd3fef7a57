"""Test isolation: every run gets its own databases, Redis key prefix and
AMQP exchange, so that runs (and a `make run` beside them) never collide.

Integration and end-to-end tests talk to the real PostgreSQL, RabbitMQ and
Redis at the usual MONETA_* URLs; nothing here fakes them.
"""

from __future__ import annotations

import contextlib
import os

# Before anything imports gRPC: see GRPC_ENABLE_FORK_SUPPORT in the Makefile.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from services.common.config import CommonSettings
from services.common.db import create_pool, migrate
from tests.processes import ServiceProcess, service_process

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class TestRun:
    """Names that belong to this test run only."""

    __test__ = False  # not a test class, whatever its name

    run_id: str
    db_prefix: str
    redis_prefix: str
    amqp_exchange: str
    settings: CommonSettings

    def env(self) -> dict[str, str]:
        """The environment a service process of this run is started with."""
        return {
            "MONETA_POSTGRES_URL": self.settings.postgres_url,
            "MONETA_AMQP_URL": self.settings.amqp_url,
            "MONETA_REDIS_URL": self.settings.redis_url,
            "MONETA_DB_PREFIX": self.db_prefix,
            "MONETA_REDIS_PREFIX": self.redis_prefix,
            "MONETA_AMQP_EXCHANGE": self.amqp_exchange,
        }

    def database_url(self, service: str) -> str:
        return self.settings.database_url(service)


@pytest.fixture(scope="session")
def test_run() -> Iterator[TestRun]:
    run_id = f"{os.getpid()}{secrets.token_hex(3)}"
    db_prefix = f"moneta_test_{run_id}_"
    base = CommonSettings()
    settings = base.model_copy(update={"db_prefix": db_prefix})
    run = TestRun(
        run_id=run_id,
        db_prefix=db_prefix,
        redis_prefix=f"moneta-test:{run_id}:",
        amqp_exchange=f"moneta.events.test.{run_id}",
        settings=settings,
    )
    yield run
    _drop_databases(base.postgres_url, db_prefix)
    _delete_exchange(base.amqp_url, run.amqp_exchange)


def _delete_exchange(amqp_url: str, name: str) -> None:
    """The run's durable exchange outlives its publishers: remove it."""
    import asyncio

    import aio_pika

    async def delete() -> None:
        connection = await aio_pika.connect(amqp_url)
        try:
            channel = await connection.channel()
            await channel.exchange_delete(name)
        finally:
            await connection.close()

    with contextlib.suppress(OSError, aio_pika.exceptions.AMQPError):
        asyncio.run(delete())


def _drop_databases(postgres_url: str, prefix: str) -> None:
    import asyncio

    async def drop() -> None:
        parts = urlsplit(postgres_url)
        conn = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
        try:
            names = await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE $1",
                prefix.replace("_", r"\_") + "%",
            )
            for row in names:
                quoted = '"' + row["datname"].replace('"', '""') + '"'
                await conn.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
        finally:
            await conn.close()

    with contextlib.suppress(OSError):  # the server is gone already: nothing to clean
        asyncio.run(drop())


async def service_pool(run: TestRun, service: str, database: str | None = None) -> asyncpg.Pool:
    """A migrated database of the run's own for ``service`` (named
    ``database`` when several are needed), and a pool on it."""
    url = run.database_url(database or service)
    await migrate(url, ROOT / "services" / service / "migrations")
    return await create_pool(url, min_size=1, max_size=20)


@pytest.fixture(scope="session")
async def ledger_pool(test_run: TestRun) -> AsyncIterator[asyncpg.Pool]:
    pool = await service_pool(test_run, "ledger")
    yield pool
    await pool.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks each test by its folder: unit, integration or e2e."""
    for item in items:
        kind = Path(str(item.fspath)).relative_to(ROOT / "tests").parts[0]
        if kind in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session")
def ledger_process(
    test_run: TestRun, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """A ledger process of its own, on a database of its own
    (``<run prefix>lp_ledger``), so that whole-ledger checks see only what
    the ledger tests wrote."""
    env = {**test_run.env(), "MONETA_DB_PREFIX": f"{test_run.db_prefix}lp_"}
    ledger = service_process("ledger", env, tmp_path_factory.mktemp("ledger-process"))
    ledger.start()
    yield ledger
    ledger.stop()
