"""The ledger's use cases: load, decide in the domain, store, in one
transaction."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
import structlog

from services.common.errors import InvalidArgument
from services.ledger import store
from services.ledger.domain import (
    MAX_BATCH,
    AccountCode,
    AccountSpec,
    AccountState,
    NewAccount,
    Side,
    TransferOutcome,
    TransferSpec,
    account_ids,
    apply_batch,
    transfer_ids,
    validate_account,
)

log = structlog.get_logger("moneta.ledger")

# Two batches that create the same new transfer id with different accounts
# are not serialised by account locks; the loser's insert fails and the batch
# is applied again (and then sees the winner's transfer).
_MAX_ATTEMPTS = 3


def _check_batch_size(n: int) -> None:
    if n > MAX_BATCH:
        raise InvalidArgument(
            f"a batch holds at most {MAX_BATCH} items; this one has {n}",
            reason="BATCH_TOO_LARGE",
            details={"max": MAX_BATCH, "size": n},
        )


async def create_accounts(
    pool: asyncpg.Pool, specs: Sequence[AccountSpec]
) -> list[tuple[str, AccountCode]]:
    _check_batch_size(len(specs))
    validated = [validate_account(s) for s in specs]
    wanted = [v for v in validated if isinstance(v, NewAccount)]
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


async def create_transfers(
    pool: asyncpg.Pool, specs: Sequence[TransferSpec]
) -> list[TransferOutcome]:
    _check_batch_size(len(specs))
    if not specs:
        return []
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        try:
            async with pool.acquire() as conn, conn.transaction():
                accounts = await store.lock_accounts(conn, account_ids(specs))
                existing = await store.fetch_transfers(conn, transfer_ids(specs))
                now = await conn.fetchval("SELECT now()")
                batch = apply_batch(specs, accounts, existing, now)
                await store.write_batch(conn, batch)
            return batch.outcomes
        except asyncpg.UniqueViolationError:
            if attempt == _MAX_ATTEMPTS:
                raise
            log.info("transfer_batch_retried", attempt=attempt)
    raise AssertionError("unreachable")


async def lookup_accounts(pool: asyncpg.Pool, ids: Sequence[str]) -> list[asyncpg.Record]:
    parsed = [_uuid_or_none(i) for i in ids]
    async with pool.acquire() as conn:
        rows = await store.fetch_accounts(conn, [p for p in parsed if p is not None])
    by_id = {row["id"]: row for row in rows}
    return [by_id[p] for p in parsed if p is not None and p in by_id]


async def get_balances(
    pool: asyncpg.Pool, ids: Sequence[str]
) -> tuple[list[AccountState], datetime]:
    for raw in ids:
        if _uuid_or_none(raw) is None:
            raise InvalidArgument("account ids must be UUIDs", reason="INVALID_ID")
    rows = await lookup_accounts(pool, ids)
    return [store.account_state(r) for r in rows], datetime.now(UTC)


async def verify_ledger(pool: asyncpg.Pool) -> tuple[list[dict[str, object]], dict[str, int]]:
    async with pool.acquire() as conn:
        return await store.verify(conn)


def _uuid_or_none(raw: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(raw)
    except ValueError:
        return None
