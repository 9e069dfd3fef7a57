"""The gateway's Redis-backed state against the real Redis: token buckets
per user and per IP (refusals with a Retry-After, refill over time, failing
open when Redis is down), and the replay cache of money-moving requests
(the first answer replayed, a different request under the same key a
conflict, concurrent duplicates run once, "try again" answers not kept,
keys scoped to the caller, the request served without the cache when
Redis is down)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from moneta.common.v1.money_pb2 import Money
from moneta.wallet.v1 import wallet_pb2
from services.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    MonetaError,
    Unavailable,
)
from services.common.infra import redis_client
from services.gateway.idempotency import Answer, ReplayCache, fingerprint
from services.gateway.ratelimit import RateLimited, RateLimiter
from services.gateway.resilience import CircuitBreaker
from tests.conftest import TestRun

DOWN = "redis://127.0.0.1:1/0"


@pytest.fixture
async def redis(test_run: TestRun) -> AsyncIterator[aioredis.Redis]:
    client = redis_client(test_run.settings.redis_url)
    yield client
    async for key in client.scan_iter(match=f"{test_run.redis_prefix}gw:*"):
        await client.delete(key)
    await client.aclose()


@pytest.fixture
async def dead_redis() -> AsyncIterator[aioredis.Redis]:
    client = redis_client(DOWN)
    yield client
    await client.aclose()


def breaker() -> CircuitBreaker:
    return CircuitBreaker("redis", threshold=3, cooldown=2.0)


def limiter(
    client: aioredis.Redis, prefix: str, user: tuple[float, int], ip: tuple[float, int]
) -> RateLimiter:
    return RateLimiter(client, prefix, user[0], user[1], ip[0], ip[1], breaker())


# -- rate limits


async def test_a_user_gets_their_burst_then_a_retry_after(
    redis: aioredis.Redis, test_run: TestRun
) -> None:
    limits = limiter(redis, test_run.redis_prefix, user=(1.0, 3), ip=(1000.0, 1000))
    user = str(uuid.uuid4())

    for _ in range(3):
        await limits.check(user, "10.0.0.1")
    with pytest.raises(RateLimited) as caught:
        await limits.check(user, "10.0.0.1")

    assert caught.value.retry_after == 1
    assert caught.value.reason == "RATE_LIMITED"
    await limits.check(str(uuid.uuid4()), "10.0.0.1")  # another user is not affected


async def test_an_ip_is_limited_across_its_users(redis: aioredis.Redis, test_run: TestRun) -> None:
    limits = limiter(redis, test_run.redis_prefix, user=(1000.0, 1000), ip=(0.5, 2))

    await limits.check(str(uuid.uuid4()), "10.0.0.2")
    await limits.check(str(uuid.uuid4()), "10.0.0.2")
    with pytest.raises(RateLimited) as caught:
        await limits.check(str(uuid.uuid4()), "10.0.0.2")

    assert caught.value.retry_after == 2  # one token takes two seconds at 0.5/s
    await limits.check(str(uuid.uuid4()), "10.0.0.3")


async def test_a_refused_request_takes_no_token_from_the_other_bucket(
    redis: aioredis.Redis, test_run: TestRun
) -> None:
    limits = limiter(redis, test_run.redis_prefix, user=(0.001, 1), ip=(1000.0, 2))
    user = str(uuid.uuid4())
    await limits.check(user, "10.0.0.4")

    for _ in range(5):
        with pytest.raises(RateLimited):
            await limits.check(user, "10.0.0.4")

    await limits.check(str(uuid.uuid4()), "10.0.0.4")  # the IP still had its second token


async def test_buckets_refill_at_their_rate(redis: aioredis.Redis, test_run: TestRun) -> None:
    limits = limiter(redis, test_run.redis_prefix, user=(20.0, 1), ip=(1000.0, 1000))
    user = str(uuid.uuid4())
    await limits.check(user, None)
    with pytest.raises(RateLimited):
        await limits.check(user, None)

    deadline = asyncio.get_running_loop().time() + 2.0
    while True:  # a token is back after 50 ms
        try:
            await limits.check(user, None)
            break
        except RateLimited:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)


async def test_limits_fail_open_when_redis_is_down(
    dead_redis: aioredis.Redis, test_run: TestRun
) -> None:
    limits = limiter(dead_redis, test_run.redis_prefix, user=(0.001, 1), ip=(0.001, 1))

    for _ in range(10):
        await limits.check("someone", "10.0.0.5")


# -- the replay cache


def cache(client: aioredis.Redis, prefix: str, wait: float = 2.0) -> ReplayCache:
    return ReplayCache(client, prefix, 3600, 30.0, wait, breaker())


def transfer(amount: int, key: str = "k") -> wallet_pb2.TransferRequest:
    return wallet_pb2.TransferRequest(
        sender_id="u-1",
        recipient=wallet_pb2.Recipient(username="bob"),
        amount=Money(amount=amount, currency="USD"),
        idempotency_key=key,
    )


class Upstream:
    """Counts runs; answers with a fresh body each time (so that a replay
    is told apart from a second run), or raises what it is given."""

    def __init__(self, error: MonetaError | None = None, delay: float = 0.0) -> None:
        self.runs = 0
        self.error = error
        self.delay = delay

    async def __call__(self) -> Answer:
        self.runs += 1
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return Answer(200, f'{{"run": {self.runs}}}'.encode())


def refusal(exc: MonetaError) -> Answer:
    status = {AlreadyExists: 409, Aborted: 409, FailedPrecondition: 422, Unavailable: 503}[
        type(exc)
    ]
    return Answer(status, f'{{"reason": "{exc.reason}"}}'.encode())


async def test_the_same_key_and_request_replays_the_first_answer(
    redis: aioredis.Redis, test_run: TestRun
) -> None:
    replays, upstream = cache(redis, test_run.redis_prefix), Upstream()
    fp = fingerprint(transfer(100))

    first = await replays.once("alice", "key-1", fp, upstream, refusal)
    again = await replays.once("alice", "key-1", fp, upstream, refusal)

    assert (first.status, first.body, first.replayed) == (200, b'{"run": 1}', False)
    assert (again.status, again.body, again.replayed) == (200, b'{"run": 1}', True)
    assert upstream.runs == 1


async def test_the_same_key_with_another_request_is_a_conflict(
    redis: aioredis.Redis, test_run: TestRun
) -> None:
    replays, upstream = cache(redis, test_run.redis_prefix), Upstream()
    await replays.once("alice", "key-2", fingerprint(transfer(100)), upstream, refusal)

    with pytest.raises(AlreadyExists) as caught:
        await replays.once("alice", "key-2", fingerprint(transfer(200)), upstream, refusal)

    assert caught.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert upstream.runs == 1


async def test_keys_are_scoped_to_the_caller(redis: aioredis.Redis, test_run: TestRun) -> None:
    replays, upstream = cache(redis, test_run.redis_prefix), Upstream()

    await replays.once("alice", "key-3", fingerprint(transfer(100)), upstream, refusal)
    bobs = await replays.once("bob", "key-3", fingerprint(transfer(200)), upstream, refusal)

    assert (bobs.body, bobs.replayed) == (b'{"run": 2}', False)


async def test_concurrent_duplicates_run_once_and_all_get_its_answer(
    redis: aioredis.Redis, test_run: TestRun
) -> None:
    replays, upstream = cache(redis, test_run.redis_prefix), Upstream(delay=0.2)
    fp = fingerprint(transfer(100))

    answers = await asyncio.gather(
        *(replays.once("alice", "key-4", fp, upstream, refusal) for _ in range(5))
    )

    assert upstream.runs == 1
    assert {a.body for a in answers} == {b'{"run": 1}'}
    assert sorted(a.replayed for a in answers) == [False, True, True, True, True]


async def test_a_business_refusal_is_kept_and_replayed(
    redis: aioredis.Redis, test_run: TestRun
) -> None:
    replays = cache(redis, test_run.redis_prefix)
    broke = Upstream(FailedPrecondition("no money", reason="INSUFFICIENT_FUNDS"))
    fp = fingerprint(transfer(100))

    first = await replays.once("alice", "key-5", fp, broke, refusal)
    again = await replays.once("alice", "key-5", fp, Upstream(), refusal)

    assert (first.status, again.status, again.body) == (
        422,
        422,
        b'{"reason": "INSUFFICIENT_FUNDS"}',
    )
    assert again.replayed


async def test_an_unavailable_upstream_is_not_kept_so_a_retry_runs(
    redis: aioredis.Redis, test_run: TestRun
) -> None:
    replays = cache(redis, test_run.redis_prefix)
    fp = fingerprint(transfer(100))

    with pytest.raises(Unavailable):
        await replays.once("alice", "key-6", fp, Upstream(Unavailable("down")), refusal)
    retry = await replays.once("alice", "key-6", fp, Upstream(), refusal)

    assert (retry.status, retry.replayed) == (200, False)


async def test_an_in_progress_answer_is_not_kept_so_a_retry_gets_the_outcome(
    redis: aioredis.Redis, test_run: TestRun
) -> None:
    replays = cache(redis, test_run.redis_prefix)
    fp = fingerprint(transfer(100))
    in_progress = Aborted("still in progress; retry shortly", reason="REQUEST_IN_PROGRESS")

    with pytest.raises(Aborted):
        await replays.once("alice", "key-9", fp, Upstream(in_progress), refusal)
    retry = await replays.once("alice", "key-9", fp, Upstream(), refusal)

    assert (retry.status, retry.replayed) == (200, False)


async def test_a_duplicate_waits_only_so_long_for_a_slow_first_request(
    redis: aioredis.Redis, test_run: TestRun
) -> None:
    replays = cache(redis, test_run.redis_prefix, wait=0.1)
    fp = fingerprint(transfer(100))
    slow = asyncio.create_task(replays.once("alice", "key-7", fp, Upstream(delay=0.5), refusal))
    await asyncio.sleep(0.05)

    with pytest.raises(MonetaError) as caught:
        await replays.once("alice", "key-7", fp, Upstream(), refusal)

    assert caught.value.reason == "IDEMPOTENCY_KEY_IN_USE"
    assert (await slow).status == 200


async def test_requests_run_without_the_cache_when_redis_is_down(
    dead_redis: aioredis.Redis, test_run: TestRun
) -> None:
    replays, upstream = cache(dead_redis, test_run.redis_prefix), Upstream()
    fp = fingerprint(transfer(100))

    first = await replays.once("alice", "key-8", fp, upstream, refusal)
    second = await replays.once("alice", "key-8", fp, upstream, refusal)

    # Both ran: the upstream's own idempotency (same key) keeps money moving once.
    assert (first.status, second.status, upstream.runs) == (200, 200, 2)


def test_fingerprints_tell_methods_and_amounts_apart() -> None:
    add = wallet_pb2.AddFundsRequest(user_id="u", amount=Money(amount=1000, currency="USD"))
    withdraw = wallet_pb2.WithdrawRequest(user_id="u", amount=Money(amount=1000, currency="USD"))

    assert fingerprint(transfer(1000)) == fingerprint(transfer(1000))
    assert fingerprint(transfer(1000)) != fingerprint(transfer(1001))
    assert fingerprint(add) != fingerprint(withdraw)


def test_a_pin_is_no_part_of_a_fingerprint_and_is_left_in_the_request() -> None:
    money = Money(amount=1000, currency="USD")
    with_pin = wallet_pb2.WithdrawRequest(user_id="u", amount=money, pin="2468")
    other_pin = wallet_pb2.WithdrawRequest(user_id="u", amount=money, pin="1357")
    no_pin = wallet_pb2.WithdrawRequest(user_id="u", amount=money)

    assert fingerprint(with_pin) == fingerprint(other_pin) == fingerprint(no_pin)
    assert with_pin.pin == "2468"
    assert fingerprint(with_pin) != fingerprint(
        wallet_pb2.WithdrawRequest(
            user_id="u", amount=Money(amount=1001, currency="USD"), pin="2468"
        )
    )
