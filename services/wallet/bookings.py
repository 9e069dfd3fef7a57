"""Bookings: the wallet pays for a booking and refunds its cancellations.

The booking and user services drive these through events (the events
issue's consumers call ``charge_booking`` and ``refund_booking``). A booking
is charged once per booking id: its budget spend is reserved and committed
under the booking's category and the money moves from the user's wallet to
the booking clearing account. A refusal (funds, budget, a frozen wallet)
moves nothing and announces ``BookingPaymentFailed``. A cancellation
reverses the booking's ledger transfer in full or in part (never more than
was paid, over all cancellations), gives the budget spend back and announces
``BookingRefunded``.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import structlog

from moneta.ledger.v1 import ledger_pb2
from services.common import outbox
from services.common.db import DbConn
from services.common.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MonetaError,
    NotFound,
)
from services.common.ids import parse_uuid
from services.common.money import (
    require_positive,
    to_major_units,
    to_minor_units,
    validate_currency,
)
from services.wallet import history, store
from services.wallet.domain import NAMESPACE, WalletStatus, ensure_can_send
from services.wallet.handlers import ensure_wallet_account
from services.wallet.peers import Peers

log = structlog.get_logger("moneta.wallet.bookings")

CATEGORIES = frozenset({"FLIGHT", "HOTEL", "CAR", "RAIL", "OTHER"})
_OK = (ledger_pb2.TransferResult.OK, ledger_pb2.TransferResult.EXISTS)

# Runs in the transaction that completes an effect (a consumer records its
# inbox there).
OnCommit = Callable[[DbConn], Awaitable[None]]


def booking_transfer_id(booking_id: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"booking:{booking_id}")


def refund_transfer_id(refund_id: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"booking-refund:{refund_id}")


def clearing_account_id(currency: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"booking-clearing:{currency}")


@dataclass(frozen=True)
class BookingCharge:
    booking_id: str
    user_id: str
    amount: int
    currency: str
    category: str
    description: str = ""


@dataclass(frozen=True)
class BookingOutcome:
    booking_id: str
    status: str  # CHARGED or FAILED
    reason: str = ""


def _validate(charge: BookingCharge) -> None:
    if not charge.booking_id or len(charge.booking_id) > 100:
        raise InvalidArgument("booking_id must be 1 to 100 characters", reason="INVALID_BOOKING_ID")
    parse_uuid(charge.user_id, "user_id")
    require_positive(charge.amount)
    validate_currency(charge.currency)
    if charge.category not in CATEGORIES:
        raise InvalidArgument("unknown booking category", reason="UNKNOWN_CATEGORY")


async def charge_booking(
    pool: asyncpg.Pool,
    peers: Peers,
    charge: BookingCharge,
    *,
    wait_for_wallet: bool = False,
    on_commit: OnCommit | None = None,
) -> BookingOutcome:
    """Charges a booking once. A second call for the same booking id answers
    the first outcome; a refusal is final and announced. With
    ``wait_for_wallet``, a user without a wallet yet (their UserCreated may
    still be on its way) is NOT_FOUND instead of a refusal, so that the
    caller can try again later."""
    _validate(charge)
    user_id = uuid.UUID(charge.user_id)
    async with pool.acquire() as conn:
        prior = await conn.fetchrow(
            "SELECT status, failure_reason FROM bookings WHERE booking_id = $1", charge.booking_id
        )
        if prior is not None and prior["status"] != "PROCESSING":
            return BookingOutcome(charge.booking_id, prior["status"], prior["failure_reason"] or "")
        wallet = await store.fetch_wallet(conn, user_id=user_id)
        if wallet is None and wait_for_wallet:
            raise NotFound("the user has no wallet yet", reason="WALLET_NOT_FOUND")
        await conn.execute(
            """
            INSERT INTO bookings (booking_id, user_id, amount, currency, category, description,
                                  transfer_id, status)
            VALUES ($1, $2, $3, $4, $5, $6, $7, 'PROCESSING') ON CONFLICT DO NOTHING
            """,
            charge.booking_id, user_id, charge.amount, charge.currency, charge.category,
            charge.description[:500], booking_transfer_id(charge.booking_id),
        )  # fmt: skip
    if wallet is None:
        return await _refuse(pool, charge, "WALLET_NOT_FOUND", None, on_commit=on_commit)
    transfer_id = booking_transfer_id(charge.booking_id)
    reservation_id: str | None = None
    try:
        if await peers.lookup_transfer(transfer_id) is None:
            ensure_can_send(WalletStatus(wallet["status"]))
            reservation = await peers.reserve(
                user_id, charge.amount, charge.currency, charge.category,
                f"booking:{charge.booking_id}",
            )  # fmt: skip
            reservation_id = reservation.reservation_id
            account = await ensure_wallet_account(pool, peers, wallet, charge.currency)
            clearing = clearing_account_id(charge.currency)
            await peers.create_accounts(
                [ledger_pb2.Account(id=str(clearing), currency=charge.currency,
                                    type=ledger_pb2.ACCOUNT_TYPE_BOOKING_CLEARING)],
                keep_existing=True,
            )  # fmt: skip
            result = await peers.create_transfer(
                ledger_pb2.Transfer(
                    id=str(transfer_id), debit_account_id=str(account),
                    credit_account_id=str(clearing), amount=charge.amount,
                    currency=charge.currency, code="BOOKING",
                    metadata={"booking_id": charge.booking_id},
                )
            )  # fmt: skip
            if result.code == ledger_pb2.TransferResult.INSUFFICIENT_FUNDS:
                raise FailedPrecondition("insufficient funds", reason="INSUFFICIENT_FUNDS")
            if result.code not in _OK:
                raise Internal("the ledger refused the booking: "
                               + ledger_pb2.TransferResult.Code.Name(result.code),
                               reason="LEDGER_REFUSED")  # fmt: skip
        else:
            reservation = await peers.reserve(
                user_id, charge.amount, charge.currency, charge.category,
                f"booking:{charge.booking_id}",
            )  # fmt: skip
            reservation_id = reservation.reservation_id
    except FailedPrecondition as refusal:
        return await _refuse(pool, charge, refusal.reason, reservation_id, peers, on_commit)
    try:
        await peers.commit(reservation_id)
    except FailedPrecondition as exc:  # the money has moved: that is final
        log.error("booking_budget_commit_failed", booking_id=charge.booking_id, reason=exc.reason)
    account = await ensure_wallet_account(pool, peers, wallet, charge.currency)
    await peers.cache.invalidate([account])
    balance = (await peers.balances([account]))[str(account)]
    async with pool.acquire() as conn, conn.transaction():
        await history.record(
            conn,
            history.Movement(
                wallet_id=wallet["wallet_id"], ledger_transfer_id=transfer_id, type="BOOKING",
                amount=-charge.amount, currency=charge.currency, status="COMPLETED",
                counterparty=charge.category.title(), description=charge.description,
                reference_id=charge.booking_id, balance_after=balance.posted,
            ),
        )  # fmt: skip
        await conn.execute(
            "UPDATE bookings SET status = 'CHARGED', wallet_id = $2, reservation_id = $3,"
            " updated_at = now() WHERE booking_id = $1 AND status = 'PROCESSING'",
            charge.booking_id,
            wallet["wallet_id"],
            uuid.UUID(reservation_id) if reservation_id else None,
        )
        if on_commit is not None:
            await on_commit(conn)
    log.info("booking_charged", booking_id=charge.booking_id, amount=charge.amount)
    return BookingOutcome(charge.booking_id, "CHARGED")


async def _refuse(
    pool: asyncpg.Pool,
    charge: BookingCharge,
    reason: str,
    reservation_id: str | None,
    peers: Peers | None = None,
    on_commit: OnCommit | None = None,
) -> BookingOutcome:
    if reservation_id is not None and peers is not None:
        try:
            await peers.release(reservation_id)
        except MonetaError as exc:  # the reservation's ttl frees it anyway
            log.warning("booking_release_failed", booking_id=charge.booking_id, reason=exc.reason)
    async with pool.acquire() as conn, conn.transaction():
        changed = await conn.fetchval(
            "UPDATE bookings SET status = 'FAILED', failure_reason = $2, updated_at = now()"
            " WHERE booking_id = $1 AND status = 'PROCESSING' RETURNING booking_id",
            charge.booking_id,
            reason,
        )
        if changed is not None:
            await outbox.add_event(
                conn,
                event_id=uuid.uuid5(NAMESPACE, f"booking-payment-failed:{charge.booking_id}"),
                event_type="BookingPaymentFailed",
                routing_key="booking.payment_failed",
                aggregate_id=charge.booking_id,
                data={"booking_id": charge.booking_id, "user_id": charge.user_id, "reason": reason},
            )
        if on_commit is not None:
            await on_commit(conn)
    log.info("booking_refused", booking_id=charge.booking_id, reason=reason)
    return BookingOutcome(charge.booking_id, "FAILED", reason)


async def refund_booking(
    pool: asyncpg.Pool, peers: Peers, booking_id: str, refund_id: str,
    amount: int | str | None, reason: str = "", on_commit: OnCommit | None = None,
) -> int:  # fmt: skip
    """Refunds a charged booking: ``amount`` minor units (or a decimal
    string in the booking's currency), or all that is not refunded yet when
    None. Once per ``refund_id`` (the cancellation's own
    id); never more than was paid over all refunds. Returns the amount
    refunded. A booking not charged yet is NOT_FOUND, so that a
    cancellation arriving first can be retried; a booking whose payment
    failed has nothing to refund (BOOKING_NOT_CHARGED)."""
    if not refund_id or len(refund_id) > 200:
        raise InvalidArgument("refund_id must be 1 to 200 characters", reason="INVALID_REFUND_ID")
    async with pool.acquire() as conn:
        booking = await conn.fetchrow("SELECT * FROM bookings WHERE booking_id = $1", booking_id)
    if booking is not None and booking["status"] == "FAILED":
        raise FailedPrecondition(
            "the booking's payment failed: nothing was paid", reason="BOOKING_NOT_CHARGED"
        )
    if booking is None or booking["status"] != "CHARGED":
        raise NotFound("no charged booking with this id", reason="BOOKING_NOT_FOUND")
    refund_transfer = refund_transfer_id(refund_id)
    done = await peers.lookup_transfer(refund_transfer)
    if done is None:
        remaining = booking["amount"] - booking["refunded"]
        if isinstance(amount, str):
            amount = to_minor_units(amount, booking["currency"])
        wanted = remaining if amount is None else require_positive(amount)
        if wanted == 0:
            raise FailedPrecondition("the booking is fully refunded", reason="ALREADY_REFUNDED")
        if wanted > remaining:
            raise FailedPrecondition(
                "a refund cannot exceed what was paid", reason="REFUND_EXCEEDS_PAID",
                details={"refundable": to_major_units(remaining, booking["currency"])},
            )  # fmt: skip
        result = await peers.create_transfer(
            ledger_pb2.Transfer(
                id=str(refund_transfer), type=ledger_pb2.TRANSFER_TYPE_REVERSAL,
                reverses_id=str(booking["transfer_id"]), amount=wanted, code="REFUND",
                metadata={"booking_id": booking_id},
            )
        )  # fmt: skip
        if result.code == ledger_pb2.TransferResult.ALREADY_REVERSED:
            raise FailedPrecondition("a refund cannot exceed what was paid",
                                     reason="REFUND_EXCEEDS_PAID")  # fmt: skip
        if result.code not in _OK:
            raise Internal("the ledger refused the refund: "
                           + ledger_pb2.TransferResult.Code.Name(result.code),
                           reason="LEDGER_REFUSED")  # fmt: skip
        refunded = result.transfer.amount
    else:
        refunded = done.amount
    if booking["reservation_id"] is not None:
        try:
            await peers.refund_spend(
                str(booking["reservation_id"]), refunded, booking["currency"], f"refund:{refund_id}"
            )
        except FailedPrecondition as exc:
            log.error("booking_budget_refund_failed", booking_id=booking_id, reason=exc.reason)
    async with pool.acquire() as conn:
        accounts = await store.wallet_accounts(conn, booking["wallet_id"])
    ledger_account = accounts[booking["currency"]]
    await peers.cache.invalidate([ledger_account])
    account = (await peers.balances([ledger_account]))[str(ledger_account)]
    async with pool.acquire() as conn, conn.transaction():
        first = await conn.fetchval(
            "INSERT INTO booking_refunds (refund_id, booking_id, amount) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING RETURNING refund_id",
            refund_id,
            booking_id,
            refunded,
        )
        if first is not None:
            await conn.execute(
                "UPDATE bookings SET refunded = refunded + $2, updated_at = now()"
                " WHERE booking_id = $1",
                booking_id,
                refunded,
            )
            await history.record(
                conn,
                history.Movement(
                    wallet_id=booking["wallet_id"], ledger_transfer_id=refund_transfer,
                    type="REFUND", amount=refunded, currency=booking["currency"],
                    status="COMPLETED", counterparty=booking["category"].title(),
                    description=reason or f"Refund of booking {booking_id}",
                    reference_id=booking_id, balance_after=account.posted,
                ),
            )  # fmt: skip
            await outbox.add_event(
                conn,
                event_id=uuid.uuid5(NAMESPACE, f"booking-refunded:{refund_id}"),
                event_type="BookingRefunded",
                routing_key="booking.refunded",
                aggregate_id=booking_id,
                data={
                    "booking_id": booking_id,
                    "user_id": str(booking["user_id"]),
                    "refund_amount": to_major_units(refunded, booking["currency"]),
                    "currency": booking["currency"],
                    "txn_id": str(history.txn_id(refund_transfer, booking["wallet_id"])),
                },
            )
        if on_commit is not None:
            await on_commit(conn)
    log.info("booking_refunded", booking_id=booking_id, amount=refunded)
    return int(refunded)
