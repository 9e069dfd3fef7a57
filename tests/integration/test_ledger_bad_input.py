"""What the ledger refuses, over gRPC against a real ledger process, and that
a refusal writes nothing; then cursor pagination and balances as of a past
moment.

Every refusal is asserted with its exact code (and reason), so none of them
may be INTERNAL or UNKNOWN. "Nothing written" is checked in the ledger's own
database: the transfers and entries that touch the test's accounts, and the
accounts' balances and status, are the same before and after.

The ledger process's database is shared by the whole run: every test opens
accounts of its own (fresh uuid4 ids).
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import asyncpg
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from moneta.ledger.v1 import ledger_pb2 as pb
from moneta.ledger.v1 import ledger_pb2_grpc
from services.common.db import create_pool
from services.common.errors import from_rpc_error
from tests.processes import ServiceProcess

if TYPE_CHECKING:
    from moneta.ledger.v1.ledger_pb2_grpc import LedgerServiceAsyncStub as Ledger
    from tests.conftest import TestRun

MAX_BATCH = 8_000
R = pb.TransferResult
FUNDS = 1_000_000


def new_id() -> str:
    return str(uuid.uuid4())


def at(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def timestamp(moment: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(moment)
    return ts


def page_token(*items: object) -> str:
    """A page token of the ledger's shape (base64 of a JSON list), holding
    whatever we like."""
    raw = json.dumps(list(items)).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@dataclass(frozen=True)
class Accounts:
    world: str  # the outside world: may go negative
    payer: str  # a USD wallet holding FUNDS
    payee: str  # an empty USD wallet
    euro: str  # an empty EUR wallet
    unknown: str  # never created

    @property
    def all(self) -> list[str]:
        return [self.world, self.payer, self.payee, self.euro, self.unknown]


def transfer(accounts: Accounts, **fields: Any) -> pb.Transfer:
    """A good POSTED transfer of 100 from payer to payee, but for ``fields``."""
    good: dict[str, Any] = {
        "id": new_id(),
        "debit_account_id": accounts.payer,
        "credit_account_id": accounts.payee,
        "amount": 100,
        "currency": "USD",
        "type": pb.TRANSFER_TYPE_POSTED,
    }
    return pb.Transfer(**{**good, **fields})


def wallet(account_id: str, currency: str = "USD") -> pb.Account:
    return pb.Account(
        id=account_id, currency=currency, type=pb.ACCOUNT_TYPE_USER_WALLET, no_overdraft=True
    )


async def create(ledger: Ledger, *transfers: pb.Transfer) -> list[int]:
    response = await ledger.CreateTransfers(pb.CreateTransfersRequest(transfers=transfers))
    return [r.code for r in response.results]


async def refusal(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    """The status code and ErrorInfo reason a call is refused with."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), from_rpc_error(caught.value).reason


async def balance(ledger: Ledger, account_id: str, as_of: datetime | None = None) -> pb.Balance:
    response: pb.GetBalancesResponse = await ledger.GetBalances(
        pb.GetBalancesRequest(
            account_ids=[account_id], as_of=timestamp(as_of) if as_of is not None else None
        )
    )
    assert len(response.balances) == 1
    return response.balances[0]


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
    """The ledger process's own database, to see what a call wrote."""
    settings = test_run.settings.model_copy(
        update={"db_prefix": ledger_process.env["MONETA_DB_PREFIX"]}
    )
    pool = await create_pool(settings.database_url("ledger"), min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
async def accounts(ledger: Ledger) -> Accounts:
    opened = Accounts(
        world=new_id(), payer=new_id(), payee=new_id(), euro=new_id(), unknown=new_id()
    )
    response = await ledger.CreateAccounts(
        pb.CreateAccountsRequest(
            accounts=[
                pb.Account(id=opened.world, currency="USD", type=pb.ACCOUNT_TYPE_EXTERNAL),
                wallet(opened.payer),
                wallet(opened.payee),
                wallet(opened.euro, "EUR"),
            ]
        )
    )
    assert {r.code for r in response.results} == {pb.AccountResult.OK}
    funding = transfer(
        opened, debit_account_id=opened.world, credit_account_id=opened.payer, amount=FUNDS
    )
    assert await create(ledger, funding) == [R.OK]
    return opened


@dataclass(frozen=True)
class Footprint:
    transfers: int
    entries: int
    # (id, status, debits posted, credits posted, debits pending, credits pending)
    accounts: tuple[tuple[object, ...], ...]


async def footprint(db: asyncpg.Pool, account_ids: Sequence[str]) -> Footprint:
    """What the database holds for these accounts."""
    ids = [uuid.UUID(a) for a in account_ids]
    async with db.acquire() as conn:
        transfers = await conn.fetchval(
            "SELECT count(*) FROM transfers WHERE debit_account_id = ANY($1::uuid[])"
            " OR credit_account_id = ANY($1::uuid[])",
            ids,
        )
        entries = await conn.fetchval(
            "SELECT count(*) FROM entries WHERE account_id = ANY($1::uuid[])", ids
        )
        rows = await conn.fetch(
            "SELECT id, status, debits_posted, credits_posted, debits_pending, credits_pending"
            " FROM accounts WHERE id = ANY($1::uuid[]) ORDER BY id",
            ids,
        )
    return Footprint(transfers, entries, tuple(tuple(r) for r in rows))


@asynccontextmanager
async def writes_nothing(db: asyncpg.Pool, account_ids: Sequence[str]) -> AsyncIterator[None]:
    before = await footprint(db, account_ids)
    yield
    assert await footprint(db, account_ids) == before


# ---------------------------------------------------------------- per-item codes

BadTransfer = Callable[[Accounts], pb.Transfer]

BAD_TRANSFERS = [
    pytest.param(lambda a: transfer(a, id=""), R.INVALID_ID, id="empty-id"),
    pytest.param(lambda a: transfer(a, id="not-a-uuid"), R.INVALID_ID, id="non-uuid-id"),
    pytest.param(lambda a: transfer(a, id=str(uuid.UUID(int=0))), R.INVALID_ID, id="nil-uuid-id"),
    pytest.param(lambda a: transfer(a, amount=0), R.INVALID_AMOUNT, id="zero-amount"),
    pytest.param(lambda a: transfer(a, amount=-100), R.INVALID_AMOUNT, id="negative-amount"),
    pytest.param(lambda a: transfer(a, currency="XXX"), R.INVALID_CURRENCY, id="unknown-currency"),
    pytest.param(lambda a: transfer(a, currency=""), R.INVALID_CURRENCY, id="empty-currency"),
    pytest.param(
        lambda a: transfer(a, currency="EUR"), R.CURRENCY_MISMATCH, id="currency-not-the-accounts"
    ),
    pytest.param(
        lambda a: transfer(a, credit_account_id=a.euro),
        R.CURRENCY_MISMATCH,
        id="accounts-of-two-currencies",
    ),
    pytest.param(
        lambda a: transfer(a, credit_account_id=a.payer), R.SAME_ACCOUNT, id="same-debit-and-credit"
    ),
    pytest.param(
        lambda a: transfer(a, credit_account_id=a.unknown),
        R.ACCOUNT_NOT_FOUND,
        id="unknown-credit-account",
    ),
    pytest.param(
        lambda a: transfer(a, debit_account_id=a.unknown),
        R.ACCOUNT_NOT_FOUND,
        id="unknown-debit-account",
    ),
    pytest.param(
        lambda a: transfer(a, timeout_seconds=60), R.INVALID_TIMEOUT, id="timeout-on-posted"
    ),
    pytest.param(lambda a: transfer(a, type=42), R.INVALID_TYPE, id="unknown-type"),
    pytest.param(
        lambda a: transfer(
            a,
            type=pb.TRANSFER_TYPE_POST_PENDING,
            pending_id=new_id(),
            debit_account_id="",
            credit_account_id="",
            amount=0,
            currency="",
        ),
        R.PENDING_NOT_FOUND,
        id="post-of-unknown-hold",
    ),
    pytest.param(
        lambda a: transfer(
            a,
            type=pb.TRANSFER_TYPE_REVERSAL,
            reverses_id=new_id(),
            debit_account_id=a.payee,
            credit_account_id=a.payer,
        ),
        R.TRANSFER_NOT_FOUND,
        id="reversal-of-unknown-transfer",
    ),
]


@pytest.mark.parametrize(("bad", "code"), BAD_TRANSFERS)
async def test_a_bad_transfer_is_refused_with_its_code_and_writes_nothing(
    ledger: Ledger, ledger_db: asyncpg.Pool, accounts: Accounts, bad: BadTransfer, code: int
) -> None:
    item = bad(accounts)
    async with writes_nothing(ledger_db, accounts.all):
        response = await ledger.CreateTransfers(pb.CreateTransfersRequest(transfers=[item]))
    (result,) = response.results
    assert (result.id, result.code, result.HasField("transfer")) == (item.id, code, False)


@pytest.mark.parametrize(("bad", "code"), BAD_TRANSFERS)
async def test_a_bad_transfer_fails_alone_among_good_ones(
    ledger: Ledger, ledger_db: asyncpg.Pool, accounts: Accounts, bad: BadTransfer, code: int
) -> None:
    first, item, last = transfer(accounts), bad(accounts), transfer(accounts)
    before = await footprint(ledger_db, accounts.all)

    assert await create(ledger, first, item, last) == [R.OK, code, R.OK]

    after = await footprint(ledger_db, accounts.all)
    assert (after.transfers, after.entries) == (before.transfers + 2, before.entries + 4)
    payer, payee = await balance(ledger, accounts.payer), await balance(ledger, accounts.payee)
    assert (payer.posted, payee.posted) == (FUNDS - 200, 200)
    found = await ledger.LookupTransfers(
        pb.LookupTransfersRequest(ids=[first.id, item.id, last.id])
    )
    assert [t.id for t in found.transfers] == [first.id, last.id]


# ---------------------------------------------------------------- request-level refusals


async def test_a_batch_of_8001_transfers_is_refused_whole_as_too_large(
    ledger: Ledger, ledger_db: asyncpg.Pool, accounts: Accounts
) -> None:
    transfers = [transfer(accounts, amount=1) for _ in range(MAX_BATCH + 1)]
    async with writes_nothing(ledger_db, accounts.all):
        refused = await refusal(
            ledger.CreateTransfers(pb.CreateTransfersRequest(transfers=transfers))
        )
    assert refused == (grpc.StatusCode.INVALID_ARGUMENT, "BATCH_TOO_LARGE")


async def test_a_batch_of_8001_accounts_is_refused_whole_as_too_large(
    ledger: Ledger, ledger_db: asyncpg.Pool
) -> None:
    wanted = [wallet(new_id()) for _ in range(MAX_BATCH + 1)]

    refused = await refusal(ledger.CreateAccounts(pb.CreateAccountsRequest(accounts=wanted)))

    assert refused == (grpc.StatusCode.INVALID_ARGUMENT, "BATCH_TOO_LARGE")
    created = await ledger_db.fetchval(
        "SELECT count(*) FROM accounts WHERE id = ANY($1::uuid[])",
        [uuid.UUID(a.id) for a in wanted],
    )
    assert created == 0


async def test_get_balances_refuses_an_account_id_that_is_not_a_uuid(
    ledger: Ledger, ledger_db: asyncpg.Pool, accounts: Accounts
) -> None:
    async with writes_nothing(ledger_db, accounts.all):
        refused = await refusal(
            ledger.GetBalances(pb.GetBalancesRequest(account_ids=[accounts.payer, "not-a-uuid"]))
        )
    assert refused == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ID")


GARBAGE_TOKENS = [
    pytest.param("garbage", id="not-base64-json"),
    pytest.param("!!!", id="no-base64-characters"),
    pytest.param(page_token(1, 2), id="numbers"),
    pytest.param(page_token("2026-01-01T00:00:00+00:00"), id="one-item"),
    pytest.param(page_token("yesterday", "x"), id="not-a-time"),
    pytest.param(base64.urlsafe_b64encode(b"null").decode(), id="null"),
]


@pytest.mark.parametrize(
    "token",
    [
        *GARBAGE_TOKENS,
        pytest.param(page_token("2026-01-01T00:00:00+00:00", "x"), id="key-not-a-uuid"),
        pytest.param(
            page_token("9999-12-31T23:59:59-14:00", str(uuid.uuid4())),
            id="time-past-year-9999-in-utc",
        ),
        pytest.param(
            page_token("0001-01-01T00:00:00+14:00", str(uuid.uuid4())),
            id="time-before-year-1-in-utc",
        ),
    ],
)
async def test_list_transfers_refuses_a_garbage_page_token(
    ledger: Ledger, ledger_db: asyncpg.Pool, accounts: Accounts, token: str
) -> None:
    async with writes_nothing(ledger_db, accounts.all):
        refused = await refusal(
            ledger.ListTransfers(
                pb.ListTransfersRequest(account_id=accounts.payer, page_token=token)
            )
        )
    assert refused == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


@pytest.mark.parametrize(
    "token",
    [
        *GARBAGE_TOKENS,
        pytest.param(page_token("2026-01-01T00:00:00+00:00", str(uuid.uuid4())), id="uuid-key"),
        pytest.param(
            page_token("2026-01-01T00:00:00+00:00", str(2**63)),
            id="key-beyond-bigint",
        ),
    ],
)
async def test_list_entries_refuses_a_garbage_page_token(
    ledger: Ledger, ledger_db: asyncpg.Pool, accounts: Accounts, token: str
) -> None:
    async with writes_nothing(ledger_db, accounts.all):
        refused = await refusal(
            ledger.ListEntries(pb.ListEntriesRequest(account_id=accounts.payer, page_token=token))
        )
    assert refused == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


async def test_list_transfers_refuses_a_negative_page_size(
    ledger: Ledger, ledger_db: asyncpg.Pool, accounts: Accounts
) -> None:
    async with writes_nothing(ledger_db, accounts.all):
        refused = await refusal(
            ledger.ListTransfers(pb.ListTransfersRequest(account_id=accounts.payer, page_size=-1))
        )
    assert refused == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_SIZE")


async def test_list_entries_refuses_a_negative_page_size(
    ledger: Ledger, ledger_db: asyncpg.Pool, accounts: Accounts
) -> None:
    async with writes_nothing(ledger_db, accounts.all):
        refused = await refusal(
            ledger.ListEntries(pb.ListEntriesRequest(account_id=accounts.payer, page_size=-1))
        )
    assert refused == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_SIZE")


async def test_closing_an_account_with_money_is_refused_as_not_empty(
    ledger: Ledger, ledger_db: asyncpg.Pool, accounts: Accounts
) -> None:
    async with writes_nothing(ledger_db, accounts.all):
        refused = await refusal(ledger.CloseAccount(pb.CloseAccountRequest(id=accounts.payer)))
    assert refused == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_NOT_EMPTY")


async def test_closing_an_account_with_an_open_hold_is_refused_as_having_pending(
    ledger: Ledger, ledger_db: asyncpg.Pool, accounts: Accounts
) -> None:
    """The payee has no posted money, only a hold coming in."""
    hold = transfer(accounts, type=pb.TRANSFER_TYPE_PENDING)
    assert await create(ledger, hold) == [R.OK]
    async with writes_nothing(ledger_db, accounts.all):
        refused = await refusal(ledger.CloseAccount(pb.CloseAccountRequest(id=accounts.payee)))
    assert refused == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_HAS_PENDING")


async def test_closing_an_unknown_account_is_not_found(
    ledger: Ledger, ledger_db: asyncpg.Pool, accounts: Accounts
) -> None:
    async with writes_nothing(ledger_db, accounts.all):
        refused = await refusal(ledger.CloseAccount(pb.CloseAccountRequest(id=accounts.unknown)))
    assert refused == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


# google.protobuf.Timestamp is valid from 0001-01-01 to 9999-12-31 UTC, with
# nanos in [0, 1e9): anything else is the caller's mistake.
YEAR_10000 = Timestamp(seconds=253_402_300_800)
NEGATIVE_NANOS = Timestamp(seconds=1_700_000_000, nanos=-1)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(
            lambda ledger, a: ledger.GetBalances(
                pb.GetBalancesRequest(account_ids=[a.payer], as_of=YEAR_10000)
            ),
            id="balances-as-of-year-10000",
        ),
        pytest.param(
            lambda ledger, a: ledger.GetBalances(
                pb.GetBalancesRequest(account_ids=[a.payer], as_of=NEGATIVE_NANOS)
            ),
            id="balances-as-of-negative-nanos",
        ),
        pytest.param(
            lambda ledger, a: ledger.ListTransfers(
                pb.ListTransfersRequest(account_id=a.payer, start_time=YEAR_10000)
            ),
            id="transfers-from-year-10000",
        ),
        pytest.param(
            lambda ledger, a: ledger.ListEntries(
                pb.ListEntriesRequest(account_id=a.payer, end_time=YEAR_10000)
            ),
            id="entries-until-year-10000",
        ),
    ],
)
async def test_an_invalid_timestamp_is_refused_as_invalid_argument(
    ledger: Ledger,
    ledger_db: asyncpg.Pool,
    accounts: Accounts,
    call: Callable[[Ledger, Accounts], Awaitable[object]],
) -> None:
    async with writes_nothing(ledger_db, accounts.all):
        code, _ = await refusal(call(ledger, accounts))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_transfer_with_an_invalid_effective_at_is_refused_as_invalid_argument(
    ledger: Ledger, ledger_db: asyncpg.Pool, accounts: Accounts
) -> None:
    item = transfer(accounts, effective_at=YEAR_10000)
    async with writes_nothing(ledger_db, accounts.all):
        code, _ = await refusal(ledger.CreateTransfers(pb.CreateTransfersRequest(transfers=[item])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------- pagination

PAGE_SIZE = 10


async def pay_one_by_one(ledger: Ledger, accounts: Accounts, count: int) -> list[str]:
    """``count`` transfers into the payee, each in its own call (so each in
    its own commit), oldest first."""
    ids = []
    for amount in range(1, count + 1):
        item = transfer(accounts, amount=amount)
        assert await create(ledger, item) == [R.OK]
        ids.append(item.id)
    return ids


async def transfers_page(ledger: Ledger, account_id: str, token: str = "") -> tuple[list[str], str]:
    response = await ledger.ListTransfers(
        pb.ListTransfersRequest(account_id=account_id, page_size=PAGE_SIZE, page_token=token)
    )
    return [t.id for t in response.transfers], response.next_page_token


async def entries_page(ledger: Ledger, account_id: str, token: str = "") -> tuple[list[str], str]:
    """The page's entries, by the transfer each belongs to."""
    response = await ledger.ListEntries(
        pb.ListEntriesRequest(account_id=account_id, page_size=PAGE_SIZE, page_token=token)
    )
    return [e.transfer_id for e in response.entries], response.next_page_token


Pager: TypeAlias = "Callable[[Ledger, str, str], Awaitable[tuple[list[str], str]]]"
PAGERS = [
    pytest.param(transfers_page, id="transfers"),
    pytest.param(entries_page, id="entries"),
]


async def read_to_the_end(
    ledger: Ledger, pager: Pager, account_id: str, token: str
) -> list[list[str]]:
    pages = []
    while token:
        page, token = await pager(ledger, account_id, token)
        pages.append(page)
        assert len(pages) <= 10, "the pages never end"
    return pages


@pytest.mark.parametrize("pager", PAGERS)
async def test_pages_come_newest_first_without_gaps_or_duplicates(
    ledger: Ledger, accounts: Accounts, pager: Pager
) -> None:
    paid = await pay_one_by_one(ledger, accounts, 25)

    first, token = await pager(ledger, accounts.payee, "")
    pages = [first, *await read_to_the_end(ledger, pager, accounts.payee, token)]

    assert [len(p) for p in pages] == [10, 10, 5]
    assert [tid for page in pages for tid in page] == paid[::-1]


@pytest.mark.parametrize("pager", PAGERS)
async def test_pages_after_the_first_ignore_what_arrives_meanwhile(
    ledger: Ledger, accounts: Accounts, pager: Pager
) -> None:
    paid = await pay_one_by_one(ledger, accounts, 25)

    first, token = await pager(ledger, accounts.payee, "")
    await pay_one_by_one(ledger, accounts, 5)
    rest = await read_to_the_end(ledger, pager, accounts.payee, token)

    assert [len(first), *(len(p) for p in rest)] == [10, 10, 5]
    assert first + [tid for page in rest for tid in page] == paid[::-1]


@pytest.mark.parametrize("pager", PAGERS)
async def test_pages_split_transfers_committed_together_without_gaps_or_duplicates(
    ledger: Ledger, accounts: Accounts, pager: Pager
) -> None:
    """One call of 25 transfers: one commit, one timestamp for all of them."""
    paid = [transfer(accounts, amount=amount) for amount in range(1, 26)]
    assert await create(ledger, *paid) == [R.OK] * 25

    first, token = await pager(ledger, accounts.payee, "")
    pages = [first, *await read_to_the_end(ledger, pager, accounts.payee, token)]

    assert [len(p) for p in pages] == [10, 10, 5]
    listed = [tid for page in pages for tid in page]
    assert sorted(listed) == sorted(t.id for t in paid)


# ---------------------------------------------------------------- balances as of

TICK = timedelta(microseconds=1)


async def test_the_balance_as_of_a_moment_between_two_transfers_is_the_balance_after_the_first(
    ledger: Ledger, accounts: Accounts
) -> None:
    (first,) = (
        await ledger.CreateTransfers(pb.CreateTransfersRequest(transfers=[transfer(accounts)]))
    ).results
    after_first = await balance(ledger, accounts.payee)
    assert await create(ledger, transfer(accounts, amount=50)) == [R.OK]

    then = await balance(ledger, accounts.payee, as_of=at(first.transfer.created_at) + TICK)

    fields = ("debits_posted", "credits_posted", "posted", "pending", "available")
    assert [getattr(then, f) for f in fields] == [getattr(after_first, f) for f in fields]
    assert then.posted == 100


async def test_the_balance_as_of_a_moment_before_the_first_transfer_is_zero(
    ledger: Ledger, accounts: Accounts
) -> None:
    (first,) = (
        await ledger.CreateTransfers(pb.CreateTransfersRequest(transfers=[transfer(accounts)]))
    ).results

    then = await balance(ledger, accounts.payee, as_of=at(first.transfer.created_at) - TICK)

    assert (then.credits_posted, then.posted, then.available) == (0, 0, 0)


async def test_a_hold_open_at_a_moment_counts_as_pending_as_of_then_though_voided_later(
    ledger: Ledger, accounts: Accounts
) -> None:
    hold = transfer(accounts, amount=300, type=pb.TRANSFER_TYPE_PENDING)
    (held,) = (await ledger.CreateTransfers(pb.CreateTransfersRequest(transfers=[hold]))).results
    void = pb.Transfer(id=new_id(), type=pb.TRANSFER_TYPE_VOID_PENDING, pending_id=hold.id)
    assert await create(ledger, void) == [R.OK]

    then = await balance(ledger, accounts.payer, as_of=at(held.transfer.created_at) + TICK)
    now = await balance(ledger, accounts.payer)

    assert (then.debits_pending, then.pending, then.available) == (300, -300, FUNDS - 300)
    assert (now.debits_pending, now.pending, now.available) == (0, 0, FUNDS)


def test_the_verifier_runs_as_a_command_and_reports_a_sound_ledger(
    ledger_process: ServiceProcess,
) -> None:
    import json
    import subprocess
    import sys

    from tests.processes import ROOT

    completed = subprocess.run(
        [sys.executable, "-m", "services.ledger", "verify"],
        cwd=ROOT,
        env=ledger_process.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    report = json.loads(completed.stdout)
    assert (completed.returncode, report["ok"], report["discrepancies"]) == (0, True, [])
    assert report["checked"]["transfers"] > 0
