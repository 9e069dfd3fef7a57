"""Calls to an upstream: a deadline on each, the request id passed on,
reads retried when the upstream did not answer, and a circuit breaker that
fails fast (503 with Retry-After) while the upstream is down.

Only transport failures count against an upstream: UNAVAILABLE or
DEADLINE_EXCEEDED without the ErrorInfo a Moneta service puts on every
answer. A refusal (NOT_FOUND, INSUFFICIENT_FUNDS …) proves it is alive, and
so does an UNAVAILABLE it answers because one of *its* dependencies is down.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import structlog
from prometheus_client import Counter, Gauge

from services.common.errors import DeadlineExceeded, Unavailable
from services.common.interceptors import REQUEST_ID_HEADER
from services.common.logging import request_id_var

log = structlog.get_logger("moneta.gateway")

# Calls that change nothing, and so may be sent again.
READ_PREFIXES = ("Get", "List", "Verify", "Check")
_TRANSPORT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
# Below this, a call could not get an answer back in time: it is not sent.
_MIN_CALL_SECONDS = 0.005

CIRCUIT_OPEN = Gauge(
    "moneta_gateway_circuit_open",
    "1 while an upstream's circuit is open (calls fail fast), 0 otherwise.",
    ["upstream"],
)
UPSTREAM_FAILURES = Counter(
    "moneta_gateway_upstream_failures_total",
    "Calls an upstream did not answer (UNAVAILABLE or DEADLINE_EXCEEDED in transport).",
    ["upstream", "code"],
)
UPSTREAM_RETRIES = Counter(
    "moneta_gateway_upstream_retries_total", "Reads sent again to an upstream.", ["upstream"]
)


class RetryLater(Unavailable):
    """503 with a Retry-After: the upstream is known to be down."""

    def __init__(self, upstream: str, retry_after: float) -> None:
        super().__init__(
            f"the {upstream} service is unavailable; retry later",
            reason="UPSTREAM_UNAVAILABLE",
            details={"upstream": upstream},
        )
        self.retry_after = max(1, math.ceil(retry_after))


class CircuitBreaker:
    """Closed: calls pass. After ``threshold`` consecutive failures it opens:
    calls fail at once. After ``cooldown`` one probe call passes (half open);
    its success closes the circuit, its failure opens it again."""

    def __init__(
        self,
        name: str,
        threshold: int,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._threshold = threshold
        self._cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        CIRCUIT_OPEN.labels(name).set(0)

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half_open" if self._probing else "open"

    def before_call(self) -> None:
        """Raises RetryLater while the circuit is open, or while its probe runs."""
        if self._opened_at is None:
            return
        wait = self._opened_at + self._cooldown - self._clock()
        if wait > 0 or self._probing:
            raise RetryLater(self.name, max(wait, 1.0))
        self._probing = True  # this call is the probe

    def succeeded(self) -> None:
        if self._opened_at is not None:
            log.info("circuit_closed", upstream=self.name)
            CIRCUIT_OPEN.labels(self.name).set(0)
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def failed(self) -> None:
        self._failures += 1
        if self._probing or (self._opened_at is None and self._failures >= self._threshold):
            if not self._probing:
                log.warning("circuit_opened", upstream=self.name, failures=self._failures)
            self._opened_at = self._clock()
            self._probing = False
            CIRCUIT_OPEN.labels(self.name).set(1)

    def abandoned(self) -> None:
        """A call ended without an answer either way (its caller went away):
        a probe's turn passes to the next call."""
        if self._probing and self._opened_at is not None:
            self._probing = False
            self._opened_at = self._clock() - self._cooldown


def transport_failure(exc: grpc.aio.AioRpcError) -> bool:
    """The upstream did not answer, as opposed to answering with an error."""
    if exc.code() not in _TRANSPORT_CODES:
        return False
    return not any(key == _STATUS_DETAILS_KEY for key, _ in exc.trailing_metadata() or ())


class GuardedCall:
    """A unary call to one upstream method under the upstream's policy."""

    def __init__(
        self,
        inner: Any,
        method: str,
        breaker: CircuitBreaker,
        timeout: float,
        attempts: int,
    ) -> None:
        self._inner = inner
        self.method = method
        self._breaker = breaker
        self._timeout = timeout
        self._attempts = attempts if method.rsplit("/", 1)[-1].startswith(READ_PREFIXES) else 1

    async def __call__(
        self,
        request: Any,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,  # noqa: ASYNC109 - the signature of a gRPC call
    ) -> Any:
        call_metadata = list(metadata)
        request_id = request_id_var.get()
        if request_id:
            call_metadata.append((REQUEST_ID_HEADER, request_id))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else self._timeout)
        attempt = 0
        while True:
            attempt += 1
            self._breaker.before_call()
            left = deadline - loop.time()
            if left < _MIN_CALL_SECONDS:
                self._breaker.abandoned()
                raise DeadlineExceeded("a dependency timed out", reason="DEPENDENCY_TIMEOUT")
            try:
                response = await self._inner(request, metadata=call_metadata, timeout=left)
            except grpc.aio.AioRpcError as exc:
                if not transport_failure(exc):
                    self._breaker.succeeded()  # it answered
                    raise
                self._breaker.failed()
                UPSTREAM_FAILURES.labels(self._breaker.name, exc.code().name).inc()
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self._attempts:
                    raise
                UPSTREAM_RETRIES.labels(self._breaker.name).inc()
                await asyncio.sleep(min(0.025 * 2**attempt * random.uniform(0.5, 1.5), left / 2))  # noqa: S311
                continue
            except BaseException:
                self._breaker.abandoned()
                raise
            self._breaker.succeeded()
            return response


class GuardedChannel:
    """Wraps a channel so that every stub made over it calls through
    GuardedCall: the stubs keep their generated types."""

    def __init__(
        self, channel: grpc.aio.Channel, breaker: CircuitBreaker, timeout: float, attempts: int
    ) -> None:
        self._channel = channel
        self.breaker = breaker
        self._timeout = timeout
        self._attempts = attempts

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> GuardedCall:
        inner = self._channel.unary_unary(
            method,
            request_serializer=request_serializer,
            response_deserializer=response_deserializer,
            _registered_method=_registered_method,
        )
        return GuardedCall(inner, method, self.breaker, self._timeout, self._attempts)
