"""gRPC clients of the wallet's peers: ledger, budget and fraud.

Each call turns a failed RPC back into the domain error it stood for, so the
wallet's handlers speak only in domain errors.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Sequence
from typing import TypeVar

import grpc

from moneta.budget.v1 import budget_pb2, budget_pb2_grpc
from moneta.common.v1.money_pb2 import Money
from moneta.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from moneta.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from services.common.errors import Internal, from_rpc_error
from services.common.interceptors import peer_channel
from services.wallet.balance_cache import BalanceCache

T = TypeVar("T")


async def _call(call: Awaitable[T]) -> T:
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None


class Peers:
    def __init__(
        self,
        ledger_addr: str,
        budget_addr: str,
        fraud_addr: str,
        timeout: float,
        cache: BalanceCache | None = None,
    ) -> None:
        self.cache = cache or BalanceCache(None, "")
        self._channels = [peer_channel(a, timeout) for a in (ledger_addr, budget_addr, fraud_addr)]
        self.ledger = ledger_pb2_grpc.LedgerServiceStub(self._channels[0])
        self.budget = budget_pb2_grpc.BudgetServiceStub(self._channels[1])
        self.fraud = fraud_pb2_grpc.FraudServiceStub(self._channels[2])

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    # ---------------------------------------------------------------- ledger

    async def create_accounts(
        self, accounts: Sequence[ledger_pb2.Account], *, keep_existing: bool = False
    ) -> None:
        """Opens the accounts. An id taken with other fields is an error,
        unless ``keep_existing``: then the account as it is will do."""
        response = await _call(
            self.ledger.CreateAccounts(ledger_pb2.CreateAccountsRequest(accounts=accounts))
        )
        accepted = {ledger_pb2.AccountResult.OK, ledger_pb2.AccountResult.EXISTS}
        if keep_existing:
            accepted.add(ledger_pb2.AccountResult.EXISTS_WITH_DIFFERENT_FIELDS)
        for result in response.results:
            if result.code not in accepted:
                name = ledger_pb2.AccountResult.Code.Name(result.code)
                raise Internal(
                    f"ledger refused account {result.id}: {name}", reason="LEDGER_ACCOUNT_REFUSED"
                )

    async def create_transfer(self, transfer: ledger_pb2.Transfer) -> ledger_pb2.TransferResult:
        return (await self.create_transfers([transfer]))[0]

    async def create_transfers(
        self, transfers: Sequence[ledger_pb2.Transfer]
    ) -> list[ledger_pb2.TransferResult]:
        """Several transfers in one request (a linked chain, say): one result
        each, in order."""
        touched = {t.debit_account_id for t in transfers} | {t.credit_account_id for t in transfers}
        try:
            response: ledger_pb2.CreateTransfersResponse = await _call(
                self.ledger.CreateTransfers(ledger_pb2.CreateTransfersRequest(transfers=transfers))
            )
        finally:
            # Whatever the outcome (even unknown), the balances may have moved.
            await self.cache.invalidate(touched)
        stored = {r.transfer.debit_account_id for r in response.results if r.HasField("transfer")}
        stored |= {r.transfer.credit_account_id for r in response.results if r.HasField("transfer")}
        if stored - touched:
            await self.cache.invalidate(stored - touched)
        return list(response.results)

    async def close_account(self, account_id: uuid.UUID, reason: str) -> None:
        """Closes a ledger account: refused (FAILED_PRECONDITION) unless empty."""
        await _call(
            self.ledger.CloseAccount(
                ledger_pb2.CloseAccountRequest(id=str(account_id), reason=reason)
            )
        )

    async def lookup_transfer(self, transfer_id: uuid.UUID) -> ledger_pb2.Transfer | None:
        """The ledger's transfer with this id, if it exists: whether money moved."""
        response: ledger_pb2.LookupTransfersResponse = await _call(
            self.ledger.LookupTransfers(ledger_pb2.LookupTransfersRequest(ids=[str(transfer_id)]))
        )
        return response.transfers[0] if response.transfers else None

    async def balances(self, account_ids: Sequence[uuid.UUID]) -> dict[str, ledger_pb2.Balance]:
        """Balances by account id, read through the cache."""
        return await self.cache.balances(account_ids, self._ledger_balances)

    async def _ledger_balances(
        self, account_ids: Sequence[uuid.UUID]
    ) -> dict[str, ledger_pb2.Balance]:
        response = await _call(
            self.ledger.GetBalances(
                ledger_pb2.GetBalancesRequest(account_ids=[str(a) for a in account_ids])
            )
        )
        return {b.account_id: b for b in response.balances}

    # ---------------------------------------------------------------- fraud

    async def score(self, request: fraud_pb2.ScoreRequest) -> fraud_pb2.ScoreResponse:
        return await _call(self.fraud.Score(request))

    # ---------------------------------------------------------------- budget

    async def reserve(
        self,
        user_id: uuid.UUID,
        amount: int,
        currency: str,
        category: str,
        reference: str,
        ttl_seconds: int = 0,
    ) -> budget_pb2.Reservation:
        response: budget_pb2.ReserveResponse = await _call(
            self.budget.Reserve(
                budget_pb2.ReserveRequest(
                    user_id=str(user_id),
                    amount=Money(amount=amount, currency=currency),
                    category=category,
                    reference=reference,
                    ttl_seconds=ttl_seconds,
                )
            )
        )
        return response.reservation

    async def commit(self, reservation_id: str) -> None:
        await _call(self.budget.Commit(budget_pb2.CommitRequest(reservation_id=reservation_id)))

    async def refund_spend(
        self, reservation_id: str, amount: int, currency: str, reference: str
    ) -> None:
        """Gives committed budget spend back (a cancelled booking)."""
        await _call(
            self.budget.Refund(
                budget_pb2.RefundRequest(
                    reservation_id=reservation_id,
                    amount=Money(amount=amount, currency=currency),
                    reference=reference,
                )
            )
        )

    async def release(self, reservation_id: str) -> None:
        await _call(self.budget.Release(budget_pb2.ReleaseRequest(reservation_id=reservation_id)))
