"""Wallets, their histories, PINs and P2P transfers over HTTP."""

import uuid
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from moneta.common.v1.money_pb2 import Money
from moneta.wallet.v1 import wallet_pb2
from services.common.errors import InvalidArgument, NotFound, PermissionDenied
from services.common.money import to_major_units
from services.gateway.deps import (
    ERROR_RESPONSES,
    Amount,
    BalanceAnswer,
    Caller,
    IdempotencyKeyHeader,
    Peers,
    Replays,
    authorize_user_access,
    balance_answers,
    call,
    enum_value,
    is_self,
    iso,
    parse_amount,
    positive_money,
    replay_once,
    require_idempotency_key,
    require_person,
    require_positive_amount,
    require_role,
    require_self,
    status_name,
    type_name,
)

router = APIRouter()

# Page-numbered history is counted by walking the wallet's cursor pages; this
# far and no further (the cursor-paged history goes on from there).
PAGED_HISTORY_DEPTH = 10_000
_WALK_PAGE_SIZE = 1000


class TransferBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sender_id: str = Field(min_length=1, max_length=64)
    recipient: str = Field(
        min_length=1, max_length=320, description="User id, email, phone (E.164) or username."
    )
    amount: Amount = Field(description='Decimal string or number, in major units, e.g. "12.50".')
    currency: str | None = Field(default=None, min_length=3, max_length=4)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    note: str = Field(default="", max_length=500)
    device_id: str = Field(default="", max_length=200)


class TransferAnswer(BaseModel):
    transfer_id: str
    status: str = Field(description="COMPLETED, or PENDING_REVIEW (confirm with the PIN).")
    sender_balance: str
    currency: str


class CreateWalletBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=64)
    currency: str = Field(min_length=3, max_length=4)
    initial_balance: Amount | None = None


class WalletAnswer(BaseModel):
    wallet_id: str
    user_id: str
    balance: str
    currency: str
    status: str
    balances: list[BalanceAnswer]
    created_at: str
    updated_at: str


def recipient_of(value: str) -> wallet_pb2.Recipient:
    value = value.strip()
    try:
        return wallet_pb2.Recipient(user_id=str(uuid.UUID(value)))
    except ValueError:
        pass
    if "@" in value:
        return wallet_pb2.Recipient(email=value)
    if value.startswith("+"):
        return wallet_pb2.Recipient(phone=value)
    return wallet_pb2.Recipient(username=value)


def wallet_answer(w: wallet_pb2.Wallet) -> WalletAnswer:
    return WalletAnswer(
        wallet_id=w.wallet_id,
        user_id=w.user_id,
        balance=to_major_units(w.balance, w.currency),
        currency=w.currency,
        status=wallet_pb2.WalletStatus.Name(w.status).removeprefix("WALLET_STATUS_"),
        balances=balance_answers(w.balances),
        created_at=w.created_at.ToDatetime().isoformat() + "Z",
        updated_at=w.updated_at.ToDatetime().isoformat() + "Z",
    )


async def wallet_by_id(ups: Peers, who: Caller, wallet_id: str) -> wallet_pb2.Wallet:
    """The wallet, when the caller may see it (self, their company's
    manager, admin); not found otherwise, whether or not it exists."""
    try:
        found: wallet_pb2.GetWalletResponse = await call(
            who, ups.wallet.GetWallet, wallet_pb2.GetWalletRequest(wallet_id=wallet_id)
        )
    except (InvalidArgument, NotFound):
        raise _no_wallet() from None
    await authorize_user_access(ups, who, found.wallet.user_id, "WALLET_NOT_FOUND")
    return found.wallet


def _no_wallet() -> NotFound:
    return NotFound("not found", reason="WALLET_NOT_FOUND")


# -- wallets


@router.post("/api/v1/wallets", status_code=201, tags=["wallets"], responses=ERROR_RESPONSES)
async def create_wallet(body: CreateWalletBody, who: Caller, ups: Peers) -> WalletAnswer:
    """Creates a user's wallet, funded from their company when an initial
    balance is given. Managers (own company) and admins."""
    require_role(who, "manager", "admin")
    await authorize_user_access(ups, who, body.user_id, "USER_NOT_FOUND")
    initial = (
        parse_amount(body.initial_balance, body.currency, "initial_balance")
        if body.initial_balance is not None
        else 0
    )
    if initial and who.role != "admin" and is_self(who, body.user_id):
        raise PermissionDenied(
            "a manager cannot fund their own wallet", reason="SELF_FUNDING_FORBIDDEN"
        )
    response = await call(
        who,
        ups.wallet.CreateWallet,
        wallet_pb2.CreateWalletRequest(
            user_id=body.user_id, currency=body.currency, initial_balance=initial
        ),
    )
    return wallet_answer(response.wallet)


@router.get("/api/v1/wallets/{user_id}", tags=["wallets"], responses=ERROR_RESPONSES)
async def get_wallet(user_id: str, who: Caller, ups: Peers) -> WalletAnswer:
    """A user's wallet with its balance in every currency. The user, a
    manager of their company, admins."""
    await authorize_user_access(ups, who, user_id, "WALLET_NOT_FOUND")
    response = await call(who, ups.wallet.GetWallet, wallet_pb2.GetWalletRequest(user_id=user_id))
    return wallet_answer(response.wallet)


class StatusBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: str = Field(pattern="^(ACTIVE|FROZEN|CLOSED)$")
    reason: str = Field(min_length=1, max_length=500)


@router.put("/api/v1/wallets/{wallet_id}/status", tags=["wallets"], responses=ERROR_RESPONSES)
async def update_wallet_status(
    wallet_id: str, body: StatusBody, who: Caller, ups: Peers
) -> WalletAnswer:
    """Freezes, unfreezes or closes a wallet, recording who and why.
    Managers (own company, not their own wallet) and admins."""
    require_role(who, "manager", "admin")
    wallet = await wallet_by_id(ups, who, wallet_id)
    if is_self(who, wallet.user_id) and who.role != "admin":
        raise PermissionDenied(
            "a manager cannot change their own wallet", reason="SELF_ACTION_FORBIDDEN"
        )
    response = await call(
        who,
        ups.wallet.UpdateWalletStatus,
        wallet_pb2.UpdateWalletStatusRequest(
            wallet_id=wallet.wallet_id,
            status=wallet_pb2.WalletStatus.Value(f"WALLET_STATUS_{body.status}"),
            reason=body.reason,
        ),
    )
    return wallet_answer(response.wallet)


class PinBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pin: str = Field(min_length=4, max_length=6)
    current_pin: str = Field(default="", max_length=6)


@router.put("/api/v1/wallet/pin", status_code=204, tags=["wallets"], responses=ERROR_RESPONSES)
async def set_pin(body: PinBody, who: Caller, ups: Peers) -> Response:
    """Sets the caller's wallet PIN (4 to 6 digits), or changes it with the
    current one."""
    require_person(who)
    await call(
        who,
        ups.wallet.SetPin,
        wallet_pb2.SetPinRequest(user_id=who.user_id, pin=body.pin, current_pin=body.current_pin),
    )
    return Response(status_code=204)


# -- histories


class HistoryItem(BaseModel):
    id: str
    type: str
    amount: str
    currency: str
    counterparty: str
    timestamp: str
    status: str
    description: str
    balance_after: str | None


class HistoryAnswer(BaseModel):
    transactions: list[HistoryItem]
    balance: str
    currency: str
    next_page_token: str


@router.get("/api/v1/wallet/{user_id}/transactions", tags=["wallets"], responses=ERROR_RESPONSES)
async def list_transactions(
    user_id: str,
    who: Caller,
    ups: Peers,
    from_: Annotated[datetime | None, Query(alias="from")] = None,
    to: datetime | None = None,
    type: Annotated[list[str] | None, Query(max_length=10)] = None,
    status: str | None = Query(default=None, max_length=20),
    min_amount: Amount | None = None,
    max_amount: Amount | None = None,
    counterparty: str | None = Query(default=None, max_length=200),
    q: str | None = Query(default=None, max_length=200),
    page_size: int = Query(default=50, ge=1, le=200),
    page_token: str = Query(default="", max_length=500),
) -> HistoryAnswer:
    """A wallet's history, newest first, with filters and cursor paging."""
    await authorize_user_access(ups, who, user_id, "WALLET_NOT_FOUND")
    wallet = (
        await call(who, ups.wallet.GetWallet, wallet_pb2.GetWalletRequest(user_id=user_id))
    ).wallet
    currency = wallet.currency
    request = _history_request(wallet.wallet_id, type or (), status, from_, to)
    request.min_amount = (
        parse_amount(min_amount, currency, "min_amount") if min_amount is not None else 0
    )
    request.max_amount = (
        parse_amount(max_amount, currency, "max_amount") if max_amount is not None else 0
    )
    request.counterparty = counterparty or ""
    request.query = q or ""
    request.page_size = page_size
    request.page_token = page_token
    response = await call(who, ups.wallet.ListTransactions, request)
    return HistoryAnswer(
        transactions=[
            HistoryItem(
                id=t.id,
                type=type_name(t.type),
                amount=to_major_units(t.amount.amount, t.amount.currency),
                currency=t.amount.currency,
                counterparty=t.counterparty,
                timestamp=iso(t.created_at),
                status=status_name(t.status),
                description=t.description,
                balance_after=to_major_units(t.balance_after, t.amount.currency),
            )
            for t in response.transactions
        ],
        balance=to_major_units(response.wallet.balance, response.wallet.currency),
        currency=response.wallet.currency,
        next_page_token=response.next_page_token,
    )


def _history_request(
    wallet_id: str,
    types: Any,
    status: str | None,
    start: datetime | None,
    end: datetime | None,
) -> wallet_pb2.ListTransactionsRequest:
    request = wallet_pb2.ListTransactionsRequest(
        wallet_id=wallet_id,
        types=[
            enum_value(wallet_pb2.TransactionType, "TRANSACTION_TYPE_", t, "type") for t in types
        ],
        status=enum_value(
            wallet_pb2.TransactionStatus, "TRANSACTION_STATUS_", status or "UNSPECIFIED", "status"
        ),
    )
    try:
        if start is not None:
            request.start_time.FromDatetime(_aware(start))
        if end is not None:
            request.end_time.FromDatetime(_aware(end))
    except (ValueError, OverflowError):
        raise InvalidArgument("a date is out of range", reason="INVALID_TIMESTAMP") from None
    return request


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _date_bound(value: str | None, field: str, end: bool) -> datetime | None:
    """A bound of a date range: a date-time as given (UTC when it names no
    zone); a plain date from its start (00:00 UTC) or, as an end, to its end
    (the next day's start), so that a one-day range is start_date=end_date."""
    if value is None:
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value) + timedelta(days=1 if end else 0)
            return datetime.combine(day, time(), tzinfo=UTC)
        return _aware(datetime.fromisoformat(value))
    except (ValueError, OverflowError):
        raise InvalidArgument(
            f"{field} must be a date (2024-05-31) or a date-time (2024-05-31T12:00:00Z)",
            reason="INVALID_DATE",
            details={"field": field},
        ) from None


class PagedItem(BaseModel):
    txn_id: str
    amount: str = Field(description="Signed: negative when money leaves the wallet.")
    currency: str
    type: str
    description: str
    status: str
    created_at: str


class Pagination(BaseModel):
    page: int
    limit: int
    total: int = Field(description=f"Exact up to {PAGED_HISTORY_DEPTH:,}; see total_capped.")
    total_capped: bool = Field(description=f"The wallet has more than {PAGED_HISTORY_DEPTH:,}.")


class PagedHistoryAnswer(BaseModel):
    transactions: list[PagedItem]
    pagination: Pagination


@router.get("/api/v1/wallets/{wallet_id}/transactions", tags=["wallets"], responses=ERROR_RESPONSES)
async def list_wallet_transactions(
    wallet_id: str,
    who: Caller,
    ups: Peers,
    page: int = Query(default=1, ge=1, le=PAGED_HISTORY_DEPTH),
    limit: int = Query(default=20, ge=1, le=100),
    start_date: Annotated[
        str | None,
        Query(max_length=40, description="A date (from its start, UTC) or a date-time."),
    ] = None,
    end_date: Annotated[
        str | None,
        Query(max_length=40, description="A date (to its end, UTC) or a date-time (exclusive)."),
    ] = None,
    type: str | None = Query(default=None, max_length=20, description="e.g. P2P_OUT, DEPOSIT."),
    status: str | None = Query(default=None, max_length=20, description="e.g. COMPLETED."),
) -> PagedHistoryAnswer:
    """A wallet's history by page number, newest first, with the total. For
    deep or large histories use the cursor-paged
    /api/v1/wallet/{user_id}/transactions."""
    if page * limit > PAGED_HISTORY_DEPTH:
        raise InvalidArgument(
            f"page * limit may be at most {PAGED_HISTORY_DEPTH:,}; use the cursor-paged history",
            reason="PAGE_TOO_DEEP",
            details={"field": "page"},
        )
    wallet = await wallet_by_id(ups, who, wallet_id)
    request = _history_request(
        wallet.wallet_id,
        [type] if type else (),
        status,
        _date_bound(start_date, "start_date", end=False),
        _date_bound(end_date, "end_date", end=True),
    )
    request.page_size = _WALK_PAGE_SIZE
    first, items, counted = (page - 1) * limit, [], 0
    while True:
        response = await call(who, ups.wallet.ListTransactions, request)
        for t in response.transactions:
            if first <= counted < first + limit:
                items.append(t)
            counted += 1
        request.page_token = response.next_page_token
        if not request.page_token or counted >= PAGED_HISTORY_DEPTH:
            break
    return PagedHistoryAnswer(
        transactions=[
            PagedItem(
                txn_id=t.id,
                amount=to_major_units(t.amount.amount, t.amount.currency),
                currency=t.amount.currency,
                type=type_name(t.type),
                description=t.description,
                status=status_name(t.status),
                created_at=iso(t.created_at),
            )
            for t in items
        ],
        pagination=Pagination(
            page=page, limit=limit, total=counted, total_capped=bool(request.page_token)
        ),
    )


class AdjustmentBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: Amount
    type: str = Field(pattern="^(CREDIT|DEBIT)$")
    currency: str | None = Field(default=None, min_length=3, max_length=4)
    description: str = Field(default="", max_length=500)
    reference_id: str = Field(min_length=1, max_length=200)
    reference_type: str = Field(min_length=1, max_length=50)
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Default: reference_type and reference_id together.",
    )


class TransactionAnswer(BaseModel):
    txn_id: str
    amount: str
    currency: str
    type: str
    description: str
    status: str
    balance_after: str
    created_at: str


@router.post(
    "/api/v1/wallets/{wallet_id}/transactions",
    status_code=201,
    tags=["wallets"],
    response_model=TransactionAnswer,
    responses=ERROR_RESPONSES,
)
async def post_transaction(
    wallet_id: str,
    body: AdjustmentBody,
    who: Caller,
    ups: Peers,
    replays: Replays,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """A CREDIT or DEBIT by an internal service (role ``service``), once
    per idempotency key (by default its reference type and id)."""
    require_role(who, "service")
    key = body.idempotency_key or idempotency_key or f"{body.reference_type}:{body.reference_id}"
    try:
        wallet = (
            await call(who, ups.wallet.GetWallet, wallet_pb2.GetWalletRequest(wallet_id=wallet_id))
        ).wallet
    except InvalidArgument:
        raise _no_wallet() from None
    currency = body.currency or wallet.currency
    request = wallet_pb2.PostTransactionRequest(
        wallet_id=wallet.wallet_id,
        amount=Money(
            amount=require_positive_amount(parse_amount(body.amount, currency)),
            currency=currency,
        ),
        direction=wallet_pb2.DIRECTION_CREDIT
        if body.type == "CREDIT"
        else wallet_pb2.DIRECTION_DEBIT,
        description=body.description,
        reference_id=body.reference_id,
        reference_type=body.reference_type,
        idempotency_key=key,
    )

    async def post() -> TransactionAnswer:
        t = (await call(who, ups.wallet.PostTransaction, request)).transaction
        return TransactionAnswer(
            txn_id=t.id,
            amount=to_major_units(t.amount.amount, t.amount.currency),
            currency=t.amount.currency,
            type=type_name(t.type),
            description=t.description,
            status=status_name(t.status),
            balance_after=to_major_units(t.balance_after, t.amount.currency),
            created_at=iso(t.created_at),
        )

    return await replay_once(replays, who, key, request, post, status_code=201)


# -- transfers


@router.post(
    "/api/v1/transfers",
    tags=["transfers"],
    response_model=TransferAnswer,
    responses=ERROR_RESPONSES,
)
async def create_transfer(
    body: TransferBody,
    who: Caller,
    ups: Peers,
    replays: Replays,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """A P2P transfer from the caller's wallet to a user found by id, email,
    phone or username. Retrying with the same idempotency key returns the
    first answer and moves nothing again."""
    require_self(who, body.sender_id)
    key = require_idempotency_key(body.idempotency_key, idempotency_key)
    request = wallet_pb2.TransferRequest(
        sender_id=body.sender_id,
        recipient=recipient_of(body.recipient),
        amount=await positive_money(ups, who, body.amount, body.currency, who.user_id),
        idempotency_key=key,
        note=body.note,
        device_id=body.device_id,
    )

    async def transfer() -> TransferAnswer:
        response = await call(who, ups.wallet.Transfer, request)
        balance = response.sender_balance
        return TransferAnswer(
            transfer_id=response.transfer_id,
            status=status_name(response.status),
            sender_balance=to_major_units(balance.amount, balance.currency),
            currency=balance.currency,
        )

    return await replay_once(replays, who, key, request, transfer)


class ConfirmBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pin: str = Field(min_length=4, max_length=6)


class ConfirmAnswer(BaseModel):
    transfer_id: str
    status: str


@router.post(
    "/api/v1/transfers/{transfer_id}/confirm", tags=["transfers"], responses=ERROR_RESPONSES
)
async def confirm_transfer(
    transfer_id: str, body: ConfirmBody, who: Caller, ups: Peers
) -> ConfirmAnswer:
    """Confirms the caller's transfer held for review (status
    PENDING_REVIEW) with their PIN. Five wrong PINs lock confirmation for
    15 minutes."""
    require_person(who)
    try:
        response = await call(
            who,
            ups.wallet.ConfirmTransfer,
            wallet_pb2.ConfirmTransferRequest(
                transfer_id=transfer_id, user_id=who.user_id, pin=body.pin
            ),
        )
    except InvalidArgument as exc:
        if exc.details.get("field") == "transfer_id":
            raise NotFound("no such transfer", reason="TRANSFER_NOT_FOUND") from None
        raise
    return ConfirmAnswer(transfer_id=response.transfer_id, status=status_name(response.status))
