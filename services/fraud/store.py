"""The fraud service's storage: the velocity store in Redis (one Lua script
per scored transaction) and the decisions, review cases, lists, flags and
models in PostgreSQL."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
import redis.exceptions
import structlog

from services.common.db import DbConn
from services.common.group_commit import GroupCommit
from services.common.resp import RespConnection, Script
from services.fraud.domain import (
    History,
    ListHits,
    ListKind,
    Model,
    RecipientKind,
    ReviewStatus,
    Rules,
    Subject,
    Transaction,
    Verdict,
    subjects,
)

log = structlog.get_logger("moneta.fraud")


class HistoryUnavailable(Exception):
    """The velocity store did not answer."""


# One round trip per transaction, atomic: for each window the user's sorted
# set is trimmed, the transaction id added (NX: a retried scoring counts
# once) and counted; the user's recent amounts, devices, countries, last
# location and payees are read and (on the first scoring only) updated; so
# are the recipient's first-paid time and distinct payers. Times are integer
# milliseconds: Lua prints doubles with 14 digits, which a millisecond epoch
# fits exactly.
OBSERVE = Script("""
local now = tonumber(ARGV[2])
local ttl = tonumber(ARGV[13])
local first = 0
local counts = {}
for i = 1, 2 do
  local window = tonumber(ARGV[2 + i])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  first = redis.call('ZADD', KEYS[i], 'NX', now, ARGV[1])
  counts[i] = redis.call('ZCOUNT', KEYS[i], '(' .. (now - window), now)
  redis.call('PEXPIRE', KEYS[i], window + 1000)
end

local keep = tonumber(ARGV[6])
local amounts = redis.call('LRANGE', KEYS[3], 0, keep - 1)
if first == 1 then
  redis.call('LPUSH', KEYS[3], ARGV[5])
  redis.call('LTRIM', KEYS[3], 0, keep - 1)
  redis.call('PEXPIRE', KEYS[3], ttl)
end

local function novelty(key, value)
  local count = redis.call('SCARD', key)
  if value == '' then return {-1, count} end
  local known = redis.call('SISMEMBER', key, value)
  if first == 1 then
    redis.call('SADD', key, value)
    redis.call('PEXPIRE', key, ttl)
  end
  return {known, count}
end
local device = novelty(KEYS[4], ARGV[7])
local country = novelty(KEYS[5], ARGV[8])

local last = redis.call('HMGET', KEYS[6], 'lat', 'lon', 'at')
if first == 1 and ARGV[9] ~= '' then
  redis.call('HSET', KEYS[6], 'lat', ARGV[9], 'lon', ARGV[10], 'at', ARGV[2])
  redis.call('PEXPIRE', KEYS[6], ttl)
end

local payee = novelty(KEYS[7], ARGV[11])
local since = false
local payers = 0
if ARGV[15] ~= '' then
  since = redis.call('GET', KEYS[8])
  if not since then redis.call('SET', KEYS[8], ARGV[2], 'PX', ttl) end
  local window = tonumber(ARGV[14])
  redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', now - window)
  redis.call('ZADD', KEYS[9], now, ARGV[12])
  payers = redis.call('ZCARD', KEYS[9])
  redis.call('PEXPIRE', KEYS[9], window + 1000)
end

return {first, counts[1], counts[2], amounts, device[1], device[2], country[1], country[2],
        last[1], last[2], last[3], payee[1], since, payers}
""")

_REDIS_ERRORS = (redis.exceptions.RedisError, OSError)


def _known(flag: int) -> bool | None:
    return None if flag < 0 else bool(flag)


class VelocityStore:
    """The per-user and per-recipient history in Redis. After a failure it
    is not asked again for ``retry_seconds``: a dead Redis costs one failed
    call a second, not one per transaction."""

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        rules: Rules,
        history_days: int = 180,
        retry_seconds: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._prefix = f"{prefix}fraud:"
        # The client's server and settings, on a pipelined connection of the
        # store's own: the script runs on every Score (see services.common.resp).
        self._redis = RespConnection.like(client)
        self._rules = rules
        self._ttl_ms = history_days * 86_400_000
        self._retry_seconds = retry_seconds
        self._monotonic = monotonic
        self._down_until = 0.0

    def keys(self, tx: Transaction, fan_in: str) -> list[str]:
        user = f"{self._prefix}u:{tx.user_id}:"
        recipient = f"{self._prefix}r:{fan_in or '-'}:"
        r = self._rules
        return [
            f"{user}v:{r.short_window_seconds}",
            f"{user}v:{r.long_window_seconds}",
            f"{user}amounts:{tx.currency}",
            f"{user}devices",
            f"{user}countries",
            f"{user}location",
            f"{user}payees",
            f"{recipient}since",
            f"{recipient}payers:{r.recipient_window_seconds}",
        ]

    async def close(self) -> None:
        await self._redis.close()

    async def observe(self, tx: Transaction) -> History:
        """Records the transaction and answers what was known before it."""
        if self._monotonic() < self._down_until:
            raise HistoryUnavailable("the velocity store failed moments ago")
        r = self._rules
        # Fan-in (many payers into one account) marks mule accounts; shops
        # are paid by many as a matter of course.
        fan_in = tx.recipient_id if tx.recipient_kind == RecipientKind.USER else ""
        lat, lon = tx.location if tx.location is not None else ("", "")
        try:
            raw = await self._redis.run(
                OBSERVE,
                self.keys(tx, fan_in),
                [
                    str(tx.transaction_id), round(tx.at * 1000), r.short_window_seconds * 1000,
                    r.long_window_seconds * 1000, tx.amount, r.typical_amounts_kept,
                    tx.device_id, tx.country, repr(lat) if lat != "" else "",
                    repr(lon) if lon != "" else "", tx.recipient_id, str(tx.user_id),
                    self._ttl_ms, r.recipient_window_seconds * 1000, fan_in,
                ],
            )  # fmt: skip
        except _REDIS_ERRORS as exc:
            self._down_until = self._monotonic() + self._retry_seconds
            raise HistoryUnavailable(str(exc)) from exc
        (_, short, long, amounts, device, devices, country, countries,
         last_lat, last_lon, last_at, payee, since, payers) = raw  # fmt: skip
        return History(
            velocity=(int(short), int(long)),
            recent_amounts=tuple(int(a) for a in amounts),
            device_known=_known(device),
            devices_known=int(devices),
            country_known=_known(country),
            countries_known=int(countries),
            last_location=(float(last_lat), float(last_lon), int(last_at) / 1000)
            if last_at
            else None,
            payee_known=_known(payee),
            recipient_since=int(since) / 1000 if since else None,
            recipient_payers=int(payers) or 1,
        )


# ---------------------------------------------------------------- lists


class ListCache:
    """The block and allow lists and the flagged accounts, held in memory:
    a Score looks them up without a query. ``refresh`` reloads them when
    their version (bumped by a trigger on every change) has moved."""

    def __init__(self) -> None:
        self.version = -1
        self._entries: dict[tuple[Subject, str], set[ListKind]] = {}
        self._flagged: set[str] = set()

    async def refresh(self, conn: DbConn, version: int | None = None) -> bool:
        if version is None:
            version = await conn.fetchval("SELECT version FROM lists_version")
        if version == self.version:
            return False
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            version = await conn.fetchval("SELECT version FROM lists_version")
            rows = await conn.fetch("SELECT list, subject_type, value FROM list_entries")
            flagged = await conn.fetch("SELECT account_id FROM flagged_accounts")
        entries: dict[tuple[Subject, str], set[ListKind]] = {}
        for row in rows:
            entries.setdefault((Subject(row["subject_type"]), row["value"]), set()).add(
                ListKind(row["list"])
            )
        self._entries, self._flagged = entries, {str(r["account_id"]) for r in flagged}
        self.version = version
        log.info("lists_loaded", version=version, entries=len(rows), flagged=len(flagged))
        return True

    def hits(self, tx: Transaction) -> ListHits:
        blocked: list[Subject] = []
        allowed: list[Subject] = []
        for subject, value in subjects(tx).items():
            kinds = self._entries.get((subject, value)) if value else None
            if kinds:
                if ListKind.BLOCK in kinds:
                    blocked.append(subject)
                if ListKind.ALLOW in kinds:
                    allowed.append(subject)
        return ListHits(tuple(blocked), tuple(allowed), tx.recipient_id in self._flagged)


async def versions(conn: DbConn) -> tuple[int, int]:
    """The lists' version and the newest model's id (0: none)."""
    row = await conn.fetchrow(
        "SELECT (SELECT version FROM lists_version) AS lists,"
        " coalesce((SELECT max(id) FROM models), 0) AS model"
    )
    assert row is not None
    return int(row["lists"]), int(row["model"])


async def upsert_list_entry(
    conn: DbConn, kind: ListKind, subject: Subject, value: str, reason: str, actor: str
) -> asyncpg.Record:
    row = await conn.fetchrow(
        """
        INSERT INTO list_entries (list, subject_type, value, reason, created_by)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (list, subject_type, value)
        DO UPDATE SET reason = EXCLUDED.reason, created_by = EXCLUDED.created_by
        RETURNING list, subject_type, value, reason, created_by, created_at
        """,
        int(kind), int(subject), value, reason, actor,
    )  # fmt: skip
    assert row is not None
    return row


async def delete_list_entry(conn: DbConn, kind: ListKind, subject: Subject, value: str) -> None:
    await conn.execute(
        "DELETE FROM list_entries WHERE list = $1 AND subject_type = $2 AND value = $3",
        int(kind), int(subject), value,
    )  # fmt: skip


async def list_entries(
    conn: DbConn,
    kind: ListKind | None,
    subject: Subject | None,
    after: tuple[datetime, int, int, str] | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Entries oldest first, optionally of one list and one subject type."""
    return await conn.fetch(
        """
        SELECT list, subject_type, value, reason, created_by, created_at FROM list_entries
         WHERE ($1::smallint IS NULL OR list = $1)
           AND ($2::smallint IS NULL OR subject_type = $2)
           AND ($3::timestamptz IS NULL
                OR (created_at, list, subject_type, value) > ($3, $4::smallint, $5::smallint, $6))
         ORDER BY created_at, list, subject_type, value
         LIMIT $7
        """,
        int(kind) if kind else None, int(subject) if subject else None,
        *(after or (None, None, None, None)), limit,
    )  # fmt: skip


async def flag_account(conn: DbConn, account_id: uuid.UUID, reason: str, actor: str) -> None:
    async with conn.transaction():
        await conn.execute(
            """
            INSERT INTO flagged_accounts (account_id, reason, flagged_by) VALUES ($1, $2, $3)
            ON CONFLICT (account_id) DO UPDATE
               SET reason = EXCLUDED.reason, flagged_by = EXCLUDED.flagged_by
            """,
            account_id, reason, actor,
        )  # fmt: skip
        await _flag_history(conn, account_id, "FLAG", reason, actor)


async def unflag_account(conn: DbConn, account_id: uuid.UUID, reason: str, actor: str) -> bool:
    async with conn.transaction():
        removed = await conn.fetchval(
            "DELETE FROM flagged_accounts WHERE account_id = $1 RETURNING true", account_id
        )
        if removed:
            await _flag_history(conn, account_id, "UNFLAG", reason, actor)
    return bool(removed)


async def _flag_history(
    conn: DbConn, account_id: uuid.UUID, action: str, reason: str, actor: str
) -> None:
    await conn.execute(
        "INSERT INTO account_flag_history (account_id, action, reason, actor)"
        " VALUES ($1, $2, $3, $4)",
        account_id, action, reason, actor,
    )  # fmt: skip


# ---------------------------------------------------------------- decisions


_DECISION_COLUMNS = """transaction_id, user_id, type, amount, currency, score, decision, reasons,
    features, model_version, recipient_kind, recipient_id, device_id, ip, country, latitude,
    longitude, occurred_at, degraded"""


def _recording(rows: str) -> str:
    """The statement that records decisions: those not recorded before (a
    transaction id already stored is skipped, not overwritten) and a review
    case for each new REVIEW; it answers the transactions recorded now."""
    return f"""
    WITH d AS (
        INSERT INTO decisions ({_DECISION_COLUMNS})
        {rows}
        ON CONFLICT (transaction_id) DO NOTHING
        RETURNING transaction_id, decision
    ), r AS (
        INSERT INTO reviews (transaction_id) SELECT transaction_id FROM d WHERE decision = 2
        RETURNING transaction_id, review_id
    )
    SELECT d.transaction_id, r.review_id FROM d LEFT JOIN r USING (transaction_id)
    """


# One decision: plain parameters, the cheapest for the database and the driver.
_RECORD_ONE = _recording(
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,"
    " to_timestamp($18), $19)"
)
# Many: one array per column, whatever their number (one prepared statement);
# the JSON columns come as text and the time as seconds.
_ARRAY_COLUMNS = (
    _DECISION_COLUMNS.replace("reasons,", "reasons::jsonb,")
    .replace("features,", "features::jsonb,")
    .replace("occurred_at,", "to_timestamp(occurred_at),")
)
_RECORD_MANY = _recording(
    f"""SELECT {_ARRAY_COLUMNS}
          FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::bigint[], $5::text[],
                      $6::float8[], $7::smallint[], $8::text[], $9::text[], $10::text[],
                      $11::smallint[], $12::text[], $13::text[], $14::text[], $15::text[],
                      $16::float8[], $17::float8[], $18::float8[], $19::bool[])
               AS b({_DECISION_COLUMNS})"""
)


async def record_decisions(
    conn: DbConn, decisions: Sequence[tuple[Transaction, Verdict]]
) -> dict[uuid.UUID, uuid.UUID | None]:
    """Stores the decisions (and a review case for each REVIEW) in one
    statement, committed as one. Answers the transactions recorded now, each
    with its review case; a transaction scored before is not among them.
    Each transaction id may appear once."""
    rows = [_decision_row(tx, verdict) for tx, verdict in decisions]
    if len(rows) == 1:
        found = await conn.fetch(_RECORD_ONE, *rows[0])
    else:
        columns = [list(column) for column in zip(*rows, strict=True)]
        for json_column in (7, 8):  # reasons, features: as text, cast in SQL
            columns[json_column] = [_json_text(v) for v in columns[json_column]]
        found = await conn.fetch(_RECORD_MANY, *columns)
    return {row["transaction_id"]: row["review_id"] for row in found}


def _decision_row(tx: Transaction, verdict: Verdict) -> tuple[Any, ...]:
    lat, lon = tx.location if tx.location is not None else (None, None)
    return (
        tx.transaction_id, tx.user_id, tx.type, tx.amount, tx.currency, verdict.score,
        int(verdict.decision),
        [{"code": r.code, "detail": r.detail, "weight": r.weight} for r in verdict.reasons],
        dict(verdict.features),
        verdict.model_version, int(tx.recipient_kind), tx.recipient_id, tx.device_id, tx.ip,
        tx.country, lat, lon, tx.at, verdict.degraded,
    )  # fmt: skip


def _json_text(value: object) -> str:
    return orjson.dumps(value).decode()


async def fetch_decisions(
    conn: DbConn, transaction_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, asyncpg.Record]:
    rows = await conn.fetch(
        """
        SELECT d.transaction_id, d.user_id, d.amount, d.currency, d.score, d.decision, d.reasons,
               d.features, d.model_version, d.degraded, r.review_id
          FROM decisions d LEFT JOIN reviews r USING (transaction_id)
         WHERE d.transaction_id = ANY($1::uuid[])
        """,
        list(transaction_ids),
    )
    return {row["transaction_id"]: row for row in rows}


@dataclass(frozen=True)
class Recorded:
    """A decision recorded: its review case when it opened one; or, when its
    transaction was scored before, the decision stored then (``prior``)."""

    review_id: uuid.UUID | None = None
    prior: asyncpg.Record | None = None


class DecisionRecorder(GroupCommit[tuple[Transaction, Verdict], Recorded]):
    """Records decisions durably, many to a commit (group commit,
    services/common/group_commit.py): under heavy load many Scores share one
    round trip and one WAL flush. Every caller is answered only once its own
    decision is committed, so the answer to a Score is never ahead of its
    record. A second scoring of one transaction waits for the next batch,
    where it finds the first recorded. A caller that gives up does not stop
    its decision from being recorded: it is kept, as the velocity store kept
    the transaction, and a retry answers it."""

    def __init__(self, pool: asyncpg.Pool, max_batch: int = 500) -> None:
        super().__init__(pool, _record_batch, name="fraud_decisions", max_batch=max_batch,
                         key=lambda decision: decision[0].transaction_id,
                         keep_abandoned=True)  # fmt: skip

    async def record(self, tx: Transaction, verdict: Verdict) -> Recorded:
        return await self.submit((tx, verdict))


async def _record_batch(
    conn: DbConn, decisions: Sequence[tuple[Transaction, Verdict]]
) -> list[Recorded]:
    """Records the decisions; one scored before answers with what was stored then."""
    recorded = await record_decisions(conn, decisions)
    again = [tx.transaction_id for tx, _ in decisions if tx.transaction_id not in recorded]
    prior = await fetch_decisions(conn, again) if again else {}
    return [
        Recorded(recorded[tx.transaction_id])
        if tx.transaction_id in recorded
        else Recorded(prior=prior[tx.transaction_id])
        for tx, _ in decisions
    ]


async def report_fraud(conn: DbConn, transaction_id: uuid.UUID, reason: str, actor: str) -> bool:
    """Records fraud found after the fact; False when no such decision."""
    try:
        await conn.execute(
            "INSERT INTO fraud_reports (transaction_id, reason, reported_by) VALUES ($1, $2, $3)"
            " ON CONFLICT (transaction_id) DO NOTHING",
            transaction_id, reason, actor,
        )  # fmt: skip
    except asyncpg.ForeignKeyViolationError:
        return False
    return True


# ---------------------------------------------------------------- reviews

_REVIEW = """
    SELECT r.review_id, r.transaction_id, d.user_id, d.amount, d.currency, d.score, d.reasons,
           r.status, r.marked_fraud, r.resolved_by, r.created_at, r.resolved_at
      FROM {source} r JOIN decisions d USING (transaction_id)
"""


async def fetch_review(
    conn: DbConn, *, review_id: uuid.UUID | None = None, transaction_id: uuid.UUID | None = None
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        _REVIEW.format(source="reviews")
        + " WHERE ($1::uuid IS NULL OR r.review_id = $1)"
        " AND ($2::uuid IS NULL OR r.transaction_id = $2)",
        review_id, transaction_id,
    )  # fmt: skip


async def resolve_review(
    conn: DbConn, review_id: uuid.UUID, status: ReviewStatus, marked_fraud: bool, actor: str
) -> asyncpg.Record | None:
    """Resolves an open (or expired) case; None when it was not."""
    return await conn.fetchrow(
        "WITH u AS (UPDATE reviews SET status = $2, marked_fraud = $3, resolved_by = $4,"
        " resolved_at = now() WHERE review_id = $1 AND status IN (1, 4) RETURNING *)"
        + _REVIEW.format(source="u"),
        review_id, int(status), marked_fraud, actor,
    )  # fmt: skip


async def list_reviews(
    conn: DbConn,
    status: ReviewStatus | None,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Cases oldest first (a queue), optionally of one status."""
    return await conn.fetch(
        _REVIEW.format(source="reviews")
        + """
         WHERE ($1::smallint IS NULL OR r.status = $1)
           AND ($2::timestamptz IS NULL OR (r.created_at, r.review_id) > ($2, $3::uuid))
         ORDER BY r.created_at, r.review_id
         LIMIT $4
        """,
        int(status) if status else None, *(after or (None, None)), limit,
    )  # fmt: skip


async def expire_reviews(conn: DbConn, older_than_seconds: float) -> int:
    """Open cases nobody resolved in time: nothing waits on them any more."""
    result = await conn.execute(
        "UPDATE reviews SET status = 4 WHERE status = 1"
        " AND created_at < now() - make_interval(secs => $1)",
        older_than_seconds,
    )
    return int(result.split()[-1])


# ---------------------------------------------------------------- models


async def insert_model(
    conn: DbConn, model: Model, metrics: Mapping[str, Any], trained_on: str
) -> int:
    model_id = await conn.fetchval(
        "INSERT INTO models (version, kind, parameters, metrics, trained_on)"
        " VALUES ($1, 'logistic_regression', $2, $3, $4) RETURNING id",
        model.version, model.parameters(), dict(metrics), trained_on,
    )  # fmt: skip
    return int(model_id)


async def newest_model(conn: DbConn) -> tuple[int, Model] | None:
    row = await conn.fetchrow("SELECT id, version, parameters FROM models ORDER BY id DESC LIMIT 1")
    if row is None:
        return None
    return int(row["id"]), Model.from_parameters(row["version"], row["parameters"])


async def labelled_history(conn: DbConn, maturity_days: float) -> list[asyncpg.Record]:
    """Decisions with a label: 1 for fraud (a case marked fraud, or reported
    after the fact); 0 for a case approved (an analyst, or the payer's PIN)
    and for an ALLOW older than the maturity window with no report since.
    Blocked and still-open transactions have no label: nobody saw what
    they would have become; nor have decisions made without the velocity
    store, whose features were never known."""
    return await conn.fetch(
        """
        SELECT d.transaction_id, d.user_id, d.features,
               CASE WHEN f.transaction_id IS NOT NULL OR r.marked_fraud THEN 1
                    WHEN r.status = 2 THEN 0
                    ELSE 0 END AS label
          FROM decisions d
          LEFT JOIN reviews r USING (transaction_id)
          LEFT JOIN fraud_reports f USING (transaction_id)
         WHERE NOT d.degraded  -- its velocity features were never known
           AND (f.transaction_id IS NOT NULL OR r.marked_fraud OR r.status = 2
                OR (d.decision = 1 AND r.review_id IS NULL
                    AND d.created_at < now() - make_interval(secs => $1)))
        """,
        maturity_days * 86_400.0,
    )
