"""The wallet's balance cache, read right after a write of the wallet's own
(a payment's balances): the ledger is asked at once, and the cache filled
only if no other write came since."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from services.common.infra import redis_client
from services.wallet.balance_cache import BalanceCache
from tests.conftest import TestRun
from tests.integration.test_balance_cache import Ledger


@pytest.fixture
async def redis(test_run: TestRun) -> AsyncIterator[aioredis.Redis]:
    client = redis_client(test_run.settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(test_run: TestRun) -> str:
    return f"{test_run.redis_prefix}{uuid.uuid4().hex[:8]}:"


@pytest.fixture
async def cache(redis: aioredis.Redis, prefix: str) -> AsyncIterator[BalanceCache]:
    cache = BalanceCache(redis, prefix)
    yield cache
    await cache.close()


async def test_a_read_after_a_write_sees_it_and_caches_it_for_the_next_reader(
    cache: BalanceCache,
) -> None:
    ledger, account = Ledger(), uuid.uuid4()
    ledger.available[str(account)] = 500
    await cache.balances([account], ledger.fetch)  # cached: 500

    ledger.available[str(account)] = 300
    await cache.invalidate([account])
    after = await cache.balances_after_write([account], ledger.fetch)
    calls = ledger.calls
    next_read = await cache.balances([account], ledger.fetch)

    assert after[str(account)].available == next_read[str(account)].available == 300
    assert ledger.calls == calls  # served from the cache


async def test_a_read_after_a_write_overtaken_by_another_replicas_write_caches_nothing(
    cache: BalanceCache, redis: aioredis.Redis, prefix: str
) -> None:
    other_replica = BalanceCache(redis, prefix)
    ledger, account = Ledger(), uuid.uuid4()
    try:
        ledger.available[str(account)] = 500
        await cache.invalidate([account])  # this replica's write
        ledger.hold = asyncio.Event()
        slow = asyncio.create_task(cache.balances_after_write([account], ledger.fetch))
        await asyncio.wait_for(ledger.called.wait(), 5)  # it has read 500

        ledger.available[str(account)] = 300
        await other_replica.invalidate([account])  # another write meanwhile
        ledger.hold.set()
        stale = await slow
        ledger.hold = None
        fresh = await other_replica.balances([account], ledger.fetch)
    finally:
        await other_replica.close()

    assert stale[str(account)].available == 500  # what it read, answered once
    assert fresh[str(account)].available == 300  # but never cached


async def test_a_read_after_a_write_whose_invalidation_failed_goes_to_the_ledger() -> None:
    unreachable = redis_client("redis://127.0.0.1:1/0")
    cache = BalanceCache(unreachable, "x:")
    ledger, account = Ledger(), uuid.uuid4()
    ledger.available[str(account)] = 42
    try:
        await cache.invalidate([account])
        balances = await cache.balances_after_write([account], ledger.fetch)
    finally:
        await cache.close()
        await unreachable.aclose()

    assert balances[str(account)].available == 42
