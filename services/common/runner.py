"""A service's process: settings → logging → connections → server, and the
``migrate`` command that Kubernetes runs as a Job."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import structlog
import uvloop

from services.common import outbox
from services.common.config import CommonSettings, load_settings
from services.common.db import create_pool, migrate
from services.common.logging import configure_logging
from services.common.server import GrpcService, serve

S = TypeVar("S", bound=CommonSettings)
log = structlog.get_logger("moneta.runner")

USAGE = "usage: python -m services.{name} [{commands}]"


def run_service(
    name: str,
    settings_cls: type[S],
    start: Callable[[S], AbstractAsyncContextManager[GrpcService]],
    migrations: Path | None,
    commands: Mapping[str, Callable[[S], Coroutine[Any, Any, int]]] | None = None,
) -> None:
    """The entry point of every gRPC service's ``__main__``: ``serve`` (the
    default), ``migrate``, ``relay`` where the service has an outbox, and the
    service's own ``commands``, whose result is the exit status."""
    extra = dict(commands or {})
    if migrations is not None and _has_outbox(migrations):
        extra.setdefault("relay", lambda settings: relay_events(name, settings))
    command = sys.argv[1] if len(sys.argv) > 1 else "serve"
    if command not in ("serve", "migrate", *extra):
        sys.exit(USAGE.format(name=name, commands="|".join(["serve", "migrate", *extra])))
    settings = load_settings(settings_cls, f"moneta-{name}")
    configure_logging(name, settings.log_level, settings.log_format)
    if command == "migrate":
        if migrations is not None:
            asyncio.run(migrate_when_ready(settings.database_url(name), migrations))
        return
    if command in extra:
        sys.exit(asyncio.run(extra[command](settings)))

    async def main() -> None:
        if migrations is not None:
            await migrate_when_ready(settings.database_url(name), migrations)
        async with start(settings) as service:
            settle_garbage_collector()
            await serve(service)

    uvloop.run(main())


def _has_outbox(migrations: Path) -> bool:
    return any("CREATE TABLE outbox" in f.read_text() for f in migrations.glob("*.sql"))


async def relay_events(name: str, settings: CommonSettings) -> int:
    """``relay``: the service's outbox relay as a process of its own, until
    SIGTERM. It may run beside the relay inside the service: the outbox's
    lock lets one publish at a time, in order."""
    pool = await create_pool(settings.database_url(name), 1, 2)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    relay = asyncio.create_task(
        outbox.relay_outbox(pool, settings.amqp_url, settings.amqp_exchange)
    )
    try:
        await stop.wait()
    finally:
        relay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay
        await pool.close()
    return 0


# Every gRPC call leaves a reference cycle behind (grpc's method lookup), so
# the young generation fills at a steady pace and a collection's pause grows
# with its size faster than linearly: in the budget service at 500
# Reserve+Commit pairs/s a young collection at 20,000 objects took 5.7 ms
# (median; up to 10 ms), at 2,000 0.36 ms (up to 0.9 ms), ten times as often
# for the same collector CPU in all (fraud measured the same for Score:
# 4-18 ms at 20,000). Full collections stay rare (every 20 x 200 young ones).
YOUNG_GENERATION = (2_000, 20, 200)


def settle_garbage_collector() -> None:
    """What exists at start (modules, settings, pools) lives as long as the
    process: freezing it keeps every collection from scanning it again; the
    young generation is sized for short pauses (see YOUNG_GENERATION)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*YOUNG_GENERATION)


async def migrate_when_ready(url: str, folder: Path, wait_seconds: float = 60.0) -> None:
    """Applies migrations, waiting for the database to answer first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_seconds
    delay = 0.25
    while True:
        try:
            await migrate(url, folder)
            return
        except (OSError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError) as exc:
            if loop.time() >= deadline:
                log.error("database_unreachable", error=str(exc))
                raise SystemExit(1) from exc
            log.warning("database_not_ready", error=str(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
