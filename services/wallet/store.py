"""The wallet's PostgreSQL adapter."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

import asyncpg

from services.common.db import DbConn
from services.common.errors import AlreadyExists
from services.wallet.leases import Lease, clock

_USER_COLUMNS = (
    "user_id, email, phone, username, full_name, company_id, role, default_currency, created_at"
)
_WALLET_COLUMNS = (
    "wallet_id, user_id, default_currency, status, initial_balance, created_at, updated_at"
)
_PAYMENT_COLUMNS = """
    payment_id, kind, sender_user_id, idempotency_key, request_hash, recipient_user_id, amount,
    currency, note, status, failure_reason, failure_message, reservation_id, sender_balance,
    created_at, updated_at, review_expires_at, lease_until
"""
_TAKEN_REASONS = {
    "users_email_key": "EMAIL_TAKEN",
    "users_phone_key": "PHONE_TAKEN",
    "users_username_key": "USERNAME_TAKEN",
}


async def insert_user(
    conn: DbConn,
    *,
    user_id: uuid.UUID,
    email: str,
    phone: str | None,
    username: str | None,
    full_name: str,
    company_id: uuid.UUID | None,
    role: int,
    default_currency: str,
) -> bool:
    """Inserts the user; False when the id exists already. An email, phone or
    username that belongs to someone else is ALREADY_EXISTS with a reason."""
    try:
        status = await conn.execute(
            f"""
            INSERT INTO users ({_USER_COLUMNS})
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())
            ON CONFLICT (user_id) DO NOTHING
            """,
            user_id,
            email,
            phone,
            username,
            full_name,
            company_id,
            role,
            default_currency,
        )
    except asyncpg.UniqueViolationError as exc:
        reason = _TAKEN_REASONS.get(exc.constraint_name or "", "USER_EXISTS")
        field = reason.removesuffix("_TAKEN").lower()
        raise AlreadyExists(f"that {field} belongs to another user", reason=reason) from None
    return bool(status.endswith(" 1"))


async def fetch_user(conn: DbConn, user_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE user_id = $1", user_id)


async def find_user(conn: DbConn, *, by: str, value: str) -> asyncpg.Record | None:
    """A user by email, phone or username (email and username ignore case)."""
    where = {
        "email": "lower(email) = lower($1)",
        "phone": "phone = $1",
        "username": "lower(username) = lower($1)",
    }[by]
    return await conn.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE {where}", value)


async def insert_wallet(
    conn: DbConn,
    *,
    wallet_id: uuid.UUID,
    user_id: uuid.UUID,
    currency: str,
    initial_balance: int,
    ledger_account_id: uuid.UUID,
) -> None:
    await conn.execute(
        """
        INSERT INTO wallets (wallet_id, user_id, default_currency, initial_balance)
        VALUES ($1, $2, $3, $4)
        ON CONFLICT DO NOTHING  -- by id or by user: the id is the user's, either way
        """,
        wallet_id,
        user_id,
        currency,
        initial_balance,
    )
    await insert_wallet_account(conn, wallet_id, currency, ledger_account_id)


async def insert_wallet_account(
    conn: DbConn, wallet_id: uuid.UUID, currency: str, ledger_account_id: uuid.UUID
) -> None:
    await conn.execute(
        """
        INSERT INTO wallet_accounts (wallet_id, currency, ledger_account_id)
        VALUES ($1, $2, $3)
        ON CONFLICT DO NOTHING  -- the account id is the wallet's and currency's
        """,
        wallet_id,
        currency,
        ledger_account_id,
    )


async def fetch_wallet(
    conn: DbConn,
    *,
    wallet_id: uuid.UUID | None = None,
    user_id: uuid.UUID | None = None,
) -> asyncpg.Record | None:
    if wallet_id is not None:
        return await conn.fetchrow(
            f"SELECT {_WALLET_COLUMNS} FROM wallets WHERE wallet_id = $1", wallet_id
        )
    return await conn.fetchrow(f"SELECT {_WALLET_COLUMNS} FROM wallets WHERE user_id = $1", user_id)


async def fetch_wallet_and_accounts(
    conn: DbConn, user_id: uuid.UUID
) -> tuple[asyncpg.Record | None, dict[str, uuid.UUID]]:
    """The user's wallet and its ledger accounts by currency (as
    ``wallet_accounts``), in one round trip; the row as
    ``fetch_wallets_and_accounts`` gives it."""
    return (await fetch_wallets_and_accounts(conn, [user_id])).get(user_id, (None, {}))


async def fetch_wallets_and_accounts(
    conn: DbConn, user_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, tuple[asyncpg.Record, dict[str, uuid.UUID]]]:
    """The users' wallets, each with its ledger accounts by currency (as
    ``wallet_accounts``), by user id, in one round trip; a user without a
    wallet is missing. Each row also holds what a payment needs of its
    owner and payee: the owner's display fields (``full_name``, ``username``,
    ``email``) and ``owes`` (the wallet has an unpaid bank debt, as of this
    read)."""
    rows = await conn.fetch(
        f"""
        SELECT {", ".join("w." + c.strip() for c in _WALLET_COLUMNS.split(","))},
               u.full_name, u.username, u.email,
               EXISTS (SELECT FROM bank_debts d
                        WHERE d.wallet_id = w.wallet_id AND d.repaid < d.amount) AS owes,
               array_agg(a.currency ORDER BY a.created_at, a.currency)
                   FILTER (WHERE a.currency IS NOT NULL) AS account_currencies,
               array_agg(a.ledger_account_id ORDER BY a.created_at, a.currency)
                   FILTER (WHERE a.currency IS NOT NULL) AS account_ids
          FROM wallets w JOIN users u ON u.user_id = w.user_id
               LEFT JOIN wallet_accounts a ON a.wallet_id = w.wallet_id
         WHERE w.user_id = ANY($1::uuid[])
         GROUP BY w.wallet_id, u.user_id
        """,
        list(user_ids),
    )
    return {
        row["user_id"]: (
            row,
            dict(zip(row["account_currencies"] or (), row["account_ids"] or (), strict=True)),
        )
        for row in rows
    }


async def wallet_accounts(conn: DbConn, wallet_id: uuid.UUID) -> dict[str, uuid.UUID]:
    rows = await conn.fetch(
        "SELECT currency, ledger_account_id FROM wallet_accounts WHERE wallet_id = $1"
        " ORDER BY created_at, currency",
        wallet_id,
    )
    return {r["currency"]: r["ledger_account_id"] for r in rows}


async def claim_payment(
    conn: DbConn,
    *,
    payment_id: uuid.UUID,
    kind: str,
    sender_user_id: uuid.UUID,
    idempotency_key: str,
    request_hash: str,
    recipient_user_id: uuid.UUID | None,
    amount: int,
    currency: str,
    note: str,
    lease_seconds: float,
) -> tuple[asyncpg.Record, Lease | None]:
    """Records the payment as PROCESSING, leased to this attempt, or returns
    the one recorded under the same idempotency key (whose lease the caller
    has yet to take). The second value is the lease when this call recorded
    it, None when it did not. One round trip; two when the key's first
    payment committed while this statement ran (invisible to its snapshot)."""
    started = clock()
    row = await conn.fetchrow(
        f"""
        WITH new AS (
            INSERT INTO payments (payment_id, kind, sender_user_id, idempotency_key,
                                  request_hash, recipient_user_id, amount, currency, note,
                                  status, lease_until)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'PROCESSING',
                    clock_timestamp() + make_interval(secs => $10))
            ON CONFLICT DO NOTHING
            RETURNING {_PAYMENT_COLUMNS}, true AS fresh
        )
        SELECT * FROM new
        UNION ALL
        SELECT {_PAYMENT_COLUMNS}, false FROM payments
         WHERE sender_user_id = $3 AND idempotency_key = $4 AND NOT EXISTS (SELECT FROM new)
        """,
        payment_id,
        kind,
        sender_user_id,
        idempotency_key,
        request_hash,
        recipient_user_id,
        amount,
        currency,
        note,
        lease_seconds,
    )
    if row is None:
        row = await conn.fetchrow(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments"
            " WHERE sender_user_id = $1 AND idempotency_key = $2",
            sender_user_id,
            idempotency_key,
        )
        assert row is not None
        return row, None
    if not row["fresh"]:
        return row, None
    return row, Lease(row["lease_until"], started, lease_seconds)


async def take_lease(conn: DbConn, payment_id: uuid.UUID, seconds: float) -> Lease | None:
    """Leases an unfinished payment to this attempt; None while another
    attempt holds it."""
    started = clock()
    until = await conn.fetchval(
        """
        UPDATE payments SET lease_until = clock_timestamp() + make_interval(secs => $2), updated_at = now()
         WHERE payment_id = $1 AND status IN ('PROCESSING', 'PENDING_REVIEW')
           AND (lease_until IS NULL OR lease_until < now())
        RETURNING lease_until
        """,
        payment_id,
        seconds,
    )
    return None if until is None else Lease(until, started, seconds)


async def release_lease(conn: DbConn, payment_id: uuid.UUID, lease: Lease) -> None:
    """Gives the lease up, if it is still this attempt's (another may hold
    the payment by now)."""
    await conn.execute(
        "UPDATE payments SET lease_until = NULL WHERE payment_id = $1 AND lease_until = $2",
        payment_id,
        lease.until,
    )


async def fetch_payment(conn: DbConn, payment_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE payment_id = $1", payment_id
    )


async def stale_payments(conn: DbConn, older_than_seconds: float, limit: int) -> list[uuid.UUID]:
    """P2P payments still PROCESSING that no attempt has touched for a while
    (merchant payments and exchanges have reconcilers of their own)."""
    rows = await conn.fetch(
        """
        SELECT payment_id FROM payments
         WHERE kind = 'P2P' AND status = 'PROCESSING'
           AND updated_at < now() - make_interval(secs => $1)
           AND (lease_until IS NULL OR lease_until < now())
         ORDER BY updated_at LIMIT $2
        """,
        older_than_seconds,
        limit,
    )
    return [r["payment_id"] for r in rows]


async def complete_payment(conn: DbConn, payment_id: uuid.UUID, sender_balance: int) -> None:
    await conn.execute(
        """
        UPDATE payments SET status = 'COMPLETED', sender_balance = $2, lease_until = NULL,
                            updated_at = now()
         WHERE payment_id = $1 AND status IN ('PROCESSING', 'PENDING_REVIEW')
        """,
        payment_id,
        sender_balance,
    )


async def fail_payment(
    conn: DbConn, payment_id: uuid.UUID, reason: str, message: str, *, lease: Lease | None
) -> bool:
    """Records the payment's refusal; False when it is finished already or,
    given the ``lease`` of the attempt recording it, no longer leased to it
    (None only where no lease is taken: a lapsed review, under its row lock)."""
    status = await conn.execute(
        """
        UPDATE payments SET status = 'FAILED', failure_reason = $2, failure_message = $3,
                            lease_until = NULL, updated_at = now()
         WHERE payment_id = $1 AND status IN ('PROCESSING', 'PENDING_REVIEW')
           AND ($4::timestamptz IS NULL OR lease_until = $4)
        """,
        payment_id,
        reason,
        message,
        lease.until if lease else None,
    )
    return bool(status == "UPDATE 1")


async def change_wallet_status(
    conn: DbConn, wallet_id: uuid.UUID, old: int, new: int, reason: str, actor: str
) -> bool:
    """Moves the wallet from ``old`` to ``new`` and records the change; False
    if it was no longer ``old``."""
    changed = await conn.fetchval(
        """
        UPDATE wallets SET status = $3, updated_at = now()
         WHERE wallet_id = $1 AND status = $2 RETURNING wallet_id
        """,
        wallet_id,
        int(old),
        int(new),
    )
    if changed is None:
        return False
    await conn.execute(
        """
        INSERT INTO wallet_status_changes (change_id, wallet_id, old_status, new_status, reason,
                                           actor_id)
        VALUES ($1, $2, $3, $4, $5, $6)
        """,
        uuid.uuid4(),
        wallet_id,
        int(old),
        int(new),
        reason,
        actor,
    )
    return True


async def hold_for_review(
    conn: DbConn,
    payment_id: uuid.UUID,
    sender_balance: int,
    expires_at: datetime,
    reservation_id: str | None,
) -> None:
    await conn.execute(
        """
        UPDATE payments SET status = 'PENDING_REVIEW', sender_balance = $2,
                            review_expires_at = $3, lease_until = NULL, updated_at = now(),
                            reservation_id = coalesce($4, reservation_id)
         WHERE payment_id = $1 AND status = 'PROCESSING'
        """,
        payment_id,
        sender_balance,
        expires_at,
        uuid.UUID(reservation_id) if reservation_id else None,
    )


async def lapsed_reviews(conn: DbConn, limit: int) -> list[uuid.UUID]:
    """Payments whose review hold has passed its expiry (and a margin for the
    ledger's sweeper)."""
    rows = await conn.fetch(
        """
        SELECT payment_id FROM payments
         WHERE status = 'PENDING_REVIEW' AND review_expires_at < now() - interval '5 seconds'
           AND (lease_until IS NULL OR lease_until < now())
         ORDER BY review_expires_at LIMIT $1
        """,
        limit,
    )
    return [r["payment_id"] for r in rows]
