"""The wallet's gRPC servicer: proto → handler → proto."""

from __future__ import annotations

import asyncpg
import grpc

from moneta.common.v1.money_pb2 import Money
from moneta.wallet.v1 import wallet_pb2 as pb
from moneta.wallet.v1 import wallet_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.grpc_util import actor_id, optional_timestamp, timestamp
from services.common.ids import parse_uuid
from services.wallet import handlers, history, pins
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
            self._settings.review_hold_seconds,
        )
        return pb.TransferResponse(
            transfer_id=str(outcome.transfer_id),
            status=pb.TransactionStatus.Value(f"TRANSACTION_STATUS_{outcome.status}"),
            sender_balance=Money(amount=outcome.sender_balance, currency=outcome.currency),
        )

    async def UpdateWalletStatus(
        self, request: pb.UpdateWalletStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateWalletStatusResponse:
        view = await handlers.update_wallet_status(
            self._pool,
            self._peers,
            request.wallet_id,
            request.status,
            request.reason,
            actor_id(context) or "unknown",
        )
        return pb.UpdateWalletStatusResponse(wallet=wallet_to_pb(view))

    async def SetPin(
        self, request: pb.SetPinRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetPinResponse:
        await pins.set_pin(self._pool, request.user_id, request.pin, request.current_pin)
        return pb.SetPinResponse()

    async def ListTransactions(
        self, request: pb.ListTransactionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTransactionsResponse:
        query = history.HistoryQuery(
            wallet_id=parse_uuid(request.wallet_id, "wallet_id"),
            start=optional_timestamp(request, "start_time"),
            end=optional_timestamp(request, "end_time"),
            types=frozenset(_type_name(t) for t in request.types),
            status=_status_name(request.status) if request.status else None,
            min_amount=request.min_amount or None,
            max_amount=request.max_amount or None,
            counterparty=request.counterparty or None,
            text=request.query or None,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        rows, token, _ = await handlers.list_transactions(self._pool, query)
        view = await handlers.get_wallet(self._pool, self._peers, wallet_id=request.wallet_id)
        return pb.ListTransactionsResponse(
            transactions=[transaction_to_pb(r) for r in rows],
            next_page_token=token,
            wallet=wallet_to_pb(view),
        )

    async def ConfirmTransfer(
        self, request: pb.ConfirmTransferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ConfirmTransferResponse:
        outcome = await handlers.confirm_transfer(
            self._pool, self._peers, request.transfer_id, request.user_id, request.pin
        )
        return pb.ConfirmTransferResponse(
            transfer_id=str(outcome.transfer_id),
            status=pb.TransactionStatus.Value(f"TRANSACTION_STATUS_{outcome.status}"),
        )

    async def PostTransaction(
        self, request: pb.PostTransactionRequest, context: grpc.aio.ServicerContext
    ) -> pb.PostTransactionResponse:
        if request.direction not in (pb.DIRECTION_CREDIT, pb.DIRECTION_DEBIT):
            raise InvalidArgument("direction must be CREDIT or DEBIT", reason="INVALID_DIRECTION")
        row = await handlers.post_adjustment(
            self._pool,
            self._peers,
            handlers.AdjustmentCommand(
                wallet_id=request.wallet_id,
                amount=request.amount.amount,
                currency=request.amount.currency,
                credit=request.direction == pb.DIRECTION_CREDIT,
                description=request.description,
                reference_id=request.reference_id,
                reference_type=request.reference_type,
                idempotency_key=request.idempotency_key,
            ),
        )
        return pb.PostTransactionResponse(transaction=transaction_to_pb(row))


def _type_name(value: int) -> str:
    try:
        return str(pb.TransactionType.Name(value)).removeprefix("TRANSACTION_TYPE_")  # type: ignore[arg-type]
    except ValueError:
        raise InvalidArgument("unknown transaction type", reason="INVALID_TYPE") from None


def _status_name(value: int) -> str:
    try:
        return str(pb.TransactionStatus.Name(value)).removeprefix("TRANSACTION_STATUS_")  # type: ignore[arg-type]
    except ValueError:
        raise InvalidArgument("unknown transaction status", reason="INVALID_STATUS") from None


def transaction_to_pb(row: asyncpg.Record) -> pb.Transaction:
    return pb.Transaction(
        id=str(row["txn_id"]),
        wallet_id=str(row["wallet_id"]),
        type=pb.TransactionType.Value(f"TRANSACTION_TYPE_{row['type']}"),
        amount=Money(amount=row["amount"], currency=row["currency"]),
        counterparty=row["counterparty"],
        status=pb.TransactionStatus.Value(f"TRANSACTION_STATUS_{row['status']}"),
        description=row["description"],
        balance_after=row["balance_after"] or 0,
        reference_id=row["reference_id"],
        created_at=timestamp(row["created_at"]),
    )
