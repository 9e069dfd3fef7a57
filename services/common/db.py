"""PostgreSQL: each service's own database, its pool, and its migrations.

Migrations are numbered ``.sql`` files in the service's ``migrations/`` folder
(``001_accounts.sql``). They are applied in order, each once, inside one
transaction that holds an advisory lock, so that replicas starting together
never race. Each applied file is recorded with a checksum; a file edited after
it was applied stops the service instead of drifting silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import asyncpg.pool
import orjson
import structlog

log = structlog.get_logger("moneta.db")

# A connection, whether held directly or borrowed from a pool.
DbConn: TypeAlias = (
    "asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
)


def atomic(conn: DbConn) -> contextlib.AbstractAsyncContextManager[object]:
    """A transaction for a unit of writes: the caller's own when one is open
    (a savepoint would cost two more round trips and nothing here catches a
    failure to carry on), a new one otherwise."""
    if conn.is_in_transaction():
        return contextlib.nullcontext()
    return conn.transaction()


_MIGRATION_RE = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")
# Any constant shared by all services; each service has its own database, so
# the lock only ever meets replicas of the same service.
_MIGRATION_LOCK_KEY = 0x4D4F4E455441  # "MONETA"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(RuntimeError):
    pass


def load_migrations(folder: Path) -> list[Migration]:
    migrations = []
    for path in sorted(folder.glob("*.sql")):
        match = _MIGRATION_RE.match(path.name)
        if not match:
            raise MigrationError(f"migration file name not of the form NNN_name.sql: {path.name}")
        migrations.append(Migration(int(match.group(1)), path.name, path.read_text()))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a version in {folder}")
    return migrations


async def ensure_database(url: str) -> None:
    """Creates the database named in ``url`` when it does not exist yet."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    maintenance = urlunsplit(parts._replace(path="/postgres"))
    conn = await asyncpg.connect(maintenance)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            try:
                # Identifiers cannot be parameters; quote it the PostgreSQL way.
                quoted = '"' + name.replace('"', '""') + '"'
                await conn.execute(f"CREATE DATABASE {quoted}")
                log.info("database_created", database=name)
            except asyncpg.DuplicateDatabaseError:
                pass  # another replica won the race
    finally:
        await conn.close()


async def apply_migrations(conn: DbConn, migrations: list[Migration]) -> list[str]:
    """Applies the migrations not applied yet; returns their names."""
    applied_now: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_KEY)
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        done = {r["version"]: r for r in rows}
        for migration in migrations:
            row = done.get(migration.version)
            if row is not None:
                if row["checksum"] != migration.checksum:
                    raise MigrationError(f"migration {migration.name} changed after it was applied")
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
            applied_now.append(migration.name)
    return applied_now


async def migrate(url: str, folder: Path) -> list[str]:
    """Creates the database if needed and brings its schema up to date."""
    await ensure_database(url)
    conn = await asyncpg.connect(url)
    try:
        applied = await apply_migrations(conn, load_migrations(folder))
    finally:
        await conn.close()
    if applied:
        log.info("migrations_applied", migrations=applied)
    return applied


async def _init_connection(conn: asyncpg.Connection) -> None:
    for kind in ("jsonb", "json"):
        await conn.set_type_codec(kind, encoder=_json, decoder=orjson.loads, schema="pg_catalog")


def _json(value: object) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset on release (see ``create_pool``)."""


async def create_pool(url: str, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool whose released connections skip asyncpg's reset query
    (UNLISTEN, RESET ALL, advisory unlock): one round trip per release saved.
    Moneta keeps no session state: its advisory locks are transaction-level,
    it never LISTENs or SETs a session; an open transaction is still rolled
    back by asyncpg on release."""
    pool = await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=_keep_session,
        command_timeout=30,
        # The pool survives a database restart: broken connections are
        # replaced on the next acquire.
        max_inactive_connection_lifetime=60,
    )
    assert pool is not None
    return pool


def pool_check(pool: asyncpg.Pool) -> Callable[[], Awaitable[None]]:
    """A readiness check: the database answers a query."""

    async def check() -> None:
        async with pool.acquire(timeout=1.0) as conn:
            await conn.fetchval("SELECT 1")

    return check
