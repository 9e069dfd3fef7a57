"""The ledger under concurrent load, over gRPC against a real ledger process.

Many clients send random transfers at once (duplicates and uncoverable
amounts among them); afterwards the ledger must agree with a model built from
the answers the clients got: money conserved, no protected account below
zero, every transfer answered OK stored exactly once with its two entries.
Then the same for a crash: the process is killed mid-load and restarted, and
every client resends everything it sent.

The ledger process's database is shared by the whole run: every test opens
accounts of its own (fresh uuid4 ids) and checks sums over those only.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar, cast

import asyncpg
import grpc
import pytest

from moneta.ledger.v1 import ledger_pb2 as pb
from moneta.ledger.v1 import ledger_pb2_grpc
from services.common.db import create_pool
from tests.processes import ServiceProcess

if TYPE_CHECKING:
    from moneta.ledger.v1.ledger_pb2_grpc import LedgerServiceAsyncStub as Ledger
    from tests.conftest import TestRun

MAX_BATCH = 8_000
OK = pb.TransferResult.OK
EXISTS = pb.TransferResult.EXISTS
INSUFFICIENT_FUNDS = pb.TransferResult.INSUFFICIENT_FUNDS

T = TypeVar("T")


def new_id() -> str:
    return str(uuid.uuid4())


def chunks(items: Sequence[T], size: int = MAX_BATCH) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def wallet(account_id: str) -> pb.Account:
    """A user's wallet: it may never go below zero."""
    return pb.Account(
        id=account_id, currency="USD", type=pb.ACCOUNT_TYPE_USER_WALLET, no_overdraft=True
    )


def world(account_id: str) -> pb.Account:
    """The outside world: money enters the test's accounts from here, so it
    may go negative."""
    return pb.Account(id=account_id, currency="USD", type=pb.ACCOUNT_TYPE_EXTERNAL)


def posted(debit: str, credit: str, amount: int) -> pb.Transfer:
    return pb.Transfer(
        id=new_id(),
        debit_account_id=debit,
        credit_account_id=credit,
        amount=amount,
        currency="USD",
        type=pb.TRANSFER_TYPE_POSTED,
    )


def request(transfers: Iterable[pb.Transfer]) -> pb.CreateTransfersRequest:
    return pb.CreateTransfersRequest(transfers=transfers)


async def open_accounts(ledger: Ledger, accounts: Sequence[pb.Account]) -> None:
    for chunk in chunks(accounts):
        response = await ledger.CreateAccounts(pb.CreateAccountsRequest(accounts=chunk))
        assert {r.code for r in response.results} == {pb.AccountResult.OK}


async def create_transfers(
    ledger: Ledger, transfers: Sequence[pb.Transfer]
) -> list[pb.TransferResult]:
    results: list[pb.TransferResult] = []
    for chunk in chunks(transfers):
        results.extend((await ledger.CreateTransfers(request(chunk))).results)
    return results


async def balances(ledger: Ledger, account_ids: Sequence[str]) -> dict[str, pb.Balance]:
    found: dict[str, pb.Balance] = {}
    for chunk in chunks(account_ids):
        response = await ledger.GetBalances(pb.GetBalancesRequest(account_ids=chunk))
        found.update((b.account_id, b) for b in response.balances)
    assert found.keys() == set(account_ids)
    return found


async def lookup_transfers(ledger: Ledger, ids: Sequence[str]) -> list[pb.Transfer]:
    found: list[pb.Transfer] = []
    for chunk in chunks(ids):
        found.extend((await ledger.LookupTransfers(pb.LookupTransfersRequest(ids=chunk))).transfers)
    return found


def net_credits(transfers: Iterable[pb.Transfer]) -> Counter[str]:
    """Per account, credits minus debits that these transfers make."""
    net: Counter[str] = Counter()
    for t in transfers:
        net[t.credit_account_id] += t.amount
        net[t.debit_account_id] -= t.amount
    return net


def stub(channel: grpc.aio.Channel) -> Ledger:
    return cast("Ledger", ledger_pb2_grpc.LedgerServiceStub(channel))


@pytest.fixture
async def ledger(ledger_process: ServiceProcess) -> AsyncIterator[Ledger]:
    async with grpc.aio.insecure_channel(ledger_process.address) as channel:
        yield stub(channel)


@pytest.fixture(scope="module")
async def ledger_db(
    test_run: TestRun, ledger_process: ServiceProcess
) -> AsyncIterator[asyncpg.Pool]:
    """The ledger process's own database, for counts the API does not give."""
    settings = test_run.settings.model_copy(
        update={"db_prefix": ledger_process.env["MONETA_DB_PREFIX"]}
    )
    pool = await create_pool(settings.database_url("ledger"), min_size=1, max_size=4)
    yield pool
    await pool.close()


# ---------------------------------------------------------------- random load

CLIENTS = 50
CALLS_PER_CLIENT = 14  # 50 clients, 14 calls each, ~10.5 transfers a call: ~7,300 transfers
HOT_ACCOUNTS = 20
COLD_ACCOUNTS = 10_000
# Hot accounts never run dry, so whatever they pay always succeeds; that makes
# their transfers safe to send twice at once. Cold accounts run dry often.
HOT_FUNDING = 10**12
COLD_FUNDING_MAX = 2_000
# More than all the money the test ever brings in: no account covers it.
UNCOVERABLE = 10**15


@dataclass
class Load:
    """What the clients sent and what they were answered, id by id."""

    world: str
    hot: list[str]
    cold: list[str]
    funding: list[pb.Transfer]
    sent: dict[str, pb.Transfer] = field(default_factory=dict)
    answers: defaultdict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    # Answered OK or EXISTS: sending them again must answer EXISTS.
    stored: list[pb.Transfer] = field(default_factory=list)
    # Paid by a hot account and awaiting an answer: other clients send them too.
    in_flight: dict[str, pb.Transfer] = field(default_factory=dict)
    uncoverable: list[pb.Transfer] = field(default_factory=list)
    concurrent_duplicates: int = 0
    resends: int = 0

    @property
    def wallets(self) -> list[str]:
        return self.hot + self.cold

    @property
    def accounts(self) -> list[str]:
        return [self.world, *self.wallets]

    def ok_ids(self) -> set[str]:
        return {tid for tid, codes in self.answers.items() if OK in codes}

    def next_transfer(self, rng: random.Random) -> pb.Transfer:
        roll = rng.random()
        if roll < 0.06 and self.in_flight:
            self.concurrent_duplicates += 1
            return rng.choice(list(self.in_flight.values()))
        if roll < 0.12 and self.stored:
            self.resends += 1
            return rng.choice(self.stored)
        if roll < 0.14 and self.uncoverable:
            return rng.choice(self.uncoverable)
        if roll < 0.18:
            debit, credit = rng.sample(self.wallets, 2)
            transfer = posted(debit, credit, UNCOVERABLE)
            self.uncoverable.append(transfer)
        elif roll < 0.55:
            debit = rng.choice(self.hot)
            credit = rng.choice(self.wallets if rng.random() < 0.5 else self.hot)
            while credit == debit:
                credit = rng.choice(self.hot)
            transfer = posted(debit, credit, rng.randint(1, 10_000))
        else:
            debit = rng.choice(self.cold)
            credit = rng.choice(self.hot if rng.random() < 0.3 else self.cold)
            while credit == debit:
                credit = rng.choice(self.cold)
            transfer = posted(debit, credit, rng.randint(1, 3_000))
        self.sent[transfer.id] = transfer
        return transfer


async def run_client(ledger: Ledger, load: Load, rng: random.Random) -> None:
    for _ in range(CALLS_PER_CLIENT):
        batch = [load.next_transfer(rng) for _ in range(rng.randint(1, 20))]
        shared = [t for t in batch if t.debit_account_id in load.hot]
        load.in_flight.update((t.id, t) for t in shared)
        try:
            response = await ledger.CreateTransfers(request(batch), timeout=30)
        finally:
            for t in shared:
                load.in_flight.pop(t.id, None)
        assert [r.id for r in response.results] == [t.id for t in batch]
        for transfer, result in zip(batch, response.results, strict=True):
            load.answers[transfer.id].append(result.code)
            if result.code in (OK, EXISTS):
                load.stored.append(transfer)


@pytest.fixture(scope="module")
async def load(ledger_process: ServiceProcess) -> Load:
    """Funds 20 hot and 10,000 cold wallets, then lets 50 clients send random
    transfers among them at once."""
    rng = random.Random(20_261_121)
    hot = [new_id() for _ in range(HOT_ACCOUNTS)]
    cold = [new_id() for _ in range(COLD_ACCOUNTS)]
    source = new_id()
    funding = [posted(source, a, HOT_FUNDING) for a in hot] + [
        posted(source, a, amount) for a in cold if (amount := rng.randint(0, COLD_FUNDING_MAX)) > 0
    ]
    async with grpc.aio.insecure_channel(ledger_process.address) as channel:
        ledger = stub(channel)
        await open_accounts(ledger, [world(source)] + [wallet(a) for a in hot + cold])
        results = await create_transfers(ledger, funding)
        assert {r.code for r in results} == {OK}
        state = Load(world=source, hot=hot, cold=cold, funding=funding)
        await asyncio.gather(*(run_client(ledger, state, random.Random(i)) for i in range(CLIENTS)))
    return state


async def test_load_sends_duplicates_and_uncoverable_amounts(load: Load) -> None:
    codes = Counter(code for answers in load.answers.values() for code in answers)
    assert 5_000 <= sum(codes.values()) <= 10_000
    assert load.concurrent_duplicates > 0 and load.resends > 0 and load.uncoverable
    assert codes[OK] and codes[EXISTS] and codes[INSUFFICIENT_FUNDS]


async def test_money_is_conserved_across_the_accounts_under_load(
    load: Load, ledger: Ledger
) -> None:
    found = (await balances(ledger, load.accounts)).values()
    assert sum(b.debits_posted for b in found) == sum(b.credits_posted for b in found)
    assert sum(b.debits_pending for b in found) == sum(b.credits_pending for b in found) == 0


async def test_no_protected_account_goes_negative_under_load(load: Load, ledger: Ledger) -> None:
    found = await balances(ledger, load.wallets)
    negative = {
        a: (b.posted, b.available) for a, b in found.items() if min(b.posted, b.available) < 0
    }
    assert negative == {}


async def test_a_transfer_answered_ok_is_stored_once_and_answered_exists_ever_after(
    load: Load, ledger: Ledger
) -> None:
    ok_ids = load.ok_ids()
    answered_twice = {tid: codes for tid, codes in load.answers.items() if codes.count(OK) > 1}
    assert answered_twice == {}
    otherwise_answered = {
        tid: codes for tid in ok_ids if set(codes := load.answers[tid]) - {OK, EXISTS}
    }
    assert otherwise_answered == {}
    found = await lookup_transfers(ledger, sorted(ok_ids))
    assert Counter(t.id for t in found) == Counter(ok_ids)

    def fields(t: pb.Transfer) -> tuple[str, str, int]:
        return t.debit_account_id, t.credit_account_id, t.amount

    assert {t.id: fields(t) for t in found} == {tid: fields(load.sent[tid]) for tid in ok_ids}


async def test_a_refused_transfer_is_refused_every_time_and_never_stored(
    load: Load, ledger: Ledger
) -> None:
    refused = {tid: codes for tid, codes in load.answers.items() if OK not in codes}
    assert refused
    assert {code for codes in refused.values() for code in codes} == {INSUFFICIENT_FUNDS}
    assert await lookup_transfers(ledger, sorted(refused)) == []


async def test_each_transfer_answered_ok_wrote_exactly_two_entries(
    load: Load, ledger_db: asyncpg.Pool
) -> None:
    ids = [uuid.UUID(a) for a in load.accounts]
    expected = len(load.ok_ids()) + len(load.funding)
    async with ledger_db.acquire() as conn:
        transfers = await conn.fetchval(
            "SELECT count(*) FROM transfers WHERE debit_account_id = ANY($1::uuid[])"
            " OR credit_account_id = ANY($1::uuid[])",
            ids,
        )
        entries = await conn.fetchval(
            "SELECT count(*) FROM entries WHERE account_id = ANY($1::uuid[])", ids
        )
    assert (transfers, entries) == (expected, 2 * expected)


async def test_balances_are_the_funding_plus_the_transfers_answered_ok(
    load: Load, ledger: Ledger
) -> None:
    ok_ids = load.ok_ids()
    model = net_credits([*load.funding, *(load.sent[tid] for tid in ok_ids)])
    found = await balances(ledger, load.accounts)
    actual = {a: b.credits_posted - b.debits_posted for a, b in found.items()}
    assert actual == {a: model[a] for a in load.accounts}


async def test_verify_ledger_is_ok_after_the_load(load: Load, ledger: Ledger) -> None:
    verdict = await ledger.VerifyLedger(pb.VerifyLedgerRequest())
    assert (verdict.ok, list(verdict.discrepancies)) == (True, [])


# ---------------------------------------------------------------- hot account


async def test_concurrent_debits_of_one_account_succeed_exactly_as_far_as_its_money_goes(
    ledger: Ledger,
) -> None:
    source, payer, payee = new_id(), new_id(), new_id()
    await open_accounts(ledger, [world(source), wallet(payer), wallet(payee)])
    funding = posted(source, payer, 10 * 100)  # covers exactly ten debits of 100
    assert [r.code for r in await create_transfers(ledger, [funding])] == [OK]

    responses = await asyncio.gather(
        *(ledger.CreateTransfers(request([posted(payer, payee, 100)])) for _ in range(64))
    )

    assert Counter(r.results[0].code for r in responses) == {OK: 10, INSUFFICIENT_FUNDS: 54}
    balance = (await balances(ledger, [payer]))[payer]
    assert (balance.posted, balance.available, balance.pending) == (0, 0, 0)


# ---------------------------------------------------------------- group commit


async def test_concurrent_single_transfer_calls_share_database_transactions(
    ledger: Ledger, ledger_db: asyncpg.Pool
) -> None:
    """Group commit: calls that arrive while a batch commits are committed
    together in the next one, with one transaction timestamp."""
    source = new_id()
    payees = [new_id() for _ in range(10)]
    await open_accounts(ledger, [world(source)] + [wallet(a) for a in payees])
    transfers = [posted(source, payees[i % len(payees)], 1) for i in range(200)]

    responses = await asyncio.gather(*(ledger.CreateTransfers(request([t])) for t in transfers))

    assert {r.results[0].code for r in responses} == {OK}
    commits = await ledger_db.fetchval(
        "SELECT count(DISTINCT created_at) FROM transfers WHERE id = ANY($1::uuid[])",
        [uuid.UUID(t.id) for t in transfers],
    )
    assert commits < len(transfers)


# ---------------------------------------------------------------- crash


CRASH_CLIENTS = 8
CRASH_BATCHES_PER_CLIENT = 150
CRASH_ACCOUNTS = 40
# Enough that no account ever runs dry: every transfer can be funded.
CRASH_FUNDING = 10**9
RESEND_SECONDS = 45.0


@dataclass
class CrashClient:
    batches: list[list[pb.Transfer]]
    sent: int = 0  # batches[:sent] went out, the last perhaps unanswered
    interrupted: bool = False
    answers_after_restart: list[pb.TransferResult] = field(default_factory=list)

    @property
    def sent_transfers(self) -> list[pb.Transfer]:
        return [t for batch in self.batches[: self.sent] for t in batch]

    @property
    def unsent_transfers(self) -> list[pb.Transfer]:
        return [t for batch in self.batches[self.sent :] for t in batch]


def crash_client(rng: random.Random, accounts: Sequence[str]) -> CrashClient:
    batches = []
    for _ in range(CRASH_BATCHES_PER_CLIENT):
        batch = []
        for _ in range(rng.randint(1, 20)):
            debit, credit = rng.sample(accounts, 2)
            batch.append(posted(debit, credit, rng.randint(1, 1_000)))
        batches.append(batch)
    return CrashClient(batches)


async def send_until_crash(
    ledger: Ledger, client: CrashClient, answered: Counter[str], enough: asyncio.Event
) -> None:
    threshold = CRASH_CLIENTS * CRASH_BATCHES_PER_CLIENT // 3
    for batch in client.batches:
        client.sent += 1
        try:
            await ledger.CreateTransfers(request(batch), timeout=10)
        except grpc.aio.AioRpcError:
            client.interrupted = True
            return
        answered["batches"] += 1
        if answered["batches"] >= threshold:
            enough.set()


async def resend_everything(ledger: Ledger, client: CrashClient, deadline: float) -> None:
    """Sends every batch the client sent before the crash again, each until
    it gets an answer."""
    loop = asyncio.get_running_loop()
    for batch in client.batches[: client.sent]:
        while True:
            remaining = deadline - loop.time()
            assert remaining > 0, "a resent batch got no answer in time"
            try:
                response = await ledger.CreateTransfers(
                    request(batch), timeout=remaining, wait_for_ready=True
                )
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
        client.answers_after_restart.extend(response.results)


async def test_a_crash_mid_load_and_a_full_resend_apply_every_transfer_exactly_once(
    ledger_process: ServiceProcess, ledger_db: asyncpg.Pool
) -> None:
    rng = random.Random(7)
    source = new_id()
    accounts = [new_id() for _ in range(CRASH_ACCOUNTS)]
    funding = [posted(source, a, CRASH_FUNDING) for a in accounts]
    clients = [crash_client(rng, accounts) for _ in range(CRASH_CLIENTS)]
    senders: list[asyncio.Task[None]] = []
    try:
        async with grpc.aio.insecure_channel(ledger_process.address) as channel:
            ledger = stub(channel)
            await open_accounts(ledger, [world(source)] + [wallet(a) for a in accounts])
            assert {r.code for r in await create_transfers(ledger, funding)} == {OK}
            answered: Counter[str] = Counter()
            enough = asyncio.Event()
            senders = [
                asyncio.create_task(send_until_crash(ledger, c, answered, enough)) for c in clients
            ]
            await asyncio.wait_for(enough.wait(), timeout=60)
            ledger_process.kill()
            await asyncio.wait_for(asyncio.gather(*senders), timeout=30)
        await asyncio.to_thread(ledger_process.start)

        # A fresh channel: the old one may be backing off its reconnects.
        async with grpc.aio.insecure_channel(ledger_process.address) as channel:
            ledger = stub(channel)
            deadline = asyncio.get_running_loop().time() + RESEND_SECONDS
            await asyncio.gather(*(resend_everything(ledger, c, deadline) for c in clients))

            sent = [t for c in clients for t in c.sent_transfers]
            unsent = [t for c in clients for t in c.unsent_transfers]
            found = await lookup_transfers(ledger, [t.id for t in sent + unsent])
            after = await balances(ledger, [source, *accounts])
            verdict = await ledger.VerifyLedger(pb.VerifyLedgerRequest())
    finally:
        for task in senders:
            task.cancel()
        if ledger_process.process is None or ledger_process.process.poll() is not None:
            await asyncio.to_thread(ledger_process.start)

    assert any(c.interrupted for c in clients), "the crash interrupted no client"
    assert any(c.unsent_transfers for c in clients), "the load was over before the crash"
    answers = Counter(r.code for c in clients for r in c.answers_after_restart)
    assert set(answers) <= {OK, EXISTS} and answers.total() == len(sent)
    assert Counter(t.id for t in found) == Counter(t.id for t in sent)
    entries = await ledger_db.fetchval(
        "SELECT count(*) FROM entries WHERE transfer_id = ANY($1::uuid[])",
        [uuid.UUID(t.id) for t in sent],
    )
    assert entries == 2 * len(sent)
    model = net_credits([*funding, *sent])
    actual = {a: b.credits_posted - b.debits_posted for a, b in after.items()}
    assert actual == {a: model[a] for a in [source, *accounts]}
    assert (verdict.ok, list(verdict.discrepancies)) == (True, [])
