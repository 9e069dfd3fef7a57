"""The wallet's use cases.

A P2P transfer goes: idempotency → fraud score → budget reservation → ledger
transfer → budget commit. Every step is keyed by the payment's id, so a
retried request (or a resumed one after a crash) repeats no effect: fraud
scores it once, the budget reserves it once, the ledger moves it once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg
import structlog

from moneta.common.v1.money_pb2 import Money
from moneta.fraud.v1 import fraud_pb2
from moneta.ledger.v1 import ledger_pb2
from services.common.db import DbConn
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MonetaError,
    NotFound,
    Unimplemented,
)
from services.common.ids import parse_uuid
from services.common.money import INT64_MAX, require_positive, validate_currency
from services.wallet import store
from services.wallet.domain import (
    Role,
    UserFields,
    WalletStatus,
    company_funding_account_id,
    ensure_can_receive,
    ensure_can_send,
    initial_funding_transfer_id,
    payment_id,
    request_hash,
    validate_idempotency_key,
    wallet_account_id,
    wallet_id_for,
)
from services.wallet.peers import Peers

log = structlog.get_logger("moneta.wallet")

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
    pool: asyncpg.Pool, peers: Peers, user_id: str, currency: str, initial_balance: int
) -> WalletView:
    """Creates the user's wallet, funded from their company's funding account
    when an initial balance is asked for: money never appears from nothing."""
    user = await get_user(pool, user_id)
    currency = validate_currency(currency or user["default_currency"])
    if not 0 <= initial_balance <= INT64_MAX:
        raise InvalidArgument("initial_balance must not be negative", reason="INVALID_AMOUNT")
    wallet_id = wallet_id_for(user["user_id"])
    account_id = wallet_account_id(wallet_id, currency)

    async with pool.acquire() as conn:
        existing = await store.fetch_wallet(conn, user_id=user["user_id"])
    if existing is not None:
        if (existing["default_currency"], existing["initial_balance"]) != (
            currency,
            initial_balance,
        ):
            raise AlreadyExists("the user has a wallet already", reason="WALLET_EXISTS")
        return await get_wallet(pool, peers, wallet_id=str(wallet_id))

    funding_id = company_funding_account_id(user["company_id"], currency)
    await peers.create_accounts(
        [
            ledger_pb2.Account(
                id=str(account_id),
                currency=currency,
                type=ledger_pb2.ACCOUNT_TYPE_USER_WALLET,
                no_overdraft=True,
                metadata={"wallet_id": str(wallet_id), "user_id": str(user["user_id"])},
            ),
            ledger_pb2.Account(
                id=str(funding_id),
                currency=currency,
                type=ledger_pb2.ACCOUNT_TYPE_COMPANY_FUNDING,
                metadata={"company_id": str(user["company_id"] or "platform")},
            ),
        ]
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
        if result.code == ledger_pb2.TransferResult.EXISTS_WITH_DIFFERENT_FIELDS:
            raise AlreadyExists("the user has a wallet already", reason="WALLET_EXISTS")
        if result.code not in _OK_CODES:
            raise Internal(
                "the ledger refused the initial funding: "
                + ledger_pb2.TransferResult.Code.Name(result.code),
                reason="LEDGER_REFUSED",
            )
    async with pool.acquire() as conn, conn.transaction():
        await store.insert_wallet(
            conn,
            wallet_id=wallet_id,
            user_id=user["user_id"],
            currency=currency,
            initial_balance=initial_balance,
            ledger_account_id=account_id,
        )
    log.info("wallet_created", wallet_id=str(wallet_id), currency=currency)
    return await get_wallet(pool, peers, wallet_id=str(wallet_id))


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


async def transfer(pool: asyncpg.Pool, peers: Peers, cmd: TransferCommand) -> TransferOutcome:
    sender_id = parse_uuid(cmd.sender_id, "sender_id")
    key = validate_idempotency_key(cmd.idempotency_key)
    require_positive(cmd.amount)
    if len(cmd.note) > 500:
        raise InvalidArgument("note is at most 500 characters", reason="INVALID_NOTE")

    async with pool.acquire() as conn:
        sender_wallet = await store.fetch_wallet(conn, user_id=sender_id)
        if sender_wallet is None:
            raise NotFound("the sender has no wallet", reason="WALLET_NOT_FOUND")
        currency = validate_currency(cmd.currency or sender_wallet["default_currency"])
        recipient = await _resolve_recipient(conn, *cmd.recipient)
        if recipient["user_id"] == sender_id:
            raise InvalidArgument("a transfer to oneself moves nothing", reason="SELF_TRANSFER")
        recipient_wallet = await store.fetch_wallet(conn, user_id=recipient["user_id"])
        if recipient_wallet is None:
            raise NotFound("no such recipient", reason="RECIPIENT_NOT_FOUND")
        pid = payment_id(sender_id, key)
        fingerprint = request_hash(
            recipient=recipient["user_id"],
            amount=cmd.amount,
            currency=currency,
            note=cmd.note,
            category=cmd.category,
        )
        payment = await store.claim_payment(
            conn,
            payment_id=pid,
            kind="P2P",
            sender_user_id=sender_id,
            idempotency_key=key,
            request_hash=fingerprint,
            recipient_user_id=recipient["user_id"],
            amount=cmd.amount,
            currency=currency,
            note=cmd.note,
        )
        sender_accounts = await store.wallet_accounts(conn, sender_wallet["wallet_id"])

    if payment["payment_id"] != pid or payment["request_hash"] != fingerprint:
        raise AlreadyExists(
            "this idempotency key was used for a different request",
            reason="IDEMPOTENCY_KEY_REUSED",
        )
    if payment["status"] == "COMPLETED":
        return TransferOutcome(pid, "COMPLETED", payment["sender_balance"], currency)
    if payment["status"] == "FAILED":
        raise FailedPrecondition(payment["failure_message"], reason=payment["failure_reason"])

    try:
        return await _run_transfer(
            pool, peers, pid, cmd, currency, sender_wallet, sender_accounts, recipient_wallet
        )
    except FailedPrecondition as refusal:
        # A business refusal is final for this key: a retry replays it.
        async with pool.acquire() as conn:
            await store.fail_payment(conn, pid, refusal.reason, refusal.message)
        raise


async def _run_transfer(
    pool: asyncpg.Pool,
    peers: Peers,
    pid: uuid.UUID,
    cmd: TransferCommand,
    currency: str,
    sender_wallet: asyncpg.Record,
    sender_accounts: dict[str, uuid.UUID],
    recipient_wallet: asyncpg.Record,
) -> TransferOutcome:
    ensure_can_send(WalletStatus(sender_wallet["status"]))
    ensure_can_receive(WalletStatus(recipient_wallet["status"]))
    sender_account = sender_accounts.get(currency)
    if sender_account is None:
        raise FailedPrecondition(
            f"the wallet holds no {currency}",
            reason="INSUFFICIENT_FUNDS",
            details={"currency": currency, "available": 0},
        )

    verdict = await peers.score(
        fraud_pb2.ScoreRequest(
            transaction_id=str(pid),
            user_id=str(sender_wallet["user_id"]),
            type="P2P_OUT",
            amount=Money(amount=cmd.amount, currency=currency),
            recipient_kind=fraud_pb2.RECIPIENT_KIND_USER,
            recipient_id=str(recipient_wallet["user_id"]),
            device_id=cmd.device_id,
            ip=cmd.ip,
            country=cmd.country,
        )
    )
    if verdict.decision == fraud_pb2.DECISION_BLOCK:
        # Which rule fired is never told to the payer.
        raise TransactionDeclined("the transaction was declined")
    if verdict.decision == fraud_pb2.DECISION_REVIEW:
        raise Unimplemented(
            "step-up review of a flagged transfer is not supported yet",
            reason="REVIEW_NOT_SUPPORTED",
        )

    reservation = await peers.reserve(
        sender_wallet["user_id"], cmd.amount, currency, cmd.category, str(pid)
    )
    async with pool.acquire() as conn:
        await store.set_payment_reservation(conn, pid, reservation.reservation_id)

    try:
        recipient_account = await _ensure_wallet_account(pool, peers, recipient_wallet, currency)
        result = await peers.create_transfer(
            ledger_pb2.Transfer(
                id=str(pid),
                debit_account_id=str(sender_account),
                credit_account_id=str(recipient_account),
                amount=cmd.amount,
                currency=currency,
                code="P2P",
                metadata={"kind": "P2P"},
            )
        )
    except MonetaError as exc:
        if not isinstance(exc, FailedPrecondition | InvalidArgument):
            # Unknown whether the ledger applied it: keep the reservation; the
            # client's retry resumes here, and the ttl releases it otherwise.
            raise
        await peers.release(reservation.reservation_id)
        raise
    if result.code not in _OK_CODES:
        await peers.release(reservation.reservation_id)
        if result.code == ledger_pb2.TransferResult.INSUFFICIENT_FUNDS:
            raise FailedPrecondition(
                "insufficient funds", reason="INSUFFICIENT_FUNDS", details={"currency": currency}
            )
        raise Internal(
            "the ledger refused the transfer: " + ledger_pb2.TransferResult.Code.Name(result.code),
            reason="LEDGER_REFUSED",
        )
    try:
        await peers.commit(reservation.reservation_id)
    except FailedPrecondition as exc:
        # The money has moved; that is final. A reservation that expired in
        # the meantime leaves the spend uncounted: say so loudly.
        log.error("budget_commit_failed", transfer_id=str(pid), reason=exc.reason)

    balance = (await peers.balances([sender_account]))[str(sender_account)].available
    async with pool.acquire() as conn:
        await store.complete_payment(conn, pid, balance)
    log.info("transfer_completed", transfer_id=str(pid), amount=cmd.amount, currency=currency)
    return TransferOutcome(pid, "COMPLETED", balance, currency)


async def _ensure_wallet_account(
    pool: asyncpg.Pool, peers: Peers, wallet: asyncpg.Record, currency: str
) -> uuid.UUID:
    """The wallet's ledger account in ``currency``, opened on first use."""
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
