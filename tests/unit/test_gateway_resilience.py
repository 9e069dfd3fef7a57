"""Upstream calls at the gateway: the circuit breaker opens after
consecutive transport failures and then fails fast with a Retry-After,
lets one probe through after its cool-down, and closes on the probe's
success; an upstream's own refusals never count against it. Reads are
retried when the upstream did not answer; writes never are. Every call
carries a deadline and the request id. No network: stand-in calls."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import pytest

from services.common.errors import DeadlineExceeded
from services.common.logging import request_id_var
from services.gateway.resilience import CircuitBreaker, GuardedCall, RetryLater


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rpc_error(code: grpc.StatusCode, answered: bool = False) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata()
    if answered:  # a Moneta service's refusal carries its ErrorInfo
        trailing.add("grpc-status-details-bin", b"\x08\x01")
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details="x")


class FakeCall:
    """Answers each call with the next outcome: an exception to raise, or
    a value to return; records the timeout and metadata it was given."""

    def __init__(self, outcomes: Sequence[Any]) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, request: Any, *, metadata: Any, timeout: float) -> Any:  # noqa: ASYNC109
        self.calls.append({"metadata": list(metadata), "timeout": timeout})
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def breaker(clock: Clock, threshold: int = 3, cooldown: float = 5.0) -> CircuitBreaker:
    return CircuitBreaker("wallet", threshold, cooldown, clock)


def opened(clock: Clock) -> CircuitBreaker:
    """A breaker its three failures have just opened."""
    cb = breaker(clock)
    for _ in range(3):
        cb.before_call()
        cb.failed()
    return cb


def guarded(fake: FakeCall, cb: CircuitBreaker, method: str = "Transfer") -> GuardedCall:
    return GuardedCall(fake, f"/moneta.wallet.v1.WalletService/{method}", cb, 2.0, attempts=3)


# -- the breaker


def test_breaker_opens_after_consecutive_failures_and_fails_fast() -> None:
    cb = opened(Clock())

    with pytest.raises(RetryLater) as caught:
        cb.before_call()

    assert cb.state == "open"
    assert caught.value.retry_after == 5
    assert caught.value.reason == "UPSTREAM_UNAVAILABLE"


def test_a_success_between_failures_keeps_the_breaker_closed() -> None:
    cb = breaker(Clock())
    for outcome in ("fail", "fail", "ok", "fail", "fail"):
        cb.before_call()
        cb.failed() if outcome == "fail" else cb.succeeded()

    cb.before_call()
    assert cb.state == "closed"


def test_after_the_cooldown_one_probe_passes_and_others_still_wait() -> None:
    clock = Clock()
    cb = opened(clock)
    clock.now += 5.0

    cb.before_call()  # the probe
    with pytest.raises(RetryLater):
        cb.before_call()
    assert cb.state == "half_open"


def test_a_successful_probe_closes_the_breaker() -> None:
    clock = Clock()
    cb = opened(clock)
    clock.now += 5.0
    cb.before_call()

    cb.succeeded()

    assert cb.state == "closed"
    cb.before_call()


def test_a_failed_probe_opens_the_breaker_for_another_cooldown() -> None:
    clock = Clock()
    cb = opened(clock)
    clock.now += 5.0
    cb.before_call()

    cb.failed()
    clock.now += 4.0

    with pytest.raises(RetryLater) as caught:
        cb.before_call()
    assert caught.value.retry_after == 1


def test_an_abandoned_probe_lets_the_next_call_probe() -> None:
    clock = Clock()
    cb = opened(clock)
    clock.now += 5.0
    cb.before_call()

    cb.abandoned()

    cb.before_call()  # the next probe, at once
    assert cb.state == "half_open"


# -- calls through the breaker


async def test_refusals_by_a_live_upstream_never_open_the_breaker() -> None:
    cb = breaker(Clock(), threshold=2)
    refusals = [
        rpc_error(grpc.StatusCode.FAILED_PRECONDITION, answered=True),
        rpc_error(grpc.StatusCode.NOT_FOUND, answered=True),
        rpc_error(grpc.StatusCode.UNAVAILABLE, answered=True),  # its own dependency is down
    ]
    call = guarded(FakeCall(refusals), cb)

    for _ in refusals:
        with pytest.raises(grpc.aio.AioRpcError):
            await call(object())

    assert cb.state == "closed"


async def test_unanswered_writes_are_not_retried_and_open_the_breaker() -> None:
    cb = breaker(Clock(), threshold=2)
    fake = FakeCall([rpc_error(grpc.StatusCode.UNAVAILABLE)] * 2)
    call = guarded(fake, cb, "Transfer")

    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError):
            await call(object())
    with pytest.raises(RetryLater):
        await call(object())

    assert len(fake.calls) == 2


async def test_an_unanswered_read_is_retried_until_it_is_answered() -> None:
    cb = breaker(Clock(), threshold=5)
    fake = FakeCall([rpc_error(grpc.StatusCode.UNAVAILABLE)] * 2 + ["answer"])

    assert await guarded(fake, cb, "GetWallet")(object()) == "answer"
    assert len(fake.calls) == 3
    assert cb.state == "closed"


async def test_a_read_is_tried_at_most_the_configured_attempts() -> None:
    fake = FakeCall([rpc_error(grpc.StatusCode.UNAVAILABLE)] * 5)

    with pytest.raises(grpc.aio.AioRpcError):
        await guarded(fake, breaker(Clock(), threshold=10), "ListTransactions")(object())

    assert len(fake.calls) == 3


async def test_a_read_that_timed_out_is_not_retried() -> None:
    fake = FakeCall([rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED), "late"])

    with pytest.raises(grpc.aio.AioRpcError):
        await guarded(fake, breaker(Clock()), "GetWallet")(object())

    assert len(fake.calls) == 1


async def test_calls_carry_the_deadline_and_the_request_id() -> None:
    fake = FakeCall(["answer"])
    token = request_id_var.set("req-42")
    try:
        await guarded(fake, breaker(Clock()))(object(), metadata=[("x-actor-id", "u-1")])
    finally:
        request_id_var.reset(token)

    (sent,) = fake.calls
    assert 1.9 < sent["timeout"] <= 2.0
    assert ("x-request-id", "req-42") in sent["metadata"]
    assert ("x-actor-id", "u-1") in sent["metadata"]


async def test_a_call_with_no_time_left_is_not_sent() -> None:
    fake = FakeCall(["answer"])

    with pytest.raises(DeadlineExceeded):
        await guarded(fake, breaker(Clock()))(object(), timeout=0.001)

    assert fake.calls == []
