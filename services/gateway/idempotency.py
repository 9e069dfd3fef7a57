"""The gateway's replay cache for money-moving requests, in Redis.

A request with an idempotency key first claims the key (SET NX with a
lease), runs, and stores its answer (status and body) for the key's
lifetime. The same key with the same request replays that answer; with
another request (a different fingerprint: the upstream request message,
whose type names the method) it is 409 IDEMPOTENCY_KEY_REUSED. A duplicate arriving while
the first still runs waits for its answer (up to a bound, then 409
IDEMPOTENCY_KEY_IN_USE with Retry-After), so concurrent duplicates never
both run. Keys are scoped to the caller.

Answers of 5xx, 429 and ABORTED ("in progress, retry shortly") are not stored: the lease is dropped and a retry runs
again. When Redis is down the request runs without the cache: the upstream
services are idempotent by the same key themselves (they replay the first
result and refuse a different request), so money still moves once; only
the byte-for-byte replay of the first answer is lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import orjson
import redis.asyncio as aioredis
import structlog
from google.protobuf.message import Message
from prometheus_client import Counter
from redis.exceptions import RedisError

from services.common.errors import Aborted, AlreadyExists, MonetaError
from services.common.resp import RespConnection, Script
from services.gateway.resilience import CircuitBreaker, RetryLater

log = structlog.get_logger("moneta.gateway")

IDEMPOTENCY = Counter(
    "moneta_gateway_idempotency_total",
    "Money-moving requests by what the replay cache did: ran, replayed, conflict, unavailable.",
    ["outcome"],
)

# Deletes the lease only while it is still ours.
_RELEASE = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")
_POLL_SECONDS = 0.02


class KeyInUse(Aborted):
    def __init__(self) -> None:
        super().__init__(
            "a request with this idempotency key is still running; retry shortly",
            reason="IDEMPOTENCY_KEY_IN_USE",
        )
        self.retry_after = 1


# Fields left out of a fingerprint, in any request that has them: secrets
# that must not be kept, even hashed.
_SECRET_FIELDS = ("pin", "current_pin")


def fingerprint(request: Message) -> str:
    """What makes two requests the same: the upstream request, its type
    (which names the method) and its fields byte for byte, so that "10" and
    "10.00" are the same amount, and AddFunds is not Withdraw. A PIN is not
    part of it: it would be kept, hashed, beside the answer, where a 4 to 6
    digit secret is quickly guessed from its hash."""
    fields = request.DESCRIPTOR.fields_by_name
    secrets_in_it = [name for name in _SECRET_FIELDS if name in fields]
    if secrets_in_it:
        without = type(request)()
        without.CopyFrom(request)
        for name in secrets_in_it:
            without.ClearField(name)
        request = without
    digest = hashlib.sha256(request.DESCRIPTOR.full_name.encode())
    digest.update(b"\0")
    digest.update(request.SerializeToString(deterministic=True))
    return digest.hexdigest()


class Answer:
    """A stored (or fresh) HTTP answer: status and JSON body bytes."""

    __slots__ = ("body", "replayed", "status")

    def __init__(self, status: int, body: bytes, replayed: bool = False) -> None:
        self.status = status
        self.body = body
        self.replayed = replayed


def stores(status: int, error: MonetaError | None = None) -> bool:
    """Final answers are stored; answers that say "try again" are not: 5xx,
    429, and ABORTED refusals (a request still in progress upstream, a
    version clash), whose retry may well succeed."""
    if error is not None and error.status_code == grpc.StatusCode.ABORTED:
        return False
    return status < 500 and status != 429


class ReplayCache:
    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        ttl_seconds: int,
        lease_seconds: float,
        wait_seconds: float,
        breaker: CircuitBreaker,
    ) -> None:
        # The client's server and settings, on a pipelined connection of the
        # cache's own: every money-moving request claims and stores a key
        # (see services.common.resp).
        self._redis = RespConnection.like(redis)
        self._prefix = f"{prefix}gw:idem:"
        self._ttl_ms = ttl_seconds * 1000
        self._lease_ms = int(lease_seconds * 1000)
        self._wait = wait_seconds
        self._breaker = breaker

    async def close(self) -> None:
        await self._redis.close()

    def _key(self, caller: str, key: str) -> str:
        scoped = hashlib.sha256(f"{caller}\0{key}".encode()).hexdigest()[:40]
        return self._prefix + scoped

    async def once(
        self,
        caller: str,
        key: str,
        fingerprint: str,
        run: Callable[[], Awaitable[Answer]],
        error_answer: Callable[[MonetaError], Answer],
    ) -> Answer:
        """The answer for this caller's key: the stored one, or ``run()``'s.
        A refusal ``run`` raises is stored as ``error_answer`` makes it; one
        that is not final (5xx, 429) is raised again, and nothing stored."""
        redis_key = self._key(caller, key)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._wait
        lease = orjson.dumps({"lease": secrets.token_hex(8), "fp": fingerprint})
        while True:
            claimed = await self._redis_call(
                self._redis.call("SET", redis_key, lease, "NX", "PX", self._lease_ms)
            )
            if claimed is None:  # Redis unavailable: the upstream's own idempotency stands
                IDEMPOTENCY.labels("unavailable").inc()
                return await _final(run, error_answer)
            if claimed:
                break
            stored = await self._follow(redis_key, fingerprint, give_up)
            if stored is not None:
                return stored
            # The first request let go of the key (it failed): claim it again.
        IDEMPOTENCY.labels("ran").inc()
        try:
            answer = await _final(run, error_answer)
        except BaseException:
            await self._redis_call(self._redis.run(_RELEASE, [redis_key], [lease]))
            raise
        stored_value = orjson.dumps(
            {"fp": fingerprint, "status": answer.status, "body": answer.body.decode()}
        )
        await self._redis_call(self._redis.call("SET", redis_key, stored_value, "PX", self._ttl_ms))
        return answer

    async def _follow(self, redis_key: str, fingerprint: str, give_up: float) -> Answer | None:
        """The key is taken: its stored answer once there is one; None when
        the key was let go (or Redis went away) meanwhile."""
        loop = asyncio.get_running_loop()
        while True:
            raw = await self._redis_call(self._redis.call("GET", redis_key))
            if not raw:
                return None
            entry: dict[str, Any] = orjson.loads(raw)
            if entry["fp"] != fingerprint:
                IDEMPOTENCY.labels("conflict").inc()
                raise AlreadyExists(
                    "this idempotency key was used for a different request",
                    reason="IDEMPOTENCY_KEY_REUSED",
                )
            if "status" in entry:
                IDEMPOTENCY.labels("replayed").inc()
                return Answer(entry["status"], entry["body"].encode(), replayed=True)
            if loop.time() >= give_up:
                raise KeyInUse()
            await asyncio.sleep(_POLL_SECONDS)

    async def _redis_call(self, pending: Awaitable[Any]) -> Any:
        """The command's result; None when Redis is down (counted, logged,
        and skipped altogether for a while by the breaker). A missing key
        or a refused SET NX reads as b"", not None."""
        try:
            self._breaker.before_call()
        except RetryLater:
            _discard(pending)
            return None
        try:
            result = await pending
        except (TimeoutError, RedisError, OSError) as exc:
            self._breaker.failed()
            log.warning("idempotency_store_unavailable", error=type(exc).__name__)
            return None
        self._breaker.succeeded()
        return b"" if result is None else result


async def _final(
    run: Callable[[], Awaitable[Answer]], error_answer: Callable[[MonetaError], Answer]
) -> Answer:
    try:
        return await run()
    except MonetaError as exc:
        answer = error_answer(exc)
        if not stores(answer.status, exc):
            raise
        return answer


def _discard(pending: Awaitable[Any]) -> None:
    close = getattr(pending, "close", None)
    if close is not None:
        close()
