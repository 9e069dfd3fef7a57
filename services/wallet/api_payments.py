"""The wallet's merchant-payment and currency-exchange RPCs. Mixed into
``WalletApi``."""

from __future__ import annotations

import asyncpg
import grpc

from moneta.common.v1.money_pb2 import Money
from moneta.wallet.v1 import wallet_pb2 as pb
from services.common.fx_rates import format_rate
from services.common.grpc_util import timestamp
from services.wallet import fx, merchants
from services.wallet.config import WalletSettings
from services.wallet.peers import Peers


def merchant_to_pb(row: asyncpg.Record) -> pb.Merchant:
    return pb.Merchant(
        merchant_id=str(row["merchant_id"]),
        name=row["name"],
        currency=row["currency"],
        created_at=timestamp(row["created_at"]),
    )


def quote_to_pb(row: asyncpg.Record) -> pb.ExchangeQuote:
    return pb.ExchangeQuote(
        quote_id=str(row["quote_id"]),
        rate=format_rate(row["rate"]),
        from_amount=Money(amount=row["from_amount"], currency=row["from_currency"]),
        to_amount=Money(amount=row["to_amount"], currency=row["to_currency"]),
        expires_at=timestamp(row["expires_at"]),
    )


def _status(name: str) -> pb.TransactionStatus.ValueType:
    return pb.TransactionStatus.Value(f"TRANSACTION_STATUS_{name}")


class PaymentsApi:
    _pool: asyncpg.Pool
    _peers: Peers
    _settings: WalletSettings

    async def CreateMerchant(
        self, request: pb.CreateMerchantRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateMerchantResponse:
        row = await merchants.create_merchant(
            self._pool, self._peers, self._settings.bank_account_key, request.name, request.currency
        )
        return pb.CreateMerchantResponse(merchant=merchant_to_pb(row))

    async def CreatePaymentQr(
        self, request: pb.CreatePaymentQrRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreatePaymentQrResponse:
        payload, expires_at = await merchants.create_payment_qr(
            self._pool,
            self._settings.bank_account_key,
            self._settings.qr_ttl_seconds,
            request.merchant_id,
            request.amount.amount,
            request.amount.currency,
            request.reference,
        )
        return pb.CreatePaymentQrResponse(qr_payload=payload, expires_at=timestamp(expires_at))

    async def PayMerchant(
        self, request: pb.PayMerchantRequest, context: grpc.aio.ServicerContext
    ) -> pb.PayMerchantResponse:
        outcome = await merchants.pay_merchant(
            self._pool,
            self._peers,
            merchants.PayMerchantCommand(
                payer_id=request.payer_id,
                idempotency_key=request.idempotency_key,
                qr_payload=request.qr_payload,
                merchant_id=request.merchant_id,
                amount=request.amount.amount,
                currency=request.amount.currency,
                category=request.category or merchants.DEFAULT_CATEGORY,
                device_id=request.device_id,
                pin=request.pin,
            ),
        )
        return pb.PayMerchantResponse(
            payment_id=str(outcome.payment_id),
            status=_status(outcome.status),
            payer_balance=Money(amount=outcome.payer_balance, currency=outcome.currency),
        )

    async def CreateExchangeQuote(
        self, request: pb.CreateExchangeQuoteRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateExchangeQuoteResponse:
        row = await fx.create_quote(
            self._pool,
            rates=self._settings.fx_rates,
            spread_bps=self._settings.fx_spread_bps,
            ttl_seconds=self._settings.fx_quote_ttl_seconds,
            user_id=request.user_id,
            from_currency=request.from_currency,
            to_currency=request.to_currency,
            amount=request.amount,
        )
        return pb.CreateExchangeQuoteResponse(quote=quote_to_pb(row))

    async def ExecuteExchange(
        self, request: pb.ExecuteExchangeRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExecuteExchangeResponse:
        outcome = await fx.execute_exchange(
            self._pool,
            self._peers,
            user_id=request.user_id,
            quote_id=request.quote_id,
            idempotency_key=request.idempotency_key,
        )
        return pb.ExecuteExchangeResponse(
            exchange_id=str(outcome.exchange_id),
            status=_status(outcome.status),
            balances=[
                pb.CurrencyBalance(
                    currency=str(b["currency"]),
                    available=int(b["available"]),
                    pending=int(b["pending"]),
                    posted=int(b["posted"]),
                )
                for b in outcome.balances
            ],
        )
