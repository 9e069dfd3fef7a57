"""Rate limits: token buckets in Redis, per user and per client IP, checked
together in one Lua script (one round trip, atomic across gateway replicas).

A bucket holds up to ``burst`` tokens and refills at ``rate`` per second;
a request takes one token from each of its buckets, or none when any is
empty, and is then told how long until it would pass (429, Retry-After).
Time is Redis's own clock, so replicas with skewed clocks agree.

When Redis is down the limits fail open: requests pass, and each one is
counted (moneta_gateway_rate_limit_degraded_total), logged once per
outage, and the breaker spares them the wait for a dead Redis.
"""

from __future__ import annotations

import math

import redis.asyncio as aioredis
import structlog
from prometheus_client import Counter
from redis.exceptions import RedisError

from services.common.errors import ResourceExhausted
from services.common.resp import RespConnection, Script
from services.gateway.resilience import CircuitBreaker, RetryLater

log = structlog.get_logger("moneta.gateway")

RATE_LIMITED = Counter(
    "moneta_gateway_rate_limited_total", "Requests refused with 429, by bucket.", ["bucket"]
)
DEGRADED = Counter(
    "moneta_gateway_rate_limit_degraded_total",
    "Requests let through unchecked because Redis did not answer.",
)

# KEYS: one bucket per key. ARGV: for each key its rate (tokens/s) and burst.
# Returns {0, 0} when every bucket had a token (one is taken from each), or
# {milliseconds until the emptiest would have one, index of that bucket}.
_BUCKETS_SCRIPT = Script("""
local now_parts = redis.call('TIME')
local now = now_parts[1] * 1000 + math.floor(now_parts[2] / 1000)
local levels = {}
local wait, which = 0, 0
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local state = redis.call('HMGET', key, 'tokens', 'at')
  local tokens = tonumber(state[1])
  local at = tonumber(state[2])
  if tokens == nil or at == nil then
    tokens = burst
  else
    tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
  end
  levels[i] = tokens
  if tokens < 1 then
    local ms = math.ceil((1 - tokens) * 1000 / rate)
    if ms > wait then wait, which = ms, i end
  end
end
if wait > 0 then return {wait, which} end
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  redis.call('HSET', key, 'tokens', tostring(levels[i] - 1), 'at', tostring(now))
  redis.call('PEXPIRE', key, math.ceil(burst * 1000 / rate) + 1000)
end
return {0, 0}
""")


class RateLimited(ResourceExhausted):
    def __init__(self, retry_after: float) -> None:
        super().__init__("too many requests; retry later", reason="RATE_LIMITED")
        self.retry_after = max(1, math.ceil(retry_after))


class RateLimiter:
    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        user_rate: float,
        user_burst: int,
        ip_rate: float,
        ip_burst: int,
        breaker: CircuitBreaker,
    ) -> None:
        self._prefix = f"{prefix}gw:rl:"
        self._user = (user_rate, user_burst)
        self._ip = (ip_rate, ip_burst)
        self._breaker = breaker
        # The client's server and settings, on a pipelined connection of the
        # limiter's own: every request runs the script (see services.common.resp).
        self._redis = RespConnection.like(redis)
        self._degraded = False

    async def close(self) -> None:
        await self._redis.close()

    async def check(self, user_id: str | None, ip: str | None) -> None:
        """Takes a token from the caller's buckets, or raises RateLimited."""
        keys: list[str] = []
        args: list[float] = []
        names: list[str] = []
        if user_id:
            keys.append(f"{self._prefix}u:{user_id}")
            args.extend(self._user)
            names.append("user")
        if ip:
            keys.append(f"{self._prefix}ip:{ip}")
            args.extend(self._ip)
            names.append("ip")
        if not keys:
            return
        try:
            self._breaker.before_call()
            wait_ms, which = await self._redis.run(_BUCKETS_SCRIPT, keys, args)
        except (TimeoutError, RetryLater, RedisError, OSError) as exc:
            if not isinstance(exc, RetryLater):
                self._breaker.failed()
            DEGRADED.inc()
            if not self._degraded:
                self._degraded = True
                log.warning("rate_limits_unchecked", error=type(exc).__name__)
            return
        self._breaker.succeeded()
        if self._degraded:
            self._degraded = False
            log.info("rate_limits_checked_again")
        if wait_ms:
            RATE_LIMITED.labels(names[int(which) - 1]).inc()
            raise RateLimited(int(wait_ms) / 1000)
