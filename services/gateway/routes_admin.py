"""Admin work over HTTP: fraud reviews and flagged accounts, and the
ledger's proof that no money was created or lost. Admins only."""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from moneta.fraud.v1 import fraud_pb2
from moneta.ledger.v1 import ledger_pb2
from services.common.errors import InvalidArgument, NotFound
from services.common.money import to_major_units
from services.gateway.deps import (
    ERROR_RESPONSES,
    Caller,
    Peers,
    call,
    iso,
    require_role,
)

router = APIRouter()

# Verifying reads the whole ledger: it may take longer than a usual call.
VERIFY_SECONDS = 30.0


class ReasonAnswer(BaseModel):
    code: str
    detail: str
    weight: float


class ReviewAnswer(BaseModel):
    review_id: str
    transaction_id: str
    user_id: str
    amount: str
    currency: str
    score: float
    reasons: list[ReasonAnswer]
    status: str
    marked_fraud: bool
    resolved_by: str
    created_at: str
    resolved_at: str | None


class ReviewsAnswer(BaseModel):
    reviews: list[ReviewAnswer]
    next_page_token: str


class ResolveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["APPROVE", "REJECT"]
    mark_fraud: bool = False


class FlagBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=64)
    reason: str = Field(min_length=1, max_length=500)


class FlagAnswer(BaseModel):
    user_id: str
    flagged: bool


class VerifyAnswer(BaseModel):
    ok: bool
    discrepancies: list[dict[str, Any]]
    accounts_checked: int
    transfers_checked: int
    entries_checked: int


def review_answer(r: fraud_pb2.Review) -> ReviewAnswer:
    return ReviewAnswer(
        review_id=r.review_id,
        transaction_id=r.transaction_id,
        user_id=r.user_id,
        amount=to_major_units(r.amount.amount, r.amount.currency) if r.amount.currency else "0",
        currency=r.amount.currency,
        score=r.score,
        reasons=[ReasonAnswer(code=x.code, detail=x.detail, weight=x.weight) for x in r.reasons],
        status=fraud_pb2.ReviewStatus.Name(r.status).removeprefix("REVIEW_STATUS_"),
        marked_fraud=r.marked_fraud,
        resolved_by=r.resolved_by,
        created_at=iso(r.created_at),
        resolved_at=iso(r.resolved_at) if r.HasField("resolved_at") else None,
    )


# -- fraud


@router.get("/api/v1/fraud/reviews", tags=["fraud"], responses=ERROR_RESPONSES)
async def list_reviews(
    who: Caller,
    ups: Peers,
    status: Literal["OPEN", "APPROVED", "REJECTED", "EXPIRED"] | None = None,
    page_size: Annotated[int, Query(ge=1, le=200)] = 50,
    page_token: Annotated[str, Query(max_length=500)] = "",
) -> ReviewsAnswer:
    """Payments held for review, newest first; by status (default: all)."""
    require_role(who, "admin")
    response = await call(
        who,
        ups.fraud.ListReviews,
        fraud_pb2.ListReviewsRequest(
            status=fraud_pb2.ReviewStatus.Value(f"REVIEW_STATUS_{status}")
            if status
            else fraud_pb2.REVIEW_STATUS_UNSPECIFIED,
            page_size=page_size,
            page_token=page_token,
        ),
    )
    return ReviewsAnswer(
        reviews=[review_answer(r) for r in response.reviews],
        next_page_token=response.next_page_token,
    )


@router.post("/api/v1/fraud/reviews/{review_id}/resolve", tags=["fraud"], responses=ERROR_RESPONSES)
async def resolve_review(
    review_id: str, body: ResolveBody, who: Caller, ups: Peers
) -> ReviewAnswer:
    """Approves or rejects a held payment; ``mark_fraud`` also records the
    payer as a fraud case."""
    require_role(who, "admin")
    try:
        response = await call(
            who,
            ups.fraud.ResolveReview,
            fraud_pb2.ResolveReviewRequest(
                review_id=review_id,
                decision=fraud_pb2.ReviewDecision.Value(f"REVIEW_DECISION_{body.decision}"),
                mark_fraud=body.mark_fraud,
            ),
        )
    except InvalidArgument as exc:
        if exc.reason == "INVALID_ID":
            raise NotFound("no such review", reason="REVIEW_NOT_FOUND") from None
        raise
    return review_answer(response.review)


@router.post("/api/v1/fraud/flags", status_code=201, tags=["fraud"], responses=ERROR_RESPONSES)
async def flag_account(body: FlagBody, who: Caller, ups: Peers) -> FlagAnswer:
    """Flags an account: payments to it are scored as risky."""
    require_role(who, "admin")
    await call(
        who,
        ups.fraud.FlagAccount,
        fraud_pb2.FlagAccountRequest(user_id=body.user_id, reason=body.reason),
    )
    return FlagAnswer(user_id=body.user_id, flagged=True)


@router.delete(
    "/api/v1/fraud/flags/{user_id}", status_code=204, tags=["fraud"], responses=ERROR_RESPONSES
)
async def unflag_account(
    user_id: str,
    who: Caller,
    ups: Peers,
    reason: Annotated[str, Query(max_length=500, description="Why, for the audit trail.")] = "",
) -> Response:
    """Removes an account's flag (removing one that is not there is no error)."""
    require_role(who, "admin")
    await call(
        who,
        ups.fraud.UnflagAccount,
        fraud_pb2.UnflagAccountRequest(user_id=user_id, reason=reason),
    )
    return Response(status_code=204)


# -- ledger


@router.get("/api/v1/admin/ledger/verify", tags=["admin"], responses=ERROR_RESPONSES)
async def verify_ledger(who: Caller, ups: Peers) -> VerifyAnswer:
    """Proves that no money was created or lost: every account's balance
    against its entries, every transfer balanced per currency."""
    require_role(who, "admin")
    r = await call(
        who, ups.ledger.VerifyLedger, ledger_pb2.VerifyLedgerRequest(), timeout=VERIFY_SECONDS
    )
    return VerifyAnswer(
        ok=r.ok,
        discrepancies=[
            {
                "kind": d.kind,
                "account_id": d.account_id,
                "currency": d.currency,
                "expected": d.expected,
                "actual": d.actual,
                "detail": d.detail,
            }
            for d in r.discrepancies
        ],
        accounts_checked=r.accounts_checked,
        transfers_checked=r.transfers_checked,
        entries_checked=r.entries_checked,
    )
