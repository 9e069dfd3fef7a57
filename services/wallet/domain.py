"""The wallet's rules: pure, no I/O."""

from __future__ import annotations

import enum
import hashlib
import json
import re
import uuid
from dataclasses import dataclass

from services.common.errors import FailedPrecondition, InvalidArgument

# Ids the wallet derives are UUIDv5 in this namespace: the same business fact
# always maps to the same id, so every retried step is idempotent downstream.
NAMESPACE = uuid.UUID("6f1c2d4e-8a53-4b7e-9d0a-3c5e7f9a1b2d")
# Users with no company are funded by the platform's own funding account.
PLATFORM_COMPANY_ID = uuid.UUID(int=0)

_EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{2,63}$")
_PHONE_RE = re.compile(r"^\+[1-9]\d{6,14}$")
_USERNAME_RE = re.compile(r"^[A-Za-z0-9_.]{3,32}$")
MAX_IDEMPOTENCY_KEY = 200


class Role(enum.IntEnum):
    USER = 1
    MANAGER = 2
    ADMIN = 3


class WalletStatus(enum.IntEnum):
    ACTIVE = 1
    FROZEN = 2
    CLOSED = 3


def wallet_id_for(user_id: uuid.UUID) -> uuid.UUID:
    """One wallet per user, with an id that follows from the user."""
    return uuid.uuid5(NAMESPACE, f"wallet:{user_id}")


def wallet_account_id(wallet_id: uuid.UUID, currency: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"wallet-account:{wallet_id}:{currency}")


def company_funding_account_id(company_id: uuid.UUID | None, currency: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"company-funding:{company_id or PLATFORM_COMPANY_ID}:{currency}")


def initial_funding_transfer_id(wallet_id: uuid.UUID) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"initial-funding:{wallet_id}")


def payment_id(sender_id: uuid.UUID, idempotency_key: str) -> uuid.UUID:
    """A payment's id follows from who asked and their key."""
    return uuid.uuid5(NAMESPACE, f"payment:{sender_id}:{idempotency_key}")


def request_hash(**fields: object) -> str:
    """A fingerprint of what a request asked for, to tell a retry from a
    different request that reuses its idempotency key."""
    canonical = json.dumps(fields, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def validate_idempotency_key(key: str) -> str:
    if not key or len(key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidArgument(
            f"idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} characters",
            reason="INVALID_IDEMPOTENCY_KEY",
        )
    return key


@dataclass(frozen=True)
class UserFields:
    email: str
    phone: str | None
    username: str | None
    full_name: str

    @staticmethod
    def validated(email: str, phone: str, username: str, full_name: str) -> UserFields:
        if not _EMAIL_RE.match(email):
            raise InvalidArgument("email is not a valid address", reason="INVALID_EMAIL")
        if phone and not _PHONE_RE.match(phone):
            raise InvalidArgument(
                "phone must be in E.164 form (+15551234567)", reason="INVALID_PHONE"
            )
        if username and not _USERNAME_RE.match(username):
            raise InvalidArgument(
                "username must be 3 to 32 letters, digits, '_' or '.'", reason="INVALID_USERNAME"
            )
        if len(full_name) > 200:
            raise InvalidArgument("full_name is at most 200 characters", reason="INVALID_FULL_NAME")
        return UserFields(email, phone or None, username or None, full_name)


def ensure_can_send(status: WalletStatus) -> None:
    """Nothing leaves a frozen or closed wallet."""
    if status == WalletStatus.FROZEN:
        raise FailedPrecondition("the wallet is frozen", reason="WALLET_FROZEN")
    if status == WalletStatus.CLOSED:
        raise FailedPrecondition("the wallet is closed", reason="WALLET_CLOSED")


def ensure_can_receive(status: WalletStatus) -> None:
    """Money may still arrive in a frozen wallet, never in a closed one."""
    if status == WalletStatus.CLOSED:
        raise FailedPrecondition(
            "the recipient's wallet is closed", reason="RECIPIENT_WALLET_CLOSED"
        )


def display_name(full_name: str | None, username: str | None, email: str) -> str:
    """How another person appears in someone's history: first name and
    initial, else their username, else their email with the local part
    masked. Never their phone or full email."""
    parts = (full_name or "").split()
    if parts:
        return parts[0] if len(parts) == 1 else f"{parts[0]} {parts[-1][0]}."
    if username:
        return f"@{username}"
    local, _, domain = email.partition("@")
    return f"{local[:1]}•••@{domain}"
