"""Wallets, P2P transfers and the ledger's verifier over HTTP."""

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from moneta.common.v1.money_pb2 import Money
from moneta.ledger.v1 import ledger_pb2
from moneta.wallet.v1 import wallet_pb2
from services.common.errors import InvalidArgument, PermissionDenied
from services.common.money import to_major_units
from services.gateway.deps import (
    ERROR_RESPONSES,
    Amount,
    Caller,
    Peers,
    authorize_user_access,
    call,
    is_self,
    parse_amount,
    require_idempotency_key,
    require_role,
    require_self,
)

router = APIRouter()


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
    status: str
    sender_balance: str
    currency: str


class CreateWalletBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=64)
    currency: str = Field(min_length=3, max_length=4)
    initial_balance: Amount | None = None


class BalanceAnswer(BaseModel):
    currency: str
    available: str
    pending: str
    posted: str


class WalletAnswer(BaseModel):
    wallet_id: str
    user_id: str
    balance: str
    currency: str
    status: str
    balances: list[BalanceAnswer]
    created_at: str
    updated_at: str


class VerifyAnswer(BaseModel):
    ok: bool
    discrepancies: list[dict[str, Any]]
    accounts_checked: int
    transfers_checked: int
    entries_checked: int


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
        balances=[
            BalanceAnswer(
                currency=b.currency,
                available=to_major_units(b.available, b.currency),
                pending=to_major_units(b.pending, b.currency),
                posted=to_major_units(b.posted, b.currency),
            )
            for b in w.balances
        ],
        created_at=w.created_at.ToDatetime().isoformat() + "Z",
        updated_at=w.updated_at.ToDatetime().isoformat() + "Z",
    )


# -- wallets


@router.post("/api/v1/wallets", status_code=201, tags=["wallets"], responses=ERROR_RESPONSES)
async def create_wallet(body: CreateWalletBody, who: Caller, ups: Peers) -> WalletAnswer:
    """Creates a user's wallet, funded from their company when an initial
    balance is given. Managers (own company) and admins."""
    if who.role not in ("manager", "admin"):
        raise PermissionDenied("managers and admins create wallets", reason="ROLE_REQUIRED")
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
    """A user's wallet with its balance in every currency."""
    await authorize_user_access(ups, who, user_id, "WALLET_NOT_FOUND")
    response = await call(who, ups.wallet.GetWallet, wallet_pb2.GetWalletRequest(user_id=user_id))
    return wallet_answer(response.wallet)


# -- transfers


@router.post("/api/v1/transfers", tags=["transfers"], responses=ERROR_RESPONSES)
async def create_transfer(
    body: TransferBody,
    who: Caller,
    ups: Peers,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> TransferAnswer:
    """A P2P transfer from the caller's wallet to a user found by id, email,
    phone or username. Retrying with the same idempotency key returns the
    first result and moves nothing again."""
    require_self(who, body.sender_id)
    key = require_idempotency_key(body.idempotency_key, idempotency_key)
    currency = body.currency
    if currency is None:
        sender = await call(
            who, ups.wallet.GetWallet, wallet_pb2.GetWalletRequest(user_id=who.user_id)
        )
        currency = sender.wallet.currency
    amount = parse_amount(body.amount, currency)
    if amount <= 0:
        raise InvalidArgument(
            "amount must be greater than zero",
            reason="INVALID_AMOUNT",
            details={"field": "amount"},
        )
    response = await call(
        who,
        ups.wallet.Transfer,
        wallet_pb2.TransferRequest(
            sender_id=body.sender_id,
            recipient=recipient_of(body.recipient),
            amount=Money(amount=amount, currency=currency),
            idempotency_key=key,
            note=body.note,
            device_id=body.device_id,
        ),
    )
    balance = response.sender_balance
    return TransferAnswer(
        transfer_id=response.transfer_id,
        status=wallet_pb2.TransactionStatus.Name(response.status).removeprefix(
            "TRANSACTION_STATUS_"
        ),
        sender_balance=to_major_units(balance.amount, balance.currency),
        currency=balance.currency,
    )


# -- admin


@router.get("/api/v1/admin/ledger/verify", tags=["admin"], responses=ERROR_RESPONSES)
async def verify_ledger(who: Caller, ups: Peers) -> VerifyAnswer:
    """Proves that no money was created or lost. Admins."""
    if who.role != "admin":
        raise PermissionDenied("admins only", reason="ROLE_REQUIRED")
    r = await call(who, ups.ledger.VerifyLedger, ledger_pb2.VerifyLedgerRequest())
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


class StatusBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: str = Field(pattern="^(ACTIVE|FROZEN|CLOSED)$")
    reason: str = Field(min_length=1, max_length=500)


@router.put("/api/v1/wallets/{wallet_id}/status", tags=["wallets"], responses=ERROR_RESPONSES)
async def update_wallet_status(
    wallet_id: str, body: StatusBody, who: Caller, ups: Peers
) -> WalletAnswer:
    """Freezes, unfreezes or closes a wallet, recording who and why.
    Managers (own company) and admins."""
    require_role(who, "manager", "admin")
    current = await call(
        who, ups.wallet.GetWallet, wallet_pb2.GetWalletRequest(wallet_id=wallet_id)
    )
    if is_self(who, current.wallet.user_id) and who.role != "admin":
        raise PermissionDenied(
            "a manager cannot change their own wallet", reason="SELF_ACTION_FORBIDDEN"
        )
    await authorize_user_access(ups, who, current.wallet.user_id, "WALLET_NOT_FOUND")
    response = await call(
        who,
        ups.wallet.UpdateWalletStatus,
        wallet_pb2.UpdateWalletStatusRequest(
            wallet_id=wallet_id,
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
    await call(
        who,
        ups.wallet.SetPin,
        wallet_pb2.SetPinRequest(user_id=who.user_id, pin=body.pin, current_pin=body.current_pin),
    )
    return Response(status_code=204)


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
    request = wallet_pb2.ListTransactionsRequest(
        wallet_id=wallet.wallet_id,
        types=[
            _enum_value(wallet_pb2.TransactionType, "TRANSACTION_TYPE_", t, "type")
            for t in type or ()
        ],
        status=_enum_value(
            wallet_pb2.TransactionStatus, "TRANSACTION_STATUS_", status or "UNSPECIFIED", "status"
        ),
        min_amount=parse_amount(min_amount, currency, "min_amount")
        if min_amount is not None
        else 0,
        max_amount=parse_amount(max_amount, currency, "max_amount")
        if max_amount is not None
        else 0,
        counterparty=counterparty or "",
        query=q or "",
        page_size=page_size,
        page_token=page_token,
    )
    if from_ is not None:
        request.start_time.FromDatetime(_aware(from_))
    if to is not None:
        request.end_time.FromDatetime(_aware(to))
    response = await call(who, ups.wallet.ListTransactions, request)
    return HistoryAnswer(
        transactions=[
            HistoryItem(
                id=t.id,
                type=wallet_pb2.TransactionType.Name(t.type).removeprefix("TRANSACTION_TYPE_"),
                amount=to_major_units(t.amount.amount, t.amount.currency),
                currency=t.amount.currency,
                counterparty=t.counterparty,
                timestamp=t.created_at.ToDatetime(tzinfo=UTC).isoformat(),
                status=wallet_pb2.TransactionStatus.Name(t.status).removeprefix(
                    "TRANSACTION_STATUS_"
                ),
                description=t.description,
                balance_after=to_major_units(t.balance_after, t.amount.currency),
            )
            for t in response.transactions
        ],
        balance=to_major_units(response.wallet.balance, response.wallet.currency),
        currency=response.wallet.currency,
        next_page_token=response.next_page_token,
    )


def _enum_value(enum: Any, prefix: str, name: str, field: str) -> Any:
    try:
        return enum.Value(prefix + name.upper())
    except ValueError:
        raise InvalidArgument(
            f"unknown {field} {name[:32]!r}", reason=f"INVALID_{field.upper()}"
        ) from None


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


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
    """Confirms a transfer held for review (status PENDING_REVIEW) with the
    payer's PIN. Five wrong PINs lock confirmation for 15 minutes."""
    response = await call(
        who,
        ups.wallet.ConfirmTransfer,
        wallet_pb2.ConfirmTransferRequest(
            transfer_id=transfer_id, user_id=who.user_id, pin=body.pin
        ),
    )
    return ConfirmAnswer(
        transfer_id=response.transfer_id,
        status=wallet_pb2.TransactionStatus.Name(response.status).removeprefix(
            "TRANSACTION_STATUS_"
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
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)


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
    responses=ERROR_RESPONSES,
)
async def post_transaction(
    wallet_id: str,
    body: AdjustmentBody,
    who: Caller,
    ups: Peers,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> TransactionAnswer:
    """A CREDIT or DEBIT by an internal service (role ``service``),
    idempotent by key (or by reference type and id)."""
    require_role(who, "service")
    wallet = (
        await call(who, ups.wallet.GetWallet, wallet_pb2.GetWalletRequest(wallet_id=wallet_id))
    ).wallet
    currency = body.currency or wallet.currency
    response = await call(
        who,
        ups.wallet.PostTransaction,
        wallet_pb2.PostTransactionRequest(
            wallet_id=wallet_id,
            amount=Money(amount=parse_amount(body.amount, currency), currency=currency),
            direction=wallet_pb2.DIRECTION_CREDIT
            if body.type == "CREDIT"
            else wallet_pb2.DIRECTION_DEBIT,
            description=body.description,
            reference_id=body.reference_id,
            reference_type=body.reference_type,
            idempotency_key=body.idempotency_key or idempotency_key or "",
        ),
    )
    t = response.transaction
    return TransactionAnswer(
        txn_id=t.id,
        amount=to_major_units(t.amount.amount, t.amount.currency),
        currency=t.amount.currency,
        type=wallet_pb2.TransactionType.Name(t.type).removeprefix("TRANSACTION_TYPE_"),
        description=t.description,
        status=wallet_pb2.TransactionStatus.Name(t.status).removeprefix("TRANSACTION_STATUS_"),
        balance_after=to_major_units(t.balance_after, t.amount.currency),
        created_at=t.created_at.ToDatetime(tzinfo=UTC).isoformat(),
    )
