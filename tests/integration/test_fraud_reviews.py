"""The fraud service over gRPC on the real database and Redis of this test
run: every REVIEW opens a case, cases are listed as a queue and resolved
once, outcomes and reported fraud become training labels, recipients are
flagged and unflagged, the lists page, and a newly trained model is picked
up without a restart."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis

from moneta.common.v1.money_pb2 import Money
from moneta.fraud.v1 import fraud_pb2 as pb
from moneta.fraud.v1 import fraud_pb2_grpc
from services.common.errors import from_rpc_error
from services.common.interceptors import ServerInterceptor
from services.fraud import store, training
from services.fraud.api import FraudApi
from services.fraud.config import FraudSettings
from services.fraud.domain import RULES_ONLY, Model
from services.fraud.handlers import FraudService
from services.fraud.training import train_command
from tests import conftest
from tests.integration.test_fraud_scoring import NOW, fraud_service

LARGE = 2_000_000  # above the step-up amount: always REVIEW


@pytest.fixture(scope="module")
async def fraud_pool(test_run: conftest.TestRun) -> AsyncIterator[asyncpg.Pool]:
    # A database of its own: these tests count cases and train on history.
    pool = await conftest.service_pool(test_run, "fraud", "reviews_fraud")
    yield pool
    await pool.close()


@pytest.fixture(scope="module")
async def service(
    fraud_pool: asyncpg.Pool, test_run: conftest.TestRun
) -> AsyncIterator[FraudService]:
    client = aioredis.from_url(test_run.settings.redis_url)
    prefix = f"{test_run.redis_prefix}reviews:"
    yield fraud_service(fraud_pool, client, prefix)[0]
    async for key in client.scan_iter(match=f"{prefix}*", count=1000):
        await client.delete(key)
    await client.aclose()


@pytest.fixture(scope="module")
async def stub(service: FraudService) -> AsyncIterator[fraud_pb2_grpc.FraudServiceStub]:
    server = grpc.aio.server(interceptors=[ServerInterceptor()])
    fraud_pb2_grpc.add_FraudServiceServicer_to_server(FraudApi(service), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield fraud_pb2_grpc.FraudServiceStub(channel)
    await server.stop(None)


AS_ANALYST = (("x-actor-id", "analyst-7"),)


def score_request(amount: int = 2_500, **fields: Any) -> pb.ScoreRequest:
    request = pb.ScoreRequest(
        transaction_id=str(uuid.uuid4()), user_id=str(uuid.uuid4()), type="P2P_OUT",
        amount=Money(amount=amount, currency="USD"), **fields,
    )  # fmt: skip
    request.timestamp.FromSeconds(int(NOW))
    return request


async def reviewed(stub: fraud_pb2_grpc.FraudServiceStub) -> pb.ScoreResponse:
    response: pb.ScoreResponse = await stub.Score(score_request(LARGE))
    assert response.decision == pb.DECISION_REVIEW and response.review_id
    return response


async def error(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value.code(), from_rpc_error(raised.value).reason


async def resolve(
    stub: fraud_pb2_grpc.FraudServiceStub,
    decision: pb.ReviewDecision.ValueType,
    mark_fraud: bool = False,
    **by: str,
) -> pb.Review:
    response: pb.ResolveReviewResponse = await stub.ResolveReview(
        pb.ResolveReviewRequest(decision=decision, mark_fraud=mark_fraud, **by), metadata=AS_ANALYST
    )
    return response.review


# ---------------------------------------------------------------- scoring over gRPC


async def test_score_answers_the_verdict_with_its_reasons_and_model_version(
    stub: fraud_pb2_grpc.FraudServiceStub,
) -> None:
    response = await stub.Score(score_request(LARGE))

    assert (response.decision, response.model_version) == (pb.DECISION_REVIEW, RULES_ONLY)
    assert [r.code for r in response.reasons] == ["UNUSUAL_AMOUNT", "LARGE_AMOUNT"]
    assert response.reasons[0].weight == 35.0


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"amount": Money(amount=-5, currency="USD")}, "INVALID_AMOUNT"),
        ({"amount": Money(amount=5, currency="ZZZ")}, "UNKNOWN_CURRENCY"),
        ({"user_id": "42"}, "INVALID_ID"),
        ({"has_location": True, "latitude": 95.0}, "INVALID_COORDINATES"),
    ],
    ids=["negative-amount", "unknown-currency", "malformed-id", "latitude-95"],
)
async def test_bad_input_over_grpc_is_invalid_argument_with_its_reason(
    stub: fraud_pb2_grpc.FraudServiceStub, change: dict[str, Any], reason: str
) -> None:
    request = score_request()
    for name, value in change.items():
        if isinstance(value, Money):
            request.amount.CopyFrom(value)
        else:
            setattr(request, name, value)

    assert await error(stub.Score(request)) == (grpc.StatusCode.INVALID_ARGUMENT, reason)


# ---------------------------------------------------------------- the review queue


async def test_a_review_opens_a_case_listed_as_open(
    stub: fraud_pb2_grpc.FraudServiceStub,
) -> None:
    scored = await reviewed(stub)

    cases = await stub.ListReviews(pb.ListReviewsRequest(status=pb.REVIEW_STATUS_OPEN,
                                                         page_size=1000))  # fmt: skip

    case = next(c for c in cases.reviews if c.review_id == scored.review_id)
    assert (case.transaction_id, case.amount.amount, case.status, case.score) == (
        scored.transaction_id, LARGE, pb.REVIEW_STATUS_OPEN, scored.score,
    )  # fmt: skip
    assert [r.code for r in case.reasons] == [r.code for r in scored.reasons]


async def test_reviews_page_oldest_first_without_repeats(
    stub: fraud_pb2_grpc.FraudServiceStub,
) -> None:
    for _ in range(5):
        await reviewed(stub)
    seen: list[pb.Review] = []
    token = ""
    while True:
        page = await stub.ListReviews(pb.ListReviewsRequest(page_size=2, page_token=token))
        assert len(page.reviews) <= 2
        seen += page.reviews
        token = page.next_page_token
        if not token:
            break

    ids = [c.review_id for c in seen]
    assert len(ids) == len(set(ids)) >= 5
    created = [(c.created_at.ToDatetime(), c.review_id) for c in seen]
    assert created == sorted(created)


async def test_approving_a_case_records_who_and_when(stub: fraud_pb2_grpc.FraudServiceStub) -> None:
    scored = await reviewed(stub)

    case = await resolve(stub, pb.REVIEW_DECISION_APPROVE, review_id=scored.review_id)

    assert (case.status, case.marked_fraud, case.resolved_by) == (
        pb.REVIEW_STATUS_APPROVED, False, "analyst-7",
    )  # fmt: skip
    assert case.HasField("resolved_at")


async def test_a_case_is_resolved_by_its_transaction_id_too(
    stub: fraud_pb2_grpc.FraudServiceStub,
) -> None:
    scored = await reviewed(stub)

    case = await resolve(stub, pb.REVIEW_DECISION_REJECT, True,
                         transaction_id=scored.transaction_id)  # fmt: skip

    assert (case.review_id, case.status, case.marked_fraud) == (
        scored.review_id, pb.REVIEW_STATUS_REJECTED, True,
    )  # fmt: skip


async def test_resolving_again_the_same_way_answers_the_same_case(
    stub: fraud_pb2_grpc.FraudServiceStub,
) -> None:
    scored = await reviewed(stub)
    first = await resolve(stub, pb.REVIEW_DECISION_APPROVE, review_id=scored.review_id)

    again = await resolve(stub, pb.REVIEW_DECISION_APPROVE, transaction_id=scored.transaction_id)

    assert again == first


async def test_resolving_a_case_the_other_way_is_refused(
    stub: fraud_pb2_grpc.FraudServiceStub,
) -> None:
    scored = await reviewed(stub)
    await resolve(stub, pb.REVIEW_DECISION_REJECT, review_id=scored.review_id)

    refused = await error(stub.ResolveReview(pb.ResolveReviewRequest(
        review_id=scored.review_id, decision=pb.REVIEW_DECISION_APPROVE)))  # fmt: skip

    assert refused == (grpc.StatusCode.FAILED_PRECONDITION, "REVIEW_ALREADY_RESOLVED")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"decision": pb.REVIEW_DECISION_APPROVE},
         (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REVIEW_REFERENCE")),
        ({"review_id": "x", "transaction_id": "y", "decision": pb.REVIEW_DECISION_APPROVE},
         (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REVIEW_REFERENCE")),
        ({"review_id": "not-a-uuid", "decision": pb.REVIEW_DECISION_APPROVE},
         (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ID")),
        ({"review_id": str(uuid.uuid4())},
         (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REVIEW_DECISION")),
        ({"review_id": str(uuid.uuid4()), "decision": pb.REVIEW_DECISION_APPROVE,
          "mark_fraud": True},
         (grpc.StatusCode.INVALID_ARGUMENT, "FRAUD_CANNOT_BE_APPROVED")),
        ({"review_id": str(uuid.uuid4()), "decision": pb.REVIEW_DECISION_APPROVE},
         (grpc.StatusCode.NOT_FOUND, "REVIEW_NOT_FOUND")),
    ],
    ids=["no-id", "both-ids", "malformed-id", "no-decision", "approve-as-fraud", "unknown-case"],
)  # fmt: skip
async def test_a_bad_resolution_is_refused_with_a_reason(
    stub: fraud_pb2_grpc.FraudServiceStub,
    fields: dict[str, Any],
    expected: tuple[grpc.StatusCode, str],
) -> None:
    assert await error(stub.ResolveReview(pb.ResolveReviewRequest(**fields))) == expected


async def test_the_database_lets_a_case_be_resolved_only_once(
    stub: fraud_pb2_grpc.FraudServiceStub, fraud_pool: asyncpg.Pool
) -> None:
    scored = await reviewed(stub)
    await resolve(stub, pb.REVIEW_DECISION_APPROVE, review_id=scored.review_id)

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await fraud_pool.execute(
            "UPDATE reviews SET status = 3, resolved_at = now() WHERE review_id = $1",
            uuid.UUID(scored.review_id),
        )
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await fraud_pool.execute(
            "DELETE FROM reviews WHERE review_id = $1", uuid.UUID(scored.review_id)
        )


async def test_an_open_case_nobody_resolved_expires_and_can_still_be_labelled(
    stub: fraud_pb2_grpc.FraudServiceStub, service: FraudService, fraud_pool: asyncpg.Pool
) -> None:
    scored = await reviewed(stub)

    async with fraud_pool.acquire() as conn:
        await store.expire_reviews(conn, 0)
    expired = await stub.ListReviews(pb.ListReviewsRequest(status=pb.REVIEW_STATUS_EXPIRED,
                                                           page_size=1000))  # fmt: skip
    labelled = await resolve(stub, pb.REVIEW_DECISION_REJECT, True, review_id=scored.review_id)

    assert scored.review_id in {c.review_id for c in expired.reviews}
    assert labelled.status == pb.REVIEW_STATUS_REJECTED


# ---------------------------------------------------------------- labels


async def test_outcomes_and_reported_fraud_become_training_labels(
    stub: fraud_pb2_grpc.FraudServiceStub, fraud_pool: asyncpg.Pool
) -> None:
    approved, fraud, open_case = [await reviewed(stub) for _ in range(3)]
    await resolve(stub, pb.REVIEW_DECISION_APPROVE, review_id=approved.review_id)
    await resolve(stub, pb.REVIEW_DECISION_REJECT, True, review_id=fraud.review_id)
    allowed = await stub.Score(score_request())
    reported = await stub.Score(score_request())
    await stub.ReportFraud(pb.ReportFraudRequest(transaction_id=reported.transaction_id,
                                                 reason="chargeback"), metadata=AS_ANALYST)  # fmt: skip

    async with fraud_pool.acquire() as conn:
        labels = {str(r["transaction_id"]): r["label"]
                  for r in await store.labelled_history(conn, maturity_days=0)}  # fmt: skip

    assert [labels.get(t.transaction_id) for t in (approved, fraud, open_case, allowed,
                                                    reported)] == [0, 1, None, 0, 1]  # fmt: skip


async def test_reporting_fraud_on_an_unknown_transaction_is_not_found(
    stub: fraud_pb2_grpc.FraudServiceStub,
) -> None:
    request = pb.ReportFraudRequest(transaction_id=str(uuid.uuid4()))

    assert await error(stub.ReportFraud(request)) == (
        grpc.StatusCode.NOT_FOUND, "DECISION_NOT_FOUND",
    )  # fmt: skip


# ---------------------------------------------------------------- flagged recipients


async def test_flagging_over_grpc_sends_payments_to_the_account_to_review(
    stub: fraud_pb2_grpc.FraudServiceStub,
) -> None:
    mule = str(uuid.uuid4())
    await stub.FlagAccount(pb.FlagAccountRequest(user_id=mule, reason="mule"), metadata=AS_ANALYST)

    flagged = await stub.Score(score_request(recipient_kind=pb.RECIPIENT_KIND_USER,
                                             recipient_id=mule))  # fmt: skip
    await stub.UnflagAccount(pb.UnflagAccountRequest(user_id=mule, reason="cleared"))
    unflagged = await stub.Score(score_request(recipient_kind=pb.RECIPIENT_KIND_USER,
                                               recipient_id=mule))  # fmt: skip

    assert (flagged.decision, unflagged.decision) == (pb.DECISION_REVIEW, pb.DECISION_ALLOW)
    assert flagged.reasons[0].code == "FLAGGED_RECIPIENT"


async def test_flagging_a_malformed_account_id_is_invalid(
    stub: fraud_pb2_grpc.FraudServiceStub,
) -> None:
    assert await error(stub.FlagAccount(pb.FlagAccountRequest(user_id="bob"))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ID",
    )  # fmt: skip


# ---------------------------------------------------------------- lists


async def test_list_entries_page_and_filter(stub: fraud_pb2_grpc.FraudServiceStub) -> None:
    values = [f"dev-{uuid.uuid4()}" for _ in range(3)]
    for value in values:
        await stub.AddListEntry(pb.AddListEntryRequest(entry=pb.ListEntry(
            list=pb.LIST_KIND_BLOCK, subject_type=pb.SUBJECT_TYPE_DEVICE, value=value,
            reason="stolen")), metadata=AS_ANALYST)  # fmt: skip
    found: list[pb.ListEntry] = []
    token = ""
    while True:
        page = await stub.ListListEntries(pb.ListListEntriesRequest(
            list=pb.LIST_KIND_BLOCK, subject_type=pb.SUBJECT_TYPE_DEVICE, page_size=2,
            page_token=token))  # fmt: skip
        found += page.entries
        token = page.next_page_token
        if not token:
            break

    mine = [e for e in found if e.value in values]
    assert [e.value for e in mine] == values
    assert {(e.created_by, e.reason) for e in mine} == {("analyst-7", "stolen")}
    assert {e.subject_type for e in found} == {pb.SUBJECT_TYPE_DEVICE}


# ---------------------------------------------------------------- the training command


async def train(
    test_run: conftest.TestRun, monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[int, str]:
    """``python -m services.fraud train ARGS`` on this module's database;
    its exit status and the version it stored."""
    # The service's database under the prefix "<run>reviews_" is this module's.
    settings = FraudSettings(
        postgres_url=test_run.settings.postgres_url, db_prefix=f"{test_run.db_prefix}reviews_"
    )
    monkeypatch.setattr("sys.argv", ["services.fraud", "train", *args])
    status = await train_command(settings)
    pool = await asyncpg.connect(settings.database_url("fraud"))
    try:
        version = await pool.fetchval("SELECT version FROM models ORDER BY id DESC LIMIT 1")
    finally:
        await pool.close()
    return status, str(version)


async def test_a_cold_start_trains_on_the_synthetic_set(
    test_run: conftest.TestRun, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status, version = await train(test_run, monkeypatch, "--users", "300", "--days", "10")

    out = capsys.readouterr().out
    assert status == 0
    assert "cold start" in out and "ROC AUC" in out and f"stored {version}" in out
    assert "-synthetic-" in version


async def test_with_enough_labels_the_model_trains_on_history(
    stub: fraud_pb2_grpc.FraudServiceStub,
    test_run: conftest.TestRun,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for _ in range(3):
        case = await reviewed(stub)
        await resolve(stub, pb.REVIEW_DECISION_REJECT, True, review_id=case.review_id)
    for _ in range(30):
        await stub.Score(score_request())

    status, version = await train(
        test_run, monkeypatch, "--source", "history", "--min-fraud", "3", "--maturity-days", "0"
    )

    assert status == 0 and "-history-" in version
    assert "trained  on history" in capsys.readouterr().out


async def test_too_few_labels_to_train_on_history_is_an_error(
    test_run: conftest.TestRun, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _ = await train(test_run, monkeypatch, "--source", "history", "--min-fraud", "100000")

    assert status == 1
    assert "too few to train on" in capsys.readouterr().out


# ---------------------------------------------------------------- models


async def test_a_newly_stored_model_is_used_without_a_restart(
    service: FraudService, stub: fraud_pb2_grpc.FraudServiceStub, fraud_pool: asyncpg.Pool
) -> None:
    trained = training.train_synthetic(seed=3, users=300, days=10)
    async with fraud_pool.acquire() as conn:
        await store.insert_model(conn, trained.model, trained.metrics, trained.source)

    await service.refresh()  # what the background task does every second
    response = await stub.Score(score_request())

    assert response.model_version == trained.model.version
    stored = await fraud_pool.fetchrow(
        "SELECT metrics, trained_on FROM models WHERE version = $1", trained.model.version
    )
    assert stored is not None and stored["trained_on"] == "synthetic"
    assert stored["metrics"]["roc_auc"] == trained.metrics["roc_auc"]


async def test_a_model_round_trips_through_its_stored_parameters(
    fraud_pool: asyncpg.Pool,
) -> None:
    trained = training.train_synthetic(seed=4, users=300, days=10)
    async with fraud_pool.acquire() as conn:
        await store.insert_model(conn, trained.model, trained.metrics, trained.source)
        newest = await store.newest_model(conn)

    assert newest is not None
    loaded: Model = newest[1]
    values = {name: 0.5 for name in loaded.feature_names}
    assert loaded.version == trained.model.version
    assert loaded.probability(values) == pytest.approx(trained.model.probability(values))


async def test_stored_models_refuse_change(fraud_pool: asyncpg.Pool) -> None:
    trained = training.train_synthetic(seed=5, users=200, days=5)
    async with fraud_pool.acquire() as conn:
        await store.insert_model(conn, trained.model, trained.metrics, trained.source)

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await fraud_pool.execute("UPDATE models SET trained_on = 'history'")


async def test_an_unreadable_model_leaves_the_one_in_use(
    service: FraudService, fraud_pool: asyncpg.Pool
) -> None:
    await service.refresh()
    in_use = service.model
    await fraud_pool.execute(
        "INSERT INTO models (version, kind, parameters, metrics, trained_on)"
        " VALUES ('lr-broken', 'logistic_regression', $1, '{}', 'synthetic')",
        {"features": ["log_amount"], "mean": [0.0], "scale": [0.0], "weights": [1.0],
         "bias": 0.0},
    )  # fmt: skip

    await service.refresh()

    assert in_use is not None and service.model is in_use
