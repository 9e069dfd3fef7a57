"""Merchants, merchant payments and currency exchange over HTTP."""

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field

from moneta.common.v1.money_pb2 import Money
from moneta.wallet.v1 import wallet_pb2
from services.common.errors import InvalidArgument
from services.common.money import to_major_units
from services.gateway.deps import (
    ERROR_RESPONSES,
    Amount,
    BalanceAnswer,
    Caller,
    IdempotencyKeyHeader,
    Peers,
    Replays,
    StepUpPin,
    balance_answers,
    call,
    iso,
    parse_amount,
    replay_once,
    require_idempotency_key,
    require_positive_amount,
    require_role,
    require_self,
    status_name,
)

router = APIRouter()


class CreateMerchantBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    currency: str = Field(min_length=3, max_length=4)


class MerchantAnswer(BaseModel):
    merchant_id: str
    name: str
    currency: str
    created_at: str


class CreateQrBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: Amount = Field(description='Decimal string or number, in major units, e.g. "12.50".')
    currency: str = Field(min_length=3, max_length=4)
    reference: str = Field(
        min_length=1, max_length=100, description="The merchant's reference; a QR code pays once."
    )


class QrAnswer(BaseModel):
    qr_payload: str = Field(
        description="A signed payment request: base64url(JSON) '.' base64url(Ed25519 signature)."
    )
    expires_at: str


class PaymentBody(BaseModel):
    """A QR payload, or a merchant id with an amount (in-app checkout)."""

    model_config = ConfigDict(extra="forbid")

    payer_id: str = Field(min_length=1, max_length=64)
    qr_payload: str | None = Field(default=None, min_length=1, max_length=2048)
    merchant_id: str | None = Field(default=None, min_length=1, max_length=64)
    amount: Amount | None = Field(
        default=None, description="With merchant_id: decimal string or number, in major units."
    )
    currency: str | None = Field(default=None, min_length=3, max_length=4)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    category: str | None = Field(default=None, min_length=1, max_length=32)
    device_id: str = Field(default="", max_length=200)
    pin: StepUpPin = None


class PaymentAnswer(BaseModel):
    payment_id: str
    status: str
    payer_balance: str
    currency: str


class QuoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=64)
    from_currency: str = Field(min_length=3, max_length=4)
    to_currency: str = Field(min_length=3, max_length=4)
    amount: Amount = Field(description="In major units of from_currency.")


class QuoteAnswer(BaseModel):
    quote_id: str
    rate: str = Field(
        description="Units of to_currency per unit of from_currency: the cross rate less the "
        "spread, rounded down to 12 significant digits. to_amount = from_amount * rate, rounded "
        "down to the minor unit of to_currency."
    )
    from_amount: str
    from_currency: str
    to_amount: str
    to_currency: str
    expires_at: str


class ExchangeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=64)
    quote_id: str = Field(min_length=1, max_length=64)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)


class ExchangeAnswer(BaseModel):
    exchange_id: str
    status: str
    balances: list[BalanceAnswer]


# -- merchants


@router.post("/api/v1/merchants", status_code=201, tags=["merchants"], responses=ERROR_RESPONSES)
async def create_merchant(body: CreateMerchantBody, who: Caller, ups: Peers) -> MerchantAnswer:
    """Registers a merchant with a settlement account in its currency and a
    signing key for its QR codes. Admins."""
    require_role(who, "admin")
    response = await call(
        who,
        ups.wallet.CreateMerchant,
        wallet_pb2.CreateMerchantRequest(name=body.name, currency=body.currency),
    )
    m = response.merchant
    return MerchantAnswer(
        merchant_id=m.merchant_id, name=m.name, currency=m.currency, created_at=iso(m.created_at)
    )


@router.post(
    "/api/v1/merchants/{merchant_id}/qr",
    status_code=201,
    tags=["merchants"],
    responses=ERROR_RESPONSES,
)
async def create_payment_qr(
    merchant_id: str, body: CreateQrBody, who: Caller, ups: Peers
) -> QrAnswer:
    """A signed payment request for the merchant's QR code, payable once
    until it expires. Admins."""
    require_role(who, "admin")
    amount = require_positive_amount(parse_amount(body.amount, body.currency))
    response = await call(
        who,
        ups.wallet.CreatePaymentQr,
        wallet_pb2.CreatePaymentQrRequest(
            merchant_id=merchant_id,
            amount=Money(amount=amount, currency=body.currency),
            reference=body.reference,
        ),
    )
    return QrAnswer(qr_payload=response.qr_payload, expires_at=iso(response.expires_at))


# -- payments


@router.post(
    "/api/v1/payments",
    tags=["payments"],
    response_model=PaymentAnswer,
    responses=ERROR_RESPONSES,
)
async def pay_merchant(
    body: PaymentBody,
    who: Caller,
    ups: Peers,
    replays: Replays,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Pays a merchant from the caller's wallet: a QR code (paid once), or a
    merchant id with an amount. Retrying with the same idempotency key
    returns the first answer and moves nothing again."""
    require_self(who, body.payer_id)
    key = require_idempotency_key(body.idempotency_key, idempotency_key)
    request = wallet_pb2.PayMerchantRequest(
        payer_id=body.payer_id,
        idempotency_key=key,
        category=body.category or "",
        device_id=body.device_id,
        pin=body.pin or "",
    )
    if body.qr_payload is not None:
        if body.merchant_id is not None or body.amount is not None or body.currency is not None:
            raise InvalidArgument(
                "give either qr_payload or merchant_id with amount and currency, not both",
                reason="AMBIGUOUS_PAYMENT",
            )
        request.qr_payload = body.qr_payload
    else:
        if body.merchant_id is None or body.amount is None or body.currency is None:
            raise InvalidArgument(
                "qr_payload, or merchant_id with amount and currency, is required",
                reason="MISSING_MERCHANT",
            )
        request.merchant_id = body.merchant_id
        request.amount.CopyFrom(
            Money(
                amount=require_positive_amount(parse_amount(body.amount, body.currency)),
                currency=body.currency,
            )
        )

    async def pay() -> PaymentAnswer:
        response = await call(who, ups.wallet.PayMerchant, request)
        balance = response.payer_balance
        return PaymentAnswer(
            payment_id=response.payment_id,
            status=status_name(response.status),
            payer_balance=to_major_units(balance.amount, balance.currency),
            currency=balance.currency,
        )

    return await replay_once(replays, who, key, request, pay)


# -- exchange


@router.post(
    "/api/v1/exchange/quotes", status_code=201, tags=["exchange"], responses=ERROR_RESPONSES
)
async def create_exchange_quote(body: QuoteBody, who: Caller, ups: Peers) -> QuoteAnswer:
    """A quote to exchange an amount of one currency for another, valid for
    a short time (see expires_at)."""
    require_self(who, body.user_id)
    amount = require_positive_amount(parse_amount(body.amount, body.from_currency))
    response = await call(
        who,
        ups.wallet.CreateExchangeQuote,
        wallet_pb2.CreateExchangeQuoteRequest(
            user_id=body.user_id,
            from_currency=body.from_currency,
            to_currency=body.to_currency,
            amount=amount,
        ),
    )
    q = response.quote
    return QuoteAnswer(
        quote_id=q.quote_id,
        rate=q.rate,
        from_amount=to_major_units(q.from_amount.amount, q.from_amount.currency),
        from_currency=q.from_amount.currency,
        to_amount=to_major_units(q.to_amount.amount, q.to_amount.currency),
        to_currency=q.to_amount.currency,
        expires_at=iso(q.expires_at),
    )


@router.post(
    "/api/v1/exchanges",
    tags=["exchange"],
    response_model=ExchangeAnswer,
    responses=ERROR_RESPONSES,
)
async def execute_exchange(
    body: ExchangeBody,
    who: Caller,
    ups: Peers,
    replays: Replays,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Executes the caller's quote at its rate, once, atomically. Retrying
    with the same idempotency key returns the first answer."""
    require_self(who, body.user_id)
    key = require_idempotency_key(body.idempotency_key, idempotency_key)
    request = wallet_pb2.ExecuteExchangeRequest(
        user_id=body.user_id, quote_id=body.quote_id, idempotency_key=key
    )

    async def exchange() -> ExchangeAnswer:
        response = await call(who, ups.wallet.ExecuteExchange, request)
        return ExchangeAnswer(
            exchange_id=response.exchange_id,
            status=status_name(response.status),
            balances=balance_answers(response.balances),
        )

    return await replay_once(replays, who, key, request, exchange)
