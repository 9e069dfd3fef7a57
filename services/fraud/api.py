"""The fraud service's gRPC servicer: proto → handler → proto."""

from __future__ import annotations

from typing import cast

import asyncpg
import grpc

from moneta.common.v1.money_pb2 import Money
from moneta.fraud.v1 import fraud_pb2 as pb
from moneta.fraud.v1 import fraud_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.grpc_util import actor_id, timestamp
from services.fraud.domain import ListKind, ScoreCommand, Subject, Verdict
from services.fraud.handlers import FraudService

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FraudService"].full_name


def _list_kind(value: int) -> ListKind:
    try:
        return ListKind(value)
    except ValueError:
        raise InvalidArgument("list must be BLOCK or ALLOW", reason="INVALID_LIST") from None


def _subject(value: int) -> Subject:
    try:
        return Subject(value)
    except ValueError:
        raise InvalidArgument(
            "subject_type must be USER, DEVICE, IP or COUNTRY", reason="INVALID_SUBJECT_TYPE"
        ) from None


def _reasons(reasons: list[dict[str, object]]) -> list[pb.Reason]:
    return [pb.Reason(code=str(r["code"]), detail=str(r["detail"]),
                      weight=float(cast(float, r["weight"]))) for r in reasons]  # fmt: skip


def _review(row: asyncpg.Record) -> pb.Review:
    return pb.Review(
        review_id=str(row["review_id"]),
        transaction_id=str(row["transaction_id"]),
        user_id=str(row["user_id"]),
        amount=Money(amount=row["amount"], currency=row["currency"]),
        score=row["score"],
        reasons=_reasons(row["reasons"]),
        status=row["status"],
        marked_fraud=row["marked_fraud"],
        resolved_by=row["resolved_by"],
        created_at=timestamp(row["created_at"]),
        resolved_at=timestamp(row["resolved_at"]),
    )


def _entry(row: asyncpg.Record) -> pb.ListEntry:
    return pb.ListEntry(
        list=row["list"],
        subject_type=row["subject_type"],
        value=row["value"],
        reason=row["reason"],
        created_by=row["created_by"],
        created_at=timestamp(row["created_at"]),
    )


def score_response(transaction_id: str, verdict: Verdict) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        transaction_id=transaction_id,
        score=verdict.score,
        decision=cast(pb.Decision.ValueType, int(verdict.decision)),
        reasons=[pb.Reason(code=r.code, detail=r.detail, weight=r.weight) for r in verdict.reasons],
        model_version=verdict.model_version,
        review_id=verdict.review_id,
    )


class FraudApi(fraud_pb2_grpc.FraudServiceServicer):
    def __init__(self, service: FraudService) -> None:
        self._service = service

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        verdict = await self._service.score(
            ScoreCommand(
                transaction_id=request.transaction_id,
                user_id=request.user_id,
                type=request.type,
                amount=request.amount.amount,
                currency=request.amount.currency,
                recipient_kind=request.recipient_kind,
                recipient_id=request.recipient_id,
                device_id=request.device_id,
                ip=request.ip,
                country=request.country,
                has_location=request.has_location,
                latitude=request.latitude,
                longitude=request.longitude,
                # Seconds since the epoch, put in range by read_transaction.
                timestamp=request.timestamp.seconds + request.timestamp.nanos / 1e9
                if request.HasField("timestamp")
                else None,
            )
        )
        return score_response(request.transaction_id, verdict)

    async def ListReviews(
        self, request: pb.ListReviewsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListReviewsResponse:
        rows, token = await self._service.list_reviews(
            request.status, request.page_size, request.page_token
        )
        return pb.ListReviewsResponse(reviews=[_review(r) for r in rows], next_page_token=token)

    async def ResolveReview(
        self, request: pb.ResolveReviewRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResolveReviewResponse:
        row = await self._service.resolve_review(
            request.review_id,
            request.transaction_id,
            request.decision,
            request.mark_fraud,
            actor_id(context),
        )
        return pb.ResolveReviewResponse(review=_review(row))

    async def ReportFraud(
        self, request: pb.ReportFraudRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportFraudResponse:
        await self._service.report_fraud(request.transaction_id, request.reason, actor_id(context))
        return pb.ReportFraudResponse()

    async def FlagAccount(
        self, request: pb.FlagAccountRequest, context: grpc.aio.ServicerContext
    ) -> pb.FlagAccountResponse:
        await self._service.flag_account(request.user_id, request.reason, actor_id(context))
        return pb.FlagAccountResponse()

    async def UnflagAccount(
        self, request: pb.UnflagAccountRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnflagAccountResponse:
        await self._service.unflag_account(request.user_id, request.reason, actor_id(context))
        return pb.UnflagAccountResponse()

    async def AddListEntry(
        self, request: pb.AddListEntryRequest, context: grpc.aio.ServicerContext
    ) -> pb.AddListEntryResponse:
        e = request.entry
        row = await self._service.add_list_entry(
            _list_kind(e.list), _subject(e.subject_type), e.value, e.reason, actor_id(context)
        )
        return pb.AddListEntryResponse(entry=_entry(row))

    async def RemoveListEntry(
        self, request: pb.RemoveListEntryRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemoveListEntryResponse:
        await self._service.remove_list_entry(
            _list_kind(request.list), _subject(request.subject_type), request.value
        )
        return pb.RemoveListEntryResponse()

    async def ListListEntries(
        self, request: pb.ListListEntriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListListEntriesResponse:
        rows, token = await self._service.list_list_entries(
            _list_kind(request.list) if request.list else None,
            _subject(request.subject_type) if request.subject_type else None,
            request.page_size,
            request.page_token,
        )
        return pb.ListListEntriesResponse(entries=[_entry(r) for r in rows], next_page_token=token)
