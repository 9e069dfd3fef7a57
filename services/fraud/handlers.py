"""Fraud use cases: score (recorded append-only) and list management."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from decimal import Decimal

import asyncpg

from services.common.errors import AlreadyExists, InvalidArgument
from services.common.ids import parse_uuid
from services.common.money import require_positive, to_minor_units, validate_currency
from services.fraud.domain import Decision, ListKind, Reason, Subject, Verdict, decide


@dataclass(frozen=True)
class ScoreCommand:
    transaction_id: str
    user_id: str
    type: str
    amount: int
    currency: str
    device_id: str = ""
    ip: str = ""
    country: str = ""
    has_location: bool = False
    latitude: float = 0.0
    longitude: float = 0.0


def _validate(cmd: ScoreCommand) -> None:
    parse_uuid(cmd.transaction_id, "transaction_id")
    parse_uuid(cmd.user_id, "user_id")
    require_positive(cmd.amount)
    validate_currency(cmd.currency)
    finite = math.isfinite(cmd.latitude) and math.isfinite(cmd.longitude)
    if not finite or (
        cmd.has_location and not (-90 <= cmd.latitude <= 90 and -180 <= cmd.longitude <= 180)
    ):
        raise InvalidArgument("coordinates are out of range", reason="INVALID_COORDINATES")
    if cmd.country and not (
        len(cmd.country) == 2 and cmd.country.isalpha() and cmd.country.isupper()
    ):
        raise InvalidArgument("country must be ISO 3166-1 alpha-2", reason="INVALID_COUNTRY")


async def score(
    pool: asyncpg.Pool, cmd: ScoreCommand, review_amount: Decimal | None = None
) -> Verdict:
    """Scores a transaction once: scoring it again returns the first verdict."""
    _validate(cmd)
    subjects = {
        Subject.USER: cmd.user_id,
        Subject.DEVICE: cmd.device_id,
        Subject.IP: cmd.ip,
        Subject.COUNTRY: cmd.country,
    }
    async with pool.acquire() as conn, conn.transaction():
        prior = await conn.fetchrow(
            "SELECT user_id, amount, currency, score, decision, reasons, model_version"
            " FROM decisions WHERE transaction_id = $1",
            parse_uuid(cmd.transaction_id, "transaction_id"),
        )
        if prior is not None:
            if (prior["user_id"], prior["amount"], prior["currency"]) != (
                parse_uuid(cmd.user_id, "user_id"),
                cmd.amount,
                cmd.currency,
            ):
                raise AlreadyExists(
                    "this transaction id was scored with other values",
                    reason="TRANSACTION_ID_REUSED",
                )
            return Verdict(
                score=prior["score"],
                decision=Decision(prior["decision"]),
                reasons=[Reason(**r) for r in prior["reasons"]],
                model_version=prior["model_version"],
            )
        rows = await conn.fetch(
            """
            SELECT list, subject_type, value FROM list_entries
             WHERE (subject_type, value) IN (SELECT * FROM unnest($1::smallint[], $2::text[]))
            """,
            [int(s) for s in subjects],
            list(subjects.values()),
        )
        blocked = {
            (Subject(r["subject_type"]), r["value"]) for r in rows if r["list"] == ListKind.BLOCK
        }
        allowed = {
            (Subject(r["subject_type"]), r["value"]) for r in rows if r["list"] == ListKind.ALLOW
        }
        threshold = to_minor_units(review_amount, cmd.currency) if review_amount else None
        verdict = decide(subjects, blocked, allowed, cmd.amount, threshold)
        await conn.execute(
            """
            INSERT INTO decisions (transaction_id, user_id, type, amount, currency, score, decision,
                                   reasons, features, model_version)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
            ON CONFLICT (transaction_id) DO NOTHING
            """,
            parse_uuid(cmd.transaction_id, "transaction_id"),
            parse_uuid(cmd.user_id, "user_id"),
            cmd.type,
            cmd.amount,
            cmd.currency,
            verdict.score,
            int(verdict.decision),
            [asdict(r) for r in verdict.reasons],
            json.loads(json.dumps(asdict(cmd))),
            verdict.model_version,
        )
    return verdict


async def add_list_entry(
    pool: asyncpg.Pool, kind: ListKind, subject: Subject, value: str, reason: str, actor: str
) -> asyncpg.Record:
    if not value or len(value) > 200:
        raise InvalidArgument("value must be 1 to 200 characters", reason="INVALID_VALUE")
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            """
            INSERT INTO list_entries (list, subject_type, value, reason, created_by)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (list, subject_type, value)
            DO UPDATE SET reason = EXCLUDED.reason, created_by = EXCLUDED.created_by
            RETURNING list, subject_type, value, reason, created_by, created_at
            """,
            int(kind),
            int(subject),
            value,
            reason,
            actor,
        )
    assert row is not None
    return row


async def remove_list_entry(
    pool: asyncpg.Pool, kind: ListKind, subject: Subject, value: str
) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            "DELETE FROM list_entries WHERE list = $1 AND subject_type = $2 AND value = $3",
            int(kind),
            int(subject),
            value,
        )
