"""The wallet's history: what each wallet's owner sees of every movement.

Every flow that moves money records one row per wallet it touches, keyed by
the ledger transfer, so that recording is idempotent: a retried flow records
nothing twice.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
import orjson

from services.common import outbox
from services.common.db import DbConn, atomic
from services.common.errors import InvalidArgument
from services.common.money import to_major_units
from services.common.paging import decode_cursor, encode_cursor, page_size
from services.wallet.domain import NAMESPACE

TYPES = frozenset(
    {
        "P2P_IN", "P2P_OUT", "DEPOSIT", "WITHDRAWAL", "MERCHANT_PAYMENT", "EXCHANGE",
        "BOOKING", "REFUND", "ADJUSTMENT", "CLAWBACK",
    }
)  # fmt: skip
STATUSES = frozenset({"PENDING", "PENDING_REVIEW", "COMPLETED", "FAILED", "REVERSED", "EXPIRED"})

_COLUMNS = """
    txn_id, wallet_id, type, amount, currency, status, counterparty, description, reference_id,
    ledger_transfer_id, balance_after, created_at, updated_at
"""


def txn_id(ledger_transfer_id: uuid.UUID, wallet_id: uuid.UUID) -> uuid.UUID:
    """A history row's id follows from the transfer and the wallet."""
    return uuid.uuid5(NAMESPACE, f"txn:{ledger_transfer_id}:{wallet_id}")


@dataclass(frozen=True)
class Movement:
    """One wallet's side of a ledger transfer."""

    wallet_id: uuid.UUID
    ledger_transfer_id: uuid.UUID
    type: str
    # Signed: negative when money leaves the wallet.
    amount: int
    currency: str
    status: str
    counterparty: str = ""
    description: str = ""
    reference_id: str = ""
    balance_after: int | None = None


def _completed(
    txn: uuid.UUID,
    wallet_id: uuid.UUID,
    type_: str,
    amount: int,
    currency: str,
    reference_id: str,
    balance_after: int | None,
) -> outbox.OutboxEvent:
    """TransactionCompleted for a completed history row, added in the row's
    transaction, once per row."""
    return outbox.OutboxEvent(
        event_id=uuid.uuid5(NAMESPACE, f"transaction-completed:{txn}"),
        event_type="TransactionCompleted",
        routing_key="transaction.completed",
        aggregate_id=str(wallet_id),
        data={
            "txn_id": str(txn),
            "wallet_id": str(wallet_id),
            "amount": to_major_units(amount, currency),
            "currency": currency,
            "type": type_,
            "reference_id": reference_id,
            "new_balance": to_major_units(balance_after, currency)
            if balance_after is not None
            else None,
        },
    )


def _completed_row(row: asyncpg.Record) -> outbox.OutboxEvent:
    reference = row["reference_id"] or str(row["ledger_transfer_id"] or "")
    return _completed(row["txn_id"], row["wallet_id"], row["type"], row["amount"],
                      row["currency"], reference, row["balance_after"])  # fmt: skip


async def record(conn: DbConn, *movements: Movement) -> None:
    """Records movements once each (a retry records nothing new). A movement
    recorded as COMPLETED announces itself through the outbox, in the order
    given. One statement, atomic by itself: the rows and the events of the
    rows it inserted (the outbox's ``add_events`` with a row filter), with
    no transaction of its own to open and commit."""
    for m in movements:
        assert m.type in TYPES and m.status in STATUSES and m.amount != 0
    ids = [txn_id(m.ledger_transfer_id, m.wallet_id) for m in movements]
    events = [
        (i, _completed(i, m.wallet_id, m.type, m.amount, m.currency,
                       m.reference_id[:200] or str(m.ledger_transfer_id), m.balance_after))
        for i, m in zip(ids, movements, strict=True)
        if m.status == "COMPLETED"
    ]  # fmt: skip
    await conn.execute(
        f"""
        WITH new AS (
            INSERT INTO transactions ({_COLUMNS})
            SELECT id, w, ty, am, cu, st, cp, de, re, lt, ba, now(), now()
              FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::bigint[], $5::text[],
                          $6::text[], $7::text[], $8::text[], $9::text[], $10::uuid[],
                          $11::bigint[])
                   WITH ORDINALITY AS u(id, w, ty, am, cu, st, cp, de, re, lt, ba, n)
             ORDER BY n
            ON CONFLICT DO NOTHING
            RETURNING txn_id
        )
        INSERT INTO outbox (event_id, event_type, routing_key, aggregate_id, envelope)
        SELECT i, t, r, a, e::jsonb
          FROM unnest($12::uuid[], $13::uuid[], $14::text[], $15::text[], $16::text[],
                      $17::text[])
               WITH ORDINALITY AS u(txn, i, t, r, a, e, n)
         WHERE txn IN (SELECT txn_id FROM new)
         ORDER BY n
        ON CONFLICT (event_id) DO NOTHING
        """,
        ids,
        [m.wallet_id for m in movements],
        [m.type for m in movements],
        [m.amount for m in movements],
        [m.currency for m in movements],
        [m.status for m in movements],
        [m.counterparty[:200] for m in movements],
        [m.description[:500] for m in movements],
        [m.reference_id[:200] for m in movements],
        [m.ledger_transfer_id for m in movements],
        [m.balance_after for m in movements],
        [i for i, _ in events],
        [e.event_id for _, e in events],
        [e.event_type for _, e in events],
        [e.routing_key for _, e in events],
        [e.aggregate_id for _, e in events],
        [orjson.dumps(outbox.envelope(e.event_id, e.event_type, e.data)).decode()
         for _, e in events],
    )  # fmt: skip


async def set_status(
    conn: DbConn,
    ledger_transfer_id: uuid.UUID,
    status: str,
    balance_after: dict[uuid.UUID, int] | None = None,
) -> None:
    """Moves every wallet's row of a transfer to ``status`` (a hold posted,
    voided, reversed ...), with each wallet's balance after when known."""
    assert status in STATUSES
    async with atomic(conn):
        changed = await conn.fetch(
            f"""
            UPDATE transactions AS t
               SET status = $2, updated_at = now(),
                   balance_after = coalesce(b.balance, t.balance_after)
              FROM (SELECT t2.txn_id, u.balance
                      FROM transactions t2
                      LEFT JOIN unnest($3::uuid[], $4::bigint[]) AS u(wallet_id, balance)
                             ON u.wallet_id = t2.wallet_id
                     WHERE t2.ledger_transfer_id = $1 AND t2.status <> $2) AS b
             WHERE t.txn_id = b.txn_id
            RETURNING {", ".join("t." + c.strip() for c in _COLUMNS.split(","))}
            """,
            ledger_transfer_id,
            status,
            list((balance_after or {}).keys()),
            list((balance_after or {}).values()),
        )
        if status == "COMPLETED":
            await outbox.add_events(conn, [_completed_row(row) for row in changed])


@dataclass(frozen=True)
class HistoryQuery:
    wallet_id: uuid.UUID
    start: datetime | None = None
    end: datetime | None = None
    types: frozenset[str] = field(default_factory=frozenset)
    status: str | None = None
    min_amount: int | None = None
    max_amount: int | None = None
    counterparty: str | None = None
    text: str | None = None
    page_size: int = 0
    page_token: str = ""


def _validate(query: HistoryQuery) -> None:
    unknown = query.types - TYPES
    if unknown:
        raise InvalidArgument(
            f"unknown transaction type {sorted(unknown)[0][:32]!r}", reason="INVALID_TYPE"
        )
    if query.status is not None and query.status not in STATUSES:
        raise InvalidArgument("unknown status", reason="INVALID_STATUS")
    for value, name in ((query.min_amount, "min_amount"), (query.max_amount, "max_amount")):
        if value is not None and value < 0:
            raise InvalidArgument(f"{name} must not be negative", reason="INVALID_AMOUNT")
    if query.text is not None and len(query.text) > 200:
        raise InvalidArgument("the search text is at most 200 characters", reason="INVALID_QUERY")
    if query.counterparty is not None and len(query.counterparty) > 200:
        raise InvalidArgument("counterparty is at most 200 characters", reason="INVALID_QUERY")


async def list_transactions(conn: DbConn, query: HistoryQuery) -> tuple[list[asyncpg.Record], str]:
    """A wallet's history, newest first, cursor-paged. Amount filters apply
    to the absolute amount; the text search matches words of the description
    and counterparty."""
    _validate(query)
    limit = page_size(query.page_size)
    cursor = decode_cursor(query.page_token, uuid.UUID)
    conditions = ["wallet_id = $1"]
    params: list[object] = [query.wallet_id]

    def add(sql: str, value: object) -> None:
        params.append(value)
        conditions.append(sql.replace("?", f"${len(params)}"))

    if query.start is not None:
        add("created_at >= ?", query.start)
    if query.end is not None:
        add("created_at < ?", query.end)
    if query.types:
        add("type = ANY(?::text[])", sorted(query.types))
    if query.status is not None:
        add("status = ?", query.status)
    if query.min_amount is not None:
        add("abs(amount) >= ?", query.min_amount)
    if query.max_amount is not None:
        add("abs(amount) <= ?", query.max_amount)
    if query.counterparty:
        add("counterparty ILIKE ?", "%" + _escape_like(query.counterparty) + "%")
    if query.text:
        add("search @@ plainto_tsquery('simple', ?)", query.text)
    if cursor is not None:
        params.extend(cursor)
        conditions.append(f"(created_at, txn_id) < (${len(params) - 1}, ${len(params)})")
    params.append(limit + 1)
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS} FROM transactions
         WHERE {" AND ".join(conditions)}
         ORDER BY created_at DESC, txn_id DESC LIMIT ${len(params)}
        """,
        *params,
    )
    page = list(rows[:limit])
    token = encode_cursor(page[-1]["created_at"], page[-1]["txn_id"]) if len(rows) > limit else ""
    return page, token


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
