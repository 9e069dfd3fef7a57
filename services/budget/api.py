"""The budget service's gRPC servicer: proto → handler → proto."""

from __future__ import annotations

import enum
import hashlib
import json
from datetime import UTC, datetime
from typing import TypeVar

import asyncpg
import grpc

from moneta.budget.v1 import budget_pb2 as pb
from moneta.budget.v1 import budget_pb2_grpc
from moneta.common.v1.money_pb2 import Money
from services.budget import handlers
from services.budget.domain import (
    BudgetStatus,
    Mode,
    PeriodType,
    PolicyBudget,
    Rollover,
    first_period,
)
from services.budget.store import ReservationRow
from services.common.errors import InvalidArgument
from services.common.fx_rates import DEFAULT_FX_RATES, configured_table, format_rate
from services.common.grpc_util import actor_id, from_timestamp, timestamp

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BudgetService"].full_name


def budget_to_pb(row: asyncpg.Record) -> pb.Budget:
    return pb.Budget(
        budget_id=str(row["budget_id"]),
        user_id=str(row["user_id"]),
        wallet_id=str(row["wallet_id"] or ""),
        company_id=str(row["company_id"] or ""),
        category=row["category"],
        currency=row["currency"],
        total_amount=row["total_amount"],
        used_amount=row["used_amount"],
        reserved_amount=row["reserved_amount"],
        remaining_amount=row["total_amount"] - row["used_amount"] - row["reserved_amount"],
        period_type=row["period_type"],
        start_date=timestamp(row["start_date"]),
        end_date=timestamp(row["end_date"]),
        mode=row["mode"],
        rollover=row["rollover"],
        thresholds=row["thresholds"],
        status=row["status"],
        created_by=row["created_by"],
        created_at=timestamp(row["created_at"]),
        updated_at=timestamp(row["updated_at"]),
    )


def reservation_to_pb(row: ReservationRow) -> pb.Reservation:
    return pb.Reservation(
        reservation_id=str(row["reservation_id"]),
        user_id=str(row["user_id"]),
        amount=Money(amount=row["amount"], currency=row["currency"]),
        category=row["category"],
        reference=row["reference"],
        status=row["status"],
        budget_ids=[str(b) for b in row["budget_ids"]],
        expires_at=timestamp(row["expires_at"]),
        lines=[
            pb.ReservationLine(
                budget_id=str(budget_id),
                amount=Money(amount=amount, currency=currency),
                rate="" if rate is None else format_rate(rate),
            )
            for budget_id, amount, currency, rate in zip(
                row["budget_ids"],
                row["line_amounts"],
                row["line_currencies"],
                row["line_rates"],
                strict=True,
            )
        ],
    )


def history_to_pb(row: asyncpg.Record) -> pb.BudgetHistoryEntry:
    return pb.BudgetHistoryEntry(
        history_id=str(row["history_id"]),
        budget_id=str(row["budget_id"]),
        action=row["action"],
        old_values=json.dumps(row["old_values"] or {}, sort_keys=True),
        new_values=json.dumps(row["new_values"] or {}, sort_keys=True),
        reason=row["reason"],
        actor_id=row["actor_id"],
        created_at=timestamp(row["created_at"]),
    )


def policy_to_pb(
    company_id: str, entries: list[PolicyBudget], updated_at: datetime | None
) -> pb.CompanyPolicy:
    return pb.CompanyPolicy(
        company_id=company_id,
        budgets=[
            pb.PolicyBudget(
                category=e.category,
                currency=e.currency,
                total_amount=e.total_amount,
                period_type=pb.PeriodType.ValueType(e.period_type),
                mode=pb.BudgetMode.ValueType(e.mode),
                rollover=pb.RolloverPolicy.ValueType(e.rollover),
                thresholds=list(e.thresholds),
            )
            for e in entries
        ],
        updated_at=timestamp(updated_at),
    )


E = TypeVar("E", bound=enum.IntEnum)


def _enum(kind: type[E], value: int, field: str, default: E | None = None) -> E:
    """The enum member for a wire value: ``default`` for UNSPECIFIED (which
    is refused when there is none), INVALID_ARGUMENT for values the contract
    does not define."""
    if value == 0 and default is not None:
        return default
    try:
        return kind(value)
    except ValueError:
        raise InvalidArgument(
            f"{field} must be one of {', '.join(m.name for m in kind)}",
            reason=f"INVALID_{field.upper()}",
        ) from None


class BudgetApi(budget_pb2_grpc.BudgetServiceServicer):
    def __init__(
        self, pool: asyncpg.Pool, default_ttl_seconds: int, rates: str = DEFAULT_FX_RATES
    ) -> None:
        self._pool = pool
        self._writer = handlers.ReservationWriter(pool)
        self._default_ttl = default_ttl_seconds
        self._rates = configured_table(rates)

    async def CreateBudget(
        self, request: pb.CreateBudgetRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateBudgetResponse:
        b = request.budget
        period_type = _enum(PeriodType, b.period_type, "period_type")
        start, end = first_period(
            period_type,
            from_timestamp(b.start_date, "start_date") if b.HasField("start_date") else None,
            from_timestamp(b.end_date, "end_date") if b.HasField("end_date") else None,
            datetime.now(UTC),
        )
        mode = _enum(Mode, b.mode, "mode", Mode.HARD)
        rollover = _enum(Rollover, b.rollover, "rollover", Rollover.RESET)
        values = {
            "user_id": b.user_id,
            "wallet_id": b.wallet_id,
            "company_id": b.company_id,
            "category": b.category or "ALL",
            "currency": b.currency,
            "total_amount": b.total_amount,
            "period_type": int(period_type),
            "start_date": start,
            "end_date": end,
            "mode": int(mode),
            "rollover": int(rollover),
            "thresholds": list(b.thresholds) or [80, 100],
        }
        row = await handlers.create_budget(
            self._pool,
            values,
            actor_id(context),
            request.idempotency_key,
            # What was asked (dates left out stay left out): a retry on
            # another day is still the same request.
            hashlib.sha256(b.SerializeToString(deterministic=True)).hexdigest(),
        )
        return pb.CreateBudgetResponse(budget=budget_to_pb(row))

    async def GetBudget(
        self, request: pb.GetBudgetRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetBudgetResponse:
        return pb.GetBudgetResponse(
            budget=budget_to_pb(await handlers.get_budget(self._pool, request.budget_id))
        )

    async def ListBudgets(
        self, request: pb.ListBudgetsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListBudgetsResponse:
        status = _enum(BudgetStatus, request.status, "status") if request.status else None
        rows, next_token = await handlers.list_budgets(
            self._pool,
            user_id=request.user_id,
            company_id=request.company_id,
            status=status,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListBudgetsResponse(
            budgets=[budget_to_pb(r) for r in rows], next_page_token=next_token
        )

    async def UpdateBudget(
        self, request: pb.UpdateBudgetRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateBudgetResponse:
        row = await handlers.update_budget(
            self._pool,
            request.budget_id,
            total_amount=request.total_amount or None,
            status=_enum(BudgetStatus, request.status, "status") if request.status else None,
            reason=request.reason,
            actor=actor_id(context),
        )
        return pb.UpdateBudgetResponse(budget=budget_to_pb(row))

    async def ListBudgetHistory(
        self, request: pb.ListBudgetHistoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListBudgetHistoryResponse:
        rows, next_token = await handlers.list_budget_history(
            self._pool, request.budget_id, request.page_size, request.page_token
        )
        return pb.ListBudgetHistoryResponse(
            history=[history_to_pb(r) for r in rows], next_page_token=next_token
        )

    async def GetCompanyPolicy(
        self, request: pb.GetCompanyPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCompanyPolicyResponse:
        entries, updated_at = await handlers.get_company_policy(self._pool, request.company_id)
        return pb.GetCompanyPolicyResponse(
            policy=policy_to_pb(request.company_id, entries, updated_at)
        )

    async def ApplyCompanyPolicy(
        self, request: pb.ApplyCompanyPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApplyCompanyPolicyResponse:
        created = await handlers.apply_company_policy(
            self._pool, request.user_id, request.company_id, request.wallet_id
        )
        return pb.ApplyCompanyPolicyResponse(created=[budget_to_pb(row) for row in created])

    async def SetCompanyPolicy(
        self, request: pb.SetCompanyPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetCompanyPolicyResponse:
        entries = [
            PolicyBudget(
                category=e.category or "ALL",
                currency=e.currency,
                total_amount=e.total_amount,
                period_type=_enum(PeriodType, e.period_type, "period_type"),
                mode=_enum(Mode, e.mode, "mode", Mode.HARD),
                rollover=_enum(Rollover, e.rollover, "rollover", Rollover.RESET),
                thresholds=tuple(e.thresholds),
            )
            for e in request.policy.budgets
        ]
        company_id = request.policy.company_id
        valid, updated_at = await handlers.set_company_policy(
            self._pool, company_id, entries, actor_id(context)
        )
        return pb.SetCompanyPolicyResponse(policy=policy_to_pb(company_id, valid, updated_at))

    async def Reserve(
        self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReserveResponse:
        cmd = handlers.ReserveCommand(
            user_id=request.user_id,
            amount=request.amount.amount,
            currency=request.amount.currency,
            category=request.category or "ALL",
            reference=request.reference,
            ttl_seconds=request.ttl_seconds,
            reservation_id=request.reservation_id,
        )
        row = await handlers.reserve(self._writer, cmd, self._default_ttl, self._rates)
        return pb.ReserveResponse(reservation=reservation_to_pb(row))

    async def Commit(
        self, request: pb.CommitRequest, context: grpc.aio.ServicerContext
    ) -> pb.CommitResponse:
        row = await handlers.commit(self._writer, request.reservation_id)
        return pb.CommitResponse(reservation=reservation_to_pb(row))

    async def Release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseResponse:
        row = await handlers.release(self._writer, request.reservation_id)
        return pb.ReleaseResponse(reservation=reservation_to_pb(row))

    async def Refund(
        self, request: pb.RefundRequest, context: grpc.aio.ServicerContext
    ) -> pb.RefundResponse:
        row = await handlers.refund(
            self._pool,
            request.reservation_id,
            request.amount.amount,
            request.amount.currency,
            request.reference,
        )
        return pb.RefundResponse(reservation=reservation_to_pb(row))
