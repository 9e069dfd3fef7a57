"""Fraud scoring against the real fraud database of this test run: block and
allow lists decide, each transaction is scored once, every decision is kept
append-only, and malformed input is refused with a reason."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import asyncpg
import pytest

from services.common.errors import AlreadyExists, InvalidArgument
from services.fraud import handlers
from services.fraud.domain import MODEL_VERSION, Decision, ListKind, Subject, Verdict
from tests import conftest


@pytest.fixture(scope="module")
async def fraud_pool(test_run: conftest.TestRun) -> AsyncIterator[asyncpg.Pool]:
    pool = await conftest.service_pool(test_run, "fraud")
    yield pool
    await pool.close()


def transaction(**overrides: Any) -> handlers.ScoreCommand:
    """A clean P2P transaction of a fresh user on a fresh device."""
    cmd = handlers.ScoreCommand(
        transaction_id=str(uuid.uuid4()),
        user_id=str(uuid.uuid4()),
        type="P2P",
        amount=2_500,
        currency="USD",
        device_id=f"device-{uuid.uuid4()}",
        ip="",
        country="",
    )
    return replace(cmd, **overrides)


async def put_on_list(pool: asyncpg.Pool, kind: ListKind, subject: Subject, value: str) -> None:
    await handlers.add_list_entry(pool, kind, subject, value, "test", "test")


async def stored_decision(pool: asyncpg.Pool, transaction_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        "SELECT user_id, type, amount, currency, score, decision, reasons, model_version"
        " FROM decisions WHERE transaction_id = $1",
        uuid.UUID(transaction_id),
    )


def codes(verdict: Verdict) -> list[str]:
    return [r.code for r in verdict.reasons]


# ---------------------------------------------------------------- verdicts


async def test_clean_transaction_is_allowed_with_score_zero(fraud_pool: asyncpg.Pool) -> None:
    verdict = await handlers.score(fraud_pool, transaction())

    assert (verdict.decision, verdict.score, verdict.reasons) == (Decision.ALLOW, 0.0, [])


async def test_verdict_names_the_model_version(fraud_pool: asyncpg.Pool) -> None:
    verdict = await handlers.score(fraud_pool, transaction())

    assert verdict.model_version == MODEL_VERSION


async def test_blocklisted_user_is_blocked_with_blocklisted_user(
    fraud_pool: asyncpg.Pool,
) -> None:
    cmd = transaction()
    await put_on_list(fraud_pool, ListKind.BLOCK, Subject.USER, cmd.user_id)

    verdict = await handlers.score(fraud_pool, cmd)

    assert (verdict.decision, verdict.score, codes(verdict)) == (
        Decision.BLOCK,
        100.0,
        ["BLOCKLISTED_USER"],
    )


async def test_blocklisted_device_is_blocked_with_blocklisted_device(
    fraud_pool: asyncpg.Pool,
) -> None:
    cmd = transaction()
    await put_on_list(fraud_pool, ListKind.BLOCK, Subject.DEVICE, cmd.device_id)

    verdict = await handlers.score(fraud_pool, cmd)

    assert (verdict.decision, codes(verdict)) == (Decision.BLOCK, ["BLOCKLISTED_DEVICE"])


async def test_blocklisted_ip_is_blocked_with_blocklisted_ip(fraud_pool: asyncpg.Pool) -> None:
    # IP entries are shared by every transaction from there: lift it after.
    ip = "203.0.113.7"
    await put_on_list(fraud_pool, ListKind.BLOCK, Subject.IP, ip)
    try:
        verdict = await handlers.score(fraud_pool, transaction(ip=ip))
    finally:
        await handlers.remove_list_entry(fraud_pool, ListKind.BLOCK, Subject.IP, ip)

    assert (verdict.decision, codes(verdict)) == (Decision.BLOCK, ["BLOCKLISTED_IP"])


async def test_blocklisted_country_is_blocked_with_blocklisted_country(
    fraud_pool: asyncpg.Pool,
) -> None:
    # Country entries are shared by every transaction from there: lift it after.
    await put_on_list(fraud_pool, ListKind.BLOCK, Subject.COUNTRY, "KP")
    try:
        verdict = await handlers.score(fraud_pool, transaction(country="KP"))
    finally:
        await handlers.remove_list_entry(fraud_pool, ListKind.BLOCK, Subject.COUNTRY, "KP")

    assert (verdict.decision, codes(verdict)) == (Decision.BLOCK, ["BLOCKLISTED_COUNTRY"])


async def test_every_blocklisted_subject_is_named_in_the_reasons(
    fraud_pool: asyncpg.Pool,
) -> None:
    cmd = transaction()
    await put_on_list(fraud_pool, ListKind.BLOCK, Subject.USER, cmd.user_id)
    await put_on_list(fraud_pool, ListKind.BLOCK, Subject.DEVICE, cmd.device_id)

    verdict = await handlers.score(fraud_pool, cmd)

    assert sorted(codes(verdict)) == ["BLOCKLISTED_DEVICE", "BLOCKLISTED_USER"]


async def test_block_list_wins_over_allow_list(fraud_pool: asyncpg.Pool) -> None:
    cmd = transaction()
    await put_on_list(fraud_pool, ListKind.ALLOW, Subject.USER, cmd.user_id)
    await put_on_list(fraud_pool, ListKind.BLOCK, Subject.DEVICE, cmd.device_id)

    verdict = await handlers.score(fraud_pool, cmd)

    assert (verdict.decision, codes(verdict)) == (Decision.BLOCK, ["BLOCKLISTED_DEVICE"])


async def test_another_users_block_does_not_block(fraud_pool: asyncpg.Pool) -> None:
    await put_on_list(fraud_pool, ListKind.BLOCK, Subject.USER, str(uuid.uuid4()))

    verdict = await handlers.score(fraud_pool, transaction())

    assert verdict.decision == Decision.ALLOW


async def test_allowlisted_user_is_allowed_with_allowlisted_user(
    fraud_pool: asyncpg.Pool,
) -> None:
    cmd = transaction()
    await put_on_list(fraud_pool, ListKind.ALLOW, Subject.USER, cmd.user_id)

    verdict = await handlers.score(fraud_pool, cmd)

    assert (verdict.decision, verdict.score, codes(verdict)) == (
        Decision.ALLOW,
        0.0,
        ["ALLOWLISTED_USER"],
    )


async def test_allowlisted_user_reason_is_recorded_with_the_decision(
    fraud_pool: asyncpg.Pool,
) -> None:
    cmd = transaction()
    await put_on_list(fraud_pool, ListKind.ALLOW, Subject.USER, cmd.user_id)

    await handlers.score(fraud_pool, cmd)

    row = await stored_decision(fraud_pool, cmd.transaction_id)
    assert row is not None
    assert [r["code"] for r in row["reasons"]] == ["ALLOWLISTED_USER"]


async def test_removing_a_block_lifts_it(fraud_pool: asyncpg.Pool) -> None:
    cmd = transaction()
    await put_on_list(fraud_pool, ListKind.BLOCK, Subject.USER, cmd.user_id)
    await handlers.remove_list_entry(fraud_pool, ListKind.BLOCK, Subject.USER, cmd.user_id)

    verdict = await handlers.score(fraud_pool, cmd)

    assert verdict.decision == Decision.ALLOW


async def test_adding_a_list_entry_twice_keeps_one_entry_with_the_latest_reason(
    fraud_pool: asyncpg.Pool,
) -> None:
    value = str(uuid.uuid4())
    await handlers.add_list_entry(fraud_pool, ListKind.BLOCK, Subject.USER, value, "first", "a")

    row = await handlers.add_list_entry(
        fraud_pool, ListKind.BLOCK, Subject.USER, value, "second", "b"
    )

    count = await fraud_pool.fetchval("SELECT count(*) FROM list_entries WHERE value = $1", value)
    assert (count, row["reason"], row["created_by"]) == (1, "second", "b")


@pytest.mark.parametrize("value", ["", "x" * 201], ids=["empty", "too-long"])
async def test_list_entry_value_outside_1_to_200_characters_is_invalid_value(
    fraud_pool: asyncpg.Pool, value: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await handlers.add_list_entry(fraud_pool, ListKind.BLOCK, Subject.USER, value, "", "")

    assert caught.value.reason == "INVALID_VALUE"


# ---------------------------------------------------------------- once per transaction, kept forever


async def test_scoring_a_transaction_again_returns_the_first_verdict_after_the_lists_changed(
    fraud_pool: asyncpg.Pool,
) -> None:
    cmd = transaction()
    first = await handlers.score(fraud_pool, cmd)
    await put_on_list(fraud_pool, ListKind.BLOCK, Subject.USER, cmd.user_id)

    again = await handlers.score(fraud_pool, cmd)

    assert again == first
    assert again.decision == Decision.ALLOW


async def test_rescoring_a_blocked_transaction_returns_its_reasons(
    fraud_pool: asyncpg.Pool,
) -> None:
    cmd = transaction()
    await put_on_list(fraud_pool, ListKind.BLOCK, Subject.USER, cmd.user_id)
    first = await handlers.score(fraud_pool, cmd)
    await handlers.remove_list_entry(fraud_pool, ListKind.BLOCK, Subject.USER, cmd.user_id)

    again = await handlers.score(fraud_pool, cmd)

    assert again == first
    assert codes(again) == ["BLOCKLISTED_USER"]


async def test_scoring_a_transaction_twice_stores_one_decision(
    fraud_pool: asyncpg.Pool,
) -> None:
    cmd = transaction()

    for _ in range(2):
        await handlers.score(fraud_pool, cmd)

    count = await fraud_pool.fetchval(
        "SELECT count(*) FROM decisions WHERE transaction_id = $1", uuid.UUID(cmd.transaction_id)
    )
    assert count == 1


async def test_every_decision_is_stored_with_its_transaction(fraud_pool: asyncpg.Pool) -> None:
    cmd = transaction(amount=4_200, currency="EUR", type="PAYMENT")
    await put_on_list(fraud_pool, ListKind.BLOCK, Subject.USER, cmd.user_id)

    await handlers.score(fraud_pool, cmd)

    row = await stored_decision(fraud_pool, cmd.transaction_id)
    assert row is not None
    assert dict(row) == {
        "user_id": uuid.UUID(cmd.user_id),
        "type": "PAYMENT",
        "amount": 4_200,
        "currency": "EUR",
        "score": 100.0,
        "decision": int(Decision.BLOCK),
        "reasons": [
            {"code": "BLOCKLISTED_USER", "detail": "user is on the block list", "weight": 100.0}
        ],
        "model_version": MODEL_VERSION,
    }


async def test_stored_decisions_refuse_update(fraud_pool: asyncpg.Pool) -> None:
    cmd = transaction()
    await handlers.score(fraud_pool, cmd)

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await fraud_pool.execute(
            "UPDATE decisions SET decision = 3, score = 100 WHERE transaction_id = $1",
            uuid.UUID(cmd.transaction_id),
        )


async def test_stored_decisions_refuse_delete(fraud_pool: asyncpg.Pool) -> None:
    cmd = transaction()
    await handlers.score(fraud_pool, cmd)

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await fraud_pool.execute(
            "DELETE FROM decisions WHERE transaction_id = $1", uuid.UUID(cmd.transaction_id)
        )


async def test_refused_update_leaves_the_decision_as_it_was(fraud_pool: asyncpg.Pool) -> None:
    cmd = transaction()
    await handlers.score(fraud_pool, cmd)

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await fraud_pool.execute(
            "UPDATE decisions SET decision = 3 WHERE transaction_id = $1",
            uuid.UUID(cmd.transaction_id),
        )

    row = await stored_decision(fraud_pool, cmd.transaction_id)
    assert row is not None
    assert row["decision"] == int(Decision.ALLOW)


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
        ({"has_location": True, "latitude": 91.0}, "INVALID_COORDINATES"),
        ({"has_location": True, "latitude": -91.0}, "INVALID_COORDINATES"),
        ({"has_location": True, "longitude": 181.0}, "INVALID_COORDINATES"),
        ({"has_location": True, "latitude": float("nan")}, "INVALID_COORDINATES"),
        ({"country": "usa"}, "INVALID_COUNTRY"),
        ({"country": "us"}, "INVALID_COUNTRY"),
        ({"country": "U1"}, "INVALID_COUNTRY"),
    ],
    ids=[
        "zero-amount", "negative-amount", "unknown-currency", "lowercase-currency",
        "malformed-transaction-id", "empty-transaction-id", "malformed-user-id",
        "latitude-91", "latitude-minus-91", "longitude-181", "latitude-nan",
        "country-usa", "country-lowercase", "country-digit",
    ],
)  # fmt: skip
async def test_malformed_transaction_is_invalid_argument_with_a_reason(
    fraud_pool: asyncpg.Pool, overrides: dict[str, Any], reason: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await handlers.score(fraud_pool, transaction(**overrides))

    assert caught.value.reason == reason


async def test_malformed_id_names_its_field(fraud_pool: asyncpg.Pool) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await handlers.score(fraud_pool, transaction(user_id="not-a-uuid"))

    assert caught.value.details == {"field": "user_id"}


async def test_malformed_transaction_stores_no_decision(fraud_pool: asyncpg.Pool) -> None:
    cmd = transaction(amount=0)

    with pytest.raises(InvalidArgument):
        await handlers.score(fraud_pool, cmd)

    assert await stored_decision(fraud_pool, cmd.transaction_id) is None


async def test_out_of_range_latitude_without_has_location_is_ignored(
    fraud_pool: asyncpg.Pool,
) -> None:
    verdict = await handlers.score(fraud_pool, transaction(has_location=False, latitude=91.0))

    assert verdict.decision == Decision.ALLOW


@pytest.mark.parametrize(
    "coordinates",
    [{"latitude": float("nan")}, {"longitude": float("inf")}],
    ids=["nan-latitude", "infinite-longitude"],
)
async def test_non_finite_coordinates_are_refused_even_without_has_location(
    fraud_pool: asyncpg.Pool, coordinates: dict[str, float]
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await handlers.score(fraud_pool, transaction(has_location=False, **coordinates))

    assert raised.value.reason == "INVALID_COORDINATES"


async def test_coordinates_on_the_edge_of_the_range_are_accepted(
    fraud_pool: asyncpg.Pool,
) -> None:
    cmd = transaction(has_location=True, latitude=-90.0, longitude=180.0)

    verdict = await handlers.score(fraud_pool, cmd)

    assert verdict.decision == Decision.ALLOW


async def test_a_transaction_id_scored_again_with_other_values_is_refused(
    fraud_pool: asyncpg.Pool,
) -> None:
    first = transaction()
    await handlers.score(fraud_pool, first)

    with pytest.raises(AlreadyExists) as raised:
        await handlers.score(fraud_pool, replace(first, amount=first.amount + 1))

    assert raised.value.reason == "TRANSACTION_ID_REUSED"
