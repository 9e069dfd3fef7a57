"""Fraud use cases: scoring (recorded append-only, with a review case for
every REVIEW), the review queue, reported fraud, flagged recipients and the
block and allow lists."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import replace

import asyncpg
import structlog
from prometheus_client import Counter, Gauge

from services.common import paging
from services.common.db import DbConn
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from services.common.ids import parse_uuid
from services.fraud import store
from services.fraud.domain import (
    FEATURES,
    Decision,
    ListKind,
    Model,
    Reason,
    ReviewDecision,
    ReviewStatus,
    Rules,
    ScoreCommand,
    Subject,
    Verdict,
    assess,
    read_transaction,
)
from services.fraud.store import DecisionRecorder, HistoryUnavailable, ListCache, VelocityStore

__all__ = ["FraudService", "ScoreCommand"]

log = structlog.get_logger("moneta.fraud")

DECISIONS = Counter("moneta_fraud_decisions_total", "Transactions scored, by decision.",
                    ["decision"])  # fmt: skip
RULES_FIRED = Counter("moneta_fraud_rules_fired_total", "Reasons given, by rule.", ["rule"])
DEGRADED = Counter(
    "moneta_fraud_degraded_decisions_total",
    "Decisions made without the velocity store (Redis): its rules were unknown.",
)
MODEL_LOADED = Gauge("moneta_fraud_model_loaded", "1 while a trained model scores; 0: rules only.")

_DECIDED = {d: DECISIONS.labels(d.name) for d in Decision}
# A counter per rule code, looked up once: labels() takes a lock and builds a key.
_FIRED: dict[str, Counter] = {}
_DB_DOWN = (OSError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError)
_MAX_TEXT = 500


class FraudService:
    """The fraud service's use cases over its stores. ``clock`` (seconds
    since the epoch) is the time of a transaction that does not say."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        velocity: VelocityStore,
        rules: Rules,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool = pool
        self.velocity = velocity
        self.rules = rules
        self.clock = clock
        self.lists = ListCache()
        self.recorder = DecisionRecorder(pool)
        self.model: Model | None = None
        self.model_id = 0

    # ---------------------------------------------------------------- what every replica holds

    async def refresh(self) -> None:
        """Reloads the lists when they changed and the model when a newer
        one was stored."""
        async with self.pool.acquire() as conn:
            lists_version, model_id = await store.versions(conn)
            await self.lists.refresh(conn, lists_version)
            if model_id != self.model_id:
                await self._load_newest_model(conn, model_id)
        MODEL_LOADED.set(1 if self.model is not None else 0)

    async def _load_newest_model(self, conn: DbConn, model_id: int) -> None:
        try:
            newest = await store.newest_model(conn)
        except (ValueError, KeyError, TypeError) as exc:
            # A model this code cannot read: the one in hand stays in use.
            log.error("model_unreadable", id=model_id, error=str(exc)[:200])
            self.model_id = model_id
            return
        if newest is None:
            return
        self.model_id, self.model = newest
        unknown = set(self.model.feature_names) - set(FEATURES)
        if unknown:
            log.warning("model_features_unknown", features=sorted(unknown))  # scored as 0
        log.info("model_loaded", version=self.model.version, id=self.model_id)

    async def keep_fresh(self, every_seconds: float) -> None:
        while True:
            await asyncio.sleep(every_seconds)
            try:
                await self.refresh()
            except (*_DB_DOWN, asyncpg.PostgresError) as exc:
                # The lists and the model in hand stay in use meanwhile.
                log.warning("refresh_failed", error=str(exc)[:200])

    async def expire_reviews_forever(self, after_seconds: float, every_seconds: float) -> None:
        while True:
            async with self.pool.acquire() as conn:
                expired = await store.expire_reviews(conn, after_seconds)
            if expired:
                log.info("reviews_expired", count=expired)
            await asyncio.sleep(every_seconds)

    # ---------------------------------------------------------------- scoring

    async def score(self, cmd: ScoreCommand) -> Verdict:
        """Scores a transaction once: scoring it again returns the first
        verdict (and counts it once in velocity)."""
        tx = read_transaction(cmd, self.clock())
        if self.lists.version < 0:
            await self.refresh()
        hits = self.lists.hits(tx)
        try:
            history = await self.velocity.observe(tx)
        except HistoryUnavailable as exc:
            history = None
            DEGRADED.inc()
            log.debug("scored_without_velocity_store", error=str(exc)[:200])
        verdict = assess(tx, history, hits, self.rules, self.model)
        try:
            recorded = await self.recorder.record(tx, verdict)
        except _DB_DOWN as exc:
            raise Unavailable(
                "fraud decisions cannot be recorded now", reason="FRAUD_STORE_UNAVAILABLE"
            ) from exc
        prior, review_id = recorded.prior, recorded.review_id
        if prior is not None:
            if (prior["user_id"], prior["amount"], prior["currency"]) != (
                tx.user_id, tx.amount, tx.currency,
            ):  # fmt: skip
                raise AlreadyExists(
                    "this transaction id was scored with other values",
                    reason="TRANSACTION_ID_REUSED",
                )
            return Verdict(
                score=prior["score"],
                decision=Decision(prior["decision"]),
                reasons=[Reason(**r) for r in prior["reasons"]],
                model_version=prior["model_version"],
                features=prior["features"],
                degraded=prior["degraded"],
                review_id=str(prior["review_id"] or ""),
            )
        _DECIDED[verdict.decision].inc()
        for reason in verdict.reasons:
            fired = _FIRED.get(reason.code)
            if fired is None:
                fired = _FIRED[reason.code] = RULES_FIRED.labels(reason.code)
            fired.inc()
        if review_id is not None:
            log.info("review_opened", transaction_id=str(tx.transaction_id),
                     review_id=str(review_id), score=verdict.score)  # fmt: skip
            return replace(verdict, review_id=str(review_id))
        return verdict

    # ---------------------------------------------------------------- reviews

    async def list_reviews(
        self, status: int, page_size: int, page_token: str
    ) -> tuple[list[asyncpg.Record], str]:
        """Cases oldest first (the queue's order), of one status or all."""
        wanted = _review_status(status) if status else None
        limit = paging.page_size(page_size)
        after = paging.decode_cursor(page_token, uuid.UUID)
        async with self.pool.acquire() as conn:
            rows = await store.list_reviews(conn, wanted, after, limit + 1)
        if len(rows) <= limit:
            return rows, ""
        last = rows[limit - 1]
        return rows[:limit], paging.encode_cursor(last["created_at"], last["review_id"])

    async def resolve_review(
        self, review_id: str, transaction_id: str, decision: int, mark_fraud: bool, actor: str
    ) -> asyncpg.Record:
        """Approves or rejects a case, found by its id or its transaction's.
        Resolving it again the same way answers it as it is."""
        if bool(review_id) == bool(transaction_id):
            raise InvalidArgument(
                "give either review_id or transaction_id", reason="INVALID_REVIEW_REFERENCE"
            )
        try:
            verdict = ReviewDecision(decision)
        except ValueError:
            raise InvalidArgument(
                "decision must be APPROVE or REJECT", reason="INVALID_REVIEW_DECISION"
            ) from None
        if mark_fraud and verdict is ReviewDecision.APPROVE:
            raise InvalidArgument(
                "a case marked fraud cannot be approved", reason="FRAUD_CANNOT_BE_APPROVED"
            )
        wanted = (
            ReviewStatus.APPROVED if verdict is ReviewDecision.APPROVE else ReviewStatus.REJECTED
        )
        async with self.pool.acquire() as conn:
            case = await store.fetch_review(
                conn,
                review_id=parse_uuid(review_id, "review_id") if review_id else None,
                transaction_id=parse_uuid(transaction_id, "transaction_id")
                if transaction_id
                else None,
            )
            if case is None:
                raise NotFound("no such review case", reason="REVIEW_NOT_FOUND")
            if case["status"] in (ReviewStatus.OPEN, ReviewStatus.EXPIRED):
                resolved = await store.resolve_review(
                    conn, case["review_id"], wanted, mark_fraud, actor[:200]
                )
                if resolved is not None:
                    log.info("review_resolved", review_id=str(case["review_id"]),
                             status=wanted.name, marked_fraud=mark_fraud, actor=actor)  # fmt: skip
                    return resolved
                case = await store.fetch_review(conn, review_id=case["review_id"])
                assert case is not None
        if (case["status"], case["marked_fraud"]) == (wanted, mark_fraud):
            return case
        raise FailedPrecondition(
            "the case was already resolved otherwise",
            reason="REVIEW_ALREADY_RESOLVED",
            details={
                "status": ReviewStatus(case["status"]).name,
                "marked_fraud": case["marked_fraud"],
            },
        )

    async def report_fraud(self, transaction_id: str, reason: str, actor: str) -> None:
        """Fraud found after the decision: a label for training. Once per
        transaction; reporting again changes nothing."""
        tid = parse_uuid(transaction_id, "transaction_id")
        _check_text(reason, "reason")
        async with self.pool.acquire() as conn:
            if not await store.report_fraud(conn, tid, reason, actor[:200]):
                raise NotFound("no decision for this transaction", reason="DECISION_NOT_FOUND")
        log.info("fraud_reported", transaction_id=transaction_id, actor=actor)

    # ---------------------------------------------------------------- flagged recipients

    async def flag_account(self, account_id: str, reason: str, actor: str) -> None:
        aid = parse_uuid(account_id, "user_id")
        _check_text(reason, "reason")
        async with self.pool.acquire() as conn:
            await store.flag_account(conn, aid, reason, actor[:200])
            await self.lists.refresh(conn)
        log.info("account_flagged", account_id=account_id, actor=actor)

    async def unflag_account(self, account_id: str, reason: str, actor: str) -> None:
        aid = parse_uuid(account_id, "user_id")
        _check_text(reason, "reason")
        async with self.pool.acquire() as conn:
            if await store.unflag_account(conn, aid, reason, actor[:200]):
                log.info("account_unflagged", account_id=account_id, actor=actor)
            await self.lists.refresh(conn)

    # ---------------------------------------------------------------- block and allow lists

    async def add_list_entry(
        self, kind: ListKind, subject: Subject, value: str, reason: str, actor: str
    ) -> asyncpg.Record:
        if not value or len(value) > 200:
            raise InvalidArgument("value must be 1 to 200 characters", reason="INVALID_VALUE")
        _check_text(reason, "reason")
        async with self.pool.acquire() as conn:
            row = await store.upsert_list_entry(conn, kind, subject, value, reason, actor[:200])
            await self.lists.refresh(conn)
        log.info("list_entry_added", list=kind.name, subject=subject.name, actor=actor)
        return row

    async def remove_list_entry(self, kind: ListKind, subject: Subject, value: str) -> None:
        async with self.pool.acquire() as conn:
            await store.delete_list_entry(conn, kind, subject, value)
            await self.lists.refresh(conn)

    async def list_list_entries(
        self, kind: ListKind | None, subject: Subject | None, page_size: int, page_token: str
    ) -> tuple[list[asyncpg.Record], str]:
        limit = paging.page_size(page_size)
        after = paging.decode_cursor(page_token, _entry_key)
        async with self.pool.acquire() as conn:
            rows = await store.list_entries(
                conn, kind, subject, (after[0], *after[1]) if after else None, limit + 1
            )
        if len(rows) <= limit:
            return rows, ""
        last = rows[limit - 1]
        key = f"{last['list']}:{last['subject_type']}:{last['value']}"
        return rows[:limit], paging.encode_cursor(last["created_at"], key)


def _entry_key(text: str) -> tuple[int, int, str]:
    kind, subject, value = text.split(":", 2)
    return int(kind), int(subject), value


def _review_status(value: int) -> ReviewStatus:
    try:
        return ReviewStatus(value)
    except ValueError:
        raise InvalidArgument("unknown review status", reason="INVALID_REVIEW_STATUS") from None


def _check_text(text: str, field: str) -> None:
    if len(text) > _MAX_TEXT:
        raise InvalidArgument(
            f"{field} is at most {_MAX_TEXT} characters",
            reason="INVALID_REASON",
            details={"field": field},
        )
