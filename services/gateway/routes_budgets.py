"""Budgets and company budget policies over HTTP.

A user reads their own budgets; a manager reads and manages the budgets of
their company's users (never their own: someone else sets a manager's
limits); an admin reaches every budget."""

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Header, Query
from pydantic import BaseModel, ConfigDict, Field

from moneta.budget.v1 import budget_pb2
from moneta.wallet.v1 import wallet_pb2
from services.common.errors import InvalidArgument, NotFound, PermissionDenied
from services.common.money import to_major_units
from services.gateway.auth import Principal
from services.gateway.deps import (
    ERROR_RESPONSES,
    Amount,
    Caller,
    Peers,
    Upstreams,
    authorize_user_access,
    call,
    is_self,
    iso,
    parse_amount,
    require_role,
    same_id,
    user_in_reach,
)

router = APIRouter()

PeriodName = Literal["WEEKLY", "MONTHLY", "QUARTERLY", "YEARLY", "ONE_TIME"]
ModeName = Literal["HARD", "SOFT"]
RolloverName = Literal["RESET", "ROLLOVER"]
Category = Annotated[
    str,
    Field(
        min_length=1,
        max_length=32,
        description="ALL, FLIGHT, HOTEL, CAR, RAIL, MEALS, MERCHANT, P2P or OTHER.",
    ),
]
Thresholds = Annotated[
    list[Annotated[int, Field(ge=1, le=1000)]],
    Field(max_length=10, description="Alert thresholds in percent; default [80, 100]."),
]
_AMOUNT_FIELDS = frozenset({"total_amount", "used_amount", "reserved_amount", "carried_over"})


class BudgetAnswer(BaseModel):
    budget_id: str
    user_id: str
    wallet_id: str
    company_id: str
    category: str
    currency: str
    total_amount: str
    used_amount: str
    reserved_amount: str
    remaining_amount: str
    period_type: str
    start_date: str
    end_date: str
    mode: str
    rollover: str
    thresholds: list[int]
    status: str
    created_by: str
    created_at: str
    updated_at: str


class BudgetsAnswer(BaseModel):
    budgets: list[BudgetAnswer]
    next_page_token: str


class CreateBudgetBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=64)
    total_amount: Amount = Field(description="In major units of currency.")
    currency: str = Field(min_length=3, max_length=4)
    period_type: PeriodName
    category: Category = "ALL"
    mode: ModeName = "HARD"
    rollover: RolloverName = "RESET"
    start_date: datetime | None = Field(default=None, description="Default: today, 00:00 UTC.")
    end_date: datetime | None = Field(
        default=None, description="Default: the end of the first period (required for ONE_TIME)."
    )
    thresholds: Thresholds = Field(default_factory=list)


class UpdateBudgetBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    total_amount: Amount | None = None
    status: Literal["ACTIVE", "SUSPENDED"] | None = None
    reason: str = Field(min_length=1, max_length=500)


class HistoryEntry(BaseModel):
    history_id: str
    budget_id: str
    action: str
    old_values: dict[str, Any]
    new_values: dict[str, Any]
    reason: str
    actor_id: str
    created_at: str


class BudgetHistoryAnswer(BaseModel):
    history: list[HistoryEntry]
    next_page_token: str


class PolicyBudgetItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    category: Category = "ALL"
    currency: str = Field(min_length=3, max_length=4)
    total_amount: Amount
    period_type: Literal["WEEKLY", "MONTHLY", "QUARTERLY", "YEARLY"]
    mode: ModeName = "HARD"
    rollover: RolloverName = "RESET"
    thresholds: Thresholds = Field(default_factory=list)


class PolicyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    budgets: list[PolicyBudgetItem] = Field(max_length=50)


class PolicyItemAnswer(BaseModel):
    category: str
    currency: str
    total_amount: str
    period_type: str
    mode: str
    rollover: str
    thresholds: list[int]


class PolicyAnswer(BaseModel):
    company_id: str
    budgets: list[PolicyItemAnswer]
    updated_at: str | None


# -- wire and back


def _name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)


def budget_answer(b: budget_pb2.Budget) -> BudgetAnswer:
    def money(amount: int) -> str:
        return to_major_units(amount, b.currency)

    return BudgetAnswer(
        budget_id=b.budget_id,
        user_id=b.user_id,
        wallet_id=b.wallet_id,
        company_id=b.company_id,
        category=b.category,
        currency=b.currency,
        total_amount=money(b.total_amount),
        used_amount=money(b.used_amount),
        reserved_amount=money(b.reserved_amount),
        remaining_amount=money(b.remaining_amount),
        period_type=_name(budget_pb2.PeriodType, b.period_type, "PERIOD_TYPE_"),
        start_date=iso(b.start_date),
        end_date=iso(b.end_date),
        mode=_name(budget_pb2.BudgetMode, b.mode, "BUDGET_MODE_"),
        rollover=_name(budget_pb2.RolloverPolicy, b.rollover, "ROLLOVER_POLICY_"),
        thresholds=list(b.thresholds),
        status=_name(budget_pb2.BudgetStatus, b.status, "BUDGET_STATUS_"),
        created_by=b.created_by,
        created_at=iso(b.created_at),
        updated_at=iso(b.updated_at),
    )


def _history_values(raw: str, currency: str) -> dict[str, Any]:
    """A history entry's changed fields, amounts as decimal strings and
    statuses by name, as everywhere else in the API."""
    try:
        values = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        return {"raw": raw}
    if not isinstance(values, dict):
        return {"value": values}
    for field, value in values.items():
        if field in _AMOUNT_FIELDS and isinstance(value, int):
            values[field] = to_major_units(value, currency)
        elif field == "status" and isinstance(value, int):
            values[field] = _name(budget_pb2.BudgetStatus, value, "BUDGET_STATUS_")
    return values


def _schedule(period: str, mode: str, rollover: str, thresholds: list[int]) -> dict[str, Any]:
    """A budget's (or a default budget's) period, mode, rollover and
    thresholds as their wire fields."""
    return {
        "period_type": budget_pb2.PeriodType.Value(f"PERIOD_TYPE_{period}"),
        "mode": budget_pb2.BudgetMode.Value(f"BUDGET_MODE_{mode}"),
        "rollover": budget_pb2.RolloverPolicy.Value(f"ROLLOVER_POLICY_{rollover}"),
        "thresholds": thresholds,
    }


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _set_time(field: Any, at: datetime, name: str) -> None:
    try:
        field.FromDatetime(at)
    except (ValueError, OverflowError):
        raise InvalidArgument(
            f"{name} is out of range", reason="INVALID_TIMESTAMP", details={"field": name}
        ) from None


async def _budget_in_reach(ups: Upstreams, who: Principal, budget_id: str) -> budget_pb2.Budget:
    """The budget when the caller may see it; not found otherwise."""
    try:
        found: budget_pb2.GetBudgetResponse = await call(
            who, ups.budget.GetBudget, budget_pb2.GetBudgetRequest(budget_id=budget_id)
        )
    except (InvalidArgument, NotFound):
        raise NotFound("not found", reason="BUDGET_NOT_FOUND") from None
    await authorize_user_access(ups, who, found.budget.user_id, "BUDGET_NOT_FOUND")
    return found.budget


def _not_for_oneself(who: Principal, user_id: str) -> None:
    if who.role != "admin" and is_self(who, user_id):
        raise PermissionDenied(
            "a manager cannot set their own budgets", reason="SELF_ACTION_FORBIDDEN"
        )


# -- budgets


@router.get("/api/v1/budgets/{user_id}", tags=["budgets"], responses=ERROR_RESPONSES)
async def list_budgets(
    user_id: str,
    who: Caller,
    ups: Peers,
    status: Literal["ACTIVE", "EXPIRED", "SUSPENDED"] | None = None,
    page_size: Annotated[int, Query(ge=1, le=200)] = 50,
    page_token: Annotated[str, Query(max_length=500)] = "",
) -> BudgetsAnswer:
    """A user's budgets. The user, a manager of their company, admins."""
    await authorize_user_access(ups, who, user_id, "USER_NOT_FOUND")
    try:
        response = await call(
            who,
            ups.budget.ListBudgets,
            budget_pb2.ListBudgetsRequest(
                user_id=user_id,
                status=budget_pb2.BudgetStatus.Value(f"BUDGET_STATUS_{status}")
                if status
                else budget_pb2.BUDGET_STATUS_UNSPECIFIED,
                page_size=page_size,
                page_token=page_token,
            ),
        )
    except InvalidArgument as exc:
        if exc.details.get("field") == "user_id" or exc.reason == "INVALID_ID":
            raise NotFound("not found", reason="USER_NOT_FOUND") from None
        raise
    return BudgetsAnswer(
        budgets=[budget_answer(b) for b in response.budgets],
        next_page_token=response.next_page_token,
    )


@router.post("/api/v1/budgets", status_code=201, tags=["budgets"], responses=ERROR_RESPONSES)
async def create_budget(
    body: CreateBudgetBody,
    who: Caller,
    ups: Peers,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200)
    ] = None,
) -> BudgetAnswer:
    """A spending budget for a user. Managers (their company's users, not
    themselves) and admins. With an `Idempotency-Key`, a retry answers the
    budget the first request created."""
    require_role(who, "manager", "admin")
    _not_for_oneself(who, body.user_id)
    user = await user_in_reach(ups, who, body.user_id, "USER_NOT_FOUND")
    try:
        wallet_id = (
            await call(who, ups.wallet.GetWallet, wallet_pb2.GetWalletRequest(user_id=user.user_id))
        ).wallet.wallet_id
    except NotFound:
        wallet_id = ""  # a budget may come before the wallet
    budget = budget_pb2.Budget(
        user_id=user.user_id,
        wallet_id=wallet_id,
        company_id=user.company_id,
        category=body.category,
        currency=body.currency,
        total_amount=parse_amount(body.total_amount, body.currency, "total_amount"),
        **_schedule(body.period_type, body.mode, body.rollover, body.thresholds),
    )
    # Left out, the budget service works out the first period itself.
    if body.start_date is not None:
        _set_time(budget.start_date, _aware(body.start_date), "start_date")
    if body.end_date is not None:
        _set_time(budget.end_date, _aware(body.end_date), "end_date")
    response = await call(
        who,
        ups.budget.CreateBudget,
        budget_pb2.CreateBudgetRequest(budget=budget, idempotency_key=idempotency_key or ""),
    )
    return budget_answer(response.budget)


@router.put("/api/v1/budgets/{budget_id}", tags=["budgets"], responses=ERROR_RESPONSES)
async def update_budget(
    budget_id: str, body: UpdateBudgetBody, who: Caller, ups: Peers
) -> BudgetAnswer:
    """Changes a budget's total or status (ACTIVE, SUSPENDED), recorded in
    its history with the reason. Managers (their company's users, not
    themselves) and admins."""
    require_role(who, "manager", "admin")
    budget = await _budget_in_reach(ups, who, budget_id)
    _not_for_oneself(who, budget.user_id)
    request = budget_pb2.UpdateBudgetRequest(budget_id=budget.budget_id, reason=body.reason)
    if body.total_amount is not None:
        request.total_amount = parse_amount(body.total_amount, budget.currency, "total_amount")
        if request.total_amount <= 0:
            raise InvalidArgument(
                "total_amount must be greater than zero",
                reason="INVALID_AMOUNT",
                details={"field": "total_amount"},
            )
    if body.status is not None:
        request.status = budget_pb2.BudgetStatus.Value(f"BUDGET_STATUS_{body.status}")
    response = await call(who, ups.budget.UpdateBudget, request)
    return budget_answer(response.budget)


@router.get("/api/v1/budgets/{budget_id}/history", tags=["budgets"], responses=ERROR_RESPONSES)
async def budget_history(
    budget_id: str,
    who: Caller,
    ups: Peers,
    page_size: Annotated[int, Query(ge=1, le=200)] = 50,
    page_token: Annotated[str, Query(max_length=500)] = "",
) -> BudgetHistoryAnswer:
    """What changed in a budget, who changed it and why, newest first."""
    budget = await _budget_in_reach(ups, who, budget_id)
    response = await call(
        who,
        ups.budget.ListBudgetHistory,
        budget_pb2.ListBudgetHistoryRequest(
            budget_id=budget.budget_id, page_size=page_size, page_token=page_token
        ),
    )
    return BudgetHistoryAnswer(
        history=[
            HistoryEntry(
                history_id=h.history_id,
                budget_id=h.budget_id,
                action=h.action,
                old_values=_history_values(h.old_values, budget.currency),
                new_values=_history_values(h.new_values, budget.currency),
                reason=h.reason,
                actor_id=h.actor_id,
                created_at=iso(h.created_at),
            )
            for h in response.history
        ],
        next_page_token=response.next_page_token,
    )


# -- company policies


def _require_company(who: Principal, company_id: str) -> None:
    """Managers of the company, and admins; another company is not found."""
    require_role(who, "manager", "admin")
    if who.role == "manager" and not (who.company_id and same_id(who.company_id, company_id)):
        raise NotFound("not found", reason="COMPANY_NOT_FOUND")


def policy_answer(p: budget_pb2.CompanyPolicy) -> PolicyAnswer:
    return PolicyAnswer(
        company_id=p.company_id,
        budgets=[
            PolicyItemAnswer(
                category=e.category,
                currency=e.currency,
                total_amount=to_major_units(e.total_amount, e.currency),
                period_type=_name(budget_pb2.PeriodType, e.period_type, "PERIOD_TYPE_"),
                mode=_name(budget_pb2.BudgetMode, e.mode, "BUDGET_MODE_"),
                rollover=_name(budget_pb2.RolloverPolicy, e.rollover, "ROLLOVER_POLICY_"),
                thresholds=list(e.thresholds),
            )
            for e in p.budgets
        ],
        updated_at=iso(p.updated_at) if p.HasField("updated_at") else None,
    )


@router.get(
    "/api/v1/companies/{company_id}/budget-policy", tags=["budgets"], responses=ERROR_RESPONSES
)
async def get_company_policy(company_id: str, who: Caller, ups: Peers) -> PolicyAnswer:
    """The default budgets every new user of the company gets."""
    _require_company(who, company_id)
    response = await call(
        who,
        ups.budget.GetCompanyPolicy,
        budget_pb2.GetCompanyPolicyRequest(company_id=company_id),
    )
    return policy_answer(response.policy)


@router.put(
    "/api/v1/companies/{company_id}/budget-policy", tags=["budgets"], responses=ERROR_RESPONSES
)
async def set_company_policy(
    company_id: str, body: PolicyBody, who: Caller, ups: Peers
) -> PolicyAnswer:
    """Replaces the company's default budgets (for users created from now
    on). Managers of the company and admins."""
    _require_company(who, company_id)
    policy = budget_pb2.CompanyPolicy(
        company_id=company_id,
        budgets=[
            budget_pb2.PolicyBudget(
                category=e.category,
                currency=e.currency,
                total_amount=parse_amount(e.total_amount, e.currency, "total_amount"),
                **_schedule(e.period_type, e.mode, e.rollover, e.thresholds),
            )
            for e in body.budgets
        ],
    )
    response = await call(
        who, ups.budget.SetCompanyPolicy, budget_pb2.SetCompanyPolicyRequest(policy=policy)
    )
    return policy_answer(response.policy)
