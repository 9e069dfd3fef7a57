"""Fraud scoring against the real fraud database and the real Redis of this
test run: block and allow lists decide, each rule fires on what Redis
remembers (with a clock the tests move instead of sleeping), each
transaction is scored once, every decision is kept append-only, malformed
input is refused with a reason, and without Redis the service still answers
by its degraded policy."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from services.common.db import create_pool
from services.common.errors import AlreadyExists, InvalidArgument
from services.common.infra import redis_client
from services.fraud.domain import (
    DEFAULT_RULES,
    RULES_ONLY,
    Decision,
    ListKind,
    RecipientKind,
    Rules,
    ScoreCommand,
    Subject,
    Transaction,
    Verdict,
)
from services.fraud.handlers import FraudService
from services.fraud.store import VelocityStore
from services.fraud.synthetic import MemoryVelocityStore
from tests import conftest
from tests.processes import free_port

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z


@dataclass
class Clock:
    """The service's clock, moved by the tests."""

    now: float = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
async def fraud_pool(test_run: conftest.TestRun) -> AsyncIterator[asyncpg.Pool]:
    # The service's own kind of pool: no reset on release, orjson codecs.
    await (await conftest.service_pool(test_run, "fraud")).close()
    pool = await create_pool(test_run.database_url("fraud"), 1, 20)
    yield pool
    await pool.close()


@pytest.fixture(scope="module")
async def redis(test_run: conftest.TestRun) -> AsyncIterator[aioredis.Redis]:
    client = redis_client(test_run.settings.redis_url)
    yield client
    async for key in client.scan_iter(match=f"{test_run.redis_prefix}fraud:*", count=1000):
        await client.delete(key)
    await client.aclose()


def fraud_service(
    pool: asyncpg.Pool, client: aioredis.Redis, prefix: str, rules: Rules = DEFAULT_RULES
) -> tuple[FraudService, Clock]:
    clock = Clock()
    return FraudService(pool, VelocityStore(client, prefix, rules), rules, clock), clock


@pytest.fixture
def clock_and_service(
    fraud_pool: asyncpg.Pool, redis: aioredis.Redis, test_run: conftest.TestRun
) -> tuple[FraudService, Clock]:
    return fraud_service(fraud_pool, redis, test_run.redis_prefix)


@pytest.fixture
def service(clock_and_service: tuple[FraudService, Clock]) -> FraudService:
    return clock_and_service[0]


@pytest.fixture
def clock(clock_and_service: tuple[FraudService, Clock]) -> Clock:
    return clock_and_service[1]


def transaction(**overrides: Any) -> ScoreCommand:
    """A clean P2P payment of a fresh user on a fresh device."""
    cmd = ScoreCommand(
        transaction_id=str(uuid.uuid4()),
        user_id=str(uuid.uuid4()),
        type="P2P_OUT",
        amount=2_500,
        currency="USD",
        device_id=f"device-{uuid.uuid4()}",
    )
    return replace(cmd, **overrides)


def again(cmd: ScoreCommand, **overrides: Any) -> ScoreCommand:
    """Another payment of the same user."""
    return replace(cmd, transaction_id=str(uuid.uuid4()), **overrides)


async def stored_decision(pool: asyncpg.Pool, transaction_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        "SELECT user_id, type, amount, currency, score, decision, reasons, model_version"
        " FROM decisions WHERE transaction_id = $1",
        uuid.UUID(transaction_id),
    )


def codes(verdict: Verdict) -> list[str]:
    return [r.code for r in verdict.reasons]


def reason(verdict: Verdict, code: str) -> str:
    return next(r.detail for r in verdict.reasons if r.code == code)


# ---------------------------------------------------------------- lists


async def test_clean_transaction_is_allowed_with_score_zero(service: FraudService) -> None:
    verdict = await service.score(transaction())

    assert (verdict.decision, verdict.score, verdict.reasons) == (Decision.ALLOW, 0.0, [])


async def test_without_a_stored_model_the_verdict_says_rules_only(service: FraudService) -> None:
    verdict = await service.score(transaction())

    assert verdict.model_version == RULES_ONLY


async def test_blocklisted_user_is_blocked_with_blocklisted_user(service: FraudService) -> None:
    cmd = transaction()
    await service.add_list_entry(ListKind.BLOCK, Subject.USER, cmd.user_id, "test", "test")

    verdict = await service.score(cmd)

    assert (verdict.decision, verdict.score, codes(verdict)) == (
        Decision.BLOCK,
        100.0,
        ["BLOCKLISTED_USER"],
    )


async def test_blocklisted_device_is_blocked_with_blocklisted_device(
    service: FraudService,
) -> None:
    cmd = transaction()
    await service.add_list_entry(ListKind.BLOCK, Subject.DEVICE, cmd.device_id, "", "")

    verdict = await service.score(cmd)

    assert (verdict.decision, codes(verdict)) == (Decision.BLOCK, ["BLOCKLISTED_DEVICE"])


@pytest.mark.parametrize(
    ("subject", "field", "value"),
    [(Subject.IP, "ip", "203.0.113.7"), (Subject.COUNTRY, "country", "KP")],
    ids=["ip", "country"],
)
async def test_blocklisted_ip_or_country_is_blocked(
    service: FraudService, subject: Subject, field: str, value: str
) -> None:
    # Such entries are shared by every transaction from there: lift it after.
    await service.add_list_entry(ListKind.BLOCK, subject, value, "", "")
    try:
        verdict = await service.score(transaction(**{field: value}))
    finally:
        await service.remove_list_entry(ListKind.BLOCK, subject, value)

    assert (verdict.decision, codes(verdict)) == (Decision.BLOCK, [f"BLOCKLISTED_{subject.name}"])


async def test_block_list_wins_over_allow_list(service: FraudService) -> None:
    cmd = transaction()
    await service.add_list_entry(ListKind.ALLOW, Subject.USER, cmd.user_id, "", "")
    await service.add_list_entry(ListKind.BLOCK, Subject.DEVICE, cmd.device_id, "", "")

    verdict = await service.score(cmd)

    assert (verdict.decision, codes(verdict)) == (Decision.BLOCK, ["BLOCKLISTED_DEVICE"])


async def test_allowlisted_user_skips_the_rules_and_is_recorded(service: FraudService) -> None:
    cmd = transaction()
    await service.add_list_entry(ListKind.ALLOW, Subject.USER, cmd.user_id, "", "")
    for _ in range(6):
        await service.score(again(cmd))

    verdict = await service.score(cmd)

    assert (verdict.decision, verdict.score, codes(verdict)) == (
        Decision.ALLOW,
        0.0,
        ["ALLOWLISTED_USER"],
    )
    row = await stored_decision(service.pool, cmd.transaction_id)
    assert row is not None and [r["code"] for r in row["reasons"]] == ["ALLOWLISTED_USER"]


async def test_a_list_changed_by_another_replica_applies_after_a_refresh(
    service: FraudService, fraud_pool: asyncpg.Pool, redis: aioredis.Redis,
    test_run: conftest.TestRun,
) -> None:  # fmt: skip
    other, _ = fraud_service(fraud_pool, redis, test_run.redis_prefix)
    await other.refresh()
    cmd = transaction()
    await service.add_list_entry(ListKind.BLOCK, Subject.USER, cmd.user_id, "", "")

    await other.refresh()
    verdict = await other.score(cmd)

    assert verdict.decision == Decision.BLOCK


async def test_removing_a_block_lifts_it(service: FraudService) -> None:
    cmd = transaction()
    await service.add_list_entry(ListKind.BLOCK, Subject.USER, cmd.user_id, "", "")
    await service.remove_list_entry(ListKind.BLOCK, Subject.USER, cmd.user_id)

    verdict = await service.score(cmd)

    assert verdict.decision == Decision.ALLOW


async def test_adding_a_list_entry_twice_keeps_one_entry_with_the_latest_reason(
    service: FraudService,
) -> None:
    value = str(uuid.uuid4())
    await service.add_list_entry(ListKind.BLOCK, Subject.USER, value, "first", "a")

    row = await service.add_list_entry(ListKind.BLOCK, Subject.USER, value, "second", "b")

    count = await service.pool.fetchval("SELECT count(*) FROM list_entries WHERE value = $1", value)
    assert (count, row["reason"], row["created_by"]) == (1, "second", "b")


@pytest.mark.parametrize("value", ["", "x" * 201], ids=["empty", "too-long"])
async def test_list_entry_value_outside_1_to_200_characters_is_invalid_value(
    service: FraudService, value: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.add_list_entry(ListKind.BLOCK, Subject.USER, value, "", "")

    assert caught.value.reason == "INVALID_VALUE"


# ---------------------------------------------------------------- velocity


async def test_six_transactions_in_a_minute_trip_velocity(
    service: FraudService, clock: Clock
) -> None:
    first = transaction()
    verdicts = []
    for _ in range(6):
        verdicts.append(await service.score(again(first)))
        clock.now += 9

    assert [("VELOCITY_1M" in codes(v)) for v in verdicts] == [False] * 5 + [True]
    assert reason(verdicts[-1], "VELOCITY_1M") == "6 transactions in 60 s"


async def test_the_same_transaction_scored_twice_counts_once(service: FraudService) -> None:
    cmd = transaction()
    for _ in range(4):
        await service.score(again(cmd))

    await service.score(cmd)
    await service.score(cmd)  # a retry
    sixth = await service.score(again(cmd))

    assert reason(sixth, "VELOCITY_1M") == "6 transactions in 60 s"


async def test_a_retried_scoring_after_a_lost_answer_counts_once_in_redis(
    service: FraudService,
) -> None:
    cmd = transaction()
    parsed = Transaction(uuid.UUID(cmd.transaction_id), uuid.UUID(cmd.user_id), cmd.type,
                         cmd.amount, cmd.currency, NOW)  # fmt: skip

    first = await service.velocity.observe(parsed)
    retried = await service.velocity.observe(parsed)
    after = await service.velocity.observe(replace(parsed, transaction_id=uuid.uuid4()))

    assert first.velocity == retried.velocity == (1, 1)
    assert (after.velocity, after.recent_amounts) == ((2, 2), (2_500,))


async def test_the_window_slides(service: FraudService, clock: Clock) -> None:
    cmd = transaction()
    for _ in range(5):
        await service.score(again(cmd))
        clock.now += 1
    clock.now += 60  # the five are a minute old now

    later = await service.score(again(cmd))

    assert "VELOCITY_1M" not in codes(later)


async def test_twenty_one_in_an_hour_trip_the_long_window(
    service: FraudService, clock: Clock
) -> None:
    cmd = transaction()
    verdicts = []
    for _ in range(21):
        verdicts.append(await service.score(again(cmd)))
        clock.now += 150  # never six in a minute

    assert [("VELOCITY_1H" in codes(v)) for v in verdicts] == [False] * 20 + [True]
    assert reason(verdicts[-1], "VELOCITY_1H") == "21 transactions in 1 h"
    assert not any("VELOCITY_1M" in codes(v) for v in verdicts)


async def test_a_transaction_timestamp_places_it_in_the_window(service: FraudService) -> None:
    cmd = transaction()
    for i in range(5):
        await service.score(again(cmd, timestamp=NOW - 3600 + i))

    now = await service.score(again(cmd))

    assert "VELOCITY_1M" not in codes(now)


# ---------------------------------------------------------------- amounts


async def test_ten_times_the_typical_amount_is_unusual(service: FraudService) -> None:
    cmd = transaction(amount=2_000)
    for amount in (2_000, 2_500, 1_800, 90_000, 2_200):  # one odd large one: the median holds
        await service.score(again(cmd, amount=amount))

    normal = await service.score(again(cmd, amount=19_000))
    unusual = await service.score(again(cmd, amount=25_000))

    assert "UNUSUAL_AMOUNT" not in codes(normal)
    assert reason(unusual, "UNUSUAL_AMOUNT") == (
        "250.00 USD is 10.6x the typical 23.50 (median of the last 6)"
    )


async def test_typical_amounts_are_kept_per_currency(service: FraudService) -> None:
    cmd = transaction(currency="JPY", amount=100_000)
    for _ in range(3):
        await service.score(again(cmd))

    euros = await service.score(again(cmd, currency="EUR", amount=150_000))

    assert reason(euros, "UNUSUAL_AMOUNT").startswith("1500.00 EUR with 0 earlier payments")


async def test_a_new_user_is_unusual_above_the_new_user_amount_only(
    service: FraudService,
) -> None:
    at_limit = await service.score(transaction(amount=100_000))
    above = await service.score(transaction(amount=100_001))

    assert "UNUSUAL_AMOUNT" not in codes(at_limit)
    assert reason(above, "UNUSUAL_AMOUNT") == (
        "1000.01 USD with 0 earlier payments in USD: above 1000 for a user without history"
    )


# ---------------------------------------------------------------- devices, countries, travel


async def test_a_device_never_seen_for_the_user_is_new(service: FraudService) -> None:
    cmd = transaction(device_id="phone-1", country="DE")
    await service.score(cmd)
    known = await service.score(again(cmd))

    new = await service.score(again(cmd, device_id="phone-2"))

    assert "NEW_DEVICE" not in codes(known)
    assert reason(new, "NEW_DEVICE") == "a device never seen for this user (1 known)"


async def test_a_users_first_device_and_country_are_not_new(service: FraudService) -> None:
    verdict = await service.score(transaction(device_id="phone-1", country="DE"))

    assert codes(verdict) == []


async def test_a_country_never_seen_for_the_user_is_new(service: FraudService) -> None:
    cmd = transaction(country="DE")
    await service.score(cmd)

    new = await service.score(again(cmd, country="FR"))

    assert reason(new, "NEW_COUNTRY") == "FR, a country never seen for this user (1 known)"


async def test_berlin_to_new_york_in_an_hour_is_impossible_travel(
    service: FraudService, clock: Clock
) -> None:
    berlin = transaction(has_location=True, latitude=52.52, longitude=13.405)
    await service.score(berlin)
    clock.now += 3600

    new_york = await service.score(again(berlin, latitude=40.7128, longitude=-74.006))

    assert reason(new_york, "IMPOSSIBLE_TRAVEL") == "6,385 km in 60.0 min: 6,385 km/h"


async def test_berlin_to_new_york_in_ten_hours_is_a_flight(
    service: FraudService, clock: Clock
) -> None:
    berlin = transaction(has_location=True, latitude=52.52, longitude=13.405)
    await service.score(berlin)
    clock.now += 10 * 3600

    new_york = await service.score(again(berlin, latitude=40.7128, longitude=-74.006))

    assert "IMPOSSIBLE_TRAVEL" not in codes(new_york)


async def test_a_payment_without_location_does_not_move_the_last_location(
    service: FraudService, clock: Clock
) -> None:
    berlin = transaction(has_location=True, latitude=52.52, longitude=13.405)
    await service.score(berlin)
    clock.now += 60
    await service.score(again(berlin, has_location=False, latitude=0.0, longitude=0.0))
    clock.now += 60

    paris = await service.score(again(berlin, latitude=48.8566, longitude=2.3522))

    assert "IMPOSSIBLE_TRAVEL" in codes(paris)


# ---------------------------------------------------------------- recipients


async def test_paying_a_flagged_recipient_goes_to_review(service: FraudService) -> None:
    mule = str(uuid.uuid4())
    await service.flag_account(mule, "mule ring 7", "analyst-1")

    verdict = await service.score(
        transaction(recipient_kind=int(RecipientKind.USER), recipient_id=mule)
    )

    assert (verdict.decision, codes(verdict)) == (Decision.REVIEW, ["FLAGGED_RECIPIENT"])
    assert verdict.review_id


async def test_an_unflagged_recipient_is_paid_as_any(service: FraudService) -> None:
    mule = str(uuid.uuid4())
    await service.flag_account(mule, "suspect", "analyst-1")
    await service.unflag_account(mule, "cleared", "analyst-2")

    verdict = await service.score(
        transaction(recipient_kind=int(RecipientKind.USER), recipient_id=mule)
    )

    assert verdict.decision == Decision.ALLOW
    history = await service.pool.fetch(
        "SELECT action, reason, actor FROM account_flag_history WHERE account_id = $1 ORDER BY id",
        uuid.UUID(mule),
    )
    assert [tuple(r) for r in history] == [
        ("FLAG", "suspect", "analyst-1"),
        ("UNFLAG", "cleared", "analyst-2"),
    ]


async def test_the_redis_script_answers_what_the_in_memory_simulation_does(
    service: FraudService, clock: Clock
) -> None:
    """The synthetic training set is computed by ``MemoryVelocityStore``:
    it must see what the service sees."""
    user, mule = uuid.uuid4(), str(uuid.uuid4())
    memory = MemoryVelocityStore(service.rules)
    steps = [
        (0, 2_000, "d1", "DE", (52.5, 13.4), mule),
        (5, 2_500, "d1", "DE", None, ""),
        (20, 90_000, "d2", "FR", (48.9, 2.4), mule),
        (30, 2_100, "d2", "FR", None, str(uuid.uuid4())),
        (4000, 1_900, "d1", "DE", (52.5, 13.4), mule),
    ]
    for offset, amount, device, country, location, recipient in steps:
        for payer in (user, uuid.uuid4()):
            tx = Transaction(uuid.uuid4(), payer, "P2P_OUT", amount, "USD", NOW + offset,
                             RecipientKind.USER if recipient else RecipientKind.NONE, recipient,
                             device, "", country, location)  # fmt: skip
            assert await service.velocity.observe(tx) == memory.observe(tx)


# ---------------------------------------------------------------- step-up and degradation


async def test_a_payment_at_the_review_amount_goes_to_review_with_a_case(
    service: FraudService,
) -> None:
    cmd = transaction(amount=1_000_000)

    verdict = await service.score(cmd)

    assert verdict.decision == Decision.REVIEW
    assert "LARGE_AMOUNT" in codes(verdict)
    case = await service.pool.fetchrow(
        "SELECT review_id, status FROM reviews WHERE transaction_id = $1",
        uuid.UUID(cmd.transaction_id),
    )
    assert case is not None and (str(case["review_id"]), case["status"]) == (verdict.review_id, 1)


@pytest.fixture
async def redis_down(
    fraud_pool: asyncpg.Pool, test_run: conftest.TestRun
) -> AsyncIterator[Callable[..., FraudService]]:
    """Fraud services whose Redis is a port nothing listens on: every call
    fails at once."""
    client = redis_client(f"redis://127.0.0.1:{free_port()}/0")

    def make(rules: Rules = DEFAULT_RULES) -> FraudService:
        return fraud_service(fraud_pool, client, test_run.redis_prefix, rules)[0]

    yield make
    await client.aclose()


async def test_without_redis_its_rules_are_unknown_and_a_small_payment_is_allowed(
    redis_down: Callable[..., FraudService],
) -> None:
    verdict = await redis_down().score(transaction(amount=5_000))

    assert verdict.decision == Decision.ALLOW
    assert codes(verdict) == [
        "VELOCITY_1M_UNKNOWN", "VELOCITY_1H_UNKNOWN", "UNUSUAL_AMOUNT_UNKNOWN",
        "NEW_DEVICE_UNKNOWN", "NEW_COUNTRY_UNKNOWN", "IMPOSSIBLE_TRAVEL_UNKNOWN",
    ]  # fmt: skip
    assert verdict.degraded


async def test_without_redis_a_payment_above_the_degraded_amount_goes_to_review(
    redis_down: Callable[..., FraudService],
) -> None:
    service = redis_down(replace(DEFAULT_RULES, degraded_review_amount=Decimal("100")))

    small = await service.score(transaction(amount=9_999))
    large = await service.score(transaction(amount=10_000))

    assert (small.decision, large.decision) == (Decision.ALLOW, Decision.REVIEW)
    assert "DEGRADED_REVIEW" in codes(large)


async def test_without_redis_the_lists_still_block(redis_down: Callable[..., FraudService]) -> None:
    service = redis_down()
    cmd = transaction()
    await service.add_list_entry(ListKind.BLOCK, Subject.USER, cmd.user_id, "", "")

    verdict = await service.score(cmd)

    assert verdict.decision == Decision.BLOCK


async def test_a_degraded_decision_is_stored_as_degraded(
    redis_down: Callable[..., FraudService],
) -> None:
    cmd, service = transaction(), redis_down()

    await service.score(cmd)

    degraded = await service.pool.fetchval(
        "SELECT degraded FROM decisions WHERE transaction_id = $1", uuid.UUID(cmd.transaction_id)
    )
    assert degraded is True


# ---------------------------------------------------------------- once per transaction, kept forever


async def test_scoring_a_transaction_again_returns_the_first_verdict_after_the_lists_changed(
    service: FraudService,
) -> None:
    cmd = transaction()
    first = await service.score(cmd)
    await service.add_list_entry(ListKind.BLOCK, Subject.USER, cmd.user_id, "", "")

    retried = await service.score(cmd)

    assert retried == first
    assert retried.decision == Decision.ALLOW


async def test_rescoring_a_reviewed_transaction_returns_its_review_case(
    service: FraudService,
) -> None:
    cmd = transaction(amount=2_000_000)
    first = await service.score(cmd)

    retried = await service.score(cmd)

    assert retried == first and retried.review_id


async def test_scoring_a_transaction_twice_stores_one_decision(service: FraudService) -> None:
    cmd = transaction()

    for _ in range(2):
        await service.score(cmd)

    count = await service.pool.fetchval(
        "SELECT count(*) FROM decisions WHERE transaction_id = $1", uuid.UUID(cmd.transaction_id)
    )
    assert count == 1


async def test_every_decision_is_stored_with_its_transaction_and_features(
    service: FraudService,
) -> None:
    cmd = transaction(amount=4_200, currency="EUR", type="MERCHANT_PAYMENT", country="DE",
                      ip="2001:db8::1", recipient_kind=int(RecipientKind.MERCHANT),
                      recipient_id=str(uuid.uuid4()))  # fmt: skip
    await service.add_list_entry(ListKind.BLOCK, Subject.USER, cmd.user_id, "", "")

    await service.score(cmd)

    row = await service.pool.fetchrow(
        "SELECT user_id, type, amount, currency, score, decision, reasons, model_version,"
        " recipient_kind, recipient_id, device_id, ip, country, occurred_at, features"
        " FROM decisions WHERE transaction_id = $1",
        uuid.UUID(cmd.transaction_id),
    )
    assert row is not None
    stored = dict(row)
    assert set(stored.pop("features")) >= {"log_amount", "velocity_short", "new_device"}
    assert stored.pop("occurred_at").timestamp() == NOW
    assert stored == {
        "user_id": uuid.UUID(cmd.user_id), "type": "MERCHANT_PAYMENT", "amount": 4_200,
        "currency": "EUR", "score": 100.0, "decision": int(Decision.BLOCK),
        "reasons": [{"code": "BLOCKLISTED_USER", "detail": "user is on the block list",
                     "weight": 100.0}],
        "model_version": RULES_ONLY, "recipient_kind": 2, "recipient_id": cmd.recipient_id,
        "device_id": cmd.device_id, "ip": "2001:db8::1", "country": "DE",
    }  # fmt: skip


@pytest.mark.parametrize(
    "statement",
    ["UPDATE decisions SET decision = 3, score = 100 WHERE transaction_id = $1",
     "DELETE FROM decisions WHERE transaction_id = $1"],
    ids=["update", "delete"],
)  # fmt: skip
async def test_stored_decisions_refuse_change(service: FraudService, statement: str) -> None:
    cmd = transaction()
    await service.score(cmd)

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await service.pool.execute(statement, uuid.UUID(cmd.transaction_id))

    row = await stored_decision(service.pool, cmd.transaction_id)
    assert row is not None and row["decision"] == int(Decision.ALLOW)


async def test_a_transaction_id_scored_again_with_other_values_is_refused(
    service: FraudService,
) -> None:
    first = transaction()
    await service.score(first)

    with pytest.raises(AlreadyExists) as raised:
        await service.score(replace(first, amount=first.amount + 1))

    assert raised.value.reason == "TRANSACTION_ID_REUSED"


# ---------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"amount": 0}, "INVALID_AMOUNT"),
        ({"amount": -100}, "INVALID_AMOUNT"),
        ({"currency": "XXX"}, "UNKNOWN_CURRENCY"),
        ({"currency": "usd"}, "UNKNOWN_CURRENCY"),
        ({"transaction_id": "not-a-uuid"}, "INVALID_ID"),
        ({"transaction_id": ""}, "INVALID_ID"),
        ({"user_id": "not-a-uuid"}, "INVALID_ID"),
        ({"recipient_kind": 1, "recipient_id": "bob"}, "INVALID_ID"),
        ({"recipient_kind": 9}, "INVALID_RECIPIENT_KIND"),
        ({"type": ""}, "INVALID_TYPE"),
        ({"type": "p2p"}, "INVALID_TYPE"),
        ({"ip": "999.1.1.1"}, "INVALID_IP"),
        ({"device_id": "d" * 201}, "INVALID_DEVICE_ID"),
        ({"has_location": True, "latitude": 91.0}, "INVALID_COORDINATES"),
        ({"has_location": True, "latitude": -91.0}, "INVALID_COORDINATES"),
        ({"has_location": True, "longitude": 181.0}, "INVALID_COORDINATES"),
        ({"has_location": True, "latitude": float("nan")}, "INVALID_COORDINATES"),
        ({"longitude": float("inf")}, "INVALID_COORDINATES"),
        ({"country": "usa"}, "INVALID_COUNTRY"),
        ({"country": "us"}, "INVALID_COUNTRY"),
        ({"country": "U1"}, "INVALID_COUNTRY"),
        ({"timestamp": NOW + 301}, "INVALID_TIMESTAMP"),
    ],
    ids=[
        "zero-amount", "negative-amount", "unknown-currency", "lowercase-currency",
        "malformed-transaction-id", "empty-transaction-id", "malformed-user-id",
        "malformed-recipient-id", "unknown-recipient-kind", "empty-type", "lowercase-type",
        "malformed-ip", "long-device-id", "latitude-91", "latitude-minus-91", "longitude-181",
        "latitude-nan", "infinite-longitude-without-location", "country-usa",
        "country-lowercase", "country-digit", "timestamp-in-the-future",
    ],
)  # fmt: skip
async def test_malformed_transaction_is_invalid_argument_with_a_reason_and_stores_nothing(
    service: FraudService, overrides: dict[str, Any], reason: str
) -> None:
    cmd = transaction(**overrides)
    with pytest.raises(InvalidArgument) as caught:
        await service.score(cmd)

    assert caught.value.reason == reason
    if reason != "INVALID_ID":
        assert await stored_decision(service.pool, cmd.transaction_id) is None


async def test_malformed_id_names_its_field(service: FraudService) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.score(transaction(user_id="not-a-uuid"))

    assert caught.value.details == {"field": "user_id"}


async def test_out_of_range_latitude_without_has_location_is_ignored(
    service: FraudService,
) -> None:
    verdict = await service.score(transaction(has_location=False, latitude=91.0))

    assert verdict.decision == Decision.ALLOW


async def test_coordinates_on_the_edge_of_the_range_are_accepted(service: FraudService) -> None:
    verdict = await service.score(transaction(has_location=True, latitude=-90.0, longitude=180.0))

    assert verdict.decision == Decision.ALLOW
