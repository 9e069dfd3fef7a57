"""An attempt stalled past its lease (a paused process, a long GC pause)
moves no money once another attempt has taken over, and its late release
leaves the other attempt's lease alone. The wallet's code runs in the
test's process, against the mesh's database, cache and peers, with a lease
of 1 s for the attempt that stalls."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import asyncpg
import httpx
import pytest

from moneta.fraud.v1 import fraud_pb2
from moneta.ledger.v1 import ledger_pb2
from moneta.wallet.v1 import wallet_pb2_grpc
from services.common.errors import (
    Aborted,
    AttemptExpired,
    FailedPrecondition,
    Unavailable,
)
from services.wallet import banking, fx, handlers, leases, merchants, store
from services.wallet.domain import payment_id
from services.wallet.peers import Peers
from tests.e2e.conftest import (
    InProcess,
    Mesh,
    Person,
    budget_of,
    budgeted_person,
    create_merchant,
    create_person,
    link_account,
    usd,
)

Stub = wallet_pb2_grpc.WalletServiceStub
T = TypeVar("T")
WAIT_SECONDS = 15.0


class Stalling(Peers):
    """Peers whose process stalls at one step until the test resumes it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stalled = asyncio.Event()
        self.resume = asyncio.Event()

    async def stall(self) -> None:
        self.stalled.set()
        await self.resume.wait()


class StallBeforeLedger(Stalling):
    """Stalls right before its ledger call (after fraud and budget said yes)."""

    async def create_transfers(
        self, transfers: Sequence[ledger_pb2.Transfer]
    ) -> list[ledger_pb2.TransferResult]:
        await self.stall()
        return await super().create_transfers(transfers)


class StallThenFraudDown(Stalling):
    """Stalls in the fraud check, which then fails: an outcome the attempt
    cannot know, so it gives its lease up."""

    async def score(self, request: fraud_pb2.ScoreRequest) -> fraud_pb2.ScoreResponse:
        await self.stall()
        raise Unavailable("fraud did not answer", reason="FRAUD_CHECK_UNAVAILABLE")


class StallThenDecline(Stalling):
    """Stalls in the fraud check, which then declines the payment."""

    async def score(self, request: fraud_pb2.ScoreRequest) -> fraud_pb2.ScoreResponse:
        await self.stall()
        return fraud_pb2.ScoreResponse(
            transaction_id=request.transaction_id, decision=fraud_pb2.DECISION_BLOCK
        )


class StallAfterLedger(Stalling):
    """Stalls right after the ledger answered, and counts its budget
    releases."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.released: list[str] = []

    async def create_transfers(
        self, transfers: Sequence[ledger_pb2.Transfer]
    ) -> list[ledger_pb2.TransferResult]:
        results = await super().create_transfers(transfers)
        await self.stall()
        return results

    async def release(self, reservation_id: str) -> None:
        self.released.append(reservation_id)
        await super().release(reservation_id)


class StallInLookup(Stalling):
    """Stalls when it asks the ledger for a transfer (a reconciler's first
    question), then answers."""

    async def lookup_transfer(self, transfer_id: uuid.UUID) -> ledger_pb2.Transfer | None:
        await self.stall()
        return await super().lookup_transfer(transfer_id)


@dataclass
class Stall(Generic[T]):
    """An attempt stalled past its lease; ``resume`` lets it go on."""

    peers: Stalling
    task: asyncio.Task[T]

    async def resume(self) -> T:
        """The attempt's outcome, once resumed."""
        self.peers.resume.set()
        return await asyncio.wait_for(self.task, WAIT_SECONDS)


Staller = Callable[..., AbstractAsyncContextManager[Stall[Any]]]


@pytest.fixture
def stall(mesh: Mesh, in_process: InProcess, monkeypatch: pytest.MonkeyPatch) -> Staller:
    """``stall(kind, attempt, leased, seconds=1.0)``: starts ``attempt(peers)``
    with peers of ``kind`` and leases of ``seconds``, waits until it has
    stalled and its lease (on the row ``leased``: table, key column, id) has
    run out by the database's clock, puts leases back to their usual length
    for whoever comes next, and gives the stalled attempt to the block."""

    @asynccontextmanager
    async def stalled(
        kind: type[Stalling],
        attempt: Callable[[Peers], Awaitable[T]],
        leased: tuple[str, str, uuid.UUID],
        seconds: float = 1.0,
    ) -> AsyncIterator[Stall[T]]:
        peers = mesh.peers(in_process.cache, kind)
        assert isinstance(peers, Stalling)
        usual = handlers.LEASE_SECONDS
        monkeypatch.setattr(handlers, "LEASE_SECONDS", seconds)
        task = asyncio.ensure_future(attempt(peers))
        try:
            try:
                await asyncio.wait_for(peers.stalled.wait(), WAIT_SECONDS)
                await lease_lapsed(in_process.pool, *leased)
            finally:
                monkeypatch.setattr(handlers, "LEASE_SECONDS", usual)
            yield Stall(peers, task)
        finally:
            peers.resume.set()
            if not task.done():
                task.cancel()
            await peers.close()

    return stalled


async def lease_lapsed(pool: asyncpg.Pool, table: str, key: str, row_id: uuid.UUID) -> None:
    """Polls until the row's lease has run out by the database's clock."""
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while not await pool.fetchval(
        f"SELECT lease_until < now() FROM {table} WHERE {key} = $1", row_id
    ):
        assert asyncio.get_running_loop().time() < deadline, "the lease never lapsed"
        await asyncio.sleep(0.05)


async def still_processing_under(
    pool: asyncpg.Pool, row_id: uuid.UUID, table: str = "payments", key: str = "payment_id"
) -> Any:
    """The lease a row still PROCESSING is held under."""
    row = await pool.fetchrow(f"SELECT status, lease_until FROM {table} WHERE {key} = $1", row_id)
    assert row is not None and row["status"] == "PROCESSING"
    return row["lease_until"]


async def freeze(http: httpx.AsyncClient, mesh: Mesh, person: Person) -> None:
    wallet = await http.get(f"/api/v1/wallets/{person.user_id}", headers=mesh.admin())
    response = await http.put(
        f"/api/v1/wallets/{wallet.json()['wallet_id']}/status",
        json={"status": "FROZEN", "reason": "lease e2e"},
        headers=mesh.admin(),
    )
    assert response.status_code == 200, response.text


async def usd_to_eur_quote(http: httpx.AsyncClient, mesh: Mesh, person: Person) -> str:
    """A quote for exchanging 10.00 USD of the person's into EUR."""
    quoted = await http.post(
        "/api/v1/exchange/quotes",
        json={"user_id": person.user_id, "from_currency": "USD", "to_currency": "EUR",
              "amount": "10.00"},
        headers=mesh.auth(person.user_id),
    )  # fmt: skip
    assert quoted.status_code == 201, quoted.text
    return str(quoted.json()["quote_id"])


# ---------------------------------------------------------------- P2P


@pytest.mark.parametrize("retry", ["refused", "completed"])
async def test_a_p2p_attempt_stalled_past_its_lease_moves_no_money(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: Stub,
    in_process: InProcess,
    stall: Staller,
    retry: str,
) -> None:
    payer = await budgeted_person(wallet_stub, http, mesh, "50.00", "P2P", "30")
    friend = await create_person(wallet_stub, http, mesh, "0")
    cmd = handlers.TransferCommand(payer.user_id, ("user_id", friend.user_id), 2000, "USD", "zz")
    pid = payment_id(uuid.UUID(payer.user_id), "zz")
    async with stall(
        StallBeforeLedger, lambda peers: handlers.transfer(in_process.pool, peers, cmd),
        ("payments", "payment_id", pid),
    ) as first:  # fmt: skip
        if retry == "refused":
            await freeze(http, mesh, payer)
            with pytest.raises(FailedPrecondition) as refused:
                await handlers.transfer(in_process.pool, in_process.peers, cmd)
            assert refused.value.reason == "WALLET_FROZEN"
        else:
            assert (
                await handlers.transfer(in_process.pool, in_process.peers, cmd)
            ).status == "COMPLETED"

        with pytest.raises(AttemptExpired) as expired:
            await first.resume()

    assert expired.value.reason == "ATTEMPT_EXPIRED"
    moved = await in_process.peers.lookup_transfer(pid)
    status = await in_process.pool.fetchval(
        "SELECT status FROM payments WHERE payment_id = $1", pid
    )
    if retry == "refused":
        assert moved is None
        assert status == "FAILED"
        assert await budget_of(http, mesh, payer) == ("0.00", "0.00")
        assert (await usd(http, mesh, payer))["available"] == "50.00"
    else:
        assert moved is not None and moved.amount == 2000
        assert status == "COMPLETED"
        assert await budget_of(http, mesh, payer) == ("20.00", "0.00")
        assert (await usd(http, mesh, payer))["available"] == "30.00"


async def test_a_p2p_attempt_stalled_past_its_lease_leaves_the_next_attempts_lease_alone(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: Stub,
    in_process: InProcess,
    stall: Staller,
) -> None:
    payer = await create_person(wallet_stub, http, mesh, "50.00")
    friend = await create_person(wallet_stub, http, mesh, "0")
    cmd = handlers.TransferCommand(payer.user_id, ("user_id", friend.user_id), 700, "USD", "zz")
    pid = payment_id(uuid.UUID(payer.user_id), "zz")
    async with stall(
        StallThenFraudDown, lambda peers: handlers.transfer(in_process.pool, peers, cmd),
        ("payments", "payment_id", pid),
    ) as first:  # fmt: skip
        async with in_process.pool.acquire() as conn:
            second = await store.take_lease(conn, pid, handlers.LEASE_SECONDS)
        assert second is not None  # the next attempt (or the reconciler) is at work

        with pytest.raises(Unavailable):
            await first.resume()  # and it gives up its lease, as it thinks

    lease_until = await in_process.pool.fetchval(
        "SELECT lease_until FROM payments WHERE payment_id = $1", pid
    )
    assert lease_until == second.until
    with pytest.raises(Aborted) as concurrent:
        await handlers.transfer(in_process.pool, in_process.peers, cmd)
    assert concurrent.value.reason == "REQUEST_IN_PROGRESS"


async def test_a_p2p_attempt_refused_after_its_lease_lapsed_records_nothing(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: Stub,
    in_process: InProcess,
    stall: Staller,
) -> None:
    payer = await create_person(wallet_stub, http, mesh, "50.00")
    friend = await create_person(wallet_stub, http, mesh, "0")
    cmd = handlers.TransferCommand(payer.user_id, ("user_id", friend.user_id), 700, "USD", "zz")
    pid = payment_id(uuid.UUID(payer.user_id), "zz")
    async with stall(
        StallThenDecline, lambda peers: handlers.transfer(in_process.pool, peers, cmd),
        ("payments", "payment_id", pid),
    ) as first:  # fmt: skip
        async with in_process.pool.acquire() as conn:
            second = await store.take_lease(conn, pid, handlers.LEASE_SECONDS)
        assert second is not None  # the next attempt (or the reconciler) is at work

        with pytest.raises(AttemptExpired):
            await first.resume()  # not TRANSACTION_DECLINED: the payment is the next attempt's now

    assert await still_processing_under(in_process.pool, pid) == second.until


async def test_a_p2p_attempt_refused_by_the_ledger_after_its_lease_lapsed_frees_no_budget(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: Stub,
    in_process: InProcess,
    stall: Staller,
) -> None:
    """The reservation is named after the payment, so a retry that took
    over reserves (and spends) under the same name: a stalled attempt that
    wakes to the ledger's refusal must not free it."""
    payer = await budgeted_person(wallet_stub, http, mesh, "10.00", "P2P", "30")
    friend = await create_person(wallet_stub, http, mesh, "0")
    cmd = handlers.TransferCommand(payer.user_id, ("user_id", friend.user_id), 2000, "USD", "zz")
    pid = payment_id(uuid.UUID(payer.user_id), "zz")
    # A lease long enough for the ledger call to be sent at all.
    async with stall(
        StallAfterLedger, lambda peers: handlers.transfer(in_process.pool, peers, cmd),
        ("payments", "payment_id", pid), in_process.peers.timeout + leases.MARGIN_SECONDS + 0.5,
    ) as first:  # fmt: skip
        async with in_process.pool.acquire() as conn:
            second = await store.take_lease(conn, pid, handlers.LEASE_SECONDS)
        assert second is not None  # the next attempt is at work, on the same reservation

        with pytest.raises(AttemptExpired):
            await first.resume()  # not INSUFFICIENT_FUNDS: the payment is the next attempt's now

    assert isinstance(first.peers, StallAfterLedger)
    assert first.peers.released == []
    assert await budget_of(http, mesh, payer) == ("0.00", "20.00")
    assert await still_processing_under(in_process.pool, pid) == second.until


async def test_a_reconciler_stalled_past_its_lease_fails_no_payment_another_attempt_holds(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: Stub,
    in_process: InProcess,
    stall: Staller,
) -> None:
    payer = await create_person(wallet_stub, http, mesh, "50.00")
    friend = await create_person(wallet_stub, http, mesh, "0")
    cmd = handlers.TransferCommand(payer.user_id, ("user_id", friend.user_id), 700, "USD", "zz")
    pid = payment_id(uuid.UUID(payer.user_id), "zz")
    # An attempt that gave up with its outcome unknown: PROCESSING, no lease.
    gave_up = mesh.peers(in_process.cache, StallThenFraudDown)
    assert isinstance(gave_up, Stalling)
    gave_up.resume.set()
    try:
        with pytest.raises(Unavailable):
            await handlers.transfer(in_process.pool, gave_up, cmd)
    finally:
        await gave_up.close()

    async with stall(
        StallInLookup, lambda peers: handlers.reconcile_stale_payments(in_process.pool, peers, 0.0),
        ("payments", "payment_id", pid),
    ) as reconciling:  # fmt: skip
        async with in_process.pool.acquire() as conn:
            second = await store.take_lease(conn, pid, handlers.LEASE_SECONDS)
        assert second is not None  # a retry is at work on it now
        assert await reconciling.resume() == 0

    assert await still_processing_under(in_process.pool, pid) == second.until


# ---------------------------------------------------------------- withdrawals


async def test_a_withdrawal_stalled_past_its_lease_places_no_hold_after_a_retry_was_refused(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: Stub,
    in_process: InProcess,
    stall: Staller,
) -> None:
    alice = await budgeted_person(wallet_stub, http, mesh, "100.00", "CASH_OUT", "50")
    cmd = banking.BankTransferCommand(
        alice.user_id, 4000, "USD", await link_account(http, mesh, alice), "zz"
    )
    transfer_id = banking.bank_transfer_id(uuid.UUID(alice.user_id), "zz")
    async with stall(
        StallBeforeLedger, lambda peers: banking.withdraw(in_process.pool, peers, cmd),
        ("bank_transfers", "transfer_id", transfer_id),
    ) as first:  # fmt: skip
        await freeze(http, mesh, alice)
        with pytest.raises(FailedPrecondition) as refused:
            await banking.withdraw(in_process.pool, in_process.peers, cmd)
        assert refused.value.reason == "WALLET_FROZEN"

        with pytest.raises(AttemptExpired):
            await first.resume()

    assert await in_process.peers.lookup_transfer(transfer_id) is None
    status = await in_process.pool.fetchval(
        "SELECT status FROM bank_transfers WHERE transfer_id = $1", transfer_id
    )
    assert status == "REFUSED"
    assert await budget_of(http, mesh, alice) == ("0.00", "0.00")
    assert (await usd(http, mesh, alice))["available"] == "100.00"
    with pytest.raises(FailedPrecondition) as replay:
        await banking.withdraw(in_process.pool, in_process.peers, cmd)
    assert replay.value.reason == "WALLET_FROZEN"


async def test_a_withdrawal_stalled_past_its_lease_leaves_the_next_attempts_lease_alone(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: Stub,
    in_process: InProcess,
    stall: Staller,
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "100.00")
    cmd = banking.BankTransferCommand(
        alice.user_id, 4000, "USD", await link_account(http, mesh, alice), "zz"
    )
    transfer_id = banking.bank_transfer_id(uuid.UUID(alice.user_id), "zz")
    async with stall(
        StallThenFraudDown, lambda peers: banking.withdraw(in_process.pool, peers, cmd),
        ("bank_transfers", "transfer_id", transfer_id),
    ) as first:  # fmt: skip
        async with in_process.pool.acquire() as conn:
            second = await banking._take_lease(conn, transfer_id)
        assert second is not None  # the next attempt (or the reconciler) is at work

        with pytest.raises(Unavailable):
            await first.resume()

    lease_until = await in_process.pool.fetchval(
        "SELECT lease_until FROM bank_transfers WHERE transfer_id = $1", transfer_id
    )
    assert lease_until == second[1].until
    with pytest.raises(Aborted) as concurrent:
        await banking.withdraw(in_process.pool, in_process.peers, cmd)
    assert concurrent.value.reason == "REQUEST_IN_PROGRESS"


# ---------------------------------------------------------------- merchants and exchanges


async def test_a_merchant_payment_stalled_past_its_lease_moves_nothing_after_a_retry_was_refused(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: Stub,
    in_process: InProcess,
    stall: Staller,
) -> None:
    payer = await create_person(wallet_stub, http, mesh, "30.00")
    merchant_id = await create_merchant(http, mesh)
    cmd = merchants.PayMerchantCommand(
        payer_id=payer.user_id, idempotency_key="zz", merchant_id=merchant_id,
        amount=800, currency="USD",
    )  # fmt: skip
    pid = payment_id(uuid.UUID(payer.user_id), "zz")
    async with stall(
        StallBeforeLedger, lambda peers: merchants.pay_merchant(in_process.pool, peers, cmd),
        ("payments", "payment_id", pid),
    ) as first:  # fmt: skip
        await freeze(http, mesh, payer)
        with pytest.raises(FailedPrecondition) as refused:
            await merchants.pay_merchant(in_process.pool, in_process.peers, cmd)
        assert refused.value.reason == "WALLET_FROZEN"

        with pytest.raises(AttemptExpired):
            await first.resume()

    assert await in_process.peers.lookup_transfer(pid) is None
    status = await in_process.pool.fetchval(
        "SELECT status FROM payments WHERE payment_id = $1", pid
    )
    assert status == "FAILED"
    assert (await usd(http, mesh, payer))["available"] == "30.00"


async def test_an_exchange_stalled_past_its_lease_moves_nothing_after_a_retry_was_refused(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: Stub,
    in_process: InProcess,
    stall: Staller,
) -> None:
    person = await create_person(wallet_stub, http, mesh, "30.00")
    quote_id = await usd_to_eur_quote(http, mesh, person)
    exchange_id = fx.exchange_id_for(uuid.UUID(person.user_id), "zz")

    def execute(peers: Peers) -> Awaitable[fx.ExchangeOutcome]:
        return fx.execute_exchange(
            in_process.pool, peers, user_id=person.user_id, quote_id=quote_id,
            idempotency_key="zz",
        )  # fmt: skip

    async with stall(
        StallBeforeLedger, lambda peers: execute(peers),
        ("fx_exchanges", "exchange_id", exchange_id),
    ) as first:  # fmt: skip
        await freeze(http, mesh, person)
        with pytest.raises(FailedPrecondition) as refused:
            await execute(in_process.peers)
        assert refused.value.reason == "WALLET_FROZEN"

        with pytest.raises(AttemptExpired):
            await first.resume()

    assert await in_process.peers.lookup_transfer(exchange_id) is None
    status = await in_process.pool.fetchval(
        "SELECT status FROM fx_exchanges WHERE exchange_id = $1", exchange_id
    )
    assert status == "FAILED"
    assert (await usd(http, mesh, person))["available"] == "30.00"


async def test_a_withdrawal_refused_after_its_lease_lapsed_records_nothing(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: Stub,
    in_process: InProcess,
    stall: Staller,
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "100.00")
    cmd = banking.BankTransferCommand(
        alice.user_id, 4000, "USD", await link_account(http, mesh, alice), "zz"
    )
    transfer_id = banking.bank_transfer_id(uuid.UUID(alice.user_id), "zz")
    async with stall(
        StallThenDecline, lambda peers: banking.withdraw(in_process.pool, peers, cmd),
        ("bank_transfers", "transfer_id", transfer_id),
    ) as first:  # fmt: skip
        async with in_process.pool.acquire() as conn:
            second = await banking._take_lease(conn, transfer_id)
        assert second is not None  # the next attempt (or the reconciler) is at work

        with pytest.raises(AttemptExpired):
            await first.resume()

    leased = await still_processing_under(
        in_process.pool, transfer_id, "bank_transfers", "transfer_id"
    )
    assert leased == second[1].until


async def test_a_fresh_exchange_is_leased_from_the_moment_it_is_recorded(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: Stub,
    in_process: InProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No gap between recording an execution and leasing it: otherwise a
    retry could take it over in between, and the first attempt, believing
    itself fresh, would not ask the ledger what the retry did."""
    person = await create_person(wallet_stub, http, mesh, "30.00")
    quote_id = await usd_to_eur_quote(http, mesh, person)
    seen: list[Any] = []
    claim = fx._claim_quote

    async def watched(*args: Any) -> Any:
        lease = await claim(*args)
        row = await in_process.pool.fetchrow(
            "SELECT lease_until, lease_until > now() AS held FROM fx_exchanges"
            " WHERE exchange_id = $1",
            args[3],
        )
        seen.append((lease, row))
        return lease

    monkeypatch.setattr(fx, "_claim_quote", watched)
    outcome = await fx.execute_exchange(
        in_process.pool, in_process.peers, user_id=person.user_id, quote_id=quote_id,
        idempotency_key="zz",
    )  # fmt: skip
    assert outcome.status == "COMPLETED"
    [(lease, row)] = seen
    assert lease is not None and row["held"] and row["lease_until"] == lease.until
