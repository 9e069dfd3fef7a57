"""The wallet's gRPC servicer: proto → handler → proto."""

from __future__ import annotations

import asyncpg
import grpc

from moneta.common.v1.money_pb2 import Money
from moneta.wallet.v1 import wallet_pb2 as pb
from moneta.wallet.v1 import wallet_pb2_grpc
from services.common.grpc_util import timestamp
from services.wallet import handlers
from services.wallet.api_banking import BankingApi
from services.wallet.api_payments import PaymentsApi
from services.wallet.config import WalletSettings
from services.wallet.peers import Peers

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["WalletService"].full_name


def user_to_pb(row: asyncpg.Record) -> pb.User:
    return pb.User(
        user_id=str(row["user_id"]),
        email=row["email"],
        phone=row["phone"] or "",
        username=row["username"] or "",
        full_name=row["full_name"],
        company_id=str(row["company_id"] or ""),
        role=row["role"],
        default_currency=row["default_currency"],
        created_at=timestamp(row["created_at"]),
    )


def wallet_to_pb(view: handlers.WalletView) -> pb.Wallet:
    wallet = view.wallet
    currency = wallet["default_currency"]
    default = view.balances.get(currency)
    return pb.Wallet(
        wallet_id=str(wallet["wallet_id"]),
        user_id=str(wallet["user_id"]),
        currency=currency,
        balance=default.available if default else 0,
        status=wallet["status"],
        balances=[
            pb.CurrencyBalance(
                currency=cur, available=b.available, pending=b.pending, posted=b.posted
            )
            for cur, b in view.balances.items()
        ],
        created_at=timestamp(wallet["created_at"]),
        updated_at=timestamp(wallet["updated_at"]),
    )


class WalletApi(BankingApi, PaymentsApi, wallet_pb2_grpc.WalletServiceServicer):
    def __init__(self, pool: asyncpg.Pool, peers: Peers, settings: WalletSettings) -> None:
        self._pool = pool
        self._peers = peers
        self._settings = settings

    async def CreateUser(
        self, request: pb.CreateUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateUserResponse:
        u = request.user
        row = await handlers.create_user(
            self._pool,
            handlers.CreateUserCommand(
                user_id=u.user_id,
                email=u.email,
                phone=u.phone,
                username=u.username,
                full_name=u.full_name,
                company_id=u.company_id,
                role=u.role,
                default_currency=u.default_currency,
            ),
        )
        return pb.CreateUserResponse(user=user_to_pb(row))

    async def GetUser(
        self, request: pb.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUserResponse:
        return pb.GetUserResponse(
            user=user_to_pb(await handlers.get_user(self._pool, request.user_id))
        )

    async def CreateWallet(
        self, request: pb.CreateWalletRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateWalletResponse:
        view = await handlers.create_wallet(
            self._pool,
            self._peers,
            request.user_id,
            request.currency,
            request.initial_balance,
            self._settings.company_credit_limit,
        )
        return pb.CreateWalletResponse(wallet=wallet_to_pb(view))

    async def GetWallet(
        self, request: pb.GetWalletRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetWalletResponse:
        view = await handlers.get_wallet(
            self._pool, self._peers, wallet_id=request.wallet_id, user_id=request.user_id
        )
        return pb.GetWalletResponse(wallet=wallet_to_pb(view))

    async def Transfer(
        self, request: pb.TransferRequest, context: grpc.aio.ServicerContext
    ) -> pb.TransferResponse:
        by = request.recipient.WhichOneof("by") or ""
        outcome = await handlers.transfer(
            self._pool,
            self._peers,
            handlers.TransferCommand(
                sender_id=request.sender_id,
                recipient=(by, getattr(request.recipient, by) if by else ""),
                amount=request.amount.amount,
                currency=request.amount.currency,
                idempotency_key=request.idempotency_key,
                note=request.note,
                category=request.category or "P2P",
                device_id=request.device_id,
                ip=request.ip,
                country=request.country,
            ),
        )
        return pb.TransferResponse(
            transfer_id=str(outcome.transfer_id),
            status=pb.TransactionStatus.Value(f"TRANSACTION_STATUS_{outcome.status}"),
            sender_balance=Money(amount=outcome.sender_balance, currency=outcome.currency),
        )
