"""The ledger's use cases against the real PostgreSQL: what they store, what
they refuse, and what the database itself refuses as the last line of
defence.

The database is shared by the whole run, so every test opens accounts of its
own (fresh uuid4 ids) and only ever leaves balanced data behind: money moves
through the engine, and direct SQL runs in a transaction that is rolled back.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
import pytest

from services.common.errors import InvalidArgument
from services.ledger import handlers
from services.ledger.domain import (
    MAX_BATCH,
    AccountCode,
    AccountSpec,
    AccountState,
    AccountType,
    Side,
    TransferCode,
    TransferOutcome,
    TransferSpec,
)
from tests.conftest import TestRun, service_pool


def new_id() -> str:
    return str(uuid.uuid4())


def wallet_spec(**fields: object) -> AccountSpec:
    """A user wallet that cannot go below zero."""
    fields.setdefault("currency", "USD")
    return AccountSpec(id=new_id(), type=AccountType.USER_WALLET, no_overdraft=True, **fields)  # type: ignore[arg-type]


def world_spec() -> AccountSpec:
    """The outside world: money enters the ledger from here, so it may go negative."""
    return AccountSpec(id=new_id(), currency="USD", type=AccountType.EXTERNAL)


def transfer(debit: str, credit: str, amount: int, **fields: object) -> TransferSpec:
    fields.setdefault("id", new_id())
    fields.setdefault("currency", "USD")
    return TransferSpec(
        debit_account_id=debit,
        credit_account_id=credit,
        amount=amount,
        **fields,  # type: ignore[arg-type]
    )


async def open_accounts(pool: asyncpg.Pool, *specs: AccountSpec) -> list[str]:
    results = await handlers.create_accounts(pool, specs)
    assert [code for _, code in results] == [AccountCode.OK] * len(specs)
    return [s.id for s in specs]


async def post(pool: asyncpg.Pool, *specs: TransferSpec) -> list[TransferCode]:
    return [o.code for o in await handlers.create_transfers(pool, specs)]


async def balance(pool: asyncpg.Pool, account_id: str) -> AccountState:
    (state,), _ = await handlers.get_balances(pool, [account_id], None)
    return state


@dataclass(frozen=True)
class Funded:
    world: str
    wallet: str


async def funded_wallet(pool: asyncpg.Pool, amount: int) -> Funded:
    world, wallet = await open_accounts(pool, world_spec(), wallet_spec())
    assert await post(pool, transfer(world, wallet, amount)) == [TransferCode.OK]
    return Funded(world, wallet)


async def rows_for(pool: asyncpg.Pool, account_ids: Sequence[str]) -> tuple[int, int]:
    """How many transfers and entries touch these accounts."""
    ids = [uuid.UUID(a) for a in account_ids]
    async with pool.acquire() as conn:
        transfers = await conn.fetchval(
            "SELECT count(*) FROM transfers"
            " WHERE debit_account_id = ANY($1::uuid[]) OR credit_account_id = ANY($1::uuid[])",
            ids,
        )
        entries = await conn.fetchval(
            "SELECT count(*) FROM entries WHERE account_id = ANY($1::uuid[])", ids
        )
    return transfers, entries


@asynccontextmanager
async def rolled_back(
    pool: asyncpg.Pool,
) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy[asyncpg.Record]]:
    """A connection in a transaction that is always rolled back."""
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            yield conn
        finally:
            await tx.rollback()


# ---------------------------------------------------------------- accounts


async def test_new_account_is_ok(ledger_pool: asyncpg.Pool) -> None:
    spec = wallet_spec()
    assert await handlers.create_accounts(ledger_pool, [spec]) == [(spec.id, AccountCode.OK)]


async def test_new_account_is_stored_with_its_fields(ledger_pool: asyncpg.Pool) -> None:
    spec = wallet_spec(overdraft_limit=500, metadata={"owner": "u-1"})
    await open_accounts(ledger_pool, spec)
    (row,) = await handlers.lookup_accounts(ledger_pool, [spec.id])
    assert (
        str(row["id"]),
        row["currency"],
        row["type"],
        row["normal_side"],
        row["no_overdraft"],
        row["overdraft_limit"],
        row["metadata"],
        row["status"],
    ) == (spec.id, "USD", AccountType.USER_WALLET, Side.CREDIT, True, 500, {"owner": "u-1"}, 1)


async def test_new_account_starts_with_zero_balances(ledger_pool: asyncpg.Pool) -> None:
    (account_id,) = await open_accounts(ledger_pool, wallet_spec())
    assert (await balance(ledger_pool, account_id)).balances() == (0, 0, 0, 0)


async def test_same_account_again_is_exists(ledger_pool: asyncpg.Pool) -> None:
    spec = wallet_spec()
    await open_accounts(ledger_pool, spec)
    assert await handlers.create_accounts(ledger_pool, [spec]) == [(spec.id, AccountCode.EXISTS)]


async def test_same_account_id_with_other_fields_is_exists_with_different_fields(
    ledger_pool: asyncpg.Pool,
) -> None:
    spec = wallet_spec()
    await open_accounts(ledger_pool, spec)
    other = AccountSpec(id=spec.id, currency="EUR", type=AccountType.USER_WALLET)
    assert await handlers.create_accounts(ledger_pool, [other]) == [
        (spec.id, AccountCode.EXISTS_WITH_DIFFERENT_FIELDS)
    ]


async def test_account_with_other_fields_leaves_the_stored_one_alone(
    ledger_pool: asyncpg.Pool,
) -> None:
    spec = wallet_spec()
    await open_accounts(ledger_pool, spec)
    await handlers.create_accounts(ledger_pool, [AccountSpec(id=spec.id, currency="EUR", type=1)])
    (row,) = await handlers.lookup_accounts(ledger_pool, [spec.id])
    assert row["currency"] == "USD"


async def test_same_new_account_twice_in_one_batch_is_ok_then_exists(
    ledger_pool: asyncpg.Pool,
) -> None:
    spec = wallet_spec()
    assert [code for _, code in await handlers.create_accounts(ledger_pool, [spec, spec])] == [
        AccountCode.OK,
        AccountCode.EXISTS,
    ]


@pytest.mark.parametrize("account_id", ["", "not-a-uuid", "1234"])
async def test_malformed_account_id_is_invalid_id(
    ledger_pool: asyncpg.Pool, account_id: str
) -> None:
    spec = AccountSpec(id=account_id, currency="USD", type=AccountType.USER_WALLET)
    assert await handlers.create_accounts(ledger_pool, [spec]) == [
        (account_id, AccountCode.INVALID_ID)
    ]


async def test_invalid_account_does_not_stop_the_valid_ones(ledger_pool: asyncpg.Pool) -> None:
    good = wallet_spec()
    bad = AccountSpec(id="nope", currency="USD", type=AccountType.USER_WALLET)
    await handlers.create_accounts(ledger_pool, [bad, good])
    assert [str(r["id"]) for r in await handlers.lookup_accounts(ledger_pool, [good.id])] == [
        good.id
    ]


# ---------------------------------------------------------------- transfers


async def test_posted_transfer_is_ok(ledger_pool: asyncpg.Pool) -> None:
    world, wallet = await open_accounts(ledger_pool, world_spec(), wallet_spec())
    assert await post(ledger_pool, transfer(world, wallet, 1_000)) == [TransferCode.OK]


async def test_posted_transfer_is_stored(ledger_pool: asyncpg.Pool) -> None:
    world, wallet = await open_accounts(ledger_pool, world_spec(), wallet_spec())
    spec = transfer(world, wallet, 1_000, code="TOPUP", metadata={"ref": "r-1"})
    await post(ledger_pool, spec)
    async with ledger_pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM transfers WHERE id = $1", uuid.UUID(spec.id))
    assert row is not None
    assert (
        str(row["debit_account_id"]),
        str(row["credit_account_id"]),
        row["amount"],
        row["currency"],
        row["code"],
        row["metadata"],
        row["status"],
    ) == (world, wallet, 1_000, "USD", "TOPUP", {"ref": "r-1"}, 1)


async def test_posted_transfer_stores_a_debit_and_a_credit_entry(
    ledger_pool: asyncpg.Pool,
) -> None:
    world, wallet = await open_accounts(ledger_pool, world_spec(), wallet_spec())
    spec = transfer(world, wallet, 1_000)
    await post(ledger_pool, spec)
    async with ledger_pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT account_id, side, amount, balance_after FROM entries"
            " WHERE transfer_id = $1 ORDER BY side",
            uuid.UUID(spec.id),
        )
    # The outside world is debit-normal: what it sent in is what the ledger
    # is owed by it, so a debit raises its balance too.
    assert [tuple(r.values()) for r in rows] == [
        (uuid.UUID(world), Side.DEBIT, 1_000, 1_000),
        (uuid.UUID(wallet), Side.CREDIT, 1_000, 1_000),
    ]


async def test_posted_transfer_updates_both_balances(ledger_pool: asyncpg.Pool) -> None:
    funded = await funded_wallet(ledger_pool, 1_000)
    (shop,) = await open_accounts(ledger_pool, wallet_spec())
    await post(ledger_pool, transfer(funded.wallet, shop, 300))
    assert [
        (await balance(ledger_pool, a)).posted for a in (funded.world, funded.wallet, shop)
    ] == [1_000, 700, 300]


async def test_transfer_entries_and_balances_are_written_in_one_transaction(
    ledger_pool: asyncpg.Pool,
) -> None:
    world, wallet = await open_accounts(ledger_pool, world_spec(), wallet_spec())
    spec = transfer(world, wallet, 1_000)
    await post(ledger_pool, spec)
    async with ledger_pool.acquire() as conn:
        writers = await conn.fetch(
            """
            SELECT xmin::text AS xid FROM transfers WHERE id = $1
            UNION ALL SELECT xmin::text FROM entries WHERE transfer_id = $1
            UNION ALL SELECT xmin::text FROM accounts WHERE id = ANY($2::uuid[])
            """,
            uuid.UUID(spec.id),
            [uuid.UUID(world), uuid.UUID(wallet)],
        )
    assert (len(writers), len({r["xid"] for r in writers})) == (5, 1)


async def test_refused_transfer_writes_nothing(ledger_pool: asyncpg.Pool) -> None:
    funded = await funded_wallet(ledger_pool, 100)
    (shop,) = await open_accounts(ledger_pool, wallet_spec())
    before = await rows_for(ledger_pool, [shop])
    assert await post(ledger_pool, transfer(funded.wallet, shop, 101)) == [
        TransferCode.INSUFFICIENT_FUNDS
    ]
    assert await rows_for(ledger_pool, [shop]) == before


async def test_failed_linked_chain_writes_nothing(ledger_pool: asyncpg.Pool) -> None:
    funded = await funded_wallet(ledger_pool, 100)
    (shop,) = await open_accounts(ledger_pool, wallet_spec())
    chain = [
        transfer(funded.wallet, shop, 60, linked=True),
        transfer(funded.wallet, shop, 60),
    ]
    await post(ledger_pool, *chain)
    assert (await rows_for(ledger_pool, [shop]), (await balance(ledger_pool, shop)).posted) == (
        (0, 0),
        0,
    )


async def test_retry_of_a_stored_transfer_is_exists_with_the_stored_transfer(
    ledger_pool: asyncpg.Pool,
) -> None:
    world, wallet = await open_accounts(ledger_pool, world_spec(), wallet_spec())
    spec = transfer(world, wallet, 1_000, metadata={"ref": "r-1"})
    (first,) = await handlers.create_transfers(ledger_pool, [spec])
    (retry,) = await handlers.create_transfers(ledger_pool, [spec])
    assert (retry.code, retry.transfer) == (TransferCode.EXISTS, first.transfer)


async def test_retry_of_a_stored_transfer_changes_nothing(ledger_pool: asyncpg.Pool) -> None:
    world, wallet = await open_accounts(ledger_pool, world_spec(), wallet_spec())
    spec = transfer(world, wallet, 1_000)
    await post(ledger_pool, spec)
    before = (await rows_for(ledger_pool, [wallet]), await balance(ledger_pool, wallet))
    await post(ledger_pool, spec)
    assert (await rows_for(ledger_pool, [wallet]), await balance(ledger_pool, wallet)) == before


async def test_retry_with_other_fields_is_exists_with_different_fields(
    ledger_pool: asyncpg.Pool,
) -> None:
    world, wallet = await open_accounts(ledger_pool, world_spec(), wallet_spec())
    spec = transfer(world, wallet, 1_000)
    await post(ledger_pool, spec)
    assert await post(ledger_pool, transfer(world, wallet, 999, id=spec.id)) == [
        TransferCode.EXISTS_WITH_DIFFERENT_FIELDS
    ]


async def test_empty_transfer_batch_is_empty(ledger_pool: asyncpg.Pool) -> None:
    assert await handlers.create_transfers(ledger_pool, []) == []


# ---------------------------------------------------------------- batch size


async def test_transfer_batch_of_max_batch_is_accepted(ledger_pool: asyncpg.Pool) -> None:
    world, wallet = await open_accounts(ledger_pool, world_spec(), wallet_spec())
    codes = await post(ledger_pool, *(transfer(world, wallet, 1) for _ in range(MAX_BATCH)))
    assert codes == [TransferCode.OK] * MAX_BATCH


async def test_transfer_batch_over_max_batch_is_batch_too_large(
    ledger_pool: asyncpg.Pool,
) -> None:
    world, wallet = await open_accounts(ledger_pool, world_spec(), wallet_spec())
    with pytest.raises(InvalidArgument) as caught:
        await handlers.create_transfers(
            ledger_pool, [transfer(world, wallet, 1) for _ in range(MAX_BATCH + 1)]
        )
    assert caught.value.reason == "BATCH_TOO_LARGE"


async def test_transfer_batch_over_max_batch_writes_nothing(ledger_pool: asyncpg.Pool) -> None:
    world, wallet = await open_accounts(ledger_pool, world_spec(), wallet_spec())
    with pytest.raises(InvalidArgument):
        await handlers.create_transfers(
            ledger_pool, [transfer(world, wallet, 1) for _ in range(MAX_BATCH + 1)]
        )
    assert (await rows_for(ledger_pool, [wallet]), (await balance(ledger_pool, wallet)).posted) == (
        (0, 0),
        0,
    )


async def test_account_batch_over_max_batch_writes_nothing(ledger_pool: asyncpg.Pool) -> None:
    specs = [wallet_spec() for _ in range(MAX_BATCH + 1)]
    with pytest.raises(InvalidArgument) as caught:
        await handlers.create_accounts(ledger_pool, specs)
    stored = await handlers.lookup_accounts(ledger_pool, [specs[0].id, specs[-1].id])
    assert (caught.value.reason, stored) == ("BATCH_TOO_LARGE", [])


# ---------------------------------------------------------------- verification


async def test_verify_ledger_finds_no_discrepancy(ledger_pool: asyncpg.Pool) -> None:
    await funded_wallet(ledger_pool, 1_000)
    discrepancies, _ = await handlers.verify_ledger(ledger_pool)
    assert discrepancies == []


async def test_verify_ledger_counts_accounts_transfers_and_entries(
    ledger_pool: asyncpg.Pool,
) -> None:
    _, before = await handlers.verify_ledger(ledger_pool)
    await funded_wallet(ledger_pool, 1_000)  # two accounts, one transfer
    _, after = await handlers.verify_ledger(ledger_pool)
    assert {k: after[k] - before[k] for k in before} == {
        "accounts": 2,
        "transfers": 1,
        "entries": 2,
    }


# ---------------------------------------------------------------- database refusals


async def test_database_refuses_to_update_an_entry(ledger_pool: asyncpg.Pool) -> None:
    funded = await funded_wallet(ledger_pool, 1_000)
    async with rolled_back(ledger_pool) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute(
                "UPDATE entries SET amount = amount + 1 WHERE account_id = $1",
                uuid.UUID(funded.wallet),
            )


async def test_database_refuses_to_delete_an_entry(ledger_pool: asyncpg.Pool) -> None:
    funded = await funded_wallet(ledger_pool, 1_000)
    async with rolled_back(ledger_pool) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute(
                "DELETE FROM entries WHERE account_id = $1", uuid.UUID(funded.wallet)
            )


async def test_database_refuses_to_truncate_entries(ledger_pool: asyncpg.Pool) -> None:
    async with rolled_back(ledger_pool) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute("TRUNCATE entries")


async def test_database_refuses_to_overdraw_a_no_overdraft_account(
    ledger_pool: asyncpg.Pool,
) -> None:
    funded = await funded_wallet(ledger_pool, 1_000)
    async with rolled_back(ledger_pool) as conn:
        with pytest.raises(asyncpg.CheckViolationError) as caught:
            await conn.execute(
                "UPDATE accounts SET debits_posted = credits_posted + 1 WHERE id = $1",
                uuid.UUID(funded.wallet),
            )
    assert caught.value.constraint_name == "accounts_no_overdraft"


async def test_database_refuses_a_transfer_of_zero(ledger_pool: asyncpg.Pool) -> None:
    world, wallet = await open_accounts(ledger_pool, world_spec(), wallet_spec())
    async with rolled_back(ledger_pool) as conn:
        with pytest.raises(asyncpg.CheckViolationError, match="amount"):
            await conn.execute(
                "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount,"
                " currency, type, status) VALUES ($1, $2, $3, 0, 'USD', 1, 1)",
                uuid.uuid4(),
                uuid.UUID(world),
                uuid.UUID(wallet),
            )


async def test_database_refuses_a_transfer_to_the_same_account(
    ledger_pool: asyncpg.Pool,
) -> None:
    (world,) = await open_accounts(ledger_pool, world_spec())
    async with rolled_back(ledger_pool) as conn:
        with pytest.raises(asyncpg.CheckViolationError) as caught:
            await conn.execute(
                "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount,"
                " currency, type, status) VALUES ($1, $2, $2, 1, 'USD', 1, 1)",
                uuid.uuid4(),
                uuid.UUID(world),
            )
    assert caught.value.constraint_name == "transfers_distinct_accounts"


# ---------------------------------------------------------------- concurrency

RACERS = 20
AFFORDABLE = 5
PRICE = 100


@dataclass(frozen=True)
class Race:
    wallet: str
    outcomes: list[TransferOutcome]


@pytest.fixture(scope="module")
async def race(ledger_pool: asyncpg.Pool) -> Race:
    """RACERS concurrent calls, each spending PRICE from one no_overdraft
    wallet that holds enough for only AFFORDABLE of them."""
    funded = await funded_wallet(ledger_pool, AFFORDABLE * PRICE)
    (shop,) = await open_accounts(ledger_pool, world_spec())
    results = await asyncio.gather(
        *(
            handlers.create_transfers(ledger_pool, [transfer(funded.wallet, shop, PRICE)])
            for _ in range(RACERS)
        )
    )
    return Race(funded.wallet, [outcome for (outcome,) in results])


async def test_concurrent_spends_succeed_exactly_as_often_as_funds_allow(race: Race) -> None:
    assert sum(o.code == TransferCode.OK for o in race.outcomes) == AFFORDABLE


async def test_concurrent_spends_beyond_the_funds_are_insufficient_funds(race: Race) -> None:
    refused = [o.code for o in race.outcomes if o.code != TransferCode.OK]
    assert refused == [TransferCode.INSUFFICIENT_FUNDS] * (RACERS - AFFORDABLE)


async def test_concurrent_spends_never_take_the_balance_below_zero(
    ledger_pool: asyncpg.Pool, race: Race
) -> None:
    async with ledger_pool.acquire() as conn:
        history = await conn.fetch(
            "SELECT balance_after FROM entries WHERE account_id = $1", uuid.UUID(race.wallet)
        )
    assert (
        min(r["balance_after"] for r in history),
        (await balance(ledger_pool, race.wallet)).posted,
    ) == (0, 0)


async def test_concurrent_spends_leave_the_ledger_verified(
    ledger_pool: asyncpg.Pool, race: Race
) -> None:
    discrepancies, _ = await handlers.verify_ledger(ledger_pool)
    assert discrepancies == []


async def test_concurrent_retries_of_one_new_transfer_move_money_once(
    ledger_pool: asyncpg.Pool,
) -> None:
    world, wallet = await open_accounts(ledger_pool, world_spec(), wallet_spec())
    spec = transfer(world, wallet, 100)
    results = await asyncio.gather(
        *(handlers.create_transfers(ledger_pool, [spec]) for _ in range(5))
    )
    assert (
        sorted(outcome.code.value for (outcome,) in results),
        (await balance(ledger_pool, wallet)).posted,
    ) == (["EXISTS"] * 4 + ["OK"], 100)


async def test_concurrent_same_id_on_other_accounts_is_exists_with_different_fields(
    ledger_pool: asyncpg.Pool,
) -> None:
    # Disjoint accounts take no common lock: the loser's insert collides and
    # its batch is applied again.
    world, first = await open_accounts(ledger_pool, world_spec(), wallet_spec())
    other_world, third = await open_accounts(ledger_pool, world_spec(), wallet_spec())
    transfer_id = new_id()
    results = await asyncio.gather(
        handlers.create_transfers(ledger_pool, [transfer(world, first, 100, id=transfer_id)]),
        handlers.create_transfers(ledger_pool, [transfer(other_world, third, 100, id=transfer_id)]),
    )
    assert sorted(outcome.code.value for (outcome,) in results) == [
        "EXISTS_WITH_DIFFERENT_FIELDS",
        "OK",
    ]


async def test_concurrent_batches_locking_accounts_in_any_order_all_complete(
    ledger_pool: asyncpg.Pool,
) -> None:
    ids = await open_accounts(ledger_pool, *(world_spec() for _ in range(4)))
    batches = [
        [transfer(ids[i % 4], ids[(i + 1) % 4], 1), transfer(ids[(i + 3) % 4], ids[(i + 2) % 4], 1)]
        for i in range(RACERS)
    ]
    results = await asyncio.gather(*(handlers.create_transfers(ledger_pool, b) for b in batches))
    assert {o.code for outcomes in results for o in outcomes} == {TransferCode.OK}


async def test_the_verifier_finds_a_balance_changed_behind_the_ledgers_back(
    test_run: TestRun,
) -> None:
    # A database of its own: the tampering must not reach other tests.
    pool = await service_pool(test_run, "ledger", database="ledger_tamper")
    try:
        payer, payee = str(uuid.uuid4()), str(uuid.uuid4())
        await handlers.create_accounts(
            pool,
            [
                AccountSpec(id=payer, currency="USD", type=AccountType.EXTERNAL),
                AccountSpec(id=payee, currency="USD", type=AccountType.USER_WALLET),
            ],
        )
        await handlers.create_transfers(
            pool, [TransferSpec(str(uuid.uuid4()), payer, payee, 500, "USD")]
        )
        async with pool.acquire() as conn:
            await conn.execute(
                "UPDATE accounts SET credits_posted = credits_posted + 1 WHERE id = $1",
                uuid.UUID(payee),
            )

        discrepancies, _ = await handlers.verify_ledger(pool)

        kinds = {(d["kind"], d.get("account_id")) for d in discrepancies}
        assert kinds == {("CURRENCY_UNBALANCED", None), ("BALANCE_MISMATCH", payee)}
    finally:
        await pool.close()


async def test_entries_and_transfers_filter_by_code_amount_range_and_side(
    ledger_pool: asyncpg.Pool,
) -> None:
    world, wallet = await open_accounts(ledger_pool, world_spec(), wallet_spec())
    await post(
        ledger_pool,
        transfer(world, wallet, 100, code="DEPOSIT"),
        transfer(world, wallet, 900, code="DEPOSIT"),
        transfer(wallet, world, 50, code="FEE"),
    )

    deposits, _ = await handlers.list_entries(
        ledger_pool, handlers.EntryQuery(account_id=wallet, code="DEPOSIT", min_amount=500)
    )
    debits, _ = await handlers.list_entries(
        ledger_pool, handlers.EntryQuery(account_id=wallet, side=1)
    )
    fees, _ = await handlers.list_transfers(
        ledger_pool, handlers.TransferQuery(account_id=wallet, code="FEE", max_amount=60)
    )

    assert [(e["code"], e["amount"]) for e in deposits] == [("DEPOSIT", 900)]
    assert [(e["code"], e["amount"]) for e in debits] == [("FEE", 50)]
    assert [(t.code, t.amount) for t in fees] == [("FEE", 50)]
