"""The budget service's PostgreSQL adapter."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from services.budget.domain import BudgetState, Mode, ReservationStatus
from services.common.db import DbConn

_BUDGET_COLUMNS = """
    budget_id, user_id, wallet_id, company_id, category, currency, total_amount, used_amount,
    reserved_amount, period_type, start_date, end_date, mode, rollover, thresholds, status,
    created_by, created_at, updated_at
"""
_RESERVATION_COLUMNS = """
    r.reservation_id, r.reference, r.user_id, r.amount, r.currency, r.category, r.status,
    r.expires_at, coalesce(array_agg(l.budget_id) FILTER (WHERE l.budget_id IS NOT NULL), '{}')
    AS budget_ids
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
                             thresholds, created_by)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
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
    )
    assert row is not None
    await conn.execute(
        "INSERT INTO budget_history (history_id, budget_id, action, new_values, actor_id)"
        " VALUES ($1, $2, 'CREATED', $3, $4)",
        uuid.uuid4(),
        row["budget_id"],
        {k: str(v) for k, v in values.items()},
        actor,
    )
    return row


async def fetch_budget(conn: DbConn, budget_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {_BUDGET_COLUMNS} FROM budgets WHERE budget_id = $1", budget_id
    )


async def list_budgets(conn: DbConn, user_id: uuid.UUID) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            f"SELECT {_BUDGET_COLUMNS} FROM budgets WHERE user_id = $1 ORDER BY created_at, budget_id",
            user_id,
        )
    )


async def lock_applicable_budgets(
    conn: DbConn, user_id: uuid.UUID, category: str, now: datetime
) -> list[BudgetState]:
    """The active budgets that a spend in ``category`` must fit, locked in id
    order so that concurrent reservations queue instead of deadlocking."""
    rows = await conn.fetch(
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
    return [budget_state(r) for r in rows]


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
        SELECT {_RESERVATION_COLUMNS} FROM reservations r
          LEFT JOIN reservation_lines l ON l.reservation_id = r.reservation_id
         WHERE {where} GROUP BY r.reservation_id
        """,
        key,
    )


async def insert_reservation(
    conn: DbConn,
    *,
    reservation_id: uuid.UUID,
    reference: str,
    user_id: uuid.UUID,
    amount: int,
    currency: str,
    category: str,
    expires_at: datetime,
    lines: list[tuple[uuid.UUID, int]],
) -> None:
    await conn.execute(
        """
        INSERT INTO reservations (reservation_id, reference, user_id, amount, currency, category,
                                  status, expires_at)
        VALUES ($1, $2, $3, $4, $5, $6, 1, $7)
        """,
        reservation_id,
        reference,
        user_id,
        amount,
        currency,
        category,
        expires_at,
    )
    if lines:
        await conn.execute(
            "INSERT INTO reservation_lines (reservation_id, budget_id, amount)"
            " SELECT $1, b, a FROM unnest($2::uuid[], $3::bigint[]) AS u(b, a)",
            reservation_id,
            [b for b, _ in lines],
            [a for _, a in lines],
        )
        await conn.execute(
            """
            UPDATE budgets SET reserved_amount = reserved_amount + u.a, updated_at = now()
              FROM unnest($1::uuid[], $2::bigint[]) AS u(b, a) WHERE budget_id = u.b
            """,
            [b for b, _ in lines],
            [a for _, a in lines],
        )


async def settle_reservation(
    conn: DbConn, reservation_id: uuid.UUID, to: ReservationStatus
) -> None:
    """Moves a RESERVED reservation to COMMITTED (reserved → used) or to
    RELEASED/EXPIRED (reserved freed). The caller holds its row lock."""
    used = "used_amount + l.amount" if to == ReservationStatus.COMMITTED else "used_amount"
    # Budgets are locked in id order, as Reserve locks them: no deadlocks.
    await conn.execute(
        """
        SELECT 1 FROM budgets WHERE budget_id IN
               (SELECT budget_id FROM reservation_lines WHERE reservation_id = $1)
         ORDER BY budget_id FOR UPDATE
        """,
        reservation_id,
    )
    await conn.execute(
        f"""
        UPDATE budgets b SET reserved_amount = b.reserved_amount - l.amount,
                             used_amount = {used}, updated_at = now()
          FROM (SELECT budget_id, amount FROM reservation_lines
                 WHERE reservation_id = $1 ORDER BY budget_id) l
         WHERE b.budget_id = l.budget_id
        """,
        reservation_id,
    )
    await conn.execute(
        "UPDATE reservations SET status = $2, updated_at = now() WHERE reservation_id = $1",
        reservation_id,
        int(to),
    )


async def expired_reservation_ids(conn: DbConn, limit: int = 500) -> list[uuid.UUID]:
    rows = await conn.fetch(
        """
        SELECT reservation_id FROM reservations
         WHERE status = 1 AND expires_at <= now()
         ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED
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
    await conn.execute(
        """
        UPDATE budgets b SET used_amount = greatest(b.used_amount - $2, 0), updated_at = now()
          FROM reservation_lines l
         WHERE l.reservation_id = $1 AND b.budget_id = l.budget_id
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
