"""The budget service's use cases, each in one database transaction."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import structlog

from services.budget import store
from services.budget.domain import Mode, ReservationStatus, charge, validate_category
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.common.ids import parse_uuid
from services.common.money import require_positive, validate_currency

log = structlog.get_logger("moneta.budget")

MAX_TTL_SECONDS = 24 * 3600


@dataclass(frozen=True)
class ReserveCommand:
    user_id: str
    amount: int
    currency: str
    category: str
    reference: str
    ttl_seconds: int


async def create_budget(pool: asyncpg.Pool, values: dict[str, Any], actor: str) -> asyncpg.Record:
    values = dict(values)
    values["budget_id"] = uuid.uuid4()
    values["user_id"] = parse_uuid(values["user_id"], "user_id")
    for key in ("wallet_id", "company_id"):
        values[key] = parse_uuid(values[key], key) if values.get(key) else None
    validate_category(values["category"])
    validate_currency(values["currency"])
    require_positive(values["total_amount"], "total_amount")
    if values["end_date"] <= values["start_date"]:
        raise InvalidArgument("end_date must be after start_date", reason="INVALID_PERIOD")
    async with pool.acquire() as conn, conn.transaction():
        return await store.insert_budget(conn, values, actor)


async def get_budget(pool: asyncpg.Pool, budget_id: str) -> asyncpg.Record:
    async with pool.acquire() as conn:
        row = await store.fetch_budget(conn, parse_uuid(budget_id, "budget_id"))
    if row is None:
        raise NotFound("no such budget", reason="BUDGET_NOT_FOUND")
    return row


async def list_budgets(pool: asyncpg.Pool, user_id: str) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return await store.list_budgets(conn, parse_uuid(user_id, "user_id"))


async def reserve(pool: asyncpg.Pool, cmd: ReserveCommand, default_ttl: int) -> asyncpg.Record:
    """Reserves the spend on every applicable budget, once per reference."""
    user_id = parse_uuid(cmd.user_id, "user_id")
    require_positive(cmd.amount)
    validate_currency(cmd.currency)
    validate_category(cmd.category)
    if not cmd.reference or len(cmd.reference) > 200:
        raise InvalidArgument("reference must be 1 to 200 characters", reason="INVALID_REFERENCE")
    ttl = cmd.ttl_seconds or default_ttl
    if not 0 < ttl <= MAX_TTL_SECONDS:
        raise InvalidArgument("ttl must be 1 second to 24 hours", reason="INVALID_TTL")

    for attempt in (1, 2):
        try:
            async with pool.acquire() as conn, conn.transaction():
                prior = await store.fetch_reservation(conn, reference=cmd.reference)
                if prior is not None:
                    return _same_reservation(prior, user_id, cmd)
                now = datetime.now(UTC)
                budgets = await store.lock_applicable_budgets(conn, user_id, cmd.category, now)
                # A concurrent call with the same reference may have reserved
                # while this one waited for the budget locks: answer with its
                # reservation rather than charge the budget twice.
                prior = await store.fetch_reservation(conn, reference=cmd.reference)
                if prior is not None:
                    return _same_reservation(prior, user_id, cmd)
                lines = charge(budgets, cmd.amount, cmd.currency)
                reservation_id = uuid.uuid4()
                await store.insert_reservation(
                    conn,
                    reservation_id=reservation_id,
                    reference=cmd.reference,
                    user_id=user_id,
                    amount=cmd.amount,
                    currency=cmd.currency,
                    category=cmd.category,
                    expires_at=now + timedelta(seconds=ttl),
                    lines=lines,
                )
                row = await store.fetch_reservation(conn, reservation_id=reservation_id)
                assert row is not None
                return row
        except asyncpg.UniqueViolationError:
            # A concurrent call with the same reference won; read its result.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _same_reservation(
    prior: asyncpg.Record, user_id: uuid.UUID, cmd: ReserveCommand
) -> asyncpg.Record:
    if (prior["user_id"], prior["amount"], prior["currency"], prior["category"]) != (
        user_id,
        cmd.amount,
        cmd.currency,
        cmd.category,
    ):
        raise AlreadyExists(
            "this reference was reserved with other values", reason="REFERENCE_REUSED"
        )
    return prior


async def commit(pool: asyncpg.Pool, reservation_id: str) -> asyncpg.Record:
    return await _settle(pool, reservation_id, ReservationStatus.COMMITTED)


async def release(pool: asyncpg.Pool, reservation_id: str) -> asyncpg.Record:
    return await _settle(pool, reservation_id, ReservationStatus.RELEASED)


async def _settle(pool: asyncpg.Pool, raw_id: str, to: ReservationStatus) -> asyncpg.Record:
    rid = parse_uuid(raw_id, "reservation_id")
    async with pool.acquire() as conn, conn.transaction():
        row = await store.fetch_reservation(conn, reservation_id=rid, lock=True)
        if row is None:
            raise NotFound("no such reservation", reason="RESERVATION_NOT_FOUND")
        status = ReservationStatus(row["status"])
        if status == to:
            return row  # a retry: already done
        if status == ReservationStatus.RESERVED and row["expires_at"] <= datetime.now(UTC):
            await store.settle_reservation(conn, rid, ReservationStatus.EXPIRED)
            status = ReservationStatus.EXPIRED
        elif status == ReservationStatus.RESERVED:
            await store.settle_reservation(conn, rid, to)
            after = await store.fetch_reservation(conn, reservation_id=rid)
            assert after is not None
            return after
    raise FailedPrecondition(
        f"the reservation is {status.name.lower()}",
        reason=f"RESERVATION_{status.name}",
        details={"reservation_id": rid},
    )


async def refund(
    pool: asyncpg.Pool, reservation_id: str, amount: int, currency: str, reference: str
) -> asyncpg.Record:
    """Gives back ``amount`` of a committed reservation's spend to the
    budgets (and the periods) it was charged to. Once per reference; never
    more than was committed, over all refunds."""
    rid = parse_uuid(reservation_id, "reservation_id")
    require_positive(amount)
    if not reference or len(reference) > 200:
        raise InvalidArgument("reference must be 1 to 200 characters", reason="INVALID_REFERENCE")
    async with pool.acquire() as conn, conn.transaction():
        row = await store.fetch_reservation(conn, reservation_id=rid, lock=True)
        if row is None:
            raise NotFound("no such reservation", reason="RESERVATION_NOT_FOUND")
        prior = await conn.fetchrow(
            "SELECT reservation_id, amount FROM reservation_refunds WHERE reference = $1",
            reference,
        )
        if prior is not None:
            if (prior["reservation_id"], prior["amount"]) != (rid, amount):
                raise AlreadyExists(
                    "this reference was refunded with other values", reason="REFERENCE_REUSED"
                )
            return row
        if ReservationStatus(row["status"]) != ReservationStatus.COMMITTED:
            raise FailedPrecondition(
                "only committed spend can be given back", reason="RESERVATION_NOT_COMMITTED"
            )
        if currency != row["currency"]:
            raise InvalidArgument(
                "the refund's currency is not the spend's", reason="CURRENCY_MISMATCH"
            )
        refunded = await conn.fetchval(
            "SELECT refunded FROM reservations WHERE reservation_id = $1", rid
        )
        if refunded + amount > row["amount"]:
            raise FailedPrecondition(
                "more than was spent cannot be given back",
                reason="REFUND_EXCEEDS_SPEND",
                details={"refundable": row["amount"] - refunded},
            )
        await store.refund_reservation(conn, rid, amount, reference)
        after = await store.fetch_reservation(conn, reservation_id=rid)
    assert after is not None
    return after


async def expire_reservations(pool: asyncpg.Pool) -> int:
    """Releases reservations whose ttl has passed; returns how many."""
    async with pool.acquire() as conn, conn.transaction():
        ids = await store.expired_reservation_ids(conn)
        for rid in ids:
            await store.settle_reservation(conn, rid, ReservationStatus.EXPIRED)
    if ids:
        log.info("reservations_expired", count=len(ids))
    return len(ids)


async def sweep_expired_reservations(pool: asyncpg.Pool, every_seconds: float) -> None:
    while True:
        try:
            await expire_reservations(pool)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("reservation_sweep_failed", error=str(exc))
        await asyncio.sleep(every_seconds)


__all__ = ["Mode", "ReserveCommand"]
