"""Decisions are recorded many to a commit (group commit), on the real
fraud database: Scores that arrive together are all recorded, each once,
each answered only after its own commit; a decision the database refuses
fails its own caller only; a lost connection fails its batch, and the next
batch is recorded."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from services.common.db import create_pool
from services.common.errors import Unavailable
from services.fraud.domain import DEFAULT_RULES, Decision, Transaction, Verdict
from services.fraud.handlers import FraudService
from services.fraud.store import DecisionRecorder, VelocityStore
from tests import conftest
from tests.integration import test_fraud_scoring as scoring
from tests.integration.test_fraud_scoring import NOW, Clock, transaction
from tests.tcp_proxy import TcpProxy

# The scoring tests' fixtures: the run's migrated fraud database and its Redis.
fraud_pool = scoring.fraud_pool
redis = scoring.redis


def service_on(pool: asyncpg.Pool, client: aioredis.Redis, prefix: str) -> FraudService:
    return FraudService(pool, VelocityStore(client, prefix, DEFAULT_RULES), DEFAULT_RULES, Clock())


@pytest.fixture
def service(
    fraud_pool: asyncpg.Pool, redis: aioredis.Redis, test_run: conftest.TestRun
) -> FraudService:
    return service_on(fraud_pool, redis, test_run.redis_prefix)


def decision(score: float = 10.0) -> tuple[Transaction, Verdict]:
    tx = Transaction(uuid.uuid4(), uuid.uuid4(), "P2P_OUT", 2_500, "USD", NOW)
    return tx, Verdict(score, Decision.ALLOW)


async def stored(pool: asyncpg.Pool, *transaction_ids: uuid.UUID | str) -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM decisions WHERE transaction_id = ANY($1::uuid[])",
            [uuid.UUID(str(t)) for t in transaction_ids],
        )
    )


def batches() -> tuple[float, float]:
    """Commits made by every recorder so far, and the decisions in them."""
    labels = {"writer": "fraud_decisions"}
    count = REGISTRY.get_sample_value("moneta_group_commit_batch_size_count", labels) or 0.0
    total = REGISTRY.get_sample_value("moneta_group_commit_batch_size_sum", labels) or 0.0
    return count, total


async def test_concurrent_scores_are_all_recorded_once_each(service: FraudService) -> None:
    commands = [transaction() for _ in range(40)]

    verdicts = await asyncio.gather(*(service.score(cmd) for cmd in commands))

    assert all(v.decision == Decision.ALLOW for v in verdicts)
    assert await stored(service.pool, *(cmd.transaction_id for cmd in commands)) == 40


async def test_decisions_recorded_together_share_one_commit(fraud_pool: asyncpg.Pool) -> None:
    recorder = DecisionRecorder(fraud_pool)
    decisions = [decision() for _ in range(40)]
    commits_before, recorded_before = batches()

    answers = await asyncio.gather(*(recorder.record(tx, v) for tx, v in decisions))

    commits, recorded = batches()
    assert (commits - commits_before, recorded - recorded_before) == (1, 40)
    assert all(a.prior is None and a.review_id is None for a in answers)
    assert await stored(fraud_pool, *(tx.transaction_id for tx, _ in decisions)) == 40


async def test_a_batch_holds_at_most_its_limit(fraud_pool: asyncpg.Pool) -> None:
    recorder = DecisionRecorder(fraud_pool, max_batch=8)
    decisions = [decision() for _ in range(20)]
    commits_before, _ = batches()

    await asyncio.gather(*(recorder.record(tx, v) for tx, v in decisions))

    assert batches()[0] - commits_before == 3
    assert await stored(fraud_pool, *(tx.transaction_id for tx, _ in decisions)) == 20


async def test_a_transaction_scored_several_times_at_once_is_recorded_once_and_answered_alike(
    service: FraudService,
) -> None:
    cmd = transaction(amount=2_000_000)  # a REVIEW: one case, whichever answer opened it

    verdicts = await asyncio.gather(*(service.score(cmd) for _ in range(3)))

    assert verdicts[0].review_id and all(v == verdicts[0] for v in verdicts)
    assert await stored(service.pool, cmd.transaction_id) == 1
    cases = await service.pool.fetchval(
        "SELECT count(*) FROM reviews WHERE transaction_id = $1", uuid.UUID(cmd.transaction_id)
    )
    assert cases == 1


async def test_a_decision_the_database_refuses_fails_its_own_caller_only(
    fraud_pool: asyncpg.Pool,
) -> None:
    recorder = DecisionRecorder(fraud_pool)
    good = [decision() for _ in range(5)]
    bad = decision(score=150.0)  # outside the CHECK on score

    answers = await asyncio.gather(
        *(recorder.record(tx, v) for tx, v in [*good[:2], bad, *good[2:]]),
        return_exceptions=True,
    )

    assert isinstance(answers[2], asyncpg.CheckViolationError)
    assert not any(isinstance(a, BaseException) for a in answers[:2] + answers[3:])
    assert await stored(fraud_pool, *(tx.transaction_id for tx, _ in good)) == 5
    assert await stored(fraud_pool, bad[0].transaction_id) == 0


async def test_a_transaction_id_reused_with_other_values_at_once_is_refused_to_one_of_them(
    service: FraudService,
) -> None:
    first = transaction()
    other = replace(first, amount=first.amount + 1)

    answers = await asyncio.gather(service.score(first), service.score(other),
                                   return_exceptions=True)  # fmt: skip

    refused = [getattr(a, "reason", None) == "TRANSACTION_ID_REUSED" for a in answers]
    assert sorted(refused) == [False, True], answers
    recorded = await service.pool.fetchval(
        "SELECT amount FROM decisions WHERE transaction_id = $1", uuid.UUID(first.transaction_id)
    )
    assert recorded == (other if refused[0] else first).amount


async def test_a_lost_database_fails_the_batch_and_the_next_batch_is_recorded(
    fraud_pool: asyncpg.Pool, redis: aioredis.Redis, test_run: conftest.TestRun
) -> None:
    url = test_run.database_url("fraud")
    parts = urlsplit(url)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    pool = await create_pool(proxy.url(url), 1, 2)
    try:
        service = service_on(pool, redis, test_run.redis_prefix)
        await service.refresh()
        proxy.go_dark()
        lost = [transaction() for _ in range(3)]

        answers = await asyncio.gather(*(service.score(c) for c in lost), return_exceptions=True)

        assert all(
            isinstance(a, Unavailable) and a.reason == "FRAUD_STORE_UNAVAILABLE" for a in answers
        ), answers
        proxy.restore()
        retried = await asyncio.gather(*(service.score(c) for c in lost))
        assert all(v.decision == Decision.ALLOW for v in retried)
        assert await stored(fraud_pool, *(c.transaction_id for c in lost)) == 3
    finally:
        await pool.close()
        await proxy.stop()


async def test_a_caller_that_gives_up_still_has_its_decision_recorded(
    fraud_pool: asyncpg.Pool,
) -> None:
    recorder = DecisionRecorder(fraud_pool)
    (abandoned, verdict), later = decision(), decision()
    recording = asyncio.create_task(recorder.record(abandoned, verdict))
    await asyncio.sleep(0)  # its decision is queued
    recording.cancel()

    await recorder.record(*later)  # batches commit in order: the abandoned one is in by now

    assert recording.cancelled()
    assert await stored(fraud_pool, abandoned.transaction_id) == 1
