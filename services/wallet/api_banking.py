"""The wallet's banking RPCs: linked bank accounts, adding funds, cash-out,
and the bank partner's settlements. Mixed into ``WalletApi``."""

from __future__ import annotations

import asyncpg
import grpc

from moneta.wallet.v1 import wallet_pb2 as pb
from services.common.grpc_util import timestamp
from services.wallet import banking
from services.wallet.config import WalletSettings
from services.wallet.peers import Peers

_SETTLEMENT_STATUS = {
    pb.SETTLEMENT_STATUS_SETTLED: "SETTLED",
    pb.SETTLEMENT_STATUS_FAILED: "FAILED",
    pb.SETTLEMENT_STATUS_RETURNED: "RETURNED",
}


def _transaction_status(status: str) -> pb.TransactionStatus.ValueType:
    return pb.TransactionStatus.Value(f"TRANSACTION_STATUS_{status}")


def _bank_transfer_command(
    request: pb.AddFundsRequest | pb.WithdrawRequest, device_id: str = "", pin: str = ""
) -> banking.BankTransferCommand:
    return banking.BankTransferCommand(
        user_id=request.user_id,
        amount=request.amount.amount,
        currency=request.amount.currency,
        bank_account_id=request.bank_account_id,
        idempotency_key=request.idempotency_key,
        device_id=device_id,
        pin=pin,
    )


class BankingApi:
    _pool: asyncpg.Pool
    _peers: Peers
    _settings: WalletSettings

    async def LinkBankAccount(
        self, request: pb.LinkBankAccountRequest, context: grpc.aio.ServicerContext
    ) -> pb.LinkBankAccountResponse:
        linked = await banking.link_bank_account(
            self._pool,
            banking.account_key(self._settings.bank_account_key),
            banking.LinkBankAccountCommand(
                user_id=request.user_id,
                account_number=request.account_number,
                routing_number=request.routing_number,
                holder_name=request.holder_name,
            ),
        )
        return pb.LinkBankAccountResponse(
            bank_account_id=str(linked.bank_account_id), last4=linked.last4
        )

    async def AddFunds(
        self, request: pb.AddFundsRequest, context: grpc.aio.ServicerContext
    ) -> pb.AddFundsResponse:
        outcome = await banking.add_funds(self._pool, self._peers, _bank_transfer_command(request))
        return pb.AddFundsResponse(
            transfer_id=str(outcome.transfer_id),
            status=_transaction_status(outcome.status),
            estimated_completion=timestamp(outcome.estimated_completion),
        )

    async def Withdraw(
        self, request: pb.WithdrawRequest, context: grpc.aio.ServicerContext
    ) -> pb.WithdrawResponse:
        outcome = await banking.withdraw(
            self._pool,
            self._peers,
            _bank_transfer_command(request, device_id=request.device_id, pin=request.pin),
        )
        return pb.WithdrawResponse(
            transfer_id=str(outcome.transfer_id),
            status=_transaction_status(outcome.status),
            estimated_completion=timestamp(outcome.estimated_completion),
        )

    async def ApplyBankSettlement(
        self, request: pb.ApplyBankSettlementRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApplyBankSettlementResponse:
        outcome = await banking.apply_bank_settlement(
            self._pool,
            self._peers,
            banking.SettlementCommand(
                transfer_id=request.transfer_id,
                status=_SETTLEMENT_STATUS.get(request.status, ""),
                bank_reference=request.bank_reference,
                reason=request.reason,
            ),
        )
        return pb.ApplyBankSettlementResponse(
            transfer_id=str(outcome.transfer_id), status=_transaction_status(outcome.status)
        )
