"""The budget service's PostgreSQL adapter."""

from __future__ import annotations

import dataclasses
import enum
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg

from services.budget.domain import BudgetState, ChargeLine, Mode, ReservationStatus
from services.common.db import DbConn

# A reservation as read from the database, or as the fast path built it.
ReservationRow: TypeAlias = asyncpg.Record | dict[str, Any]


@dataclasses.dataclass(frozen=True)
class NewReservation:
    reservation_id: uuid.UUID
    reference: str
    user_id: uuid.UUID
    amount: int
    currency: str
    category: str
    expires_at: datetime

    def values(self) -> tuple[object, ...]:
        """In the order of the reservation's columns in the SQL below (not
        ``dataclasses.astuple``, which deep-copies every field)."""
        return (self.reservation_id, self.reference, self.user_id, self.amount, self.currency,
                self.category, self.expires_at)  # fmt: skip

    def as_row(self) -> dict[str, Any]:
        """The reservation's columns, as ``fetch_reservation`` names them."""
        return dict(zip(_NEW_RESERVATION_FIELDS, self.values(), strict=True))


_NEW_RESERVATION_FIELDS = tuple(f.name for f in dataclasses.fields(NewReservation))


class ReserveOutcome(enum.IntEnum):
    """What ``reserve_if_plain`` did."""

    FULL_PATH_NEEDED = 0
    RESERVED = 1
    REFERENCE_EXISTS = 2


_BUDGET_COLUMNS = """
    budget_id, user_id, wallet_id, company_id, category, currency, total_amount, used_amount,
    reserved_amount, period_type, start_date, end_date, mode, rollover, thresholds, status,
    created_by, created_at, updated_at, period_anchor, previous_budget_id, carried_over, policy_key,
    create_fingerprint
"""
_RESERVATION_COLUMNS = """
    r.reservation_id, r.reference, r.user_id, r.amount, r.currency, r.category, r.status,
    r.expires_at,
    coalesce(array_agg(l.budget_id ORDER BY l.budget_id) FILTER (WHERE l.budget_id IS NOT NULL),
             '{}') AS budget_ids,
    coalesce(array_agg(l.amount ORDER BY l.budget_id) FILTER (WHERE l.budget_id IS NOT NULL),
             '{}') AS line_amounts,
    coalesce(array_agg(b.currency ORDER BY l.budget_id) FILTER (WHERE l.budget_id IS NOT NULL),
             '{}') AS line_currencies,
    coalesce(array_agg(l.rate ORDER BY l.budget_id) FILTER (WHERE l.budget_id IS NOT NULL),
             '{}') AS line_rates
"""
_RESERVATION_FROM = """
    reservations r
    LEFT JOIN reservation_lines l ON l.reservation_id = r.reservation_id
    LEFT JOIN budgets b ON b.budget_id = l.budget_id
"""


def budget_state(row: asyncpg.Record) -> BudgetState:
    return BudgetState(
        budget_id=row["budget_id"],
        currency=row["currency"],
        total_amount=row["total_amount"],
        used_amount=row["used_amount"],
        reserved_amount=row["reserved_amount"],
        mode=Mode(row["mode"]),
    )


async def insert_budget(conn: DbConn, values: dict[str, Any], actor: str) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"""
        INSERT INTO budgets (budget_id, user_id, wallet_id, company_id, category, currency,
                             total_amount, period_type, start_date, end_date, mode, rollover,
                             thresholds, created_by, period_anchor, previous_budget_id,
                             carried_over, policy_key, status, create_fingerprint)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,
                coalesce($15::timestamptz, $9::timestamptz), $16, $17, $18, $19, $20)
        RETURNING {_BUDGET_COLUMNS}
        """,
        values["budget_id"],
        values["user_id"],
        values["wallet_id"],
        values["company_id"],
        values["category"],
        values["currency"],
        values["total_amount"],
        values["period_type"],
        values["start_date"],
        values["end_date"],
        values["mode"],
        values["rollover"],
        values["thresholds"],
        actor,
        values.get("period_anchor"),
        values.get("previous_budget_id"),
        values.get("carried_over", 0),
        values.get("policy_key"),
        values.get("status", 1),
        values.get("create_fingerprint"),
    )
    assert row is not None
    await insert_history(
        conn,
        row["budget_id"],
        values.get("history_action", "CREATED"),
        None,
        {k: str(v) for k, v in values.items() if k != "history_action"},
        values.get("history_reason", ""),
        actor,
    )
    return row


async def fetch_budget(conn: DbConn, budget_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {_BUDGET_COLUMNS} FROM budgets WHERE budget_id = $1", budget_id
    )


async def list_budgets(
    conn: DbConn,
    *,
    user_id: uuid.UUID | None,
    company_id: uuid.UUID | None,
    status: int | None,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Budgets (every period) oldest first, filtered by whichever of user,
    company and status are given, after the cursor (created_at, budget_id)."""
    return list(
        await conn.fetch(
            f"""
            SELECT {_BUDGET_COLUMNS} FROM budgets
             WHERE ($1::uuid IS NULL OR user_id = $1)
               AND ($2::uuid IS NULL OR company_id = $2)
               AND ($3::smallint IS NULL OR status = $3)
               AND ($4::timestamptz IS NULL OR (created_at, budget_id) > ($4, $5::uuid))
             ORDER BY created_at, budget_id LIMIT $6
            """,
            user_id,
            company_id,
            status,
            after[0] if after else None,
            after[1] if after else None,
            limit,
        )
    )


async def lock_budget(conn: DbConn, budget_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {_BUDGET_COLUMNS} FROM budgets WHERE budget_id = $1 FOR UPDATE", budget_id
    )


async def update_budget(
    conn: DbConn, budget_id: uuid.UUID, *, total_amount: int, status: int, carried_over: int
) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"""
        UPDATE budgets SET total_amount = $2, status = $3, carried_over = $4, updated_at = now()
         WHERE budget_id = $1 RETURNING {_BUDGET_COLUMNS}
        """,
        budget_id,
        total_amount,
        status,
        carried_over,
    )
    assert row is not None
    return row


async def insert_history(
    conn: DbConn,
    budget_id: uuid.UUID,
    action: str,
    old_values: dict[str, Any] | None,
    new_values: dict[str, Any] | None,
    reason: str,
    actor: str,
) -> None:
    # clock_timestamp(): entries of one transaction keep their order.
    await conn.execute(
        """
        INSERT INTO budget_history (history_id, budget_id, action, old_values, new_values,
                                    reason, actor_id, created_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, clock_timestamp())
        """,
        uuid.uuid4(),
        budget_id,
        action,
        old_values,
        new_values,
        reason,
        actor,
    )


async def list_history(
    conn: DbConn,
    budget_id: uuid.UUID,
    before: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[asyncpg.Record]:
    """A budget's history newest first, before the cursor."""
    return list(
        await conn.fetch(
            """
            SELECT history_id, budget_id, action, old_values, new_values, reason, actor_id,
                   created_at
              FROM budget_history
             WHERE budget_id = $1
               AND ($2::timestamptz IS NULL OR (created_at, history_id) < ($2, $3::uuid))
             ORDER BY created_at DESC, history_id DESC LIMIT $4
            """,
            budget_id,
            before[0] if before else None,
            before[1] if before else None,
            limit,
        )
    )


async def record_alert(
    conn: DbConn, budget_id: uuid.UUID, kind: str, threshold: int, event_id: uuid.UUID
) -> bool:
    """Records that a period announced an alert; False when it already had."""
    inserted = await conn.fetchval(
        """
        INSERT INTO budget_alerts (budget_id, kind, threshold, event_id) VALUES ($1, $2, $3, $4)
        ON CONFLICT DO NOTHING RETURNING true
        """,
        budget_id,
        kind,
        threshold,
        event_id,
    )
    return bool(inserted)


async def lock_ended_periods(conn: DbConn, now: datetime, limit: int) -> list[asyncpg.Record]:
    """Open periods (active or suspended) whose end has come, locked; a
    concurrent sweeper skips them."""
    return list(
        await conn.fetch(
            f"""
            SELECT {_BUDGET_COLUMNS} FROM budgets
             WHERE status IN (1, 3) AND end_date <= $1
             ORDER BY end_date, budget_id LIMIT $2 FOR UPDATE SKIP LOCKED
            """,
            now,
            limit,
        )
    )


async def fetch_company_policy(conn: DbConn, company_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT company_id, budgets, updated_at FROM company_policies WHERE company_id = $1",
        company_id,
    )


async def upsert_company_policy(
    conn: DbConn, company_id: uuid.UUID, budgets: list[dict[str, Any]], actor: str
) -> asyncpg.Record:
    row = await conn.fetchrow(
        """
        INSERT INTO company_policies (company_id, budgets, updated_by) VALUES ($1, $2, $3)
        ON CONFLICT (company_id) DO UPDATE
           SET budgets = excluded.budgets, updated_by = excluded.updated_by, updated_at = now()
        RETURNING company_id, budgets, updated_at
        """,
        company_id,
        budgets,
        actor,
    )
    assert row is not None
    return row


async def lock_applicable_budgets(
    conn: DbConn, user_id: uuid.UUID, category: str, now: datetime
) -> list[BudgetState]:
    """The active budgets that a spend in ``category`` must fit, locked in id
    order so that concurrent reservations queue instead of deadlocking."""
    return [
        budget_state(r) for r in await lock_applicable_budget_rows(conn, user_id, category, now)
    ]


async def lock_applicable_budget_rows(
    conn: DbConn, user_id: uuid.UUID, category: str, now: datetime
) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            f"""
        SELECT {_BUDGET_COLUMNS} FROM budgets
         WHERE user_id = $1 AND status = 1 AND category IN ($2, 'ALL')
           AND start_date <= $3 AND end_date > $3
         ORDER BY budget_id FOR UPDATE
        """,
            user_id,
            category,
            now,
        )
    )


async def fetch_reservation(
    conn: DbConn,
    *,
    reservation_id: uuid.UUID | None = None,
    reference: str | None = None,
    lock: bool = False,
) -> asyncpg.Record | None:
    where = "r.reservation_id = $1" if reservation_id is not None else "r.reference = $1"
    key: object = reservation_id if reservation_id is not None else reference
    if lock:
        await conn.execute(f"SELECT 1 FROM reservations r WHERE {where} FOR UPDATE", key)
    return await conn.fetchrow(
        f"""
        SELECT {_RESERVATION_COLUMNS} FROM {_RESERVATION_FROM}
         WHERE {where} GROUP BY r.reservation_id
        """,
        key,
    )


async def insert_reservation(
    conn: DbConn, new: NewReservation, lines: Sequence[ChargeLine]
) -> ReservationRow | None:
    """Records the reservation, its lines and the budgets' reserved amounts
    in one statement; returns it as ``fetch_reservation`` would, or None when
    the reference was reserved already (nothing written)."""
    return await conn.fetchrow(
        """
        WITH r AS (
            INSERT INTO reservations (reservation_id, reference, user_id, amount, currency,
                                      category, status, expires_at)
            VALUES ($1, $2, $3, $4, $5, $6, 1, $7)
            ON CONFLICT (reference) DO NOTHING
            RETURNING reservation_id, reference, user_id, amount, currency, category, status,
                      expires_at
        ), l AS (
            INSERT INTO reservation_lines (reservation_id, budget_id, amount, rate)
            SELECT r.reservation_id, u.b, u.a, u.rate
              FROM r, unnest($8::uuid[], $9::bigint[], $11::numeric[]) AS u(b, a, rate)
            RETURNING budget_id, amount
        ), b AS (
            UPDATE budgets SET reserved_amount = reserved_amount + l.amount, updated_at = now()
              FROM l WHERE budgets.budget_id = l.budget_id
            RETURNING 1
        )
        SELECT r.*, $8::uuid[] AS budget_ids, $9::bigint[] AS line_amounts,
               $10::text[] AS line_currencies, $11::numeric[] AS line_rates
          FROM r
        """,
        *new.values(),
        [line.budget_id for line in lines],
        [line.amount for line in lines],
        [line.currency for line in lines],
        [line.rate for line in lines],
    )


@dataclasses.dataclass(frozen=True, slots=True)
class PlainReserve:
    """Reserve's fast path for one reservation (``reserve_if_plain`` in SQL
    says when it applies), at ``now``."""

    new: NewReservation
    now: datetime


@dataclasses.dataclass(frozen=True, slots=True)
class Settle:
    """Moves a RESERVED reservation to ``to`` (COMMITTED: reserved → used;
    RELEASED or EXPIRED: reserved freed), or to EXPIRED when its ttl has
    passed at ``now``."""

    reservation_id: uuid.UUID
    to: ReservationStatus
    now: datetime


# What a PlainReserve did (and, when RESERVED, the reservation as
# ``fetch_reservation`` would return it).
Reserved: TypeAlias = tuple[ReserveOutcome, ReservationRow | None]
# The status a settled reservation had (None: there is none; any other than
# RESERVED means nothing changed), and the reservation as it is now.
Settled: TypeAlias = tuple[ReservationStatus | None, ReservationRow | None]
ReservationOp: TypeAlias = PlainReserve | Settle


async def apply_reservation_ops(
    conn: DbConn, ops: Sequence[ReservationOp]
) -> list[Reserved | Settled]:
    """Applies the operations in order, in one statement (so one commit):
    ``reservation_batch_returning`` in SQL. One result per operation: ``Reserved`` for
    a PlainReserve, ``Settled`` for a Settle."""
    if len(ops) == 1:
        # Alone, the single-item function's own statement costs the
        # database about half of what the batch function's does (measured).
        op = ops[0]
        if isinstance(op, PlainReserve):
            return [await _reserve_alone(conn, op)]
        return [await _settle_alone(conn, op)]
    columns: list[list[Any]] = [[] for _ in range(10)]
    for op in ops:
        if isinstance(op, PlainReserve):
            row: tuple[Any, ...] = (1, *op.new.values(), None, op.now)
        else:
            row = (2, op.reservation_id, None, None, None, None, None, None, int(op.to), op.now)
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    rows = await conn.fetch(
        "SELECT * FROM reservation_batch_returning($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        *columns,
    )
    return [_reserved(op, row) if isinstance(op, PlainReserve)
            else _settled(op.reservation_id, row)
            for op, row in zip(ops, rows, strict=True)]  # fmt: skip


async def _reserve_alone(conn: DbConn, op: PlainReserve) -> Reserved:
    row = await conn.fetchrow(
        "SELECT outcome AS o_outcome, budget_ids AS o_budget_ids"
        " FROM reserve_if_plain($1, $2, $3, $4, $5, $6, $7, $8)",
        *op.new.values(),
        op.now,
    )
    assert row is not None
    return _reserved(op, row)


async def _settle_alone(conn: DbConn, op: Settle) -> Settled:
    row = await conn.fetchrow(
        f"SELECT {_SETTLED_COLUMNS} FROM settle_reservation_returning($1, $2, $3)",
        op.reservation_id,
        int(op.to),
        op.now,
    )
    assert row is not None
    return _settled(op.reservation_id, row)


def _reserved(op: PlainReserve, row: asyncpg.Record) -> Reserved:
    outcome = ReserveOutcome(row["o_outcome"])
    if outcome != ReserveOutcome.RESERVED:
        return outcome, None
    budget_ids = sorted(row["o_budget_ids"])
    return outcome, {
        **op.new.as_row(),
        "status": int(ReservationStatus.RESERVED),
        "budget_ids": budget_ids,
        "line_amounts": [op.new.amount] * len(budget_ids),
        "line_currencies": [op.new.currency] * len(budget_ids),
        "line_rates": [None] * len(budget_ids),
    }


# What settle_reservation_returning returns, named as reservation_batch_returning
# names it (o_ and the column's name).
_SETTLED_FIELDS = ("prior", "settled", "reference", "user_id", "amount", "currency", "category",
                   "expires_at", "budget_ids", "line_amounts", "line_currencies", "line_rates")  # fmt: skip
_SETTLED_COLUMNS = ", ".join(f"{name} AS o_{name}" for name in _SETTLED_FIELDS)


def _settled(reservation_id: uuid.UUID, row: asyncpg.Record) -> Settled:
    prior = row["o_prior"]
    if prior is None:
        return None, None
    return ReservationStatus(prior), {
        "reservation_id": reservation_id,
        "reference": row["o_reference"],
        "user_id": row["o_user_id"],
        "amount": row["o_amount"],
        "currency": row["o_currency"],
        "category": row["o_category"],
        "status": row["o_settled"],
        "expires_at": row["o_expires_at"],
        "budget_ids": row["o_budget_ids"],
        "line_amounts": row["o_line_amounts"],
        "line_currencies": row["o_line_currencies"],
        "line_rates": row["o_line_rates"],
    }


async def expired_reservation_ids(conn: DbConn, limit: int = 500) -> list[uuid.UUID]:
    rows = await conn.fetch(
        """
        SELECT reservation_id FROM reservations
         WHERE status = 1 AND expires_at <= now()
         ORDER BY expires_at LIMIT $1
        """,
        limit,
    )
    return [r["reservation_id"] for r in rows]


async def refund_reservation(
    conn: DbConn, reservation_id: uuid.UUID, amount: int, reference: str
) -> None:
    """Takes ``amount`` off the used amount of every budget the reservation
    charged (locked in id order), and records the refund."""
    await conn.execute(
        """
        SELECT 1 FROM budgets WHERE budget_id IN
               (SELECT budget_id FROM reservation_lines WHERE reservation_id = $1)
         ORDER BY budget_id FOR UPDATE
        """,
        reservation_id,
    )
    # Each line gives back its share of the refunds so far (in its budget's
    # currency), rounded down, less what it gave back before: over all
    # refunds a line never returns more than it charged, and a full refund
    # returns exactly that.
    await conn.execute(
        """
        WITH share AS (
            SELECT l.budget_id,
                   floor(l.amount::numeric * (r.refunded + $2) / r.amount)::bigint - l.refunded
                   AS delta
              FROM reservation_lines l JOIN reservations r USING (reservation_id)
             WHERE l.reservation_id = $1
        ), line AS (
            UPDATE reservation_lines l SET refunded = l.refunded + share.delta
              FROM share WHERE l.reservation_id = $1 AND l.budget_id = share.budget_id
            RETURNING l.budget_id, share.delta
        )
        UPDATE budgets b SET used_amount = greatest(b.used_amount - line.delta, 0),
                             updated_at = now()
          FROM line WHERE b.budget_id = line.budget_id
        """,
        reservation_id,
        amount,
    )
    await conn.execute(
        "UPDATE reservations SET refunded = refunded + $2, updated_at = now()"
        " WHERE reservation_id = $1",
        reservation_id,
        amount,
    )
    await conn.execute(
        "INSERT INTO reservation_refunds (reference, reservation_id, amount) VALUES ($1, $2, $3)",
        reference,
        reservation_id,
        amount,
    )
