"""The budget service's use cases, each in one database transaction."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

import asyncpg
import structlog

from services.budget import store
from services.budget.domain import (
    Alert,
    BudgetExceeded,
    BudgetStatus,
    Mode,
    PeriodType,
    PolicyBudget,
    ReservationStatus,
    Rollover,
    alerts_due,
    charge,
    decide_update,
    default_budgets,
    next_period,
    next_period_total,
    percentage,
    validate_category,
    validate_policy,
    validate_thresholds,
)
from services.common import outbox, paging
from services.common.db import DbConn
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.common.group_commit import GroupCommit
from services.common.ids import parse_uuid
from services.common.money import require_positive, to_major_units, validate_currency

log = structlog.get_logger("moneta.budget")

MAX_TTL_SECONDS = 24 * 3600


# Reserve's fast path, Commit and Release, many to a statement and a commit:
# on a hot budget, one row lock and one WAL flush per batch, not per request.
# One per database, shared by every request (one per request would batch nothing).
class ReservationWriter(GroupCommit[store.ReservationOp, store.Reserved | store.Settled]):
    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool, store.apply_reservation_ops, name="budget_reservations")

    async def reserve(self, op: store.PlainReserve) -> store.Reserved:
        return cast(store.Reserved, await self.submit(op))

    async def settle(self, op: store.Settle) -> store.Settled:
        return cast(store.Settled, await self.submit(op))


@dataclass(frozen=True)
class ReserveCommand:
    user_id: str
    amount: int
    currency: str
    category: str
    reference: str
    ttl_seconds: int
    # The new reservation's id, when the caller chose it (empty: a new one).
    reservation_id: str = ""


async def create_budget(
    pool: asyncpg.Pool,
    values: dict[str, Any],
    actor: str,
    idempotency_key: str = "",
    fingerprint: str = "",
) -> asyncpg.Record:
    """Creates a budget. With an idempotency key, once per caller and key:
    a retry answers the budget the first call created, and the same key
    with another request (another ``fingerprint``) is refused."""
    values = dict(values)
    values["budget_id"] = uuid.uuid4()
    if idempotency_key:
        if len(idempotency_key) > 200:
            raise InvalidArgument(
                "idempotency_key is at most 200 characters", reason="INVALID_IDEMPOTENCY_KEY"
            )
        values["budget_id"] = uuid.uuid5(_CREATE_NAMESPACE, f"{actor}\0{idempotency_key}")
        values["create_fingerprint"] = fingerprint
    values["user_id"] = parse_uuid(values["user_id"], "user_id")
    for key in ("wallet_id", "company_id"):
        values[key] = parse_uuid(values[key], key) if values.get(key) else None
    validate_category(values["category"])
    validate_currency(values["currency"])
    require_positive(values["total_amount"], "total_amount")
    if values["period_type"] not in PeriodType._value2member_map_:
        raise InvalidArgument("unknown period type", reason="INVALID_PERIOD_TYPE")
    values["thresholds"] = list(validate_thresholds(values.get("thresholds") or []))
    if values["end_date"] <= values["start_date"]:
        raise InvalidArgument("end_date must be after start_date", reason="INVALID_PERIOD")
    for attempt in (1, 2):
        try:
            async with pool.acquire() as conn, conn.transaction():
                if idempotency_key:
                    prior = await store.fetch_budget(conn, values["budget_id"])
                    if prior is not None:
                        if prior["create_fingerprint"] != fingerprint:
                            raise AlreadyExists(
                                "this idempotency key was used for another budget",
                                reason="IDEMPOTENCY_KEY_REUSED",
                            )
                        return prior
                return await store.insert_budget(conn, values, actor)
        except asyncpg.UniqueViolationError:
            if attempt == 2 or not idempotency_key:
                raise  # a concurrent twin won: the retry reads its budget
    raise AssertionError("unreachable")


# Budget ids of idempotent creates: uuid5 of the caller and the key.
_CREATE_NAMESPACE = uuid.UUID("6d0f3c52-8a4e-4f7b-9a51-2f0c1b7e5d11")


async def update_budget(
    pool: asyncpg.Pool,
    budget_id: str,
    *,
    total_amount: int | None,
    status: BudgetStatus | None,
    reason: str,
    actor: str,
) -> asyncpg.Record:
    """Changes a budget's total and/or status, with a history row of the
    old and new values. A lower total may cross thresholds: announced here,
    in the same transaction."""
    bid = parse_uuid(budget_id, "budget_id")
    async with pool.acquire() as conn, conn.transaction():
        row = await store.lock_budget(conn, bid)
        if row is None:
            raise NotFound("no such budget", reason="BUDGET_NOT_FOUND")
        change = decide_update(
            store.budget_state(row),
            BudgetStatus(row["status"]),
            new_total=total_amount,
            new_status=status,
            reason=reason,
        )
        if not change.new_values:
            return row  # nothing differs: nothing to record
        new_total = change.new_values.get("total_amount", row["total_amount"])
        after = await store.update_budget(
            conn,
            bid,
            total_amount=new_total,
            status=change.new_values.get("status", row["status"]),
            # An explicit total replaces the period's total, carry included.
            carried_over=0 if "total_amount" in change.new_values else row["carried_over"],
        )
        await store.insert_history(
            conn, bid, "UPDATED", change.old_values, change.new_values, reason, actor
        )
        held = row["used_amount"] + row["reserved_amount"]
        await _announce(conn, after, (held, row["total_amount"]), (held, new_total), "update")
    log.info("budget_updated", budget_id=str(bid), **change.new_values)
    return after


async def list_budget_history(
    pool: asyncpg.Pool, budget_id: str, page_size: int, page_token: str
) -> tuple[list[asyncpg.Record], str]:
    """A budget's history, newest first, and the next page's token."""
    bid = parse_uuid(budget_id, "budget_id")
    limit = paging.page_size(page_size)
    before = paging.decode_cursor(page_token, uuid.UUID)
    async with pool.acquire() as conn:
        if await store.fetch_budget(conn, bid) is None:
            raise NotFound("no such budget", reason="BUDGET_NOT_FOUND")
        rows = await store.list_history(conn, bid, before, limit + 1)
    return _page(rows, limit, "history_id")


def _page(rows: list[asyncpg.Record], limit: int, key: str) -> tuple[list[asyncpg.Record], str]:
    if len(rows) <= limit:
        return rows, ""
    last = rows[limit - 1]
    return rows[:limit], paging.encode_cursor(last["created_at"], last[key])


async def get_budget(pool: asyncpg.Pool, budget_id: str) -> asyncpg.Record:
    async with pool.acquire() as conn:
        row = await store.fetch_budget(conn, parse_uuid(budget_id, "budget_id"))
    if row is None:
        raise NotFound("no such budget", reason="BUDGET_NOT_FOUND")
    return row


async def list_budgets(
    pool: asyncpg.Pool,
    *,
    user_id: str = "",
    company_id: str = "",
    status: BudgetStatus | None = None,
    page_size: int = 0,
    page_token: str = "",
) -> tuple[list[asyncpg.Record], str]:
    """Budgets (every period, oldest first) of a user and/or a company,
    optionally of one status; at least a user or a company is required."""
    if not user_id and not company_id:
        raise InvalidArgument("user_id or company_id is required", reason="MISSING_FILTER")
    limit = paging.page_size(page_size)
    after = paging.decode_cursor(page_token, uuid.UUID)
    async with pool.acquire() as conn:
        rows = await store.list_budgets(
            conn,
            user_id=parse_uuid(user_id, "user_id") if user_id else None,
            company_id=parse_uuid(company_id, "company_id") if company_id else None,
            status=int(status) if status is not None else None,
            after=after,
            limit=limit + 1,
        )
    return _page(rows, limit, "budget_id")


async def reserve(
    writer: ReservationWriter,
    cmd: ReserveCommand,
    default_ttl: int,
    rates: Mapping[str, Decimal],
) -> store.ReservationRow:
    """Reserves the spend on every applicable budget, once per reference.

    Built for a hot budget: the common case is one item of a group commit,
    so the budget's row lock is held for no client round trip and taken
    once for many requests; the rest (another currency, a refusal, an alert
    to announce) takes the full path."""
    user_id = parse_uuid(cmd.user_id, "user_id")
    require_positive(cmd.amount)
    validate_currency(cmd.currency)
    validate_category(cmd.category)
    if not cmd.reference or len(cmd.reference) > 200:
        raise InvalidArgument("reference must be 1 to 200 characters", reason="INVALID_REFERENCE")
    ttl = cmd.ttl_seconds or default_ttl
    if not 0 < ttl <= MAX_TTL_SECONDS:
        raise InvalidArgument("ttl must be 1 second to 24 hours", reason="INVALID_TTL")

    chosen = parse_uuid(cmd.reservation_id, "reservation_id") if cmd.reservation_id else None
    now = datetime.now(UTC)
    new = store.NewReservation(
        reservation_id=chosen or uuid.uuid4(),
        reference=cmd.reference,
        user_id=user_id,
        amount=cmd.amount,
        currency=cmd.currency,
        category=cmd.category,
        expires_at=now + timedelta(seconds=ttl),
    )
    try:
        return await _reserve(writer, cmd, new, now, user_id, rates)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != "reservations_pkey":
            raise
    # The chosen id exists: a twin of this request (same reference, same id)
    # that got there first, or another reference's.
    async with writer.pool.acquire() as conn:
        twin = await store.fetch_reservation(conn, reference=cmd.reference)
    if twin is not None and twin["reservation_id"] == new.reservation_id:
        return _same_reservation(twin, user_id, cmd)
    raise AlreadyExists("this reservation id is another reference's", reason="RESERVATION_ID_TAKEN")


async def _reserve(
    writer: ReservationWriter,
    cmd: ReserveCommand,
    new: store.NewReservation,
    now: datetime,
    user_id: uuid.UUID,
    rates: Mapping[str, Decimal],
) -> store.ReservationRow:
    outcome, reserved = await writer.reserve(store.PlainReserve(new, now))
    if reserved is not None:
        return reserved
    async with writer.pool.acquire() as conn:
        if outcome == store.ReserveOutcome.REFERENCE_EXISTS:
            prior = await store.fetch_reservation(conn, reference=cmd.reference)
            assert prior is not None
            return _same_reservation(prior, user_id, cmd)
        # The full path: conversion, refusals and alerts, decided in the domain.
        async with conn.transaction():
            rows = await store.lock_applicable_budget_rows(conn, user_id, cmd.category, now)
            try:
                lines = charge(
                    [store.budget_state(r) for r in rows], cmd.amount, cmd.currency, rates
                )
            except BudgetExceeded as refused:
                # A retry of a reservation that took the room itself is no refusal.
                prior = await store.fetch_reservation(conn, reference=cmd.reference)
                if prior is not None:
                    return _same_reservation(prior, user_id, cmd)
                refusal = (next(r for r in rows if str(r["budget_id"]) == refused.details["budget_id"]),
                           refused)  # fmt: skip
            else:
                row = await store.insert_reservation(conn, new, lines)
                if row is None:  # reserved already, by a retry or a concurrent twin
                    prior = await store.fetch_reservation(conn, reference=cmd.reference)
                    assert prior is not None
                    return _same_reservation(prior, user_id, cmd)
                for budget, line in zip(rows, lines, strict=True):
                    held = budget["used_amount"] + budget["reserved_amount"]
                    total = budget["total_amount"]
                    await _announce(
                        conn, budget, (held, total), (held + line.amount, total), cmd.reference
                    )
                return row
        # The refused transaction wrote nothing; the refusal is announced in its own.
        await _announce_refusal(conn, *refusal, cmd.reference)
    raise refusal[1]


async def _announce_refusal(
    conn: DbConn, budget: asyncpg.Record, refused: BudgetExceeded, reference: str
) -> None:
    """A hard budget refused a spend: BudgetExceeded, in its own transaction
    (the refused one wrote nothing). Once per reference and budget: a
    retried refusal is the same event."""
    spend = int(refused.details["spend_amount"])
    attempted = budget["used_amount"] + budget["reserved_amount"] + spend
    event_id = uuid.uuid5(budget["budget_id"], f"exceeded:{reference}")
    async with conn.transaction():
        await _add_exceeded_event(conn, budget, attempted, event_id)


async def _add_exceeded_event(
    conn: DbConn, budget: asyncpg.Record, held: int, event_id: uuid.UUID
) -> None:
    total = budget["total_amount"]
    await outbox.add_event(
        conn,
        event_id=event_id,
        event_type="BudgetExceeded",
        routing_key="budget.exceeded",
        aggregate_id=str(budget["budget_id"]),
        data={
            "budget_id": str(budget["budget_id"]),
            "wallet_id": str(budget["wallet_id"] or ""),
            "user_id": str(budget["user_id"]),
            "exceeded_amount": to_major_units(held - total, budget["currency"]),
            "threshold_percentage": percentage(held, total),
            "currency": budget["currency"],
        },
    )


async def _announce(
    conn: DbConn,
    budget: asyncpg.Record,
    before: tuple[int, int],
    after: tuple[int, int],
    cause: str,
) -> None:
    """Adds to the outbox, in the caller's transaction, the alerts a change
    of a period from ``before`` to ``after`` (held, total) crosses and that
    the period has not announced yet."""
    due = alerts_due(before, after, budget["thresholds"], Mode(budget["mode"]))
    for alert in due:
        event_id = uuid.uuid5(budget["budget_id"], f"{alert.kind}:{alert.threshold}")
        if not await store.record_alert(
            conn, budget["budget_id"], alert.kind, alert.threshold, event_id
        ):
            continue
        held, total = after
        if alert.kind == "EXCEEDED":
            await _add_exceeded_event(conn, budget, held, event_id)
        else:
            await _add_threshold_event(conn, budget, alert, held, total, event_id)
        log.info(
            "budget_alert",
            budget_id=str(budget["budget_id"]),
            kind=alert.kind,
            threshold=alert.threshold,
            cause=cause,
        )


async def _add_threshold_event(
    conn: DbConn, budget: asyncpg.Record, alert: Alert, held: int, total: int, event_id: uuid.UUID
) -> None:
    currency = budget["currency"]
    await outbox.add_event(
        conn,
        event_id=event_id,
        event_type="BudgetThresholdReached",
        routing_key="budget.threshold_reached",
        aggregate_id=str(budget["budget_id"]),
        data={
            "budget_id": str(budget["budget_id"]),
            "wallet_id": str(budget["wallet_id"] or ""),
            "user_id": str(budget["user_id"]),
            "threshold_percentage": alert.threshold,
            # Held spend: used and still reserved, as the hard limit counts it.
            "used_amount": to_major_units(held, currency),
            "total_amount": to_major_units(total, currency),
            "currency": currency,
        },
    )


def _same_reservation(
    prior: store.ReservationRow, user_id: uuid.UUID, cmd: ReserveCommand
) -> store.ReservationRow:
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


async def commit(writer: ReservationWriter, reservation_id: str) -> store.ReservationRow:
    return await _settle(writer, reservation_id, ReservationStatus.COMMITTED)


async def release(writer: ReservationWriter, reservation_id: str) -> store.ReservationRow:
    return await _settle(writer, reservation_id, ReservationStatus.RELEASED)


async def _settle(
    writer: ReservationWriter, raw_id: str, to: ReservationStatus
) -> store.ReservationRow:
    """Commit or release, once: a retry answers the same; a reservation
    settled otherwise (or expired) is refused with its status as the reason."""
    rid = parse_uuid(raw_id, "reservation_id")
    prior, row = await writer.settle(store.Settle(rid, to, datetime.now(UTC)))
    if prior is None or row is None:
        raise NotFound("no such reservation", reason="RESERVATION_NOT_FOUND")
    status = ReservationStatus(row["status"])
    if status != to:
        raise FailedPrecondition(
            f"the reservation is {status.name.lower()}",
            reason=f"RESERVATION_{status.name}",
            details={"reservation_id": rid},
        )
    return row


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
    """Releases reservations whose ttl has passed, a batch to a statement;
    returns how many (a Commit racing one is simply first or not)."""
    async with pool.acquire() as conn:
        now = datetime.now(UTC)
        ops = [store.Settle(rid, ReservationStatus.EXPIRED, now)
               for rid in await store.expired_reservation_ids(conn)]  # fmt: skip
        settled = cast(
            list[store.Settled], await store.apply_reservation_ops(conn, ops) if ops else []
        )
    expired = sum(prior == ReservationStatus.RESERVED for prior, _ in settled)
    if expired:
        log.info("reservations_expired", count=expired)
    return expired


async def sweep_expired_reservations(pool: asyncpg.Pool, every_seconds: float) -> None:
    while True:
        try:
            await expire_reservations(pool)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("reservation_sweep_failed", error=str(exc))
        await asyncio.sleep(every_seconds)


# ---------------------------------------------------------------- periods


async def roll_over_periods(pool: asyncpg.Pool, now: datetime, batch: int = 200) -> int:
    """Closes every open period that has ended by ``now`` (status EXPIRED)
    and opens the next by the rollover policy (ONE_TIME only closes); each
    with a history row. Periods already past are caught up one at a time
    (a new period that has ended too is closed on the next round). Returns
    how many periods it closed."""
    closed = 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            ended = await store.lock_ended_periods(conn, now, batch)
            for row in ended:
                await _close_period(conn, row)
        closed += len(ended)
        if len(ended) < batch:
            break
    if closed:
        log.info("budget_periods_closed", count=closed)
    return closed


async def _close_period(conn: DbConn, row: asyncpg.Record) -> None:
    bid = row["budget_id"]
    await conn.execute(
        "UPDATE budgets SET status = $2, updated_at = now() WHERE budget_id = $1",
        bid,
        int(BudgetStatus.EXPIRED),
    )
    await store.insert_history(
        conn,
        bid,
        "EXPIRED",
        {"status": row["status"]},
        {"status": int(BudgetStatus.EXPIRED)},
        "period ended",
        "system",
    )
    period = next_period(row["period_anchor"], PeriodType(row["period_type"]), row["end_date"])
    if period is None:
        return
    total, carried = next_period_total(
        Rollover(row["rollover"]),
        row["total_amount"],
        row["carried_over"],
        row["used_amount"],
        row["reserved_amount"],
    )
    successor = await store.insert_budget(
        conn,
        {
            "budget_id": uuid.uuid4(),
            "user_id": row["user_id"],
            "wallet_id": row["wallet_id"],
            "company_id": row["company_id"],
            "category": row["category"],
            "currency": row["currency"],
            "total_amount": total,
            "period_type": row["period_type"],
            "start_date": period[0],
            "end_date": period[1],
            "mode": row["mode"],
            "rollover": row["rollover"],
            "thresholds": list(row["thresholds"]),
            "period_anchor": row["period_anchor"],
            "previous_budget_id": bid,
            "carried_over": carried,
            "policy_key": row["policy_key"],
            "status": row["status"],  # a suspended budget stays suspended
            "history_action": "ROLLED_OVER",
            "history_reason": f"next period after {bid}",
        },
        "system",
    )
    await store.insert_history(
        conn,
        bid,
        "ROLLED_OVER",
        None,
        {"next_budget_id": str(successor["budget_id"]), "total_amount": total},
        "period ended",
        "system",
    )


async def sweep_ended_periods(pool: asyncpg.Pool, every_seconds: float) -> None:
    while True:
        try:
            await roll_over_periods(pool, datetime.now(UTC))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("period_sweep_failed", error=str(exc))
        await asyncio.sleep(every_seconds)


# ---------------------------------------------------------------- company policy


def policy_entry_to_json(entry: PolicyBudget) -> dict[str, Any]:
    return {
        "category": entry.category,
        "currency": entry.currency,
        "total_amount": entry.total_amount,
        "period_type": int(entry.period_type),
        "mode": int(entry.mode),
        "rollover": int(entry.rollover),
        "thresholds": list(entry.thresholds),
    }


def policy_entry_from_json(raw: dict[str, Any]) -> PolicyBudget:
    return PolicyBudget(
        category=raw["category"],
        currency=raw["currency"],
        total_amount=raw["total_amount"],
        period_type=PeriodType(raw["period_type"]),
        mode=Mode(raw["mode"]),
        rollover=Rollover(raw["rollover"]),
        thresholds=tuple(raw["thresholds"]),
    )


async def set_company_policy(
    pool: asyncpg.Pool, company_id: str, entries: list[PolicyBudget], actor: str
) -> tuple[list[PolicyBudget], datetime]:
    cid = parse_uuid(company_id, "company_id")
    valid = [
        PolicyBudget(
            category=e.category,
            currency=e.currency,
            total_amount=e.total_amount,
            period_type=e.period_type,
            mode=e.mode,
            rollover=e.rollover,
            thresholds=validate_thresholds(e.thresholds),
        )
        for e in validate_policy(entries)
    ]
    async with pool.acquire() as conn, conn.transaction():
        row = await store.upsert_company_policy(
            conn, cid, [policy_entry_to_json(e) for e in valid], actor
        )
    log.info("company_policy_set", company_id=str(cid), budgets=len(valid))
    return valid, row["updated_at"]


async def get_company_policy(
    pool: asyncpg.Pool, company_id: str
) -> tuple[list[PolicyBudget], datetime | None]:
    """A company's policy; an empty one when none was set."""
    cid = parse_uuid(company_id, "company_id")
    async with pool.acquire() as conn:
        row = await store.fetch_company_policy(conn, cid)
    if row is None:
        return [], None
    return [policy_entry_from_json(e) for e in row["budgets"]], row["updated_at"]


async def apply_company_policy(
    pool: asyncpg.Pool,
    user_id: str,
    company_id: str,
    wallet_id: str,
    now: datetime | None = None,
) -> list[asyncpg.Record]:
    """Creates a new user's default budgets from their company's policy;
    returns those it created. Idempotent per user and policy entry (a
    unique index): a redelivered UserCreated creates nothing more."""
    uid = parse_uuid(user_id, "user_id")
    cid = parse_uuid(company_id, "company_id")
    wid = parse_uuid(wallet_id, "wallet_id") if wallet_id else None
    entries, _ = await get_company_policy(pool, company_id)
    planned = default_budgets(entries, now or datetime.now(UTC))
    for attempt in (1, 2):
        try:
            created = await _create_policy_budgets(pool, uid, cid, wid, planned)
            break
        except asyncpg.UniqueViolationError:
            # A concurrent apply for the same user won; the retry skips its budgets.
            if attempt == 2:
                raise
    if created:
        log.info("company_policy_applied", user_id=str(uid), budgets=len(created))
    return created


async def _create_policy_budgets(
    pool: asyncpg.Pool,
    uid: uuid.UUID,
    cid: uuid.UUID,
    wid: uuid.UUID | None,
    planned: list[tuple[PolicyBudget, datetime, datetime]],
) -> list[asyncpg.Record]:
    created: list[asyncpg.Record] = []
    async with pool.acquire() as conn, conn.transaction():
        for entry, start, end in planned:
            key = f"{cid}:{entry.key}"
            exists = await conn.fetchval(
                "SELECT 1 FROM budgets WHERE user_id = $1 AND policy_key = $2", uid, key
            )
            if exists:
                continue
            values = {
                "budget_id": uuid.uuid4(),
                "user_id": uid,
                "wallet_id": wid,
                "company_id": cid,
                "category": entry.category,
                "currency": entry.currency,
                "total_amount": entry.total_amount,
                "period_type": int(entry.period_type),
                "start_date": start,
                "end_date": end,
                "mode": int(entry.mode),
                "rollover": int(entry.rollover),
                "thresholds": list(entry.thresholds),
                "policy_key": key,
                "history_reason": "company policy",
            }
            created.append(await store.insert_budget(conn, values, "system"))
    return created


__all__ = ["Mode", "ReserveCommand"]
