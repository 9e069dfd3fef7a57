"""The fraud service's gRPC servicer: proto → handler → proto."""

from __future__ import annotations

from decimal import Decimal
from typing import cast

import asyncpg
import grpc

from moneta.fraud.v1 import fraud_pb2 as pb
from moneta.fraud.v1 import fraud_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.grpc_util import actor_id, timestamp
from services.fraud import handlers
from services.fraud.domain import ListKind, Subject

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


class FraudApi(fraud_pb2_grpc.FraudServiceServicer):
    def __init__(self, pool: asyncpg.Pool, review_amount: Decimal | None = None) -> None:
        self._pool = pool
        self._review_amount = review_amount

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        verdict = await handlers.score(
            self._pool,
            handlers.ScoreCommand(
                transaction_id=request.transaction_id,
                user_id=request.user_id,
                type=request.type,
                amount=request.amount.amount,
                currency=request.amount.currency,
                device_id=request.device_id,
                ip=request.ip,
                country=request.country,
                has_location=request.has_location,
                latitude=request.latitude,
                longitude=request.longitude,
            ),
            self._review_amount,
        )
        return pb.ScoreResponse(
            transaction_id=request.transaction_id,
            score=verdict.score,
            decision=cast(pb.Decision.ValueType, int(verdict.decision)),
            reasons=[
                pb.Reason(code=r.code, detail=r.detail, weight=r.weight) for r in verdict.reasons
            ],
            model_version=verdict.model_version,
        )

    async def AddListEntry(
        self, request: pb.AddListEntryRequest, context: grpc.aio.ServicerContext
    ) -> pb.AddListEntryResponse:
        e = request.entry
        row = await handlers.add_list_entry(
            self._pool,
            _list_kind(e.list),
            _subject(e.subject_type),
            e.value,
            e.reason,
            actor_id(context),
        )
        return pb.AddListEntryResponse(
            entry=pb.ListEntry(
                list=row["list"],
                subject_type=row["subject_type"],
                value=row["value"],
                reason=row["reason"],
                created_by=row["created_by"],
                created_at=timestamp(row["created_at"]),
            )
        )

    async def RemoveListEntry(
        self, request: pb.RemoveListEntryRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemoveListEntryResponse:
        await handlers.remove_list_entry(
            self._pool, _list_kind(request.list), _subject(request.subject_type), request.value
        )
        return pb.RemoveListEntryResponse()
