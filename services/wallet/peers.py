"""gRPC clients of the wallet's peers: ledger, budget and fraud.

Each call turns a failed RPC back into the domain error it stood for, so the
wallet's handlers speak only in domain errors.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TypeVar

import grpc
import structlog
from prometheus_client import Counter

from moneta.budget.v1 import budget_pb2, budget_pb2_grpc
from moneta.common.v1.money_pb2 import Money
from moneta.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from moneta.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from services.common.config import CommonSettings
from services.common.errors import DeadlineExceeded, Internal, Unavailable, from_rpc_error
from services.common.grpc_util import ACTOR_ID_HEADER
from services.common.interceptors import peer_channel
from services.common.money import to_minor_units
from services.wallet import leases
from services.wallet.balance_cache import BalanceCache
from services.wallet.config import WalletSettings

T = TypeVar("T")
log = structlog.get_logger("moneta.wallet")

FRAUD_UNAVAILABLE = Counter(
    "moneta_wallet_fraud_unavailable_total",
    "Payments the fraud service did not score in time, by what the wallet did.",
    ["outcome"],
)


@dataclass(frozen=True)
class FraudFallback:
    """What the wallet does when the fraud service does not answer in time."""

    policy: str = "limit"
    review_amount: Decimal = Decimal("10000")
    timeout_seconds: float = 1.0

    @classmethod
    def of(cls, settings: CommonSettings | None) -> FraudFallback:
        if not isinstance(settings, WalletSettings):
            return cls()
        return cls(settings.fraud_unavailable_policy, settings.fraud_review_amount,
                   settings.fraud_timeout_seconds)  # fmt: skip

    def allows(self, amount: int, currency: str) -> bool:
        if self.policy in ("allow", "refuse"):
            return self.policy == "allow"
        return amount < to_minor_units(self.review_amount, currency)


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
        tls: CommonSettings | None = None,
    ) -> None:
        self.cache = cache or BalanceCache(None, "")
        # Every call's deadline, unless it sets a shorter one.
        self.timeout = timeout
        self._channels = [
            peer_channel(a, timeout, tls) for a in (ledger_addr, budget_addr, fraud_addr)
        ]
        self.ledger = ledger_pb2_grpc.LedgerServiceStub(self._channels[0])
        self.budget = budget_pb2_grpc.BudgetServiceStub(self._channels[1])
        self.fraud = fraud_pb2_grpc.FraudServiceStub(self._channels[2])
        self.fraud_fallback = FraudFallback.of(tls)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        await self.cache.close()

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
        each, in order. Under a lease (``leases.holding``), refused
        ATTEMPT_EXPIRED, unsent, unless the lease outlives the call."""
        leases.ensure_time_left(self.timeout)
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

    async def balances_after_write(
        self, account_ids: Sequence[uuid.UUID]
    ) -> dict[str, ledger_pb2.Balance]:
        """Balances of accounts this process has just written and
        invalidated, from the ledger (see ``BalanceCache.balances_after_write``)."""
        return await self.cache.balances_after_write(account_ids, self._ledger_balances)

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
        """The fraud service's verdict. When it does not answer in time, the
        configured fallback: an ALLOW (model version "wallet-fallback") or
        UNAVAILABLE with reason FRAUD_CHECK_UNAVAILABLE."""
        fallback = self.fraud_fallback
        try:
            return await _call(self.fraud.Score(request, timeout=fallback.timeout_seconds))
        except (Unavailable, DeadlineExceeded) as exc:
            allowed = fallback.allows(request.amount.amount, request.amount.currency)
            FRAUD_UNAVAILABLE.labels("allowed" if allowed else "refused").inc()
            log.warning("fraud_unavailable", transaction_id=request.transaction_id,
                        reason=exc.reason, policy=fallback.policy, allowed=allowed)  # fmt: skip
            if not allowed:
                raise Unavailable(
                    "the payment cannot be checked for fraud now; try again shortly",
                    reason="FRAUD_CHECK_UNAVAILABLE",
                ) from None
            return fraud_pb2.ScoreResponse(
                transaction_id=request.transaction_id,
                decision=fraud_pb2.DECISION_ALLOW,
                model_version="wallet-fallback",
            )

    async def approve_review(self, transaction_id: uuid.UUID, payer: uuid.UUID) -> None:
        """Tells fraud the payer confirmed a held payment with their PIN: its
        review case is approved. FAILED_PRECONDITION REVIEW_ALREADY_RESOLVED:
        an analyst rejected it first."""
        await _call(
            self.fraud.ResolveReview(
                fraud_pb2.ResolveReviewRequest(
                    transaction_id=str(transaction_id), decision=fraud_pb2.REVIEW_DECISION_APPROVE
                ),
                metadata=((ACTOR_ID_HEADER, f"payer-pin:{payer}"),),
                timeout=self.fraud_fallback.timeout_seconds,
            )
        )

    # ---------------------------------------------------------------- budget

    async def reserve(
        self,
        user_id: uuid.UUID,
        amount: int,
        currency: str,
        category: str,
        reference: str,
        ttl_seconds: int = 0,
        reservation_id: uuid.UUID | None = None,
    ) -> budget_pb2.Reservation:
        response: budget_pb2.ReserveResponse = await _call(
            self.budget.Reserve(
                budget_pb2.ReserveRequest(
                    user_id=str(user_id),
                    amount=Money(amount=amount, currency=currency),
                    category=category,
                    reference=reference,
                    ttl_seconds=ttl_seconds,
                    reservation_id=str(reservation_id) if reservation_id else "",
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

    async def apply_company_policy(
        self, user_id: uuid.UUID, company_id: uuid.UUID, wallet_id: uuid.UUID
    ) -> list[budget_pb2.Budget]:
        """The company's default budgets for a new user; those created now."""
        response: budget_pb2.ApplyCompanyPolicyResponse = await _call(
            self.budget.ApplyCompanyPolicy(
                budget_pb2.ApplyCompanyPolicyRequest(
                    user_id=str(user_id), company_id=str(company_id), wallet_id=str(wallet_id)
                )
            )
        )
        return list(response.created)
