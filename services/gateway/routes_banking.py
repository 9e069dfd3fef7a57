"""Bank accounts, adding funds, cash-out and the bank partner's webhook over
HTTP."""

import hashlib
import hmac
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moneta.common.v1.money_pb2 import Money
from moneta.wallet.v1 import wallet_pb2
from services.common.errors import Unauthenticated
from services.gateway.auth import Principal
from services.gateway.config import GatewaySettings
from services.gateway.deps import (
    ERROR_RESPONSES,
    Amount,
    Caller,
    IdempotencyKeyHeader,
    Peers,
    Replays,
    StepUpPin,
    Upstreams,
    call,
    limit_by_ip,
    positive_money,
    replay_once,
    require_idempotency_key,
    require_self,
    status_name,
)

router = APIRouter()

# A signed webhook older (or further ahead) than this is refused: a captured
# delivery cannot be replayed later.
WEBHOOK_TOLERANCE_SECONDS = 300
SIGNATURE_HEADER = "X-Moneta-Signature"
# Who the wallet records as acting on a settlement.
BANK_PARTNER = Principal(user_id="bank-partner", role="service", company_id="")


# -- the webhook signature (pure)


def webhook_signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``"<timestamp>.<raw body>"``."""
    return hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify_webhook_signature(
    secret: bytes,
    header: str | None,
    body: bytes,
    now: float,
    tolerance_seconds: int = WEBHOOK_TOLERANCE_SECONDS,
) -> None:
    """Accepts ``t=<unix seconds>,v1=<hex>`` (several v1 values allowed, so
    that a partner can sign with an old and a new secret while they rotate)
    when a v1 matches and t is within the tolerance of ``now``; raises
    UNAUTHENTICATED with WEBHOOK_SIGNATURE_INVALID or WEBHOOK_EXPIRED."""
    invalid = Unauthenticated(
        f"the {SIGNATURE_HEADER} header is missing or does not match the body",
        reason="WEBHOOK_SIGNATURE_INVALID",
    )
    if not header or len(header) > 1024:
        raise invalid
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(name, []).append(value)
    stamps = fields.get("t", [])
    if len(stamps) != 1 or not (stamps[0].isascii() and stamps[0].isdigit()) or len(stamps[0]) > 12:
        raise invalid
    timestamp = int(stamps[0])
    expected = webhook_signature(secret, timestamp, body).encode()
    if not any(hmac.compare_digest(expected, given.encode()) for given in fields.get("v1", [])):
        raise invalid
    if abs(now - timestamp) > tolerance_seconds:
        raise Unauthenticated(
            f"the webhook was signed more than {tolerance_seconds} seconds from now",
            reason="WEBHOOK_EXPIRED",
        )


async def webhook_secret(request: Request) -> bytes:
    """The webhook secret from the gateway's settings, read once."""
    state = request.app.state
    secret: bytes | None = getattr(state, "bank_webhook_secret", None)
    if secret is None:
        settings = getattr(state, "settings", None)
        if not isinstance(settings, GatewaySettings):
            settings = GatewaySettings()
        secret = settings.bank_webhook_secret.encode()
        state.bank_webhook_secret = secret
    return secret


# -- bodies and answers


class LinkBankAccountBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=64)
    account_number: str = Field(min_length=1, max_length=34, description="4 to 17 digits.")
    routing_number: str = Field(
        min_length=1, max_length=34, description="A 9-digit ABA routing number."
    )
    holder_name: str = Field(min_length=1, max_length=200)


class LinkBankAccountAnswer(BaseModel):
    bank_account_id: str
    last4: str


class BankTransferBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=64)
    amount: Amount = Field(description='Decimal string or number, in major units, e.g. "50.00".')
    currency: str | None = Field(
        default=None, min_length=3, max_length=4, description="Default: the wallet's currency."
    )
    bank_account_id: str = Field(min_length=1, max_length=64)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)


class WithdrawBody(BankTransferBody):
    device_id: str = Field(default="", max_length=200)
    pin: StepUpPin = None


class BankTransferAnswer(BaseModel):
    transfer_id: str
    status: str
    estimated_completion: str


class BankWebhookBody(BaseModel):
    # A partner adding fields must not make its deliveries fail.
    model_config = ConfigDict(extra="ignore")

    transfer_id: str = Field(min_length=1, max_length=64)
    status: Literal["SETTLED", "FAILED", "RETURNED"]
    bank_reference: str = Field(min_length=1, max_length=200)
    reason: str | None = Field(default=None, max_length=500)


class BankWebhookAnswer(BaseModel):
    transfer_id: str
    status: str


# -- routes


@router.post(
    "/api/v1/wallet/bank-accounts", status_code=201, tags=["banking"], responses=ERROR_RESPONSES
)
async def link_bank_account(
    body: LinkBankAccountBody, who: Caller, ups: Peers
) -> LinkBankAccountAnswer:
    """Links a bank account to the caller's wallet. The account number is
    stored encrypted; only its last four digits are ever returned."""
    require_self(who, body.user_id)
    response = await call(
        who,
        ups.wallet.LinkBankAccount,
        wallet_pb2.LinkBankAccountRequest(
            user_id=body.user_id,
            account_number=body.account_number,
            routing_number=body.routing_number,
            holder_name=body.holder_name,
        ),
    )
    return LinkBankAccountAnswer(bank_account_id=response.bank_account_id, last4=response.last4)


async def _bank_transfer(
    body: BankTransferBody, who: Principal, ups: Upstreams, header_key: str | None
) -> tuple[str, Money]:
    require_self(who, body.user_id)
    key = require_idempotency_key(body.idempotency_key, header_key)
    return key, await positive_money(ups, who, body.amount, body.currency, body.user_id)


def _bank_transfer_answer(
    response: wallet_pb2.AddFundsResponse | wallet_pb2.WithdrawResponse,
) -> BankTransferAnswer:
    return BankTransferAnswer(
        transfer_id=response.transfer_id,
        status=status_name(response.status),
        estimated_completion=response.estimated_completion.ToDatetime().isoformat() + "Z",
    )


@router.post(
    "/api/v1/wallet/add-funds",
    status_code=202,
    tags=["banking"],
    response_model=BankTransferAnswer,
    responses=ERROR_RESPONSES,
)
async def add_funds(
    body: BankTransferBody,
    who: Caller,
    ups: Peers,
    replays: Replays,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Collects money from a linked bank account into the caller's wallet. It
    shows as pending, not available, until the bank settles it (two to three
    business days). Retrying with the same idempotency key returns the first
    answer and moves nothing again."""
    key, money = await _bank_transfer(body, who, ups, idempotency_key)
    request = wallet_pb2.AddFundsRequest(
        user_id=body.user_id,
        amount=money,
        bank_account_id=body.bank_account_id,
        idempotency_key=key,
    )

    async def add() -> BankTransferAnswer:
        return _bank_transfer_answer(await call(who, ups.wallet.AddFunds, request))

    return await replay_once(replays, who, key, request, add, status_code=202)


@router.post(
    "/api/v1/wallet/withdraw",
    status_code=202,
    tags=["banking"],
    response_model=BankTransferAnswer,
    responses=ERROR_RESPONSES,
)
async def withdraw(
    body: WithdrawBody,
    who: Caller,
    ups: Peers,
    replays: Replays,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Pays money out of the caller's wallet to a linked bank account. The
    amount is held at once (it cannot be spent again) and leaves when the
    bank settles. Refused from a frozen or closed wallet."""
    key, money = await _bank_transfer(body, who, ups, idempotency_key)
    request = wallet_pb2.WithdrawRequest(
        user_id=body.user_id,
        amount=money,
        bank_account_id=body.bank_account_id,
        idempotency_key=key,
        device_id=body.device_id,
        pin=body.pin or "",
    )

    async def pay_out() -> BankTransferAnswer:
        return _bank_transfer_answer(await call(who, ups.wallet.Withdraw, request))

    return await replay_once(replays, who, key, request, pay_out, status_code=202)


@router.post(
    "/api/v1/webhooks/bank",
    tags=["webhooks"],
    responses=ERROR_RESPONSES,
    dependencies=[Depends(limit_by_ip)],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": BankWebhookBody.model_json_schema()}},
        }
    },
)
async def bank_webhook(
    request: Request,
    ups: Peers,
    secret: Annotated[bytes, Depends(webhook_secret)],
    x_moneta_signature: Annotated[
        str | None,
        Header(description="t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.<raw body>'>"),
    ] = None,
) -> BankWebhookAnswer:
    """The bank partner reports a settlement: SETTLED, FAILED, or RETURNED
    after settlement. Signed; a delivery repeated changes nothing and
    answers the same status."""
    raw = await request.body()
    verify_webhook_signature(secret, x_moneta_signature, raw, time.time())
    try:
        body = BankWebhookBody.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    response = await call(
        BANK_PARTNER,
        ups.wallet.ApplyBankSettlement,
        wallet_pb2.ApplyBankSettlementRequest(
            transfer_id=body.transfer_id,
            status=wallet_pb2.SettlementStatus.Value(f"SETTLEMENT_STATUS_{body.status}"),
            bank_reference=body.bank_reference,
            reason=body.reason or "",
        ),
    )
    return BankWebhookAnswer(transfer_id=response.transfer_id, status=status_name(response.status))
