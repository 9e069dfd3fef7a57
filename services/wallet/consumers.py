"""The wallet's event consumers: UserCreated, BookingCreated and
BookingCancelled from the user and booking services. Envelope → command →
handler; the rules live in the handlers (onboarding, bookings).

Run by ``python -m services.wallet consume``; ``MONETA_EVENTS_CONSUMERS``
picks which (one Deployment each, or all in one process). The runtime
(queues, retries, parking, inbox) is services/common/consumer.py; the events
are described in docs/events.md.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Literal

import asyncpg
from pydantic import Field, model_validator

from services.common.consumer import (
    Consumer,
    ConsumerRuntime,
    ConsumerSettings,
    Event,
    EventData,
    Inbox,
    QueueNames,
    invalid,
    queue_names,
)
from services.common.errors import InvalidArgument
from services.common.money import to_minor_units, validate_currency
from services.wallet import bookings, onboarding
from services.wallet.config import WalletSettings
from services.wallet.domain import Role
from services.wallet.handlers import CreateUserCommand
from services.wallet.peers import Peers

ROLES = {"user": Role.USER, "manager": Role.MANAGER, "admin": Role.ADMIN}


def _currency(code: str) -> str:
    try:
        return validate_currency(code)
    except InvalidArgument as exc:
        raise invalid(exc.reason, exc.message) from None


def _minor_units(amount: str, currency: str, field: str) -> int:
    """A positive decimal amount in minor units of ``currency``."""
    try:
        minor = to_minor_units(amount, currency)
    except InvalidArgument as exc:
        raise invalid(exc.reason, f"{field}: {exc.message}") from None
    if minor < 0:
        raise invalid("NEGATIVE_AMOUNT", f"{field} must not be negative")
    if minor == 0:
        raise invalid("INVALID_AMOUNT", f"{field} must be greater than zero")
    return minor


class UserCreated(EventData):
    user_id: uuid.UUID
    email: str = Field(max_length=320)
    phone: str | None = Field(default=None, max_length=32)
    username: str | None = Field(default=None, max_length=64)
    full_name: str | None = Field(default=None, max_length=200)
    company_id: uuid.UUID | None = None
    role: Literal["user", "manager", "admin"]
    default_currency: str = "USD"

    @model_validator(mode="after")
    def _known_currency(self) -> UserCreated:
        _currency(self.default_currency)
        return self

    def command(self) -> CreateUserCommand:
        return CreateUserCommand(
            user_id=str(self.user_id),
            email=self.email,
            phone=self.phone or "",
            username=self.username or "",
            full_name=self.full_name or "",
            company_id=str(self.company_id or ""),
            role=int(ROLES[self.role]),
            default_currency=self.default_currency,
        )


class BookingCreated(EventData):
    booking_id: str = Field(min_length=1, max_length=100)
    user_id: uuid.UUID
    company_id: uuid.UUID | None = None
    # A decimal string in major units ("420.50"): never a JSON number.
    amount: str
    currency: str
    category: Literal["FLIGHT", "HOTEL", "CAR", "RAIL", "OTHER"]
    description: str = Field(default="", max_length=500)

    @model_validator(mode="after")
    def _money(self) -> BookingCreated:
        _minor_units(self.amount, _currency(self.currency), "amount")
        return self

    def charge(self) -> bookings.BookingCharge:
        return bookings.BookingCharge(
            booking_id=self.booking_id,
            user_id=str(self.user_id),
            amount=to_minor_units(self.amount, self.currency),
            currency=self.currency,
            category=self.category,
            description=self.description,
        )


class BookingCancelled(EventData):
    booking_id: str = Field(min_length=1, max_length=100)
    user_id: uuid.UUID
    # Absent or null: the whole amount not refunded yet. In the booking's
    # currency, whose decimals the wallet checks when it refunds.
    refund_amount: str | None = None
    reason: str = Field(default="", max_length=500)

    @model_validator(mode="after")
    def _plain_amount(self) -> BookingCancelled:
        if self.refund_amount is not None:
            # The widest precision any currency has: the refund checks the
            # booking's own.
            _minor_units(self.refund_amount, "BTC", "refund_amount")
        return self


def wallet_consumers(
    pool: asyncpg.Pool, peers: Peers, company_credit_limit: Decimal
) -> dict[str, Consumer]:
    """The wallet's consumers by name."""

    async def on_user_created(event: Event[Any], inbox: Inbox) -> None:
        data: UserCreated = event.data
        await onboarding.onboard_user(
            pool, peers, data.command(), company_credit_limit, on_commit=inbox.record
        )

    async def on_booking_created(event: Event[Any], inbox: Inbox) -> None:
        data: BookingCreated = event.data
        # Until the last attempt, a booking of a user whose wallet is not
        # there yet waits (their UserCreated may be on its way); then it fails.
        await bookings.charge_booking(
            pool,
            peers,
            data.charge(),
            wait_for_wallet=not event.final_attempt,
            on_commit=inbox.record,
        )

    async def on_booking_cancelled(event: Event[Any], inbox: Inbox) -> None:
        data: BookingCancelled = event.data
        # Once per cancellation: its event id is the refund's id. A booking
        # not charged yet is NOT_FOUND, so the cancellation is retried.
        await bookings.refund_booking(
            pool,
            peers,
            data.booking_id,
            str(event.event_id),
            data.refund_amount,
            data.reason,
            on_commit=inbox.record,
        )

    consumers = [
        Consumer("user_created", "user.created", "UserCreated", UserCreated, on_user_created),
        Consumer(
            "booking_created", "booking.created", "BookingCreated", BookingCreated,
            on_booking_created,
        ),
        Consumer(
            "booking_cancelled", "booking.cancelled", "BookingCancelled", BookingCancelled,
            on_booking_cancelled,
        ),
    ]  # fmt: skip
    return {c.name: c for c in consumers}


def consumer_queues(settings: WalletSettings, name: str) -> QueueNames:
    return queue_names(_queue_prefix(settings), name, settings.consumer_retry_delays)


def _queue_prefix(settings: WalletSettings) -> str:
    return f"{settings.amqp_exchange}.wallet"


def consumer_runtime(
    settings: WalletSettings, pool: asyncpg.Pool, peers: Peers, names: Sequence[str]
) -> ConsumerRuntime:
    """The runtime for the named consumers, configured from the settings."""
    available = wallet_consumers(pool, peers, settings.company_credit_limit)
    return ConsumerRuntime(
        ConsumerSettings(
            amqp_url=settings.amqp_url,
            exchange=settings.amqp_exchange,
            queue_prefix=_queue_prefix(settings),
            prefetch=settings.consumer_prefetch,
            retry_delays=settings.consumer_retry_delays,
            handler_timeout_seconds=settings.consumer_handler_timeout_seconds,
            delivery_limit=settings.consumer_delivery_limit,
            reconnect_interval_seconds=settings.consumer_reconnect_seconds,
            drain_seconds=settings.shutdown_grace_seconds,
            connection_name="moneta-wallet-consumers",
        ),
        pool,
        [available[name] for name in names],
    )
