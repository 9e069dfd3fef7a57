"""The wallet's balance cache against the real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest
import redis.asyncio as aioredis

from moneta.ledger.v1 import ledger_pb2
from services.common.infra import redis_client
from services.wallet.balance_cache import BalanceCache
from tests.conftest import TestRun


class Ledger:
    """Stands in for the ledger's GetBalances: counts calls, can be held."""

    def __init__(self) -> None:
        self.available: dict[str, int] = {}
        self.calls = 0
        self.asked: list[uuid.UUID] = []
        self.hold: asyncio.Event | None = None
        self.called = asyncio.Event()

    async def fetch(self, accounts: Sequence[uuid.UUID]) -> dict[str, ledger_pb2.Balance]:
        self.calls += 1
        self.asked = list(accounts)
        self.called.set()
        snapshot = {str(a): self.available.get(str(a), 0) for a in accounts}
        if self.hold is not None:
            await self.hold.wait()
        return {a: ledger_pb2.Balance(account_id=a, available=v) for a, v in snapshot.items()}


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


async def test_a_second_read_is_served_from_the_cache(cache: BalanceCache) -> None:
    ledger, account = Ledger(), uuid.uuid4()
    ledger.available[str(account)] = 500

    first = await cache.balances([account], ledger.fetch)
    second = await cache.balances([account], ledger.fetch)

    assert first[str(account)].available == second[str(account)].available == 500
    assert ledger.calls == 1


async def test_a_write_invalidates_so_the_next_read_sees_it(cache: BalanceCache) -> None:
    ledger, account = Ledger(), uuid.uuid4()
    ledger.available[str(account)] = 500
    await cache.balances([account], ledger.fetch)

    ledger.available[str(account)] = 300
    await cache.invalidate([account])
    after = await cache.balances([account], ledger.fetch)

    assert after[str(account)].available == 300


async def test_a_slow_read_overtaken_by_a_write_does_not_cache_the_old_balance(
    cache: BalanceCache,
) -> None:
    ledger, account = Ledger(), uuid.uuid4()
    ledger.available[str(account)] = 500
    ledger.hold = asyncio.Event()
    slow = asyncio.create_task(cache.balances([account], ledger.fetch))
    await asyncio.wait_for(ledger.called.wait(), 5)  # it has read the old balance

    ledger.available[str(account)] = 300
    await cache.invalidate([account])
    ledger.hold.set()
    stale = await slow
    ledger.hold = None
    fresh = await cache.balances([account], ledger.fetch)

    assert stale[str(account)].available == 500  # what it read, answered once
    assert fresh[str(account)].available == 300  # but never cached


async def test_a_read_of_several_accounts_caches_those_no_write_overtook_and_only_those(
    cache: BalanceCache,
) -> None:
    ledger, quiet, written = Ledger(), uuid.uuid4(), uuid.uuid4()
    ledger.available.update({str(quiet): 700, str(written): 500})
    ledger.hold = asyncio.Event()
    slow = asyncio.create_task(cache.balances([quiet, written], ledger.fetch))
    await asyncio.wait_for(ledger.called.wait(), 5)

    ledger.available[str(written)] = 300
    await cache.invalidate([written])
    ledger.hold.set()
    await slow
    ledger.hold, calls = None, ledger.calls
    again = await cache.balances([quiet, written], ledger.fetch)

    assert again[str(quiet)].available == 700
    assert again[str(written)].available == 300
    # Only the overtaken account was asked for again.
    assert (ledger.calls, ledger.asked) == (calls + 1, [written])


async def test_with_redis_unreachable_reads_go_to_the_ledger_and_nothing_fails() -> None:
    unreachable = redis_client("redis://127.0.0.1:1/0")
    cache = BalanceCache(unreachable, "x:")
    ledger, account = Ledger(), uuid.uuid4()
    ledger.available[str(account)] = 42
    try:
        balances = await cache.balances([account], ledger.fetch)
        await cache.invalidate([account])
    finally:
        await unreachable.aclose()

    assert balances[str(account)].available == 42


async def test_an_invalidation_lost_to_a_partition_is_applied_once_redis_answers(
    redis: aioredis.Redis, test_run: TestRun
) -> None:
    """A write whose invalidation cannot reach Redis must not let the balance
    cached before it be served after the partition heals (by this process or
    any other reading the same Redis)."""
    from tests.tcp_proxy import TcpProxy

    host, port = "127.0.0.1", 6379
    proxy = await TcpProxy(host, port).start()
    prefix = f"{test_run.redis_prefix}{uuid.uuid4().hex[:8]}:"
    partitioned = redis_client(proxy.url(test_run.settings.redis_url))
    cache, other_replica = BalanceCache(partitioned, prefix), BalanceCache(redis, prefix)
    ledger, account = Ledger(), uuid.uuid4()
    try:
        ledger.available[str(account)] = 500
        await cache.balances([account], ledger.fetch)  # cached: 500

        proxy.go_dark()
        ledger.available[str(account)] = 300  # a payment moved money...
        await cache.invalidate([account])  # ...but its invalidation was lost
        during = await cache.balances([account], ledger.fetch)
        proxy.restore()
        after_here = await cache.balances([account], ledger.fetch)
        after_elsewhere = await other_replica.balances([account], ledger.fetch)

        assert during[str(account)].available == 300  # from the ledger meanwhile
        assert after_here[str(account)].available == 300
        assert after_elsewhere[str(account)].available == 300
    finally:
        await partitioned.aclose()
        await proxy.stop()


# ---------------------------------------------------------------- a read right after a write


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
