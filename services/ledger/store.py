"""The ledger's PostgreSQL adapter: hand-written, set-based SQL."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import TypeVar

import asyncpg

from services.common.db import DbConn
from services.ledger.domain import (
    AccountState,
    BatchResult,
    NewAccount,
    Side,
    Transfer,
    TransferStatus,
    TransferType,
)

T = TypeVar("T")

_ACCOUNT_COLUMNS = """
    id, currency, type, normal_side, no_overdraft, overdraft_limit, status, metadata,
    debits_posted, credits_posted, debits_pending, credits_pending, created_at
"""
_TRANSFER_COLUMNS = """
    id, debit_account_id, credit_account_id, amount, currency, type, pending_id, reverses_id,
    linked, timeout_seconds, code, metadata, effective_at, created_at, expires_at, status,
    amount_reversed, resolved_at
"""


def account_state(row: asyncpg.Record) -> AccountState:
    return AccountState(
        id=row["id"],
        currency=row["currency"],
        normal_side=Side(row["normal_side"]),
        no_overdraft=row["no_overdraft"],
        overdraft_limit=row["overdraft_limit"],
        closed=row["status"] == 2,
        debits_posted=row["debits_posted"],
        credits_posted=row["credits_posted"],
        debits_pending=row["debits_pending"],
        credits_pending=row["credits_pending"],
    )


def transfer_from_row(row: asyncpg.Record) -> Transfer:
    return Transfer(
        id=row["id"],
        debit_account_id=row["debit_account_id"],
        credit_account_id=row["credit_account_id"],
        amount=row["amount"],
        currency=row["currency"],
        type=TransferType(row["type"]),
        pending_id=row["pending_id"],
        reverses_id=row["reverses_id"],
        linked=row["linked"],
        timeout_seconds=row["timeout_seconds"],
        code=row["code"],
        metadata=row["metadata"],
        effective_at=row["effective_at"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        status=TransferStatus(row["status"]),
        amount_reversed=row["amount_reversed"],
        resolved_at=row["resolved_at"],
    )


async def insert_accounts(conn: DbConn, accounts: Sequence[NewAccount]) -> set[uuid.UUID]:
    """Inserts the accounts that do not exist yet and returns their ids (ids
    already taken are left alone; the caller compares them)."""
    rows = await conn.fetch(
        """
        INSERT INTO accounts (id, currency, type, normal_side, no_overdraft, overdraft_limit, metadata)
        SELECT * FROM unnest($1::uuid[], $2::text[], $3::smallint[], $4::smallint[],
                             $5::boolean[], $6::bigint[], $7::jsonb[])
        ON CONFLICT (id) DO NOTHING
        RETURNING id
        """,
        [a.id for a in accounts],
        [a.currency for a in accounts],
        [int(a.type) for a in accounts],
        [int(a.normal_side) for a in accounts],
        [a.no_overdraft for a in accounts],
        [a.overdraft_limit for a in accounts],
        [dict(a.metadata) for a in accounts],
    )
    return {row["id"] for row in rows}


async def fetch_accounts(conn: DbConn, ids: Sequence[uuid.UUID]) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = ANY($1::uuid[])", list(ids)
        )
    )


async def lock_accounts(conn: DbConn, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, AccountState]:
    """Locks the accounts in id order (so that batches never deadlock) and
    returns their states."""
    return await _account_states(conn, ids, " ORDER BY id FOR UPDATE")


async def read_accounts(conn: DbConn, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, AccountState]:
    """The accounts' states, without locking them: a pipelined batch's
    write checks that they are still so."""
    return await _account_states(conn, ids, "")


async def _account_states(
    conn: DbConn, ids: Sequence[uuid.UUID], suffix: str
) -> dict[uuid.UUID, AccountState]:
    # Only what a batch needs, in AccountState's order: a batch reads up to
    # 16,000 accounts, and decoding metadata it never looks at cost more
    # than the rest.
    rows = await conn.fetch(
        "SELECT id, currency, normal_side, no_overdraft, overdraft_limit, status = 2,"
        " debits_posted, credits_posted, debits_pending, credits_pending"
        f" FROM accounts WHERE id = ANY($1::uuid[]){suffix}",
        list(ids),
    )
    return {
        r[0]: AccountState(r[0], r[1], _SIDES[r[2]], r[3], r[4], r[5], r[6], r[7], r[8], r[9])
        for r in rows
    }


_SIDES = {int(side): side for side in Side}


async def lock_transfers(conn: DbConn, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Transfer]:
    """Locks the transfers a batch refers to (holds it resolves, transfers it
    reverses), in id order, before any account: one lock order for all."""
    if not ids:
        return {}
    rows = await conn.fetch(
        f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE",
        list(ids),
    )
    return {row["id"]: transfer_from_row(row) for row in rows}


async def fetch_transfers(conn: DbConn, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Transfer]:
    rows = await conn.fetch(
        f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE id = ANY($1::uuid[])", list(ids)
    )
    return {row["id"]: transfer_from_row(row) for row in rows}


class StaleBatch(Exception):
    """Something a batch read changed before its write: nothing of it was
    written, and it must be applied again from fresh reads."""


async def write_batch(conn: DbConn, batch: BatchResult, now: datetime) -> None:
    """Writes everything a batch changed (new transfers, resolved holds and
    reversed amounts, entries, balances) in one statement: one round trip,
    however large the batch.

    The statement writes only if what the batch read is still so: each
    transfer it changed still has the status and amount reversed it read,
    each account it looked at still has the balances, status and overdraft
    limit it started from. Otherwise nothing of it is written and StaleBatch
    is raised. In READ COMMITTED, a row locked by a concurrent writer is
    waited for and checked again as that writer committed it.

    Rows are locked in the serial path's order, so that writers do not
    deadlock each other (PostgreSQL would detect it, and the batch would be
    applied again, but only after a second): changed transfers before
    accounts, since the final call's arguments are evaluated left to right,
    and the accounts one primary-key probe each, in id order, before the
    update joins them by id (not by ctid: a row another writer rewrote while
    this one waited is locked in its new version, but reported with its old
    ctid)."""
    transfers, entries = batch.new_transfers, batch.entries
    changed = sorted(
        zip(batch.updated_transfers, batch.transfers_read, strict=True), key=lambda c: c[0].id
    )
    read, touched = batch.accounts_read, batch.touched
    before, after = list(read.values()), [touched.get(aid, state) for aid, state in read.items()]
    try:
        await conn.execute(
            """
            WITH changed_transfers AS (
                UPDATE transfers AS t
                   SET status = u.status, amount_reversed = u.reversed,
                       resolved_at = u.resolved_at
                  FROM unnest($32::uuid[], $33::smallint[], $34::bigint[], $35::timestamptz[],
                              $36::smallint[], $37::bigint[])
                       AS u(id, status, reversed, resolved_at, was_status, was_reversed)
                 WHERE t.id = u.id AND t.status = u.was_status
                   AND t.amount_reversed = u.was_reversed
                RETURNING 1
            ), unchanged_accounts AS (
                SELECT u.id, u.dp, u.cp, coalesce(u.dpe, $61) AS dpe,
                       coalesce(u.cpe, $63) AS cpe, coalesce(u.touched, $65) AS touched
                  FROM unnest($47::uuid[], $48::bigint[], $49::bigint[], $50::bigint[],
                              $51::bigint[], $52::bigint[], $54::bigint[], $56::smallint[],
                              $58::bigint[], $60::bigint[], $62::bigint[], $64::boolean[])
                       AS u(id, was_dp, was_cp, dp, cp, was_dpe, was_cpe, was_status, was_limit,
                            dpe, cpe, touched)
                 -- One locking probe of the primary key per account, in the
                 -- arrays' (id) order: no scan of the table, whatever the
                 -- planner would estimate for a join.
                 CROSS JOIN LATERAL (
                     SELECT debits_posted, credits_posted, debits_pending,
                            credits_pending, status, overdraft_limit
                       FROM accounts WHERE id = u.id FOR UPDATE
                 ) AS a
                 WHERE (a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending,
                        a.status, a.overdraft_limit)
                     = (u.was_dp, u.was_cp, coalesce(u.was_dpe, $53::bigint),
                        coalesce(u.was_cpe, $55::bigint), coalesce(u.was_status, $57::smallint),
                        coalesce(u.was_limit, $59::bigint))
            ), changed_accounts AS (
                UPDATE accounts AS a
                   SET debits_posted = c.dp, credits_posted = c.cp,
                       debits_pending = c.dpe, credits_pending = c.cpe
                  FROM unchanged_accounts AS c
                 WHERE a.id = c.id AND c.touched
                RETURNING 1
            ), new_transfers AS (
                INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency,
                                       type, pending_id, reverses_id, linked, timeout_seconds,
                                       code, metadata, effective_at, created_at, expires_at,
                                       status, resolved_at, amount_reversed)
                SELECT i, d, c, am, coalesce(cu, $6::text), coalesce(ty, $8::smallint),
                       coalesce(p, $10::uuid), coalesce(r, $12::uuid),
                       coalesce(l, $14::boolean), coalesce(ti, $16::integer),
                       coalesce(co, $18::text), coalesce(m, $20::text, '{}')::jsonb,
                       coalesce(e, $22::timestamptz), $31, coalesce(ex, $24::timestamptz),
                       coalesce(st, $26::smallint), coalesce(re, $28::timestamptz),
                       coalesce(rv, $30::bigint)
                  FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::bigint[], $5::text[],
                              $7::smallint[], $9::uuid[], $11::uuid[], $13::boolean[],
                              $15::integer[], $17::text[], $19::text[], $21::timestamptz[],
                              $23::timestamptz[], $25::smallint[], $27::timestamptz[],
                              $29::bigint[])
                       AS u(i, d, c, am, cu, ty, p, r, l, ti, co, m, e, ex, st, re, rv)
            ), new_entries AS (
                INSERT INTO entries (transfer_id, account_id, side, amount, currency,
                                     balance_after, code, created_at)
                SELECT t, a, s, am, coalesce(c, $44::text), b, coalesce(co, $46::text), $31
                  FROM unnest($38::uuid[], $39::uuid[], $40::smallint[], $41::bigint[],
                              $42::bigint[], $43::text[], $45::text[]) AS u(t, a, s, am, b, c, co)
            )
            SELECT ledger_batch_unchanged($66, (SELECT count(*) FROM changed_transfers),
                                          $67, (SELECT count(*) FROM unchanged_accounts),
                                          $68, (SELECT count(*) FROM changed_accounts))
            """,
            # $1..$30: new transfers; after the first four, each column as an
            # array and a value (see _shared)
            [t.id for t in transfers],
            [t.debit_account_id for t in transfers],
            [t.credit_account_id for t in transfers],
            [t.amount for t in transfers],
            *_shared([t.currency for t in transfers]),
            *_shared([int(t.type) for t in transfers]),
            *_shared([t.pending_id for t in transfers]),
            *_shared([t.reverses_id for t in transfers]),
            *_shared([t.linked for t in transfers]),
            *_shared([t.timeout_seconds for t in transfers]),
            *_shared([t.code for t in transfers]),
            # Most transfers carry no metadata: send NULL rather than encode {}.
            *_shared([json.dumps(dict(t.metadata)) if t.metadata else None for t in transfers]),
            *_shared([t.effective_at for t in transfers]),
            *_shared([t.expires_at for t in transfers]),
            *_shared([int(t.status) for t in transfers]),
            *_shared([t.resolved_at for t in transfers]),
            # reversed in the batch that created it
            *_shared([t.amount_reversed for t in transfers]),
            # $31: the batch's moment, every new row's created_at
            now,
            # $32..$37: stored transfers changed, and as the batch read them
            [t.id for t, _ in changed],
            [int(t.status) for t, _ in changed],
            [t.amount_reversed for t, _ in changed],
            [t.resolved_at for t, _ in changed],
            [int(was.status) for _, was in changed],
            [was.amount_reversed for _, was in changed],
            # $38..$46: entries
            [e.transfer_id for e in entries],
            [e.account_id for e in entries],
            [int(e.side) for e in entries],
            [e.amount for e in entries],
            [e.balance_after for e in entries],
            *_shared([e.currency for e in entries]),
            *_shared([e.code for e in entries]),
            # $47..$65: every account the batch looked at (in id order): posted
            # sums as it read them and as it leaves them, then the rest as it
            # read them, pending sums as it leaves them, whether it changed it
            list(read),
            [s.debits_posted for s in before],
            [s.credits_posted for s in before],
            [s.debits_posted for s in after],
            [s.credits_posted for s in after],
            *_shared([s.debits_pending for s in before]),
            *_shared([s.credits_pending for s in before]),
            *_shared([2 if s.closed else 1 for s in before]),
            *_shared([s.overdraft_limit for s in before]),
            *_shared([s.debits_pending for s in after]),
            *_shared([s.credits_pending for s in after]),
            *_shared([aid in touched for aid in read]),
            # $66..$68: how many rows must be found unchanged, and updated
            len(changed),
            len(read),
            len(touched),
        )
    except asyncpg.SerializationError as exc:
        raise StaleBatch(str(exc)) from exc


def _shared(values: list[T]) -> tuple[list[T] | None, T | None]:
    """A column of a batch as two parameters: the list and NULL; or, when
    every value is the same (a batch's currency, type, code ...), NULL and
    that value, which the statement puts in every row (``unnest`` pads a NULL
    array with NULLs, and ``coalesce`` fills them). Each array element costs
    asyncpg and PostgreSQL time; most columns of a batch repeat one value."""
    if values and values.count(values[0]) == len(values):
        return None, values[0]
    return values, None


async def due_holds(conn: DbConn, limit: int) -> list[uuid.UUID]:
    """Open holds whose timeout has passed, oldest first."""
    rows = await conn.fetch(
        "SELECT id FROM transfers WHERE status = 2 AND expires_at <= now()"
        " ORDER BY expires_at LIMIT $1",
        limit,
    )
    return [row["id"] for row in rows]


async def ensure_entry_partitions(conn: DbConn, months_ahead: int = 2) -> None:
    await conn.execute(
        "SELECT ensure_entries_partition(now() + make_interval(months => m))"
        " FROM generate_series(0, $1::int) AS m",
        months_ahead,
    )


async def verify(conn: DbConn) -> tuple[list[dict[str, object]], dict[str, int]]:
    """Checks the ledger's invariants in one snapshot; returns discrepancies
    and counts."""
    discrepancies: list[dict[str, object]] = []
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        for row in await conn.fetch(
            """
            SELECT currency, sum(debits_posted)::numeric AS d, sum(credits_posted)::numeric AS c,
                   sum(debits_pending)::numeric AS dp, sum(credits_pending)::numeric AS cp
              FROM accounts GROUP BY currency
            """
        ):
            if row["d"] != row["c"]:
                discrepancies.append(
                    {
                        "kind": "CURRENCY_UNBALANCED",
                        "currency": row["currency"],
                        "expected": int(row["d"]),
                        "actual": int(row["c"]),
                        "detail": "posted debits and credits differ",
                    }
                )
            if row["dp"] != row["cp"]:
                discrepancies.append(
                    {
                        "kind": "CURRENCY_UNBALANCED_PENDING",
                        "currency": row["currency"],
                        "expected": int(row["dp"]),
                        "actual": int(row["cp"]),
                        "detail": "pending debits and credits differ",
                    }
                )
        for row in await conn.fetch(
            """
            WITH sums AS (
                SELECT account_id,
                       coalesce(sum(amount) FILTER (WHERE side = 1), 0) AS d,
                       coalesce(sum(amount) FILTER (WHERE side = 2), 0) AS c
                  FROM entries GROUP BY account_id
            )
            SELECT a.id, a.currency, a.debits_posted, a.credits_posted,
                   coalesce(s.d, 0) AS d, coalesce(s.c, 0) AS c
              FROM accounts a LEFT JOIN sums s ON s.account_id = a.id
             WHERE a.debits_posted <> coalesce(s.d, 0) OR a.credits_posted <> coalesce(s.c, 0)
            """
        ):
            discrepancies.append(
                {
                    "kind": "BALANCE_MISMATCH",
                    "account_id": str(row["id"]),
                    "currency": row["currency"],
                    "expected": int(row["d"]) - int(row["c"]),
                    "actual": row["debits_posted"] - row["credits_posted"],
                    "detail": "stored posted balance differs from the sum of entries",
                }
            )
        for row in await conn.fetch(
            """
            WITH holds AS (
                SELECT account_id, sum(d) AS d, sum(c) AS c FROM (
                    SELECT debit_account_id AS account_id, amount AS d, 0 AS c
                      FROM transfers WHERE status = 2
                    UNION ALL
                    SELECT credit_account_id, 0, amount FROM transfers WHERE status = 2
                ) h GROUP BY account_id
            )
            SELECT a.id, a.currency, a.debits_pending, a.credits_pending,
                   coalesce(h.d, 0) AS d, coalesce(h.c, 0) AS c
              FROM accounts a LEFT JOIN holds h ON h.account_id = a.id
             WHERE a.debits_pending <> coalesce(h.d, 0) OR a.credits_pending <> coalesce(h.c, 0)
            """
        ):
            discrepancies.append(
                {
                    "kind": "PENDING_MISMATCH",
                    "account_id": str(row["id"]),
                    "currency": row["currency"],
                    "expected": int(row["d"]) - int(row["c"]),
                    "actual": row["debits_pending"] - row["credits_pending"],
                    "detail": "stored pending balance differs from the open holds",
                }
            )
        for row in await conn.fetch(
            """
            SELECT id, currency, debits_posted + debits_pending AS d,
                   credits_posted + overdraft_limit AS c
              FROM accounts
             WHERE no_overdraft AND debits_posted + debits_pending > credits_posted + overdraft_limit
            """
        ):
            discrepancies.append(
                {
                    "kind": "OVERDRAWN",
                    "account_id": str(row["id"]),
                    "currency": row["currency"],
                    "expected": row["c"],
                    "actual": row["d"],
                    "detail": "debits exceed credits on a no_overdraft account",
                }
            )
        counts = {
            "accounts": await conn.fetchval("SELECT count(*) FROM accounts"),
            "transfers": await conn.fetchval("SELECT count(*) FROM transfers"),
            "entries": await conn.fetchval("SELECT count(*) FROM entries"),
        }
    return discrepancies, counts


def _filters(
    start: datetime | None,
    end: datetime | None,
    extra: Sequence[tuple[str, object]],
    cursor: tuple[datetime, object] | None,
    first_param: int,
) -> tuple[str, list[object]]:
    """SQL conditions and their parameters, numbered from ``first_param``."""
    conditions: list[str] = []
    params: list[object] = []

    def add(sql: str, *values: object) -> None:
        for value in values:
            params.append(value)
            sql = sql.replace("?", f"${first_param + len(params) - 1}", 1)
        conditions.append(sql)

    if start is not None:
        add("created_at >= ?", start)
    if end is not None:
        add("created_at < ?", end)
    for sql, value in extra:
        add(sql, value)
    if cursor is not None:
        add("(created_at, id) < (?, ?)", *cursor)
    return "".join(f" AND {c}" for c in conditions), params


def _equal_or_within(
    *, min_amount: int | None, max_amount: int | None, **equal: object
) -> list[tuple[str, object]]:
    """Conditions for the filters given: each named column equal to its
    value (empty ones ignored), and the amount within the range."""
    conditions: list[tuple[str, object]] = [
        (f"{column} = ?", value) for column, value in equal.items() if value not in (None, "")
    ]
    if min_amount is not None:
        conditions.append(("amount >= ?", min_amount))
    if max_amount is not None:
        conditions.append(("amount <= ?", max_amount))
    return conditions


async def list_transfers(
    conn: DbConn,
    account_id: uuid.UUID,
    *,
    start: datetime | None,
    end: datetime | None,
    code: str | None,
    min_amount: int | None,
    max_amount: int | None,
    status: int | None,
    cursor: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[Transfer]:
    """An account's transfers (either side), newest first. Each side is read
    from its own index and the two are merged, so the newest page of a
    busy account costs two short index scans."""
    extra = _equal_or_within(code=code, status=status, min_amount=min_amount, max_amount=max_amount)
    where, params = _filters(start, end, extra, cursor, first_param=3)
    rows = await conn.fetch(
        f"""
        SELECT * FROM (
            (SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE debit_account_id = $1{where}
              ORDER BY created_at DESC, id DESC LIMIT $2)
            UNION ALL
            (SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE credit_account_id = $1{where}
              ORDER BY created_at DESC, id DESC LIMIT $2)
        ) AS both_sides
        ORDER BY created_at DESC, id DESC LIMIT $2
        """,
        account_id,
        limit,
        *params,
    )
    return [transfer_from_row(r) for r in rows]


async def list_entries(
    conn: DbConn,
    account_id: uuid.UUID,
    *,
    start: datetime | None,
    end: datetime | None,
    code: str | None,
    min_amount: int | None,
    max_amount: int | None,
    side: int | None,
    cursor: tuple[datetime, int] | None,
    limit: int,
) -> list[asyncpg.Record]:
    extra = _equal_or_within(code=code, side=side, min_amount=min_amount, max_amount=max_amount)
    where, params = _filters(start, end, extra, cursor, first_param=3)
    return list(
        await conn.fetch(
            f"""
            SELECT id, transfer_id, account_id, side, amount, currency, balance_after, code,
                   created_at
              FROM entries WHERE account_id = $1{where}
             ORDER BY created_at DESC, id DESC LIMIT $2
            """,
            account_id,
            limit,
            *params,
        )
    )


async def balances_as_of(
    conn: DbConn, ids: Sequence[uuid.UUID], as_of: datetime
) -> list[AccountState]:
    """Balances at a past moment: posted from the entries written by then,
    pending from the holds open at that moment."""
    rows = await conn.fetch(
        f"""
        WITH wanted AS (
            SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = ANY($1::uuid[]) AND created_at <= $2
        ), posted AS (
            SELECT account_id,
                   coalesce(sum(amount) FILTER (WHERE side = 1), 0) AS d,
                   coalesce(sum(amount) FILTER (WHERE side = 2), 0) AS c
              FROM entries WHERE account_id = ANY($1::uuid[]) AND created_at <= $2
             GROUP BY account_id
        ), held AS (
            SELECT account_id, sum(d) AS d, sum(c) AS c FROM (
                SELECT debit_account_id AS account_id, amount AS d, 0 AS c FROM transfers
                 WHERE type = 2 AND created_at <= $2 AND (resolved_at IS NULL OR resolved_at > $2)
                   AND debit_account_id = ANY($1::uuid[])
                UNION ALL
                SELECT credit_account_id, 0, amount FROM transfers
                 WHERE type = 2 AND created_at <= $2 AND (resolved_at IS NULL OR resolved_at > $2)
                   AND credit_account_id = ANY($1::uuid[])
            ) h GROUP BY account_id
        )
        SELECT w.id, w.currency, w.type, w.normal_side, w.no_overdraft, w.overdraft_limit,
               w.status, w.metadata, w.created_at,
               coalesce(p.d, 0)::bigint AS debits_posted, coalesce(p.c, 0)::bigint AS credits_posted,
               coalesce(h.d, 0)::bigint AS debits_pending, coalesce(h.c, 0)::bigint AS credits_pending
          FROM wanted w
          LEFT JOIN posted p ON p.account_id = w.id
          LEFT JOIN held h ON h.account_id = w.id
        """,
        list(ids),
        as_of,
    )
    by_id = {row["id"]: account_state(row) for row in rows}
    return [by_id[i] for i in ids if i in by_id]


async def lock_account(conn: DbConn, account_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = $1 FOR UPDATE", account_id
    )


async def mark_closed(conn: DbConn, account_id: uuid.UUID, reason: str) -> None:
    await conn.execute(
        "UPDATE accounts SET status = 2, closed_at = now(), closed_reason = $2 WHERE id = $1",
        account_id,
        reason,
    )
