"""A Redis read-through cache of ledger balances, per ledger account.

Every ledger write the wallet makes invalidates the accounts it touched
before the wallet answers, so a user always reads their own writes. A
reader fills the cache only if no invalidation happened since it began (a
generation counter, checked and set atomically in Redis), so a slow read can
never put back a balance older than a write. With Redis unavailable, reads
go to the ledger and nothing fails.

An invalidation that fails (Redis unreachable, or a partition between this
process and Redis) is not forgotten: the accounts stay pending, this process
reads them from the ledger meanwhile, and the invalidation is retried before
every use of the cache and by ``retry_pending_forever``, so a balance cached
before the write is never served once Redis answers again.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

import redis.asyncio as aioredis
import structlog
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from moneta.ledger.v1 import ledger_pb2
from services.common.resp import RespConnection, Script

log = structlog.get_logger("moneta.wallet.cache")

TTL_SECONDS = 300
CACHE_READS = Counter(
    "moneta_wallet_balance_cache_reads_total", "Balance reads, by outcome.", ["outcome"]
)
INVALIDATIONS_PENDING = Gauge(
    "moneta_wallet_balance_cache_invalidations_pending",
    "Accounts whose cache invalidation has not reached Redis yet (read from the ledger meanwhile).",
)

# Sets each cached balance only while its generation is the one the reader
# saw; one script call however many accounts (KEYS: value, generation …;
# ARGV: ttl, then generation seen, balance … per account). Returns how many
# it set.
_SET_IF_GENERATION = Script("""
local set = 0
for i = 1, #KEYS, 2 do
    local current = redis.call('GET', KEYS[i + 1])
    if current == false then current = '0' end
    if current == ARGV[i + 1] then
        redis.call('SET', KEYS[i], ARGV[i + 2], 'EX', ARGV[1])
        set = set + 1
    end
end
return set
""")

# Forgets balances: for each account, bumps its generation (so that no read
# begun before puts an older balance back) and deletes its entry; one script
# call however many accounts (KEYS: value, generation, value, generation …).
# Returns the new generations, in order.
_INVALIDATE = Script("""
local generations = {}
for i = 1, #KEYS, 2 do
    generations[#generations + 1] = redis.call('INCR', KEYS[i + 1])
    redis.call('EXPIRE', KEYS[i + 1], ARGV[1])
    redis.call('DEL', KEYS[i])
end
return generations
""")
# How many accounts' generations from this process's own invalidations are
# remembered (see ``balances_after_write``); the oldest go first.
_REMEMBERED = 10_000

Fetch = Callable[[Sequence[uuid.UUID]], Awaitable[dict[str, ledger_pb2.Balance]]]


class BalanceCache:
    def __init__(self, client: aioredis.Redis | None, prefix: str) -> None:
        # The client's server and settings, on a pipelined connection of the
        # cache's own: every payment reads and invalidates balances (see
        # services.common.resp).
        self._redis = RespConnection.like(client) if client is not None else None
        self._prefix = prefix
        # Accounts whose invalidation has not reached Redis yet.
        self._pending: set[str] = set()
        # Account → the generation this process's last invalidation gave it.
        self._invalidated: dict[str, int] = {}

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.close()

    def _keys(self, account: uuid.UUID | str) -> tuple[str, str]:
        return f"{self._prefix}balance:{account}", f"{self._prefix}balance-gen:{account}"

    async def balances(
        self, accounts: Sequence[uuid.UUID], fetch: Fetch
    ) -> dict[str, ledger_pb2.Balance]:
        """Cached balances, the misses fetched (in one call) and cached."""
        if self._redis is None or not accounts:
            return await fetch(accounts)
        if self._pending and not await self._flush_pending():
            return await fetch(accounts)
        try:
            # Each account's balance and generation, side by side, in one command.
            replies = await self._redis.call(
                "MGET", *(key for a in accounts for key in self._keys(a))
            )
        except (RedisError, OSError, TimeoutError) as exc:
            CACHE_READS.labels("redis_down").inc()
            log.warning("balance_cache_unavailable", error=str(exc))
            return await fetch(accounts)
        found: dict[str, ledger_pb2.Balance] = {}
        missing: list[uuid.UUID] = []
        cached, generations = replies[0::2], replies[1::2]
        for account, raw in zip(accounts, cached, strict=True):
            if raw is None:
                missing.append(account)
            else:
                found[str(account)] = ledger_pb2.Balance.FromString(raw)
        CACHE_READS.labels("hit").inc(len(found))
        if missing:
            CACHE_READS.labels("miss").inc(len(missing))
            fetched = await fetch(missing)
            found.update(fetched)
            seen = dict(zip((str(a) for a in accounts), generations, strict=True))
            await self._fill(fetched, seen)
        return found

    async def balances_after_write(
        self, accounts: Sequence[uuid.UUID], fetch: Fetch
    ) -> dict[str, ledger_pb2.Balance]:
        """Balances of accounts this process has just invalidated (after a
        write of its own): their entries are gone, so the ledger is asked
        without a look in Redis first, and the cache is filled with them
        unless another invalidation came since this process's (the
        generation it set then is the one a reader would have seen).
        Accounts whose invalidation is not known here are read as usual."""
        generations = {str(a): self._invalidated.pop(str(a), None) for a in accounts}
        if self._redis is None or self._pending or None in generations.values():
            return await self.balances(accounts, fetch)
        CACHE_READS.labels("miss").inc(len(accounts))
        fetched = await fetch(accounts)
        await self._fill(fetched, generations)
        return fetched

    async def _fill(
        self,
        fetched: dict[str, ledger_pb2.Balance],
        generations: Mapping[str, bytes | int | None],
    ) -> None:
        assert self._redis is not None
        keys: list[str] = []
        args: list[bytes | int] = [TTL_SECONDS]
        for account, balance in fetched.items():
            keys.extend(self._keys(account))
            args.extend((generations.get(account) or b"0", balance.SerializeToString()))
        if not keys:
            return
        try:
            await self._redis.run(_SET_IF_GENERATION, keys, args)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("balance_cache_fill_failed", error=str(exc))

    async def invalidate(self, accounts: Iterable[uuid.UUID | str]) -> None:
        """Forgets the accounts' balances (after a write, before answering)."""
        if self._redis is None:
            return
        unique = {str(a) for a in accounts if a}
        if not unique:
            return
        self._pending |= unique
        await self._flush_pending()

    async def _flush_pending(self) -> bool:
        """Invalidates every pending account; True when none is left."""
        assert self._redis is not None
        pending = set(self._pending)
        pending_list = list(pending)
        try:
            keys = [key for account in pending_list for key in self._keys(account)]
            generations = await self._redis.run(_INVALIDATE, keys, [TTL_SECONDS * 2])
        except (RedisError, OSError, TimeoutError) as exc:
            INVALIDATIONS_PENDING.set(len(self._pending))
            log.error("balance_cache_invalidation_failed", error=str(exc), accounts=len(pending))
            return False
        for account, generation in zip(pending_list, generations, strict=True):
            self._invalidated.pop(account, None)  # to the end: the newest
            self._invalidated[account] = generation
        while len(self._invalidated) > _REMEMBERED:
            del self._invalidated[next(iter(self._invalidated))]
        self._pending -= pending
        INVALIDATIONS_PENDING.set(len(self._pending))
        return not self._pending

    async def retry_pending_forever(self, every_seconds: float = 1.0) -> None:
        """Retries failed invalidations until Redis takes them, so that other
        replicas stop serving the stale entries too."""
        while True:
            await asyncio.sleep(every_seconds)
            if self._redis is not None and self._pending:
                await self._flush_pending()
