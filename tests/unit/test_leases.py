"""The fence on the wallet's leases: a ledger call that moves money is sent
only while the attempt's lease outlives it, by the attempt's own clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from moneta.ledger.v1 import ledger_pb2
from services.common.errors import AttemptExpired
from services.wallet import leases
from services.wallet.peers import Peers

CALL_SECONDS = 2.0


def lease_with(seconds_left: float) -> leases.Lease:
    """A 30 s lease taken so long ago that ``seconds_left`` remain."""
    return leases.Lease(datetime.now(UTC), leases.clock() - 30.0 + seconds_left, 30.0)


@pytest.fixture
async def unreachable_peers() -> AsyncIterator[Peers]:
    """Peers whose ledger nobody answers: a call that was sent fails
    UNAVAILABLE, one refused before it was sent fails ATTEMPT_EXPIRED."""
    peers = Peers("127.0.0.1:1", "127.0.0.1:1", "127.0.0.1:1", CALL_SECONDS)
    yield peers
    await peers.close()


async def test_a_call_under_a_lease_that_outlives_it_by_the_margin_may_go() -> None:
    with leases.holding(lease_with(CALL_SECONDS + leases.MARGIN_SECONDS + 1.0)):
        leases.ensure_time_left(CALL_SECONDS)


@pytest.mark.parametrize("seconds_left", [CALL_SECONDS + leases.MARGIN_SECONDS - 0.5, 0.0, -5.0])
async def test_a_call_that_could_outlast_the_lease_is_refused(seconds_left: float) -> None:
    with leases.holding(lease_with(seconds_left)), pytest.raises(AttemptExpired) as refused:
        leases.ensure_time_left(CALL_SECONDS)
    assert refused.value.reason == "ATTEMPT_EXPIRED"
    assert "retry with the same key" in refused.value.message


async def test_a_call_under_no_lease_is_never_refused() -> None:
    leases.ensure_time_left(CALL_SECONDS)
    with leases.holding(lease_with(-5.0)), leases.holding(None):
        leases.ensure_time_left(CALL_SECONDS)


async def test_the_lease_is_held_only_inside_its_block() -> None:
    with leases.holding(lease_with(-5.0)):
        pass
    leases.ensure_time_left(CALL_SECONDS)


async def test_the_ledger_is_not_called_once_the_lease_may_have_lapsed(
    unreachable_peers: Peers,
) -> None:
    transfer = ledger_pb2.Transfer(id="t", debit_account_id="a", credit_account_id="b", amount=1)
    with leases.holding(lease_with(1.0)), pytest.raises(AttemptExpired):
        await unreachable_peers.create_transfer(transfer)
