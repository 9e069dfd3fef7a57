"""The lease an attempt holds on the row it works on, and the fence that
keeps an attempt from moving money once its lease may have lapsed.

A lease is ``lease_until`` on the row (a payment, a bank transfer, an
exchange). Taking one returns the value set: the attempt's fencing token, so
that it releases the lease only while it is still its own (``WHERE
lease_until = token``). The database's clock decides who holds a lease; the
attempt's own monotonic clock, started just before the statement that took
it was sent, tells it conservatively how long it may still count on it. A
process stalled past its lease (paused, frozen, a long GC pause) may find
another attempt, or the reconciler, has taken over and settled the row
meanwhile: right before a ledger call that moves money, ``ensure_time_left``
refuses to send it unless the lease outlives the call's deadline by a
margin. What is left is a stall between that check and the request leaving
the process: microseconds of pure Python.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime

from services.common.errors import AttemptExpired

# Beyond the ledger call's own deadline: the request's way there and the
# ledger's own checks of that deadline.
MARGIN_SECONDS = 2.0


def clock() -> float:
    """The attempt's monotonic clock (the event loop's)."""
    return asyncio.get_running_loop().time()


@dataclass(frozen=True)
class Lease:
    """A lease this attempt took: ``until`` as the database set it (the
    fencing token), ``seconds`` long, taken no earlier than ``started`` on
    ``clock()``."""

    until: datetime
    started: float
    seconds: float

    def seconds_left(self) -> float:
        """At least how long the lease still runs (by this process's clock,
        so it errs short)."""
        return self.started + self.seconds - clock()


_held: ContextVar[Lease | None] = ContextVar("moneta_wallet_lease", default=None)


@contextmanager
def holding(lease: Lease | None) -> Iterator[None]:
    """The ledger calls made inside move money under ``lease`` (None: under
    no lease, as a settlement webhook or a debt repayment under a row lock)."""
    token = _held.set(lease)
    try:
        yield
    finally:
        _held.reset(token)


def ensure_time_left(call_seconds: float) -> None:
    """Refuses, ATTEMPT_EXPIRED, to start a call of at most ``call_seconds``
    that moves money unless the lease held (if any) outlives it by
    ``MARGIN_SECONDS``. The attempt must then neither release the lease nor
    record a refusal: it may no longer be its own."""
    lease = _held.get()
    if lease is not None and lease.seconds_left() < call_seconds + MARGIN_SECONDS:
        raise AttemptExpired()
