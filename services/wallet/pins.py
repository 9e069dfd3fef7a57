"""Wallet PINs: 4 to 6 digits, kept as argon2id hashes. Five wrong tries
lock step-up confirmation for 15 minutes."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import VerificationError, VerifyMismatchError

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.common.ids import parse_uuid

MAX_TRIES = 5
LOCKOUT = timedelta(minutes=15)
_PIN_RE = re.compile(r"^[0-9]{4,6}$")
# argon2id with the library's defaults (RFC 9106 low-memory profile).
_hasher = PasswordHasher()


def validate_pin(pin: str) -> str:
    if not _PIN_RE.match(pin):
        raise InvalidArgument("a PIN is 4 to 6 digits", reason="INVALID_PIN_FORMAT")
    return pin


async def _hash(pin: str) -> str:
    # Memory-hard on purpose: off the event loop.
    return await asyncio.to_thread(_hasher.hash, pin)


async def _matches(pin_hash: str, pin: str) -> bool:
    try:
        return await asyncio.to_thread(_hasher.verify, pin_hash, pin)
    except (VerifyMismatchError, VerificationError):
        return False


async def set_pin(pool: asyncpg.Pool, user_id: str, pin: str, current_pin: str) -> None:
    """Sets the PIN, or changes it when the current one is given right."""
    uid = parse_uuid(user_id, "user_id")
    validate_pin(pin)
    async with pool.acquire() as conn:
        exists = await conn.fetchval("SELECT 1 FROM users WHERE user_id = $1", uid)
        if not exists:
            raise NotFound("no such user", reason="USER_NOT_FOUND")
        has_pin = await conn.fetchval("SELECT 1 FROM wallet_pins WHERE user_id = $1", uid)
    if has_pin:
        if not current_pin:
            raise InvalidArgument(
                "changing a PIN needs the current one", reason="CURRENT_PIN_REQUIRED"
            )
        await verify_pin(pool, user_id, current_pin)
    pin_hash = await _hash(pin)
    async with pool.acquire() as conn:
        if has_pin:
            await conn.execute(
                """
                UPDATE wallet_pins SET pin_hash = $2, failed_tries = 0, locked_until = NULL,
                                       updated_at = now()
                 WHERE user_id = $1
                """,
                uid,
                pin_hash,
            )
            return
        # A first PIN only where there is none yet: one set concurrently
        # (between the look above and now) is not overwritten without it.
        inserted = await conn.fetchval(
            "INSERT INTO wallet_pins (user_id, pin_hash) VALUES ($1, $2)"
            " ON CONFLICT (user_id) DO NOTHING RETURNING true",
            uid,
            pin_hash,
        )
    if not inserted:
        raise InvalidArgument("changing a PIN needs the current one", reason="CURRENT_PIN_REQUIRED")


async def verify_pin(pool: asyncpg.Pool, user_id: str, pin: str) -> None:
    """Passes for the right PIN. Each try is counted before the (slow) hash
    is checked, atomically, so concurrent tries cannot all slip in before the
    lockout: at most five wrong PINs per fifteen minutes, however they come."""
    uid = parse_uuid(user_id, "user_id")
    now = datetime.now(UTC)
    async with pool.acquire() as conn:
        counted = await conn.fetchrow(
            """
            UPDATE wallet_pins SET failed_tries = failed_tries + 1, updated_at = now()
             WHERE user_id = $1 AND (locked_until IS NULL OR locked_until <= $2)
               AND failed_tries < $3
            RETURNING pin_hash
            """,
            uid,
            now,
            MAX_TRIES,
        )
        if counted is None:
            row = await conn.fetchrow(
                "SELECT failed_tries, locked_until FROM wallet_pins WHERE user_id = $1", uid
            )
            if row is None:
                raise FailedPrecondition("no PIN is set", reason="PIN_NOT_SET")
            if row["locked_until"] is None or row["locked_until"] <= now:
                # Five tries are in flight or spent: lock now.
                await conn.execute(
                    "UPDATE wallet_pins SET locked_until = $2, failed_tries = 0 WHERE user_id = $1",
                    uid,
                    now + LOCKOUT,
                )
            locked_until = await conn.fetchval(
                "SELECT locked_until FROM wallet_pins WHERE user_id = $1", uid
            )
            raise FailedPrecondition(
                "too many wrong PINs; try again later",
                reason="PIN_LOCKED",
                details={"locked_until": locked_until.isoformat()},
            )
    if await _matches(counted["pin_hash"], pin):
        await _reset(pool, uid)
        return
    raise PermissionDenied("the PIN is wrong", reason="PIN_INCORRECT")


async def _reset(pool: asyncpg.Pool, uid: uuid.UUID) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE wallet_pins SET failed_tries = 0, locked_until = NULL WHERE user_id = $1", uid
        )
