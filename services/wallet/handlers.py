"""The wallet's use cases.

A P2P transfer goes: idempotency → fraud score → budget reservation → ledger
transfer → budget commit. Every step is keyed by the payment's id, so a
retried request (or a resumed one after a crash) repeats no effect: fraud
scores it once, the budget reserves it once, the ledger moves it once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC
from decimal import Decimal
from typing import TypeVar

import asyncpg
import structlog
from prometheus_client import Counter

from moneta.budget.v1 import budget_pb2
from moneta.common.v1.money_pb2 import Money
from moneta.fraud.v1 import fraud_pb2
from moneta.ledger.v1 import ledger_pb2
from services.common import outbox
from services.common.db import DbConn
from services.common.errors import (
    Aborted,
    AlreadyExists,
    AttemptExpired,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MonetaError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from services.common.ids import parse_uuid
from services.common.money import (
    INT64_MAX,
    require_positive,
    to_major_units,
    to_minor_units,
    validate_currency,
)
from services.wallet import history, leases, pins, store
from services.wallet.domain import (
    NAMESPACE,
    Role,
    UserFields,
    WalletStatus,
    company_funding_account_id,
    display_name,
    ensure_can_receive,
    ensure_can_send,
    initial_funding_transfer_id,
    payment_id,
    request_hash,
    validate_idempotency_key,
    wallet_account_id,
    wallet_id_for,
)
from services.wallet.leases import Lease
from services.wallet.peers import Peers

log = structlog.get_logger("moneta.wallet")

BUDGET_COMMIT_FAILURES = Counter(
    "moneta_wallet_budget_commit_failures_total",
    "Payments whose money moved but whose budget spend could not be committed.",
)
BUDGET_FOLLOW_UPS = Counter(
    "moneta_wallet_budget_follow_up_failures_total",
    "Budget reservations the wallet could not release, or spend it could not give back,"
    " though the money did not move or came back (logged for follow-up).",
    ["action"],
)
REVIEW_APPROVALS_LOST = Counter(
    "moneta_wallet_review_approvals_lost_total",
    "Payments confirmed with the payer's PIN whose fraud review case could not be approved.",
)

_OK_CODES = (ledger_pb2.TransferResult.OK, ledger_pb2.TransferResult.EXISTS)


# ---------------------------------------------------------------- users


@dataclass(frozen=True)
class CreateUserCommand:
    user_id: str
    email: str
    phone: str
    username: str
    full_name: str
    company_id: str
    role: int
    default_currency: str


async def create_user(pool: asyncpg.Pool, cmd: CreateUserCommand) -> asyncpg.Record:
    """Creates the user once; the same user again is answered as it is."""
    user_id = parse_uuid(cmd.user_id, "user_id")
    fields = UserFields.validated(cmd.email, cmd.phone, cmd.username, cmd.full_name)
    company_id = parse_uuid(cmd.company_id, "company_id") if cmd.company_id else None
    try:
        role = Role(cmd.role or Role.USER)
    except ValueError:
        raise InvalidArgument(
            "role must be USER, MANAGER or ADMIN", reason="INVALID_ROLE"
        ) from None
    currency = validate_currency(cmd.default_currency or "USD")
    try:
        async with pool.acquire() as conn, conn.transaction():
            await store.insert_user(
                conn,
                user_id=user_id,
                email=fields.email,
                phone=fields.phone,
                username=fields.username,
                full_name=fields.full_name,
                company_id=company_id,
                role=int(role),
                default_currency=currency,
            )
            row = await store.fetch_user(conn, user_id)
    except AlreadyExists:
        # The same id inserted at the same moment (two deliveries of one
        # event) can trip the email or username index before the id's: a
        # conflict on the id after all, compared below.
        async with pool.acquire() as conn:
            row = await store.fetch_user(conn, user_id)
        if row is None:
            raise
    assert row is not None
    wanted = (
        fields.email,
        fields.phone,
        fields.username,
        fields.full_name,
        company_id,
        role,
        currency,
    )
    stored = (
        row["email"],
        row["phone"],
        row["username"],
        row["full_name"],
        row["company_id"],
        row["role"],
        row["default_currency"],
    )
    if wanted != stored:
        raise AlreadyExists("a different user has this id", reason="USER_EXISTS")
    return row


async def get_user(pool: asyncpg.Pool, user_id: str) -> asyncpg.Record:
    async with pool.acquire() as conn:
        row = await store.fetch_user(conn, parse_uuid(user_id, "user_id"))
    if row is None:
        raise NotFound("no such user", reason="USER_NOT_FOUND")
    return row


# ---------------------------------------------------------------- wallets


@dataclass(frozen=True)
class WalletView:
    wallet: asyncpg.Record
    # currency → ledger balance
    balances: dict[str, ledger_pb2.Balance]


async def create_wallet(
    pool: asyncpg.Pool,
    peers: Peers,
    user_id: str,
    currency: str,
    initial_balance: int,
    company_credit_limit: Decimal,
) -> WalletView:
    """Creates the user's wallet, funded from their company's funding account
    when an initial balance is asked for: money never appears from nothing."""
    user = await get_user(pool, user_id)
    currency = validate_currency(currency or user["default_currency"])
    if not 0 <= initial_balance <= INT64_MAX:
        raise InvalidArgument("initial_balance must not be negative", reason="INVALID_AMOUNT")
    wallet_id = wallet_id_for(user["user_id"])
    account_id = wallet_account_id(wallet_id, currency)

    # The wallet is recorded with what was asked before anything is funded,
    # so that a retry after a crash finishes the same wallet and a different
    # request is told the wallet exists. Every ledger step is idempotent.
    async with pool.acquire() as conn, conn.transaction():
        await store.insert_wallet(
            conn,
            wallet_id=wallet_id,
            user_id=user["user_id"],
            currency=currency,
            initial_balance=initial_balance,
            ledger_account_id=account_id,
        )
        if initial_balance == 0:
            # Nothing to fund: the wallet is complete as recorded.
            await _announce_wallet(conn, wallet_id, user["user_id"], 0, currency)
        existing = await store.fetch_wallet(conn, wallet_id=wallet_id)
    assert existing is not None
    if (existing["default_currency"], existing["initial_balance"]) != (currency, initial_balance):
        raise AlreadyExists("the user has a wallet already", reason="WALLET_EXISTS")

    funding_id = company_funding_account_id(user["company_id"], currency)
    await peers.create_accounts(
        [
            ledger_pb2.Account(
                id=str(account_id),
                currency=currency,
                type=ledger_pb2.ACCOUNT_TYPE_USER_WALLET,
                no_overdraft=True,
                metadata={"wallet_id": str(wallet_id), "user_id": str(user["user_id"])},
            )
        ]
    )
    # Opened once; its credit line stays what it was then.
    await peers.create_accounts(
        [
            ledger_pb2.Account(
                id=str(funding_id),
                currency=currency,
                type=ledger_pb2.ACCOUNT_TYPE_COMPANY_FUNDING,
                # A company spends what it has prefunded plus its credit line.
                no_overdraft=True,
                overdraft_limit=to_minor_units(company_credit_limit, currency),
                metadata={"company_id": str(user["company_id"] or "platform")},
            ),
        ],
        keep_existing=True,
    )
    if initial_balance > 0:
        result = await peers.create_transfer(
            ledger_pb2.Transfer(
                id=str(initial_funding_transfer_id(wallet_id)),
                debit_account_id=str(funding_id),
                credit_account_id=str(account_id),
                amount=initial_balance,
                currency=currency,
                code="INITIAL_FUNDING",
            )
        )
        if result.code == ledger_pb2.TransferResult.INSUFFICIENT_FUNDS:
            raise FailedPrecondition(
                "the company's funding account cannot cover the initial balance",
                reason="COMPANY_FUNDS_INSUFFICIENT",
            )
        if result.code not in _OK_CODES:
            raise Internal(
                "the ledger refused the initial funding: "
                + ledger_pb2.TransferResult.Code.Name(result.code),
                reason="LEDGER_REFUSED",
            )
        async with pool.acquire() as conn, conn.transaction():
            await _announce_wallet(conn, wallet_id, user["user_id"], initial_balance, currency)
            await history.record(
                conn,
                history.Movement(
                    wallet_id=wallet_id,
                    ledger_transfer_id=initial_funding_transfer_id(wallet_id),
                    type="ADJUSTMENT",
                    amount=initial_balance,
                    currency=currency,
                    status="COMPLETED",
                    counterparty="Company funding",
                    description="Initial balance",
                    balance_after=initial_balance,
                ),
            )
    log.info("wallet_created", wallet_id=str(wallet_id), currency=currency)
    return await get_wallet(pool, peers, wallet_id=str(wallet_id))


async def _announce_wallet(
    conn: DbConn, wallet_id: uuid.UUID, user_id: uuid.UUID, initial_balance: int, currency: str
) -> None:
    """WalletCreated, once the wallet is complete (funded, if it asked to be)."""
    await outbox.add_event(
        conn,
        event_id=uuid.uuid5(NAMESPACE, f"wallet-created:{wallet_id}"),
        event_type="WalletCreated",
        routing_key="wallet.created",
        aggregate_id=str(wallet_id),
        data={
            "wallet_id": str(wallet_id),
            "user_id": str(user_id),
            "initial_balance": to_major_units(initial_balance, currency),
            "currency": currency,
        },
    )


async def get_wallet(
    pool: asyncpg.Pool, peers: Peers, *, wallet_id: str = "", user_id: str = ""
) -> WalletView:
    async with pool.acquire() as conn:
        if wallet_id:
            wallet = await store.fetch_wallet(conn, wallet_id=parse_uuid(wallet_id, "wallet_id"))
        elif user_id:
            wallet = await store.fetch_wallet(conn, user_id=parse_uuid(user_id, "user_id"))
        else:
            raise InvalidArgument("wallet_id or user_id is required", reason="MISSING_ID")
        if wallet is None:
            raise NotFound("no such wallet", reason="WALLET_NOT_FOUND")
        accounts = await store.wallet_accounts(conn, wallet["wallet_id"])
    by_account = await peers.balances(list(accounts.values()))
    balances = {
        cur: by_account[str(acc)] for cur, acc in accounts.items() if str(acc) in by_account
    }
    return WalletView(wallet=wallet, balances=balances)


# ---------------------------------------------------------------- P2P


@dataclass(frozen=True)
class TransferCommand:
    sender_id: str
    # ("user_id" | "email" | "phone" | "username", value)
    recipient: tuple[str, str]
    amount: int
    currency: str
    idempotency_key: str
    note: str = ""
    category: str = "P2P"
    device_id: str = ""
    ip: str = ""
    country: str = ""


@dataclass(frozen=True)
class TransferOutcome:
    transfer_id: uuid.UUID
    status: str
    sender_balance: int
    currency: str


class TransactionDeclined(FailedPrecondition):
    default_reason = "TRANSACTION_DECLINED"


def _recipient_uuid(by: str, value: str) -> uuid.UUID | None:
    """The recipient's user id when it is given as a well-formed one."""
    if by != "user_id":
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None  # refused as _resolve_recipient refuses it


async def _resolve_recipient(conn: DbConn, by: str, value: str) -> asyncpg.Record:
    if by == "user_id":
        row = await store.fetch_user(conn, parse_uuid(value, "recipient.user_id"))
    elif by in ("email", "phone", "username") and value:
        row = await store.find_user(conn, by=by, value=value)
    else:
        raise InvalidArgument("recipient is required", reason="MISSING_RECIPIENT")
    if row is None:
        raise NotFound("no such recipient", reason="RECIPIENT_NOT_FOUND")
    return row


# An attempt holds a payment this long: longer than the whole pipeline can
# take with every peer call at its deadline, so a lease only lapses once its
# attempt is over (finished, or crashed), or stalled: and a stalled attempt
# is fenced (services/wallet/leases.py, docs/wallet.md).
LEASE_SECONDS = 30.0


async def transfer(
    pool: asyncpg.Pool, peers: Peers, cmd: TransferCommand, review_seconds: int = 900
) -> TransferOutcome:
    sender_id = parse_uuid(cmd.sender_id, "sender_id")
    key = validate_idempotency_key(cmd.idempotency_key)
    require_positive(cmd.amount)
    if len(cmd.note) > 500:
        raise InvalidArgument("note is at most 500 characters", reason="INVALID_NOTE")

    async with pool.acquire() as conn:
        # A recipient named by a well-formed id is read with the sender, in
        # one round trip; one named otherwise is found first.
        recipient_id = _recipient_uuid(*cmd.recipient)
        wallets = await store.fetch_wallets_and_accounts(
            conn, [sender_id] if recipient_id is None else [sender_id, recipient_id]
        )
        if sender_id not in wallets:
            raise NotFound("the sender has no wallet", reason="WALLET_NOT_FOUND")
        sender_wallet, sender_accounts = wallets[sender_id]
        currency = validate_currency(cmd.currency or sender_wallet["default_currency"])
        if recipient_id is None:
            recipient_id = (await _resolve_recipient(conn, *cmd.recipient))["user_id"]
            if recipient_id != sender_id:
                wallets |= await store.fetch_wallets_and_accounts(conn, [recipient_id])
        if recipient_id == sender_id:
            raise InvalidArgument("a transfer to oneself moves nothing", reason="SELF_TRANSFER")
        if recipient_id not in wallets:  # no such user, or one without a wallet
            raise NotFound("no such recipient", reason="RECIPIENT_NOT_FOUND")
        recipient_wallet, recipient_accounts = wallets[recipient_id]
        pid = payment_id(sender_id, key)
        fingerprint = request_hash(
            recipient=recipient_id,
            amount=cmd.amount,
            currency=currency,
            note=cmd.note,
            category=cmd.category,
        )
        payment, claimed = await store.claim_payment(
            conn,
            payment_id=pid,
            kind="P2P",
            sender_user_id=sender_id,
            idempotency_key=key,
            request_hash=fingerprint,
            recipient_user_id=recipient_id,
            amount=cmd.amount,
            currency=currency,
            note=cmd.note,
            lease_seconds=LEASE_SECONDS,
        )

    fresh = claimed is not None
    replayed, lease = await admit_attempt(pool, payment, pid, fingerprint, _replay, claimed)
    if replayed is not None:
        return replayed
    assert lease is not None
    step = _Payment(
        pool, peers, pid, cmd, currency, sender_wallet, sender_accounts, recipient_wallet,
        reservation_id=payment["reservation_id"], review_seconds=review_seconds,
        recipient_accounts=recipient_accounts,
    )  # fmt: skip
    try:
        with leases.holding(lease):
            return await step.drive(resumed=not fresh)
    except AttemptExpired:
        raise  # the lease may be another attempt's by now: nothing to record or release
    except FailedPrecondition as refusal:
        # Refused before any money moved: final for this key, a retry replays it.
        async with pool.acquire() as conn:
            recorded = await store.fail_payment(
                conn, pid, refusal.reason, refusal.message, lease=lease
            )
        if not recorded:
            # This attempt outlived its lease: another one holds the payment
            # (or finished it), and its outcome is the payment's.
            raise AttemptExpired() from refusal
        if not step.moved and (not fresh or step.reservation_id is not None):
            # What this or an earlier attempt reserved is freed now, not at
            # its ttl: only once the refusal is recorded under this attempt's
            # lease, as a retry that took over may have reserved (and moved
            # money) under the same name.
            await release_quietly(peers, reservation_of(step.reservation_id, pid))
        raise
    except BaseException:
        # Outcome unknown (a peer timed out, the call was cancelled): the
        # next attempt, or the reconciler, asks the ledger what happened.
        async with pool.acquire() as conn:
            await store.release_lease(conn, pid, lease)
        raise


Outcome = TypeVar("Outcome")


async def admit_attempt(
    pool: asyncpg.Pool,
    payment: asyncpg.Record,
    pid: uuid.UUID,
    fingerprint: str,
    replay: Callable[[asyncpg.Record | None], Outcome | None],
    claimed: Lease | None = None,
) -> tuple[Outcome, None] | tuple[None, Lease]:
    """The gate every payment passes after recording itself: the same key
    with another request is refused; a finished payment answers its first
    outcome (``replay``); otherwise this attempt takes the payment's lease
    (and gets it back; ``claimed``: the lease recording it took already), or
    is told another attempt is still at work."""
    if payment["payment_id"] != pid or payment["request_hash"] != fingerprint:
        raise AlreadyExists(
            "this idempotency key was used for a different request",
            reason="IDEMPOTENCY_KEY_REUSED",
        )
    if claimed is not None:
        return None, claimed
    replayed = replay(payment)
    if replayed is not None:
        return replayed, None
    async with pool.acquire() as conn:
        lease = await store.take_lease(conn, pid, LEASE_SECONDS)
        if lease is not None:
            return None, lease
        # Maybe it finished a moment ago.
        replayed = replay(await store.fetch_payment(conn, pid))
    if replayed is not None:
        return replayed, None
    raise Aborted(
        "the same request is still in progress; retry shortly", reason="REQUEST_IN_PROGRESS"
    )


def _replay(payment: asyncpg.Record | None) -> TransferOutcome | None:
    """The recorded outcome of a finished payment, or None if it is not."""
    if payment is None or payment["status"] == "PROCESSING":
        return None
    if payment["status"] == "FAILED":
        raise FailedPrecondition(payment["failure_message"], reason=payment["failure_reason"])
    return TransferOutcome(
        payment["payment_id"], payment["status"], payment["sender_balance"], payment["currency"]
    )


class _Payment:
    """One attempt at a P2P payment, resumable at any step.

    The ledger is the source of truth for whether money moved: an attempt
    that resumes a payment asks it first. Before the money moves, a refusal
    is final; after, the payment completes whatever else fails.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        peers: Peers,
        pid: uuid.UUID,
        cmd: TransferCommand,
        currency: str,
        sender_wallet: asyncpg.Record,
        sender_accounts: dict[str, uuid.UUID],
        recipient_wallet: asyncpg.Record,
        reservation_id: uuid.UUID | str | None,
        review_seconds: int = 900,
        recipient_accounts: Mapping[str, uuid.UUID] | None = None,
    ) -> None:
        self.pool, self.peers, self.pid, self.cmd = pool, peers, pid, cmd
        self.review_seconds = review_seconds
        self.currency = currency
        self.sender_wallet, self.sender_accounts = sender_wallet, sender_accounts
        self.recipient_wallet, self.recipient_accounts = recipient_wallet, recipient_accounts
        self.cache_fresh = False
        self.reservation_id = str(reservation_id) if reservation_id else None
        # Whether the ledger has the payment's transfer (a refusal after
        # that is no longer "nothing moved").
        self.moved = False

    async def drive(self, *, resumed: bool) -> TransferOutcome:
        placed = await self.peers.lookup_transfer(self.pid) if resumed else None
        if placed is None:
            placed = await self._move_money()
            # Its balances were invalidated as the ledger answered.
            self.cache_fresh = True
        self.moved = True
        return await self.settle(placed)

    async def settle(self, placed: ledger_pb2.Transfer) -> TransferOutcome:
        """Finishes the payment from its transfer as the ledger stored it."""
        if placed.type != ledger_pb2.TRANSFER_TYPE_PENDING:
            return await self._complete(held=False)
        # A review hold: the payer confirms with their PIN, or it expires.
        if placed.status == ledger_pb2.TRANSFER_STATUS_PENDING_POSTED:
            return await self._complete(held=True)
        if placed.status != ledger_pb2.TRANSFER_STATUS_PENDING:
            await self._give_up_review()
        return await self._await_review(placed)

    async def _await_review(self, hold: ledger_pb2.Transfer) -> TransferOutcome:
        account = self.sender_accounts[self.currency]
        balance = (await self.peers.balances([account]))[str(account)].available
        expires_at = hold.expires_at.ToDatetime(tzinfo=UTC)
        async with self.pool.acquire() as conn, conn.transaction():
            await history.record(
                conn,
                history.Movement(
                    wallet_id=self.sender_wallet["wallet_id"], ledger_transfer_id=self.pid,
                    type="P2P_OUT", amount=-self.cmd.amount, currency=self.currency,
                    status="PENDING_REVIEW", description=self.cmd.note,
                ),
            )  # fmt: skip
            await store.hold_for_review(conn, self.pid, balance, expires_at, self.reservation_id)
        log.info("transfer_held_for_review", transfer_id=str(self.pid))
        return TransferOutcome(self.pid, "PENDING_REVIEW", balance, self.currency)

    async def _give_up_review(self) -> None:
        await release_quietly(self.peers, reservation_of(self.reservation_id, self.pid))
        async with self.pool.acquire() as conn:
            await history.set_status(conn, self.pid, "EXPIRED")
        raise FailedPrecondition("the transfer was not confirmed in time", reason="REVIEW_EXPIRED")

    async def _move_money(self) -> ledger_pb2.Transfer:
        """Places the transfer in the ledger (or a hold, when fraud asks for a
        review) and returns it as stored."""
        ensure_can_send(WalletStatus(self.sender_wallet["status"]))
        ensure_can_receive(WalletStatus(self.recipient_wallet["status"]))
        sender_account = self.sender_accounts.get(self.currency)
        if sender_account is None:
            raise FailedPrecondition(
                f"the wallet holds no {self.currency}",
                reason="INSUFFICIENT_FUNDS",
                details={"currency": self.currency, "available": 0},
            )
        review = await self._score()
        self.reservation_id = await reserve_for_payment(
            self.pool, self.peers, self.pid, self.sender_wallet["user_id"], self.cmd.amount,
            self.currency, self.cmd.category,
            # A held payment keeps its budget for as long as its hold lives.
            ttl_seconds=self.review_seconds + 120 if review else 0,
        )  # fmt: skip

        recipient_account = await ensure_wallet_account(
            self.pool, self.peers, self.recipient_wallet, self.currency, self.recipient_accounts
        )
        result = await self.peers.create_transfer(
            ledger_pb2.Transfer(
                id=str(self.pid),
                debit_account_id=str(sender_account),
                credit_account_id=str(recipient_account),
                amount=self.cmd.amount,
                currency=self.currency,
                code="P2P",
                metadata={"kind": "P2P"},
                type=ledger_pb2.TRANSFER_TYPE_PENDING
                if review
                else ledger_pb2.TRANSFER_TYPE_POSTED,
                timeout_seconds=self.review_seconds if review else 0,
            )
        )
        if result.code in _OK_CODES:
            return result.transfer
        # Refused: the caller frees the reservation once the refusal is recorded.
        if result.code == ledger_pb2.TransferResult.INSUFFICIENT_FUNDS:
            raise FailedPrecondition(
                "insufficient funds",
                reason="INSUFFICIENT_FUNDS",
                details={"currency": self.currency},
            )
        if result.code == ledger_pb2.TransferResult.ACCOUNT_CLOSED:
            raise FailedPrecondition("a wallet of this payment is closed", reason="WALLET_CLOSED")
        raise FailedPrecondition(
            "the ledger refused the transfer: " + ledger_pb2.TransferResult.Code.Name(result.code),
            reason="LEDGER_REFUSED",
        )

    async def _score(self) -> bool:
        """True when the payment must wait for the payer's PIN."""
        verdict = await self.peers.score(
            fraud_pb2.ScoreRequest(
                transaction_id=str(self.pid),
                user_id=str(self.sender_wallet["user_id"]),
                type="P2P_OUT",
                amount=Money(amount=self.cmd.amount, currency=self.currency),
                recipient_kind=fraud_pb2.RECIPIENT_KIND_USER,
                recipient_id=str(self.recipient_wallet["user_id"]),
                device_id=self.cmd.device_id,
                ip=self.cmd.ip,
                country=self.cmd.country,
            )
        )
        if verdict.decision == fraud_pb2.DECISION_BLOCK:
            # Which rule fired is never told to the payer.
            raise TransactionDeclined("the transaction was declined")
        return bool(verdict.decision == fraud_pb2.DECISION_REVIEW)

    async def _complete(self, *, held: bool) -> TransferOutcome:
        """The money has moved: count the spend and record the outcome
        (``held``: after a review hold, whose history rows exist already)."""
        spend = commit_spend(
            self.peers,
            self.pid,
            self.reservation_id,
            self.sender_wallet,
            self.cmd.amount,
            self.currency,
            self.cmd.category,
        )
        balance = await complete_p2p(
            self.pool, self.peers, self.pid, self.sender_wallet, self.recipient_wallet,
            self.cmd.amount, self.currency, self.cmd.note, held=held,
            cache_fresh=self.cache_fresh, spend=spend,
        )  # fmt: skip
        log.info("transfer_completed", transfer_id=str(self.pid), amount=self.cmd.amount,
                 currency=self.currency)  # fmt: skip
        return TransferOutcome(self.pid, "COMPLETED", balance, self.currency)


async def reserve_for_payment(
    pool: asyncpg.Pool,
    peers: Peers,
    pid: uuid.UUID,
    user_id: uuid.UUID,
    amount: int,
    currency: str,
    category: str,
    ttl_seconds: int = 0,
) -> str:
    """Reserves a payment's budget spend (once: the payment's id is the
    reference) under the id ``reservation_id_for`` gives it, so that nothing
    needs recording: whoever finishes the payment knows the id."""
    reservation = await peers.reserve(
        user_id, amount, currency, category, str(pid), ttl_seconds=ttl_seconds,
        reservation_id=reservation_id_for(pid),
    )  # fmt: skip
    if reservation.status != budget_pb2.RESERVATION_STATUS_RESERVED:
        # An earlier attempt's reservation lapsed before money moved.
        raise FailedPrecondition(
            "the payment's budget reservation has lapsed; retry with a new key",
            reason="RESERVATION_LAPSED",
        )
    if reservation.reservation_id != str(reservation_id_for(pid)):
        # A budget that ignores the name (older than the wallet, mid-deploy):
        # this attempt uses the real id; a reconciler falls back to the
        # reference when committing, and its releases miss until the ttl.
        BUDGET_FOLLOW_UPS.labels("unnamed_reservation").inc()
        log.warning("budget_reservation_not_named", transfer_id=str(pid))
    return str(reservation.reservation_id)


def reservation_id_for(pid: uuid.UUID) -> uuid.UUID:
    """The budget reservation of a payment, as the wallet names it."""
    return uuid.uuid5(NAMESPACE, f"reservation:{pid}")


def reservation_of(recorded: uuid.UUID | str | None, pid: uuid.UUID) -> str:
    """The reservation of a payment (or a withdrawal) ``pid``: the one
    recorded for it (by a review hold, a placed payout, or the wallet before
    it named reservations itself), or the one it named."""
    return str(recorded or reservation_id_for(pid))


def payment_reservation(payment: asyncpg.Record) -> str:
    """The reservation of a recorded payment."""
    return reservation_of(payment["reservation_id"], payment["payment_id"])


async def complete_p2p(
    pool: asyncpg.Pool,
    peers: Peers,
    pid: uuid.UUID,
    sender_wallet: asyncpg.Record,
    recipient_wallet: asyncpg.Record,
    amount: int,
    currency: str,
    note: str,
    *,
    held: bool,
    spend: Awaitable[object],
    cache_fresh: bool = False,
) -> int:
    """Records a P2P payment whose money moved: both wallets' history, then
    the payment's outcome, once ``spend`` (the budget's commit) is done; it
    runs beside the read of the balances, and nothing is recorded if it
    fails. Returns the sender's available balance afterwards. ``held``: the money moved by posting a review hold,
    so the sender's history row exists already and is completed here (a
    payment never held has no rows but those this call writes).
    ``cache_fresh``: the caller moved the money a moment ago and its balances
    were invalidated as the ledger answered. The wallets are rows of
    ``store.fetch_wallets_and_accounts``: their owners' names for each
    other's rows, and whether the recipient owed (only then are its debts
    looked at; one that arose meanwhile is left to the banking relay's
    sweep)."""
    sender_account = wallet_account_id(sender_wallet["wallet_id"], currency)
    recipient_account = wallet_account_id(recipient_wallet["wallet_id"], currency)
    if not cache_fresh:
        # The money may have moved long after the write that invalidated
        # these (a timed-out call the ledger applied late): read them fresh.
        await peers.cache.invalidate([sender_account, recipient_account])
    _, balances = await asyncio.gather(
        spend, peers.balances_after_write([sender_account, recipient_account])
    )
    sender_balance = balances[str(sender_account)]
    recipient_balance = balances.get(str(recipient_account))
    # Without a review hold the rows are new: they are written, and then the
    # outcome, each atomic on its own. A crash between the two leaves the
    # payment PROCESSING for the reconciler, whose second go records nothing
    # twice. After a hold, rows change status too: one transaction.
    async with pool.acquire() as conn, conn.transaction() if held else nullcontext():
        await history.record(
            conn,
            history.Movement(
                wallet_id=sender_wallet["wallet_id"], ledger_transfer_id=pid,
                type="P2P_OUT", amount=-amount, currency=currency, status="COMPLETED",
                counterparty=display_name(recipient_wallet["full_name"],
                                          recipient_wallet["username"], recipient_wallet["email"]),
                description=note, balance_after=sender_balance.posted,
            ),
            history.Movement(
                wallet_id=recipient_wallet["wallet_id"], ledger_transfer_id=pid,
                type="P2P_IN", amount=amount, currency=currency, status="COMPLETED",
                counterparty=display_name(sender_wallet["full_name"],
                                          sender_wallet["username"], sender_wallet["email"]),
                description=note,
                balance_after=recipient_balance.posted if recipient_balance else None,
            ),
        )  # fmt: skip
        if held:
            # A payment confirmed after review already had its sender's row.
            await history.set_status(
                conn,
                pid,
                "COMPLETED",
                {
                    sender_wallet["wallet_id"]: sender_balance.posted,
                    **(
                        {recipient_wallet["wallet_id"]: recipient_balance.posted}
                        if recipient_balance
                        else {}
                    ),
                },
            )
        await store.complete_payment(conn, pid, sender_balance.available)
    if recipient_wallet["owes"]:
        await repay_debts_after_incoming(pool, peers, recipient_wallet["wallet_id"], currency)
    return int(sender_balance.available)


async def repay_debts_after_incoming(
    pool: asyncpg.Pool, peers: Peers, wallet_id: uuid.UUID, currency: str
) -> None:
    """Money arrived: a wallet that owes (a returned deposit it had spent)
    repays first. Best effort here: the banking relay's sweep retries."""
    from services.wallet import banking  # banking builds on this module

    try:
        # Under each debt's row lock, not the payment's lease: a payment's
        # lease running out does not stop its recipient's debts being repaid.
        with leases.holding(None):
            await banking.repay_debts(pool, peers, wallet_id, currency)
    except (MonetaError, OSError, asyncpg.PostgresError) as exc:
        log.warning("debt_repayment_deferred", wallet_id=str(wallet_id), error=str(exc))


async def commit_spend(
    peers: Peers,
    pid: uuid.UUID,
    reservation_id: str | None,
    wallet: asyncpg.Record,
    amount: int,
    currency: str,
    category: str,
) -> str | None:
    """Commits the budget spend of a payment whose money moved; returns the
    reservation committed (None when it could not be). The money moving is
    final, so a budget that can no longer take the spend is logged loudly
    for follow-up rather than undoing anything."""
    try:
        if reservation_id is not None:
            try:
                await peers.commit(reservation_id)
                return reservation_id
            except NotFound:
                pass  # named, but by a budget that ignored the name: found below
        # The reference finds it (made before a crash that lost its id).
        reservation = await peers.reserve(wallet["user_id"], amount, currency, category, str(pid))
        await peers.commit(reservation.reservation_id)
        return str(reservation.reservation_id)
    except (Unavailable, DeadlineExceeded):
        raise  # not known yet: the payment's next attempt commits it
    except MonetaError as exc:
        BUDGET_COMMIT_FAILURES.inc()
        log.error("budget_commit_failed", transfer_id=str(pid), reason=exc.reason)
        return None


async def release_quietly(peers: Peers, reservation_id: str) -> None:
    """Frees a reservation whose money did not move. One that lapsed or was
    settled meanwhile needs nothing; a budget that does not answer is logged
    and counted (its ttl frees it)."""
    try:
        await peers.release(reservation_id)
    except MonetaError as exc:
        if exc.reason in ("RESERVATION_EXPIRED", "RESERVATION_RELEASED", "RESERVATION_NOT_FOUND"):
            return  # lapsed, freed already, or never made
        BUDGET_FOLLOW_UPS.labels("release").inc()
        log.error("budget_release_failed", reservation_id=reservation_id, reason=exc.reason)


def is_refusal(exc: BaseException) -> bool:
    """Whether a payment attempt ended in a final refusal (nothing moved,
    the key answers it from now on: a business refusal, or a wrong PIN)
    rather than an unknown outcome."""
    return isinstance(exc, FailedPrecondition) or (
        isinstance(exc, PermissionDenied) and exc.reason == "PIN_INCORRECT"
    )


def refusal(reason: str, message: str) -> MonetaError:
    """A recorded refusal, raised again for a retry: as it was first raised
    (a wrong PIN is PERMISSION_DENIED, the rest FAILED_PRECONDITION)."""
    if reason == "PIN_INCORRECT":
        return PermissionDenied(message, reason=reason)
    return FailedPrecondition(message, reason=reason)


async def _resumed_payment(
    pool: asyncpg.Pool, peers: Peers, payment: asyncpg.Record
) -> _Payment | None:
    """The attempt object for a recorded payment, to finish it from what the
    ledger says."""
    async with pool.acquire() as conn:
        wallets = await store.fetch_wallets_and_accounts(
            conn, [payment["sender_user_id"], payment["recipient_user_id"]]
        )
    if payment["sender_user_id"] not in wallets or payment["recipient_user_id"] not in wallets:
        return None
    sender, sender_accounts = wallets[payment["sender_user_id"]]
    recipient, recipient_accounts = wallets[payment["recipient_user_id"]]
    cmd = TransferCommand(
        sender_id=str(payment["sender_user_id"]),
        recipient=("user_id", str(payment["recipient_user_id"])),
        amount=payment["amount"],
        currency=payment["currency"],
        idempotency_key=payment["idempotency_key"],
        note=payment["note"],
    )
    return _Payment(
        pool, peers, payment["payment_id"], cmd, payment["currency"], sender, sender_accounts,
        recipient, payment_reservation(payment), recipient_accounts=recipient_accounts,
    )  # fmt: skip


async def abandon_payment(
    pool: asyncpg.Pool, peers: Peers, payment: asyncpg.Record, lease: Lease
) -> bool:
    """A reconciler's verdict on a payment the ledger never got: failed, and
    its budget freed, if the reconciler still holds it (``lease``). False
    when another attempt took it over meanwhile: its outcome stands."""
    async with pool.acquire() as conn:
        failed = await store.fail_payment(
            conn, payment["payment_id"], "PAYMENT_ABANDONED",
            "the payment did not complete; nothing moved", lease=lease,
        )  # fmt: skip
    if failed:
        await release_quietly(peers, payment_reservation(payment))
    return failed


async def reconcile_stale_payments(
    pool: asyncpg.Pool, peers: Peers, older_than: float = 60.0
) -> int:
    """Settles P2P payments that no attempt finished (a crash, a client that
    gave up), from what the ledger says: posted money completes them, a hold
    puts them in review (or expires them), and nothing at all fails them and
    frees their budget. The ledger drops requests whose caller's deadline has
    passed, so by now a payment it does not know will never arrive there."""
    async with pool.acquire() as conn:
        stale = await store.stale_payments(conn, older_than, limit=100)
    settled = 0
    for pid in stale:
        async with pool.acquire() as conn:
            lease = await store.take_lease(conn, pid, LEASE_SECONDS)
            if lease is None:
                continue
            payment = await store.fetch_payment(conn, pid)
        assert payment is not None
        try:
            if payment["status"] != "PROCESSING":
                continue  # it moved on while we listed it
            attempt = await _resumed_payment(pool, peers, payment)
            placed = await peers.lookup_transfer(pid)
            if placed is None or attempt is None:
                if not await abandon_payment(pool, peers, payment, lease):
                    continue  # a retry took over while this stalled: its outcome stands
                outcome = "FAILED"
            else:
                try:
                    with leases.holding(lease):
                        outcome = (await attempt.settle(placed)).status
                except FailedPrecondition as refusal:
                    async with pool.acquire() as conn:
                        await store.fail_payment(
                            conn, pid, refusal.reason, refusal.message, lease=lease
                        )
                    outcome = "FAILED"
            log.warning("payment_reconciled", payment_id=str(pid), outcome=outcome)
            settled += 1
        except MonetaError as exc:
            log.warning("payment_reconcile_failed", payment_id=str(pid), reason=exc.reason)
        finally:
            async with pool.acquire() as conn:
                await store.release_lease(conn, pid, lease)
    return settled


async def reconcile_forever(pool: asyncpg.Pool, peers: Peers, every_seconds: float = 10.0) -> None:
    while True:
        try:
            await reconcile_stale_payments(pool, peers)
            await settle_lapsed_reviews(pool, peers)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("reconcile_failed", error=str(exc))
        await asyncio.sleep(every_seconds)


async def ensure_wallet_account(
    pool: asyncpg.Pool,
    peers: Peers,
    wallet: asyncpg.Record,
    currency: str,
    known: Mapping[str, uuid.UUID] | None = None,
) -> uuid.UUID:
    """The wallet's ledger account in ``currency``, opened on first use.
    ``known``: the wallet's accounts as read a moment ago (accounts are never
    removed, so one found there needs no second look)."""
    if known and currency in known:
        return known[currency]
    account_id = wallet_account_id(wallet["wallet_id"], currency)
    async with pool.acquire() as conn:
        accounts = await store.wallet_accounts(conn, wallet["wallet_id"])
    if currency in accounts:
        return accounts[currency]
    await peers.create_accounts(
        [
            ledger_pb2.Account(
                id=str(account_id),
                currency=currency,
                type=ledger_pb2.ACCOUNT_TYPE_USER_WALLET,
                no_overdraft=True,
                metadata={"wallet_id": str(wallet["wallet_id"]), "user_id": str(wallet["user_id"])},
            )
        ]
    )
    async with pool.acquire() as conn:
        await store.insert_wallet_account(conn, wallet["wallet_id"], currency, account_id)
    return account_id


# ---------------------------------------------------------------- status


async def update_wallet_status(
    pool: asyncpg.Pool, peers: Peers, wallet_id: str, status: int, reason: str, actor: str
) -> WalletView:
    """ACTIVE ⇄ FROZEN; CLOSED only with zero balances and no holds, and for
    good. Every change records who, when and why."""
    wid = parse_uuid(wallet_id, "wallet_id")
    try:
        wanted = WalletStatus(status)
    except ValueError:
        raise InvalidArgument(
            "status must be ACTIVE, FROZEN or CLOSED", reason="INVALID_STATUS"
        ) from None
    reason = reason.strip()
    if not reason or len(reason) > 500:
        raise InvalidArgument(
            "a reason of 1 to 500 characters is required", reason="INVALID_REASON"
        )
    async with pool.acquire() as conn:
        wallet = await store.fetch_wallet(conn, wallet_id=wid)
        if wallet is None:
            raise NotFound("no such wallet", reason="WALLET_NOT_FOUND")
        accounts = await store.wallet_accounts(conn, wid)
    current = WalletStatus(wallet["status"])
    if current == wanted:
        return await get_wallet(pool, peers, wallet_id=wallet_id)
    if current == WalletStatus.CLOSED:
        raise FailedPrecondition("a closed wallet stays closed", reason="WALLET_CLOSED")
    if wanted == WalletStatus.CLOSED:
        # Closing the ledger accounts is the check that cannot race: the
        # ledger refuses a non-empty account, and once closed refuses any
        # transfer into it, including one already on its way.
        try:
            for account in accounts.values():
                await peers.close_account(account, f"wallet closed: {reason}")
        except FailedPrecondition:
            raise FailedPrecondition(
                "only a wallet with zero balances and no pending money can be closed",
                reason="WALLET_NOT_EMPTY",
            ) from None
    async with pool.acquire() as conn, conn.transaction():
        changed = await store.change_wallet_status(conn, wid, current, wanted, reason, actor)
        if changed:
            await outbox.add_event(
                conn,
                event_id=uuid.uuid4(),  # stored with the change: stable from here on
                event_type="WalletStatusChanged",
                routing_key="wallet.status_changed",
                aggregate_id=str(wid),
                data={
                    "wallet_id": str(wid),
                    "user_id": str(wallet["user_id"]),
                    "old_status": current.name,
                    "new_status": wanted.name,
                    "reason": reason,
                    "actor_id": actor,
                },
            )
    if not changed:
        raise Aborted("the wallet changed meanwhile; try again", reason="CONCURRENT_UPDATE")
    log.info("wallet_status_changed", wallet_id=wallet_id, status=wanted.name, actor=actor)
    return await get_wallet(pool, peers, wallet_id=wallet_id)


async def list_transactions(
    pool: asyncpg.Pool, query: history.HistoryQuery
) -> tuple[list[asyncpg.Record], str, asyncpg.Record]:
    async with pool.acquire() as conn:
        wallet = await store.fetch_wallet(conn, wallet_id=query.wallet_id)
        if wallet is None:
            raise NotFound("no such wallet", reason="WALLET_NOT_FOUND")
        rows, token = await history.list_transactions(conn, query)
    return rows, token, wallet


# ---------------------------------------------------------------- step-up


def review_post_id(pid: uuid.UUID) -> uuid.UUID:
    """The ledger transfer that posts a reviewed payment's hold."""
    return uuid.uuid5(NAMESPACE, f"review-post:{pid}")


async def confirm_transfer(
    pool: asyncpg.Pool, peers: Peers, transfer_id: str, user_id: str, pin: str
) -> TransferOutcome:
    """The payer confirms a payment held for review with their PIN: its hold
    is posted. Confirming again answers the same."""
    pid = parse_uuid(transfer_id, "transfer_id")
    uid = parse_uuid(user_id, "user_id")
    async with pool.acquire() as conn:
        payment = await store.fetch_payment(conn, pid)
    if payment is None or payment["sender_user_id"] != uid:
        raise NotFound("no such transfer", reason="TRANSFER_NOT_FOUND")
    replayed = _replay(payment)
    if replayed is not None and replayed.status == "COMPLETED":
        return replayed
    if payment["status"] != "PENDING_REVIEW":
        raise FailedPrecondition("the transfer is not waiting for confirmation",
                                 reason="NOT_PENDING_REVIEW")  # fmt: skip
    await pins.verify_pin(pool, user_id, pin)
    async with pool.acquire() as conn:
        lease = await store.take_lease(conn, pid, LEASE_SECONDS)
        if lease is None:
            raise Aborted("the transfer is being confirmed; retry shortly",
                          reason="REQUEST_IN_PROGRESS")  # fmt: skip
        wallets = await store.fetch_wallets_and_accounts(conn, [uid, payment["recipient_user_id"]])
    (sender_wallet, _), (recipient_wallet, _) = wallets[uid], wallets[payment["recipient_user_id"]]
    try:
        with leases.holding(lease):
            # The wallets may have changed while the payment waited.
            ensure_can_send(WalletStatus(sender_wallet["status"]))
            ensure_can_receive(WalletStatus(recipient_wallet["status"]))
            await _approve_review(peers, pid, uid)
            result = await peers.create_transfer(
                ledger_pb2.Transfer(
                    id=str(review_post_id(pid)),
                    type=ledger_pb2.TRANSFER_TYPE_POST_PENDING,
                    pending_id=str(pid),
                    code="P2P",
                )
            )
            if result.code in (ledger_pb2.TransferResult.PENDING_EXPIRED,
                               ledger_pb2.TransferResult.PENDING_ALREADY_RESOLVED):  # fmt: skip
                await _settle_lapsed_review(pool, peers, payment)
                raise FailedPrecondition("the transfer was not confirmed in time",
                                         reason="REVIEW_EXPIRED")  # fmt: skip
            if result.code not in _OK_CODES:
                raise Internal("the ledger refused the confirmation: "
                               + ledger_pb2.TransferResult.Code.Name(result.code),
                               reason="LEDGER_REFUSED")  # fmt: skip
            reservation = payment_reservation(payment)
            spend = commit_spend(peers, pid, reservation, sender_wallet, payment["amount"],
                                 payment["currency"], "P2P")  # fmt: skip
            balance = await complete_p2p(pool, peers, pid, sender_wallet, recipient_wallet,
                                         payment["amount"], payment["currency"], payment["note"],
                                         held=True, spend=spend)  # fmt: skip
    except AttemptExpired:
        raise  # the lease may be another attempt's by now: left as it is
    except BaseException:
        async with pool.acquire() as conn:
            await store.release_lease(conn, pid, lease)
        raise
    async with pool.acquire() as conn:
        await store.release_lease(conn, pid, lease)
    log.info("transfer_confirmed", transfer_id=str(pid))
    return TransferOutcome(pid, "COMPLETED", balance, payment["currency"])


async def screen(
    pool: asyncpg.Pool, peers: Peers, request: fraud_pb2.ScoreRequest, pin: str
) -> None:
    """Scores a payment that cannot be held for a review (a merchant at the
    till, a payout to a bank). BLOCK declines it. REVIEW steps up: the
    payer's PIN, sent with the request, approves the review case there and
    then. Without a PIN the payment is refused, PIN_REQUIRED, before anything
    is reserved or moved; the payer sends it again, with a new idempotency
    key and the PIN."""
    verdict = await peers.score(request)
    if verdict.decision == fraud_pb2.DECISION_BLOCK:
        # Which rule fired is never told to the payer.
        raise TransactionDeclined("the transaction was declined")
    if verdict.decision != fraud_pb2.DECISION_REVIEW:
        return
    if not pin:
        raise FailedPrecondition(
            "this payment needs the payer's PIN: send it again with a new idempotency key"
            " and the PIN",
            reason="PIN_REQUIRED",
        )
    await pins.verify_pin(pool, request.user_id, pin)
    await _approve_review(peers, uuid.UUID(request.transaction_id), uuid.UUID(request.user_id))


async def _approve_review(peers: Peers, pid: uuid.UUID, payer: uuid.UUID) -> None:
    """The payer's PIN approves the payment's fraud review case. An analyst's
    rejection stands: the payment is declined (its hold lapses). Fraud not
    answering does not hold the payment up: logged and counted."""
    try:
        await peers.approve_review(pid, payer)
    except FailedPrecondition as exc:
        if exc.reason == "REVIEW_ALREADY_RESOLVED":
            raise TransactionDeclined("the transaction was declined") from None
        raise
    except (Unavailable, DeadlineExceeded, NotFound) as exc:
        REVIEW_APPROVALS_LOST.inc()
        log.warning("review_approval_not_recorded", transfer_id=str(pid), reason=exc.reason)


async def _settle_lapsed_review(pool: asyncpg.Pool, peers: Peers, payment: asyncpg.Record) -> None:
    """A review hold that expired: free the budget, mark it all expired."""
    await release_quietly(peers, payment_reservation(payment))
    # The ledger released the hold by itself: the cached balance is stale.
    await peers.cache.invalidate(
        [
            wallet_account_id(wallet_id_for(payment[who]), payment["currency"])
            for who in ("sender_user_id", "recipient_user_id")
        ]
    )
    async with pool.acquire() as conn, conn.transaction():
        await history.set_status(conn, payment["payment_id"], "EXPIRED")
        await store.fail_payment(conn, payment["payment_id"], "REVIEW_EXPIRED",
                                 "the transfer was not confirmed in time", lease=None)  # fmt: skip


async def settle_lapsed_reviews(pool: asyncpg.Pool, peers: Peers) -> int:
    """Held payments nobody confirmed: once the ledger has expired their hold,
    their budget is freed and they are marked expired."""
    async with pool.acquire() as conn:
        lapsed = await store.lapsed_reviews(conn, limit=100)
    settled = 0
    for pid in lapsed:
        hold = await peers.lookup_transfer(pid)
        if hold is None or hold.status == ledger_pb2.TRANSFER_STATUS_PENDING:
            continue  # the ledger's sweeper has not reached it yet
        async with pool.acquire() as conn:
            payment = await store.fetch_payment(conn, pid)
        if payment is None or payment["status"] != "PENDING_REVIEW":
            continue
        if hold.status == ledger_pb2.TRANSFER_STATUS_PENDING_POSTED:
            # Confirmed, but the confirmation did not get to finish: finish it.
            attempt = await _resumed_payment(pool, peers, payment)
            if attempt is not None:
                await attempt.settle(hold)
                settled += 1
            continue
        await _settle_lapsed_review(pool, peers, payment)
        settled += 1
    return settled


# ---------------------------------------------------------------- adjustments


def adjustment_account_id(currency: str) -> uuid.UUID:
    """The outside world, for adjustments internal services make."""
    return uuid.uuid5(NAMESPACE, f"adjustments:{currency}")


@dataclass(frozen=True)
class AdjustmentCommand:
    wallet_id: str
    amount: int
    currency: str
    credit: bool
    description: str
    reference_id: str
    reference_type: str
    idempotency_key: str


async def post_adjustment(
    pool: asyncpg.Pool, peers: Peers, cmd: AdjustmentCommand
) -> asyncpg.Record:
    """A CREDIT or DEBIT an internal service makes to a wallet, against the
    platform's adjustments account in the currency. Idempotent by key: the
    same key answers the same transaction; with other values, refused."""
    wid = parse_uuid(cmd.wallet_id, "wallet_id")
    require_positive(cmd.amount)
    currency = validate_currency(cmd.currency)
    key = validate_idempotency_key(
        cmd.idempotency_key or f"{cmd.reference_type}:{cmd.reference_id}"
    )
    if len(cmd.description) > 500 or len(cmd.reference_id) > 200 or len(cmd.reference_type) > 50:
        raise InvalidArgument("a text field is too long", reason="FIELD_TOO_LONG")
    async with pool.acquire() as conn:
        wallet = await store.fetch_wallet(conn, wallet_id=wid)
    if wallet is None:
        raise NotFound("no such wallet", reason="WALLET_NOT_FOUND")
    transfer_id = uuid.uuid5(NAMESPACE, f"adjustment:{wid}:{key}")
    async with pool.acquire() as conn:
        done = await conn.fetchrow(
            "SELECT * FROM transactions WHERE txn_id = $1", history.txn_id(transfer_id, wid)
        )
    if done is not None:
        # A retry of a finished adjustment answers it, whatever changed since.
        if (abs(done["amount"]), done["currency"], done["amount"] > 0) != (
            cmd.amount, currency, cmd.credit,
        ):  # fmt: skip
            raise AlreadyExists("this idempotency key was used for a different request",
                                reason="IDEMPOTENCY_KEY_REUSED")  # fmt: skip
        return done
    status = WalletStatus(wallet["status"])
    if cmd.credit:
        ensure_can_receive(status)
    else:
        ensure_can_send(status)
    wallet_account = await ensure_wallet_account(pool, peers, wallet, currency)
    outside = adjustment_account_id(currency)
    await peers.create_accounts(
        [ledger_pb2.Account(id=str(outside), currency=currency, type=ledger_pb2.ACCOUNT_TYPE_EXTERNAL,
                            metadata={"purpose": "adjustments"})],
        keep_existing=True,
    )  # fmt: skip
    debit, credit = (outside, wallet_account) if cmd.credit else (wallet_account, outside)
    result = await peers.create_transfer(
        ledger_pb2.Transfer(
            id=str(transfer_id), debit_account_id=str(debit), credit_account_id=str(credit),
            amount=cmd.amount, currency=currency, code="ADJUSTMENT",
            metadata={"reference_type": cmd.reference_type, "reference_id": cmd.reference_id},
        )
    )  # fmt: skip
    if result.code == ledger_pb2.TransferResult.EXISTS_WITH_DIFFERENT_FIELDS:
        raise AlreadyExists("this idempotency key was used for a different request",
                            reason="IDEMPOTENCY_KEY_REUSED")  # fmt: skip
    if result.code == ledger_pb2.TransferResult.INSUFFICIENT_FUNDS:
        raise FailedPrecondition("insufficient funds", reason="INSUFFICIENT_FUNDS",
                                 details={"currency": currency})  # fmt: skip
    if result.code not in _OK_CODES:
        raise Internal("the ledger refused the adjustment: "
                       + ledger_pb2.TransferResult.Code.Name(result.code),
                       reason="LEDGER_REFUSED")  # fmt: skip
    balance = (await peers.balances([wallet_account]))[str(wallet_account)]
    async with pool.acquire() as conn:
        await history.record(
            conn,
            history.Movement(
                wallet_id=wid, ledger_transfer_id=transfer_id, type="ADJUSTMENT",
                amount=cmd.amount if cmd.credit else -cmd.amount, currency=currency,
                status="COMPLETED", counterparty=cmd.reference_type,
                description=cmd.description, reference_id=cmd.reference_id,
                balance_after=balance.posted,
            ),
        )  # fmt: skip
        row = await conn.fetchrow(
            "SELECT * FROM transactions WHERE txn_id = $1", history.txn_id(transfer_id, wid)
        )
    assert row is not None
    if cmd.credit:
        await repay_debts_after_incoming(pool, peers, wid, currency)
    return row
