"""The ledger's use cases: load, decide in the domain, store, in one
transaction."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import structlog

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.ids import parse_uuid
from services.common.paging import decode_cursor, encode_cursor, page_size
from services.ledger import store
from services.ledger.domain import (
    MAX_BATCH,
    AccountCode,
    AccountSpec,
    AccountState,
    BatchResult,
    LedgerBatch,
    NewAccount,
    Side,
    Transfer,
    TransferOutcome,
    TransferSpec,
    account_ids,
    referenced_ids,
    transfer_ids,
    validate_account,
)

log = structlog.get_logger("moneta.ledger")

# Two batches that create the same new transfer id with different accounts
# are not serialised by account locks; the loser's insert fails and the batch
# is applied again (and then sees the winner's transfer).
_MAX_ATTEMPTS = 3


def check_batch_size(n: int) -> None:
    if n > MAX_BATCH:
        raise InvalidArgument(
            f"a batch holds at most {MAX_BATCH} items; this one has {n}",
            reason="BATCH_TOO_LARGE",
            details={"max": MAX_BATCH, "size": n},
        )


async def create_accounts(
    pool: asyncpg.Pool, specs: Sequence[AccountSpec]
) -> list[tuple[str, AccountCode]]:
    check_batch_size(len(specs))
    validated = [validate_account(s) for s in specs]
    # In id order, as transfers lock them: concurrent batches never deadlock.
    wanted = sorted((v for v in validated if isinstance(v, NewAccount)), key=lambda a: a.id)
    async with pool.acquire() as conn, conn.transaction():
        inserted = await store.insert_accounts(conn, wanted)
        rows = await store.fetch_accounts(conn, [a.id for a in wanted])
    stored = {row["id"]: row for row in rows}
    results: list[tuple[str, AccountCode]] = []
    seen: set[uuid.UUID] = set()
    for spec, outcome in zip(specs, validated, strict=True):
        if isinstance(outcome, AccountCode):
            results.append((spec.id, outcome))
            continue
        row = stored[outcome.id]
        as_stored = NewAccount(
            id=row["id"],
            currency=row["currency"],
            type=row["type"],
            normal_side=Side(row["normal_side"]),
            no_overdraft=row["no_overdraft"],
            overdraft_limit=row["overdraft_limit"],
            metadata=row["metadata"],
        )
        if not outcome.same_fields(as_stored):
            results.append((spec.id, AccountCode.EXISTS_WITH_DIFFERENT_FIELDS))
        elif outcome.id in inserted and outcome.id not in seen:
            results.append((spec.id, AccountCode.OK))
        else:
            results.append((spec.id, AccountCode.EXISTS))
        seen.add(outcome.id)
    return results


@dataclass(frozen=True)
class ExpireHolds:
    """A batch item that expires the given holds (the sweeper's)."""

    ids: Sequence[uuid.UUID]


BatchItem = Sequence[TransferSpec] | ExpireHolds

# Races that another attempt resolves: two batches creating the same new
# transfer id on different accounts (not serialised by account locks), and
# lock clashes between ledger replicas.
_RETRYABLE = (
    asyncpg.UniqueViolationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)


@dataclass(frozen=True)
class Overlay:
    """What a batch whose write is under way leaves behind: every account
    and transfer it read or wrote, as it will have left them once committed.
    The batch after it starts from these instead of reading them."""

    accounts: Mapping[uuid.UUID, AccountState]
    transfers: Mapping[uuid.UUID, Transfer]


NO_OVERLAY = Overlay({}, {})


@dataclass(frozen=True)
class PreparedBatch:
    """A batch applied in memory: its answers (one list per item) and what
    its write must store and check."""

    results: list[list[TransferOutcome]]
    changes: BatchResult
    now: datetime

    @property
    def overlay(self) -> Overlay:
        return Overlay(self.changes.accounts_after, self.changes.transfers_after)


def _split_items(items: Sequence[BatchItem]) -> tuple[list[TransferSpec], list[uuid.UUID]]:
    specs = [spec for item in items if not isinstance(item, ExpireHolds) for spec in item]
    expiring = [tid for item in items if isinstance(item, ExpireHolds) for tid in item.ids]
    return specs, expiring


def _apply(
    items: Sequence[BatchItem],
    expiring: Sequence[uuid.UUID],
    accounts: Mapping[uuid.UUID, AccountState],
    existing: Mapping[uuid.UUID, Transfer],
) -> PreparedBatch:
    # The writer's clock, not the database's: one round trip fewer per
    # batch, and one writer's batches stay in order.
    now = datetime.now(UTC)
    batch = LedgerBatch(accounts, existing, now)
    results = [[] if isinstance(item, ExpireHolds) else batch.apply(item) for item in items]
    if expiring:
        expired = batch.expire(expiring)
        if expired:
            log.info("holds_expired", count=len(expired))
    return PreparedBatch(results, batch.result(), now)


async def apply_items(
    pool: asyncpg.Pool, items: Sequence[BatchItem]
) -> list[list[TransferOutcome]]:
    """Applies several requests (and expiries) in one database transaction:
    transfers a batch refers to are locked first, then its accounts, both in
    id order, so that concurrent batches queue instead of deadlocking. One
    result list per item, in order."""
    specs, expiring = _split_items(items)
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        try:
            async with pool.acquire() as conn, conn.transaction():
                referenced = await store.lock_transfers(
                    conn, sorted(set(referenced_ids(specs)) | set(expiring))
                )
                accounts = await store.lock_accounts(conn, account_ids(specs, referenced.values()))
                existing = await store.fetch_transfers(conn, transfer_ids(specs))
                existing.update(referenced)
                prepared = _apply(items, expiring, accounts, existing)
                await store.write_batch(conn, prepared.changes, prepared.now)
            return prepared.results
        except _RETRYABLE:
            if attempt == _MAX_ATTEMPTS:
                raise
            log.info("transfer_batch_retried", attempt=attempt)
    raise AssertionError("unreachable")


async def prepare_items(
    pool: asyncpg.Pool, items: Sequence[BatchItem], overlay: Overlay = NO_OVERLAY
) -> PreparedBatch:
    """Applies requests (and expiries) in memory, starting from ``overlay``
    for what it holds and from the database, read without locks and outside
    any transaction, for the rest. Nothing is written: ``write_prepared``
    does that, and refuses if anything read has changed meanwhile."""
    specs, expiring = _split_items(items)
    referenced = sorted(set(referenced_ids(specs)) | set(expiring))
    async with pool.acquire() as conn:
        wanted = set(transfer_ids(specs)).union(referenced)
        known = overlay.transfers
        existing = {tid: known[tid] for tid in wanted if tid in known}
        existing.update(await store.fetch_transfers(conn, [t for t in wanted if t not in known]))
        wanted_accounts = account_ids(specs, [existing[t] for t in referenced if t in existing])
        states = overlay.accounts
        accounts = {aid: states[aid] for aid in wanted_accounts if aid in states}
        accounts.update(
            await store.read_accounts(conn, [a for a in wanted_accounts if a not in states])
        )
    return _apply(items, expiring, accounts, existing)


async def write_prepared(pool: asyncpg.Pool, prepared: PreparedBatch) -> None:
    """Writes a prepared batch in one statement, its own transaction; raises
    StaleBatch, having written nothing, if anything it read has changed."""
    async with pool.acquire() as conn:
        await store.write_batch(conn, prepared.changes, prepared.now)


async def create_transfers(
    pool: asyncpg.Pool, specs: Sequence[TransferSpec]
) -> list[TransferOutcome]:
    """Applies one request on its own (the engine batches many together)."""
    check_batch_size(len(specs))
    if not specs:
        return []
    return (await apply_items(pool, [specs]))[0]


async def lookup_accounts(pool: asyncpg.Pool, ids: Sequence[str]) -> list[asyncpg.Record]:
    parsed = [_uuid_or_none(i) for i in ids]
    async with pool.acquire() as conn:
        rows = await store.fetch_accounts(conn, [p for p in parsed if p is not None])
    by_id = {row["id"]: row for row in rows}
    return [by_id[p] for p in parsed if p is not None and p in by_id]


async def lookup_transfers(pool: asyncpg.Pool, ids: Sequence[str]) -> list[Transfer]:
    _check_lookup_size(len(ids))
    parsed = [_uuid_or_none(i) for i in ids]
    async with pool.acquire() as conn:
        found = await store.fetch_transfers(conn, [p for p in parsed if p is not None])
    return [found[p] for p in parsed if p is not None and p in found]


async def close_account(pool: asyncpg.Pool, account_id: str, reason: str) -> asyncpg.Record:
    """Closes an account with a zero balance and no open holds. Closing a
    closed account again answers it as it is."""
    aid = parse_uuid(account_id, "id")
    if len(reason) > 500:
        raise InvalidArgument("reason is at most 500 characters", reason="INVALID_REASON")
    async with pool.acquire() as conn, conn.transaction():
        row = await store.lock_account(conn, aid)
        if row is None:
            raise NotFound("no such account", reason="ACCOUNT_NOT_FOUND")
        if row["status"] == 1:
            refusal = store.account_state(row).refuses_closing()
            if refusal is not None:
                raise FailedPrecondition(
                    "only an account with a zero balance and no open holds can be closed",
                    reason=refusal,
                )
            await store.mark_closed(conn, aid, reason)
        closed = (await store.fetch_accounts(conn, [aid]))[0]
    return closed


async def get_balances(
    pool: asyncpg.Pool, ids: Sequence[str], as_of: datetime | None
) -> tuple[list[AccountState], datetime]:
    _check_lookup_size(len(ids))
    parsed = [parse_uuid(raw, "account_ids") for raw in ids]
    async with pool.acquire() as conn:
        if as_of is None:
            rows = await store.fetch_accounts(conn, parsed)
            by_id = {row["id"]: store.account_state(row) for row in rows}
            return [by_id[p] for p in parsed if p in by_id], datetime.now(UTC)
        return await store.balances_as_of(conn, parsed, as_of), as_of


@dataclass(frozen=True)
class TransferQuery:
    account_id: str
    start: datetime | None = None
    end: datetime | None = None
    code: str | None = None
    min_amount: int | None = None
    max_amount: int | None = None
    status: int | None = None
    page_size: int = 0
    page_token: str = ""


async def list_transfers(pool: asyncpg.Pool, query: TransferQuery) -> tuple[list[Transfer], str]:
    """Newest first. The page token is the last item's (created_at, id): new
    transfers arriving meanwhile are newer and never shift later pages."""
    aid = parse_uuid(query.account_id, "account_id")
    limit = page_size(query.page_size)
    cursor = decode_cursor(query.page_token, uuid.UUID)
    _check_amount_range(query.min_amount, query.max_amount)
    async with pool.acquire() as conn:
        found = await store.list_transfers(
            conn,
            aid,
            start=query.start,
            end=query.end,
            code=query.code,
            min_amount=query.min_amount,
            max_amount=query.max_amount,
            status=query.status,
            cursor=cursor,
            limit=limit + 1,
        )
    page = found[:limit]
    token = encode_cursor(page[-1].created_at, page[-1].id) if len(found) > limit else ""
    return page, token


@dataclass(frozen=True)
class EntryQuery:
    account_id: str
    start: datetime | None = None
    end: datetime | None = None
    code: str | None = None
    min_amount: int | None = None
    max_amount: int | None = None
    side: int | None = None
    page_size: int = 0
    page_token: str = ""


async def list_entries(pool: asyncpg.Pool, query: EntryQuery) -> tuple[list[asyncpg.Record], str]:
    aid = parse_uuid(query.account_id, "account_id")
    limit = page_size(query.page_size)
    cursor = decode_cursor(query.page_token, int)
    _check_amount_range(query.min_amount, query.max_amount)
    if query.side not in (None, 1, 2):
        raise InvalidArgument("side must be DEBIT or CREDIT", reason="INVALID_SIDE")
    async with pool.acquire() as conn:
        found = await store.list_entries(
            conn,
            aid,
            start=query.start,
            end=query.end,
            code=query.code,
            min_amount=query.min_amount,
            max_amount=query.max_amount,
            side=query.side,
            cursor=cursor,
            limit=limit + 1,
        )
    page = found[:limit]
    next_token = encode_cursor(page[-1]["created_at"], page[-1]["id"]) if len(found) > limit else ""
    return page, next_token


def _check_amount_range(min_amount: int | None, max_amount: int | None) -> None:
    for value, name in ((min_amount, "min_amount"), (max_amount, "max_amount")):
        if value is not None and value < 0:
            raise InvalidArgument(f"{name} must not be negative", reason="INVALID_AMOUNT")


async def verify_ledger(pool: asyncpg.Pool) -> tuple[list[dict[str, object]], dict[str, int]]:
    async with pool.acquire() as conn:
        return await store.verify(conn)


def _check_lookup_size(n: int) -> None:
    if n > MAX_BATCH:
        raise InvalidArgument(f"look up at most {MAX_BATCH} ids at once", reason="BATCH_TOO_LARGE")


def _uuid_or_none(raw: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(raw)
    except ValueError:
        return None
