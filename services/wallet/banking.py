"""Money in from a bank and out to it.

- Linked bank accounts keep the account number encrypted (AES-256-GCM); only
  its last four digits ever leave the service.
- A deposit is a ledger hold from the currency's BANK_CLEARING account to the
  wallet, a withdrawal a hold from the wallet to BANK_CLEARING: pending money
  that cannot be spent (or spent twice) while the bank works.
- The bank partner is told through an outbox (``bank_requests``) written in
  the transaction that makes the transfer PENDING; ``bank_request_relay``
  delivers it.
- The bank's settlement (a signed webhook, verified by the gateway) posts the
  hold (SETTLED), voids it (FAILED) or reverses the posting (RETURNED). A
  returned deposit that was already spent leaves a debt on a RECEIVABLE
  account, freezes the wallet, and is repaid first from money that arrives.
- A withdrawal is a payment like any other: fraud scores it first (one sent
  to review goes ahead only with the payer's PIN), it reserves the payer's
  CASH_OUT budgets before its hold and commits them once the hold is placed,
  and a payout that fails or comes back gives the spend back (at once, or
  on the relay's sweep if the budget service does not answer).
- An attempt leases its transfer while it works, so the reconciler (or a
  concurrent attempt with the same key) never acts on it meanwhile.

Every ledger id derives from the transfer's id, so a retried request, a
webhook delivered twice or a step resumed after a crash moves nothing twice.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import hashlib
import hmac
import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import Any, cast

import asyncpg
import httpx
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from moneta.budget.v1 import budget_pb2
from moneta.common.v1.money_pb2 import Money
from moneta.fraud.v1 import fraud_pb2
from moneta.ledger.v1 import ledger_pb2
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
    Unavailable,
)
from services.common.ids import parse_uuid
from services.common.money import require_positive, to_major_units, validate_currency

# The module, not its names: handlers may import this module in turn.
from services.wallet import handlers, history, leases, store
from services.wallet.config import WalletSettings
from services.wallet.domain import (
    NAMESPACE,
    WalletStatus,
    ensure_can_send,
    request_hash,
    validate_idempotency_key,
    wallet_account_id,
)
from services.wallet.peers import Peers
from services.wallet.pins import validate_pin

log = structlog.get_logger("moneta.wallet.banking")

_OK_CODES = (ledger_pb2.TransferResult.OK, ledger_pb2.TransferResult.EXISTS)
# The budget category a withdrawal's spend counts under.
CASH_OUT_CATEGORY = "CASH_OUT"
# A withdrawal's reservation is committed as soon as its hold is placed; it
# lives long enough for the reconciler to commit it after an outage.
WITHDRAWAL_RESERVATION_TTL_SECONDS = 6 * 3600
# Who the wallet's own decisions are recorded as, in wallet_status_changes.
SYSTEM_ACTOR = "system:banking"


# ================================================================ rules (pure)

# A request made on a business day before this time (UTC) starts at once;
# later, or on a weekend, it starts the next business day.
CUTOFF_UTC = time(16, 0)
BUSINESS_DAYS_TO_SETTLE = 2


def is_business_day(day: date) -> bool:
    """Monday to Friday. Bank holidays are not modelled."""
    return day.weekday() < 5


def add_business_days(start: datetime, days: int) -> datetime:
    """``start`` moved ``days`` business days ahead, weekends skipped, at the
    same time of day."""
    assert days >= 0
    current = start
    while days:
        current += timedelta(days=1)
        if is_business_day(current.date()):
            days -= 1
    return current


def estimated_completion(requested_at: datetime) -> datetime:
    """When a bank transfer requested at ``requested_at`` should be settled:
    two business days ahead when the bank can start on it the same day,
    three otherwise (after the cut-off, or on a weekend)."""
    at = requested_at.astimezone(UTC)
    starts_today = is_business_day(at.date()) and at.time() < CUTOFF_UTC
    return add_business_days(at, BUSINESS_DAYS_TO_SETTLE + (0 if starts_today else 1))


def validate_account_number(value: str) -> str:
    if not (value.isascii() and value.isdigit() and 4 <= len(value) <= 17):
        raise InvalidArgument(
            "account_number must be 4 to 17 digits",
            reason="INVALID_ACCOUNT_NUMBER",
            details={"field": "account_number"},
        )
    return value


def validate_routing_number(value: str) -> str:
    """A nine-digit ABA routing number with a valid check digit."""
    if not (value.isascii() and value.isdigit() and len(value) == 9):
        raise InvalidArgument(
            "routing_number must be 9 digits",
            reason="INVALID_ROUTING_NUMBER",
            details={"field": "routing_number"},
        )
    d = [int(c) for c in value]
    if (3 * (d[0] + d[3] + d[6]) + 7 * (d[1] + d[4] + d[7]) + d[2] + d[5] + d[8]) % 10:
        raise InvalidArgument(
            "routing_number has a wrong check digit",
            reason="INVALID_ROUTING_NUMBER",
            details={"field": "routing_number"},
        )
    return value


def validate_holder_name(value: str) -> str:
    name = " ".join(value.split())
    if not 1 <= len(name) <= 200:
        raise InvalidArgument(
            "holder_name must be 1 to 200 characters",
            reason="INVALID_HOLDER_NAME",
            details={"field": "holder_name"},
        )
    return name


def last4(account_number: str) -> str:
    return account_number[-4:]


@lru_cache(maxsize=4)
def account_key(encoded: str) -> bytes:
    """The AES-256 key from its base64 setting."""
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise Internal(
            "the bank account key is not base64 of 32 bytes", reason="BANK_ACCOUNT_KEY_INVALID"
        )
    return key


def _associated_data(bank_account_id: uuid.UUID) -> bytes:
    return f"moneta:bank-account:{bank_account_id}".encode()


def encrypt_account_number(key: bytes, account_number: str, bank_account_id: uuid.UUID) -> bytes:
    """A fresh random 96-bit nonce, then the ciphertext and tag, bound to the
    bank account's id."""
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, account_number.encode(), _associated_data(bank_account_id))
    return nonce + sealed


def decrypt_account_number(key: bytes, blob: bytes, bank_account_id: uuid.UUID) -> str:
    try:
        plain = AESGCM(key).decrypt(blob[:12], blob[12:], _associated_data(bank_account_id))
    except InvalidTag:
        raise Internal(
            "a stored bank account number does not decrypt", reason="BANK_ACCOUNT_UNREADABLE"
        ) from None
    return plain.decode()


def account_fingerprint(key: bytes, routing_number: str, account_number: str) -> str:
    """A keyed hash that finds an account linked twice; the HMAC key is
    derived from the encryption key, never the key itself."""
    mac_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"moneta bank account fingerprint"
    ).derive(key)
    message = f"{routing_number}:{account_number}".encode()
    return hmac.new(mac_key, message, hashlib.sha256).hexdigest()


# -- ids: every ledger step follows from the transfer it belongs to


def bank_account_id_for(user_id: uuid.UUID, fingerprint: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"bank-account:{user_id}:{fingerprint}")


def bank_transfer_id(user_id: uuid.UUID, idempotency_key: str) -> uuid.UUID:
    """A deposit's or withdrawal's id (and its ledger hold's) follows from who
    asked and their key."""
    return uuid.uuid5(NAMESPACE, f"bank-transfer:{user_id}:{idempotency_key}")


def settlement_transfer_id(transfer_id: uuid.UUID) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"bank-settle:{transfer_id}")


def void_transfer_id(transfer_id: uuid.UUID) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"bank-void:{transfer_id}")


def return_transfer_id(transfer_id: uuid.UUID) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"bank-return:{transfer_id}")


def debt_id_for(transfer_id: uuid.UUID) -> uuid.UUID:
    """The debt a returned deposit leaves, and the ledger transfer that
    records it on the RECEIVABLE account."""
    return uuid.uuid5(NAMESPACE, f"bank-return-shortfall:{transfer_id}")


def repayment_transfer_id(debt_id: uuid.UUID, repaid_before: int) -> uuid.UUID:
    """One repayment per state of the debt: a retry of the same repayment
    reuses the id, the next repayment gets a new one."""
    return uuid.uuid5(NAMESPACE, f"bank-debt-repayment:{debt_id}:{repaid_before}")


def bank_request_id(transfer_id: uuid.UUID) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"bank-request:{transfer_id}")


def bank_clearing_account_id(currency: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"bank-clearing:{currency}")


def receivable_account_id(currency: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"receivable:bank-returns:{currency}")


class Action(enum.Enum):
    POST = "POST"
    VOID = "VOID"
    REVERSE = "REVERSE"
    # Already done: answer the current status.
    NOTHING = "NOTHING"
    # The bank contradicts what it said before.
    CONFLICT = "CONFLICT"
    # Too early: a return before the settlement, or a transfer still being set up.
    OUT_OF_ORDER = "OUT_OF_ORDER"


_SETTLEMENT_ACTIONS: dict[tuple[str, str], Action] = {
    ("PENDING", "SETTLED"): Action.POST,
    ("PENDING", "FAILED"): Action.VOID,
    ("PENDING", "RETURNED"): Action.OUT_OF_ORDER,
    ("COMPLETED", "SETTLED"): Action.NOTHING,
    ("COMPLETED", "FAILED"): Action.CONFLICT,
    ("COMPLETED", "RETURNED"): Action.REVERSE,
    ("FAILED", "FAILED"): Action.NOTHING,
    ("FAILED", "SETTLED"): Action.CONFLICT,
    ("FAILED", "RETURNED"): Action.CONFLICT,
    # A late copy of the settlement that preceded the return.
    ("REVERSED", "SETTLED"): Action.NOTHING,
    ("REVERSED", "RETURNED"): Action.NOTHING,
    ("REVERSED", "FAILED"): Action.CONFLICT,
}
SETTLEMENT_STATUSES = ("SETTLED", "FAILED", "RETURNED")


def settlement_action(current: str, reported: str) -> Action:
    """What a settlement the bank reports does to a transfer in ``current``."""
    assert reported in SETTLEMENT_STATUSES
    if current == "PROCESSING":
        return Action.OUT_OF_ORDER
    return _SETTLEMENT_ACTIONS.get((current, reported), Action.CONFLICT)


def retry_delay_seconds(attempts: int) -> float:
    """How long the relay waits after ``attempts`` failed deliveries: 1 s,
    doubling, at most 5 minutes."""
    return float(min(2 ** max(attempts - 1, 0), 300))


# ================================================================ store (SQL)

_ACCOUNT_COLUMNS = """
    bank_account_id, user_id, account_number_encrypted, fingerprint, last4, routing_number,
    holder_name, created_at
"""
_TRANSFER_COLUMNS = """
    transfer_id, kind, user_id, wallet_id, bank_account_id, idempotency_key, request_hash, amount,
    currency, status, estimated_completion, failure_reason, failure_message, bank_reference,
    bank_reason, created_at, updated_at, reservation_id, lease_until, budget_given_back_at
"""


async def _fetch_bank_account(conn: DbConn, bank_account_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {_ACCOUNT_COLUMNS} FROM bank_accounts WHERE bank_account_id = $1",
        bank_account_id,
    )


async def _fetch_transfer(
    conn: DbConn, transfer_id: uuid.UUID, *, for_update: bool = False
) -> asyncpg.Record | None:
    lock = " FOR UPDATE" if for_update else ""
    return await conn.fetchrow(
        f"SELECT {_TRANSFER_COLUMNS} FROM bank_transfers WHERE transfer_id = $1{lock}",
        transfer_id,
    )


async def _take_lease(
    conn: DbConn, transfer_id: uuid.UUID
) -> tuple[asyncpg.Record, leases.Lease] | None:
    """Leases a PROCESSING transfer to this attempt: the transfer and the
    lease, or None while another attempt holds it (or once it is no longer
    PROCESSING)."""
    seconds, started = handlers.LEASE_SECONDS, leases.clock()
    record = await conn.fetchrow(
        f"""
        UPDATE bank_transfers SET lease_until = clock_timestamp() + make_interval(secs => $2),
                                  updated_at = now()
         WHERE transfer_id = $1 AND status = 'PROCESSING'
           AND (lease_until IS NULL OR lease_until < now())
        RETURNING {_TRANSFER_COLUMNS}
        """,
        transfer_id,
        seconds,
    )
    if record is None:
        return None
    return record, leases.Lease(record["lease_until"], started, seconds)


async def _release_lease(conn: DbConn, transfer_id: uuid.UUID, lease: leases.Lease) -> None:
    """Gives the lease up, if it is still this attempt's."""
    await conn.execute(
        "UPDATE bank_transfers SET lease_until = NULL WHERE transfer_id = $1 AND lease_until = $2",
        transfer_id,
        lease.until,
    )


async def _lease(
    pool: asyncpg.Pool, record: asyncpg.Record
) -> tuple[asyncpg.Record, leases.Lease | None]:
    """A later attempt at a PROCESSING transfer: leased to it (the transfer
    as it is then, and the lease), or as another attempt left it a moment
    ago (no lease); refused, REQUEST_IN_PROGRESS, while another attempt is
    at work on it."""
    async with pool.acquire() as conn:
        leased = await _take_lease(conn, record["transfer_id"])
        if leased is not None:
            return leased
        now = await _fetch_transfer(conn, record["transfer_id"])
    assert now is not None
    if now["status"] != "PROCESSING":
        return now, None
    raise Aborted(
        "the same request is still in progress; retry shortly", reason="REQUEST_IN_PROGRESS"
    )


async def _refuse(
    conn: DbConn,
    transfer_id: uuid.UUID,
    refusal: MonetaError,
    *,
    lease: leases.Lease,
) -> bool:
    """Refuses a transfer still PROCESSING and still leased to the attempt
    refusing it (``lease``); False when it was not (another attempt finished
    it, or holds it, meanwhile)."""
    status = await conn.execute(
        """
        UPDATE bank_transfers SET status = 'REFUSED', failure_reason = $2, failure_message = $3,
                                  updated_at = now()
         WHERE transfer_id = $1 AND status = 'PROCESSING' AND lease_until = $4
        """,
        transfer_id,
        refusal.reason,
        refusal.message,
        lease.until,
    )
    return bool(status == "UPDATE 1")


# ================================================================ platform accounts

_opened_accounts: set[uuid.UUID] = set()


async def _ensure_platform_account(
    peers: Peers,
    account_id: uuid.UUID,
    currency: str,
    account_type: ledger_pb2.AccountType.ValueType,
    purpose: str,
) -> uuid.UUID:
    """Opens a platform account once per process (the ledger keeps it as it
    is if it exists). Debit-normal, no overdraft check: the platform's side
    of money on its way."""
    if account_id not in _opened_accounts:
        await peers.create_accounts(
            [
                ledger_pb2.Account(
                    id=str(account_id),
                    currency=currency,
                    type=account_type,
                    normal_side=ledger_pb2.NORMAL_SIDE_DEBIT,
                    metadata={"purpose": purpose},
                )
            ],
            keep_existing=True,
        )
        _opened_accounts.add(account_id)
    return account_id


async def _bank_clearing(peers: Peers, currency: str) -> uuid.UUID:
    return await _ensure_platform_account(
        peers, bank_clearing_account_id(currency), currency,
        ledger_pb2.ACCOUNT_TYPE_BANK_CLEARING, "bank-clearing",
    )  # fmt: skip


async def _receivable(peers: Peers, currency: str) -> uuid.UUID:
    return await _ensure_platform_account(
        peers, receivable_account_id(currency), currency,
        ledger_pb2.ACCOUNT_TYPE_RECEIVABLE, "bank-return-debts",
    )  # fmt: skip


def _ledger_refused(result: ledger_pb2.TransferResult, what: str) -> Internal:
    return Internal(
        f"the ledger refused the {what}: " + ledger_pb2.TransferResult.Code.Name(result.code),
        reason="LEDGER_REFUSED",
    )


# ================================================================ linking


@dataclass(frozen=True)
class LinkBankAccountCommand:
    user_id: str
    account_number: str
    routing_number: str
    holder_name: str


@dataclass(frozen=True)
class LinkedBankAccount:
    bank_account_id: uuid.UUID
    last4: str


async def link_bank_account(
    pool: asyncpg.Pool, key: bytes, cmd: LinkBankAccountCommand
) -> LinkedBankAccount:
    """Links the account to the user; linking the same account again answers
    the same id."""
    user_id = parse_uuid(cmd.user_id, "user_id")
    number = validate_account_number(cmd.account_number)
    routing = validate_routing_number(cmd.routing_number)
    holder = validate_holder_name(cmd.holder_name)
    fingerprint = account_fingerprint(key, routing, number)
    account_id = bank_account_id_for(user_id, fingerprint)
    async with pool.acquire() as conn:
        if await store.fetch_user(conn, user_id) is None:
            raise NotFound("no such user", reason="USER_NOT_FOUND")
        await conn.execute(
            f"""
            INSERT INTO bank_accounts ({_ACCOUNT_COLUMNS})
            VALUES ($1, $2, $3, $4, $5, $6, $7, now())
            ON CONFLICT (bank_account_id) DO NOTHING
            """,
            account_id,
            user_id,
            encrypt_account_number(key, number, account_id),
            fingerprint,
            last4(number),
            routing,
            holder,
        )
    log.info("bank_account_linked", bank_account_id=str(account_id), user_id=str(user_id))
    return LinkedBankAccount(account_id, last4(number))


# ================================================================ deposits and withdrawals


@dataclass(frozen=True)
class BankTransferCommand:
    user_id: str
    amount: int
    # Empty: the wallet's default currency.
    currency: str
    bank_account_id: str
    idempotency_key: str
    # Withdrawals only: for fraud scoring, and the payer's PIN for a payout
    # that fraud sends to review (step-up).
    device_id: str = ""
    pin: str = field(default="", repr=False)


@dataclass(frozen=True)
class BankTransferOutcome:
    transfer_id: uuid.UUID
    status: str
    estimated_completion: datetime


async def add_funds(
    pool: asyncpg.Pool, peers: Peers, cmd: BankTransferCommand, now: datetime | None = None
) -> BankTransferOutcome:
    """Bank → wallet: a hold from BANK_CLEARING that shows as pending, not
    available, until the bank settles it."""
    return await _request_bank_transfer(pool, peers, "DEPOSIT", cmd, now)


async def withdraw(
    pool: asyncpg.Pool, peers: Peers, cmd: BankTransferCommand, now: datetime | None = None
) -> BankTransferOutcome:
    """Wallet → bank: a hold on the wallet, so the money cannot be spent
    again while the bank pays it out. Like any payment it is scored by fraud
    first and counted against the payer's budgets (category CASH_OUT)."""
    return await _request_bank_transfer(pool, peers, "WITHDRAWAL", cmd, now)


async def _request_bank_transfer(
    pool: asyncpg.Pool,
    peers: Peers,
    kind: str,
    cmd: BankTransferCommand,
    now: datetime | None,
) -> BankTransferOutcome:
    user_id = parse_uuid(cmd.user_id, "user_id")
    bank_account = parse_uuid(cmd.bank_account_id, "bank_account_id")
    key = validate_idempotency_key(cmd.idempotency_key)
    require_positive(cmd.amount)
    if len(cmd.device_id) > 200:
        raise InvalidArgument("device_id is at most 200 characters", reason="INVALID_DEVICE_ID")
    if cmd.pin:
        validate_pin(cmd.pin)
    async with pool.acquire() as conn:
        wallet = await store.fetch_wallet(conn, user_id=user_id)
        if wallet is None:
            raise NotFound("the user has no wallet", reason="WALLET_NOT_FOUND")
        account = await _fetch_bank_account(conn, bank_account)
        if account is None or account["user_id"] != user_id:
            raise NotFound("no such bank account", reason="BANK_ACCOUNT_NOT_FOUND")
        currency = validate_currency(cmd.currency or wallet["default_currency"])
        transfer_id = bank_transfer_id(user_id, key)
        fingerprint = request_hash(
            kind=kind, amount=cmd.amount, currency=currency, bank_account_id=bank_account
        )
        started = leases.clock()
        claimed = await conn.fetchval(
            f"""
            INSERT INTO bank_transfers ({_TRANSFER_COLUMNS})
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'PROCESSING', $10,
                    NULL, NULL, NULL, NULL, now(), now(), NULL,
                    clock_timestamp() + make_interval(secs => $11), NULL)
            ON CONFLICT DO NOTHING
            RETURNING lease_until
            """,
            transfer_id,
            kind,
            user_id,
            wallet["wallet_id"],
            bank_account,
            key,
            fingerprint,
            cmd.amount,
            currency,
            estimated_completion(now or datetime.now(UTC)),
            handlers.LEASE_SECONDS,
        )
        record = await conn.fetchrow(
            f"SELECT {_TRANSFER_COLUMNS} FROM bank_transfers"
            " WHERE user_id = $1 AND idempotency_key = $2",
            user_id,
            key,
        )
    assert record is not None
    if record["transfer_id"] != transfer_id or record["request_hash"] != fingerprint:
        raise AlreadyExists(
            "this idempotency key was used for a different request",
            reason="IDEMPOTENCY_KEY_REUSED",
        )
    fresh = claimed is not None
    lease = leases.Lease(claimed, started, handlers.LEASE_SECONDS) if fresh else None
    if record["status"] == "PROCESSING" and not fresh:
        record, lease = await _lease(pool, record)
    if record["status"] == "REFUSED":
        raise handlers.refusal(record["failure_reason"], record["failure_message"])
    if record["status"] == "PROCESSING":
        assert lease is not None  # PROCESSING, so leased to this attempt
        try:
            with leases.holding(lease):
                if fresh or await peers.lookup_transfer(transfer_id) is None:
                    await _place_hold(pool, peers, record, wallet, account["last4"], cmd)
                else:
                    # An earlier attempt placed the hold and stopped: finish it.
                    await _finish_hold(pool, peers, record, account["last4"])
        except AttemptExpired:
            raise  # the lease may be another attempt's by now: nothing to record or release
        except BaseException as exc:
            async with pool.acquire() as conn:
                refused = handlers.is_refusal(exc) and await _refuse(
                    conn, transfer_id, cast(MonetaError, exc), lease=lease
                )
                if handlers.is_refusal(exc) and not refused:
                    # This attempt outlived its lease: another one holds the
                    # transfer (or finished it), and its outcome is the transfer's.
                    raise AttemptExpired() from exc
                if not refused:
                    # Outcome unknown: the next attempt, or the reconciler,
                    # asks the ledger whether the hold was placed.
                    await _release_lease(conn, transfer_id, lease)
            if refused:
                # Refused before any money moved: final for this key, and
                # what this or an earlier attempt reserved is freed.
                await handlers.release_quietly(
                    peers, handlers.reservation_of(record["reservation_id"], record["transfer_id"])
                )
            raise
        async with pool.acquire() as conn:
            record = await _fetch_transfer(conn, transfer_id)
        assert record is not None
        log.info(
            "bank_transfer_requested", transfer_id=str(transfer_id), kind=kind,
            amount=cmd.amount, currency=currency,
        )  # fmt: skip
    return BankTransferOutcome(transfer_id, record["status"], record["estimated_completion"])


async def _place_hold(
    pool: asyncpg.Pool,
    peers: Peers,
    record: asyncpg.Record,
    wallet: asyncpg.Record,
    account_last4: str,
    cmd: BankTransferCommand,
) -> None:
    """The ledger hold, then (in one transaction) the transfer PENDING, its
    history row and the request to the bank. A withdrawal is scored by fraud
    and reserves the payer's budgets before its hold, and commits them after.
    Every step may be repeated."""
    kind, currency, amount = record["kind"], record["currency"], record["amount"]
    status = WalletStatus(wallet["status"])
    reservation_id: str | None = None
    if kind == "WITHDRAWAL":
        ensure_can_send(status)
        async with pool.acquire() as conn:
            accounts = await store.wallet_accounts(conn, wallet["wallet_id"])
        if currency not in accounts:
            raise FailedPrecondition(
                f"the wallet holds no {currency}",
                reason="INSUFFICIENT_FUNDS",
                details={"currency": currency, "available": 0},
            )
        debit, credit = accounts[currency], await _bank_clearing(peers, currency)
        await handlers.screen(
            pool,
            peers,
            fraud_pb2.ScoreRequest(
                transaction_id=str(record["transfer_id"]),
                user_id=str(record["user_id"]),
                type="WITHDRAWAL",
                amount=Money(amount=amount, currency=currency),
                recipient_kind=fraud_pb2.RECIPIENT_KIND_BANK,
                recipient_id=str(record["bank_account_id"]),
                device_id=cmd.device_id,
            ),
            cmd.pin,
        )
        reservation_id = await _reserve_withdrawal(peers, record)
    else:
        if status == WalletStatus.CLOSED:
            raise FailedPrecondition("the wallet is closed", reason="WALLET_CLOSED")
        credit = await handlers.ensure_wallet_account(pool, peers, wallet, currency)
        debit = await _bank_clearing(peers, currency)
    result = await peers.create_transfer(
        ledger_pb2.Transfer(
            id=str(record["transfer_id"]),
            debit_account_id=str(debit),
            credit_account_id=str(credit),
            amount=amount,
            currency=currency,
            type=ledger_pb2.TRANSFER_TYPE_PENDING,
            code=kind,
            metadata={"kind": kind, "bank_account_id": str(record["bank_account_id"])},
        )
    )
    # Refused: the caller frees the reservation once the refusal is recorded.
    if result.code == ledger_pb2.TransferResult.INSUFFICIENT_FUNDS:
        raise FailedPrecondition(
            "insufficient funds", reason="INSUFFICIENT_FUNDS", details={"currency": currency}
        )
    if result.code not in _OK_CODES:
        raise _ledger_refused(result, "hold")
    await _finish_hold(pool, peers, record, account_last4, reservation_id)


async def _finish_hold(
    pool: asyncpg.Pool,
    peers: Peers,
    record: asyncpg.Record,
    account_last4: str,
    reservation_id: str | None = None,
) -> None:
    """The hold is placed: a withdrawal's spend counts (it is given back if
    the bank fails or returns the payout), then the transfer is PENDING. A
    repeat changes nothing."""
    if record["kind"] == "WITHDRAWAL":
        async with pool.acquire() as conn:
            wallet = await store.fetch_wallet(conn, user_id=record["user_id"])
        assert wallet is not None  # a withdrawal's wallet is never deleted
        committed = await handlers.commit_spend(
            peers, record["transfer_id"],
            reservation_id or handlers.reservation_of(record["reservation_id"], record["transfer_id"]),
            wallet, record["amount"], record["currency"], CASH_OUT_CATEGORY,
        )  # fmt: skip
        if committed is not None and record["reservation_id"] is None:
            # Kept once committed, so that a failed payout gives it back.
            async with pool.acquire() as conn:
                await conn.execute(
                    "UPDATE bank_transfers SET reservation_id = $2 WHERE transfer_id = $1",
                    record["transfer_id"],
                    uuid.UUID(committed),
                )
    await _record_pending(pool, record, account_last4)


async def _reserve_withdrawal(peers: Peers, record: asyncpg.Record) -> str:
    """Reserves a withdrawal's spend (once: its id is the reference), under
    the name ``handlers.reservation_id_for`` gives it, so that nothing needs
    recording until the hold is placed. BUDGET_EXCEEDED refuses the payout.
    A reservation an earlier attempt committed is its own: that attempt
    placed the hold too."""
    reservation = await peers.reserve(
        record["user_id"], record["amount"], record["currency"], CASH_OUT_CATEGORY,
        str(record["transfer_id"]), ttl_seconds=WITHDRAWAL_RESERVATION_TTL_SECONDS,
        reservation_id=handlers.reservation_id_for(record["transfer_id"]),
    )  # fmt: skip
    if reservation.status not in (
        budget_pb2.RESERVATION_STATUS_RESERVED,
        budget_pb2.RESERVATION_STATUS_COMMITTED,
    ):
        # An earlier attempt's reservation lapsed before money moved.
        raise FailedPrecondition(
            "the withdrawal's budget reservation has lapsed; retry with a new key",
            reason="RESERVATION_LAPSED",
        )
    return str(reservation.reservation_id)


async def give_budget_back(pool: asyncpg.Pool, peers: Peers, transfer_id: uuid.UUID) -> bool:
    """A payout that failed or came back gives its spend back to the budgets
    (and the period) it was counted in, once (the refund's reference is the
    transfer's). Outside the settlement's transaction, so a budget that does
    not answer never holds the bank's webhook up: what is not given back now
    is given back by the relay's sweep. True when nothing is owed any more."""
    async with pool.acquire() as conn:
        record = await _fetch_transfer(conn, transfer_id)
    assert record is not None
    if record["budget_given_back_at"] is not None or record["reservation_id"] is None:
        return True
    try:
        await peers.refund_spend(
            str(record["reservation_id"]), record["amount"], record["currency"],
            f"withdrawal-back:{record['transfer_id']}",
        )  # fmt: skip
    except (Unavailable, DeadlineExceeded) as exc:
        log.warning("withdrawal_budget_refund_deferred", transfer_id=str(transfer_id),
                    reason=exc.reason)  # fmt: skip
        return False
    except MonetaError as exc:
        # Refused for good (never committed: its commit failed and was logged
        # then; or not found): nothing to give back, and no retry changes it.
        handlers.BUDGET_FOLLOW_UPS.labels("refund").inc()
        log.error("withdrawal_budget_refund_failed", transfer_id=str(transfer_id),
                  reason=exc.reason)  # fmt: skip
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE bank_transfers SET budget_given_back_at = now() WHERE transfer_id = $1",
            transfer_id,
        )
    return True


async def give_owed_budgets_back(pool: asyncpg.Pool, peers: Peers) -> int:
    """The sweep's share: every failed or returned payout whose spend the
    budget has not taken back yet. Returns how many it gave back."""
    async with pool.acquire() as conn:
        owed = await conn.fetch(
            """
            SELECT transfer_id FROM bank_transfers
             WHERE kind = 'WITHDRAWAL' AND status IN ('FAILED', 'REVERSED')
               AND reservation_id IS NOT NULL AND budget_given_back_at IS NULL
             ORDER BY updated_at LIMIT 100
            """
        )
    done = 0
    for row in owed:
        if not await give_budget_back(pool, peers, row["transfer_id"]):
            break  # the budget does not answer: the next sweep goes on
        done += 1
    return done


async def _record_pending(pool: asyncpg.Pool, record: asyncpg.Record, account_last4: str) -> None:
    """The hold exists: the transfer is PENDING, its owner sees it, and the
    bank is to be told, all in one transaction."""
    kind = record["kind"]
    deposit = kind == "DEPOSIT"
    amount = record["amount"]
    async with pool.acquire() as conn, conn.transaction():
        # A refusal recorded by a concurrent attempt that lost the race to the
        # ledger is overruled: the ledger says the money is held.
        await conn.execute(
            """
            UPDATE bank_transfers SET status = 'PENDING', failure_reason = NULL,
                                      failure_message = NULL, updated_at = now()
             WHERE transfer_id = $1 AND status IN ('PROCESSING', 'REFUSED')
            """,
            record["transfer_id"],
        )
        await history.record(
            conn,
            history.Movement(
                wallet_id=record["wallet_id"],
                ledger_transfer_id=record["transfer_id"],
                type=kind,
                amount=amount if deposit else -amount,
                currency=record["currency"],
                status="PENDING",
                counterparty=f"Bank account ••{account_last4}",
                description=(
                    f"Add funds from bank account ending {account_last4}"
                    if deposit
                    else f"Withdrawal to bank account ending {account_last4}"
                ),
                reference_id=str(record["bank_account_id"]),
            ),
        )
        await conn.execute(
            """
            INSERT INTO bank_requests (request_id, transfer_id, kind)
            VALUES ($1, $2, $3) ON CONFLICT DO NOTHING
            """,
            bank_request_id(record["transfer_id"]),
            record["transfer_id"],
            "COLLECTION" if deposit else "PAYOUT",
        )


async def reconcile_stale_bank_transfers(
    pool: asyncpg.Pool, peers: Peers, older_than_seconds: float = 60.0
) -> int:
    """Finishes transfers that no attempt finished (a crash between the
    ledger hold and recording it, a client that gave up): PENDING when the
    ledger holds the money, REFUSED (and its budget freed) when it does not.
    Each is leased first, so no attempt is at work on it meanwhile; one that
    cannot be finished now is left for the next round."""
    async with pool.acquire() as conn:
        stale = await conn.fetch(
            """
            SELECT t.transfer_id, a.last4 FROM bank_transfers t
              JOIN bank_accounts a USING (bank_account_id)
             WHERE t.status = 'PROCESSING'
               AND t.updated_at < now() - make_interval(secs => $1)
               AND (t.lease_until IS NULL OR t.lease_until < now())
             ORDER BY t.updated_at LIMIT 100
            """,
            older_than_seconds,
        )
    finished = 0
    for row in stale:
        transfer_id = row["transfer_id"]
        async with pool.acquire() as conn:
            leased = await _take_lease(conn, transfer_id)
        if leased is None:
            continue  # an attempt is at work on it, or it moved on
        record, lease = leased
        try:
            if await peers.lookup_transfer(transfer_id) is not None:
                await _finish_hold(pool, peers, record, row["last4"])
                outcome = "PENDING"
            else:
                async with pool.acquire() as conn:
                    refused = await _refuse(
                        conn, transfer_id,
                        Aborted("the request did not complete; nothing moved",
                                reason="REQUEST_ABANDONED"),
                        lease=lease,
                    )  # fmt: skip
                if refused:
                    await handlers.release_quietly(
                        peers,
                        handlers.reservation_of(record["reservation_id"], record["transfer_id"]),
                    )
                outcome = "REFUSED"
        except (MonetaError, OSError, asyncpg.PostgresError) as exc:
            log.warning("bank_transfer_reconcile_failed", transfer_id=str(transfer_id),
                        error=str(exc))  # fmt: skip
            async with pool.acquire() as conn:
                await _release_lease(conn, transfer_id, lease)
            continue
        finished += 1
        log.warning("bank_transfer_reconciled", transfer_id=str(transfer_id),
                    outcome=outcome)  # fmt: skip
    return finished


# ================================================================ settlement


@dataclass(frozen=True)
class SettlementCommand:
    transfer_id: str
    # SETTLED, FAILED or RETURNED
    status: str
    bank_reference: str
    reason: str = ""


@dataclass(frozen=True)
class SettlementOutcome:
    transfer_id: uuid.UUID
    status: str


async def apply_bank_settlement(
    pool: asyncpg.Pool, peers: Peers, cmd: SettlementCommand
) -> SettlementOutcome:
    """Applies what the bank reports. A second delivery changes nothing and
    answers the same status; a contradiction is refused."""
    transfer_id = parse_uuid(cmd.transfer_id, "transfer_id")
    if cmd.status not in SETTLEMENT_STATUSES:
        raise InvalidArgument(
            "status must be SETTLED, FAILED or RETURNED", reason="INVALID_SETTLEMENT_STATUS"
        )
    if len(cmd.bank_reference) > 200 or len(cmd.reason) > 500:
        raise InvalidArgument(
            "bank_reference is at most 200 characters, reason at most 500",
            reason="INVALID_SETTLEMENT",
        )
    money_arrived = False
    # The row lock serialises deliveries of the same transfer; the ledger
    # calls inside are idempotent, so a crash anywhere is repaired by the
    # bank's next delivery.
    async with pool.acquire() as conn, conn.transaction():
        record = await _fetch_transfer(conn, transfer_id, for_update=True)
        if record is None:
            raise NotFound("no such bank transfer", reason="BANK_TRANSFER_NOT_FOUND")
        current = record["status"]
        action = settlement_action(current, cmd.status)
        if action == Action.NOTHING:
            return SettlementOutcome(transfer_id, current)
        if action == Action.CONFLICT:
            raise FailedPrecondition(
                f"the transfer is {current}; the bank cannot now report it {cmd.status}",
                reason="SETTLEMENT_CONFLICT",
                details={"current_status": current, "reported_status": cmd.status},
            )
        if action == Action.OUT_OF_ORDER:
            raise Aborted(
                f"the transfer is {current}; {cmd.status} cannot apply yet",
                reason="SETTLEMENT_OUT_OF_ORDER",
                details={"current_status": current, "reported_status": cmd.status},
            )
        if action == Action.POST:
            new_status = await _post_hold(conn, peers, record)
            money_arrived = record["kind"] == "DEPOSIT"
        elif action == Action.VOID:
            new_status = await _void_hold(conn, peers, record)
            money_arrived = record["kind"] == "WITHDRAWAL"
        elif record["kind"] == "WITHDRAWAL":
            new_status = await _reverse_withdrawal(conn, peers, record)
            money_arrived = True
        else:
            new_status = await _reverse_deposit(pool, conn, peers, record)
        await conn.execute(
            """
            UPDATE bank_transfers SET status = $2, bank_reference = $3, bank_reason = $4,
                                      updated_at = now()
             WHERE transfer_id = $1
            """,
            transfer_id,
            new_status,
            cmd.bank_reference,
            cmd.reason or None,
        )
    log.info("bank_settlement_applied", transfer_id=str(transfer_id), reported=cmd.status,
             status=new_status)  # fmt: skip
    if money_arrived and record["kind"] == "WITHDRAWAL":
        await give_budget_back(pool, peers, transfer_id)
    if money_arrived:
        await _repay_quietly(pool, peers, record["wallet_id"], record["currency"])
    return SettlementOutcome(transfer_id, new_status)


async def _posted_balance(peers: Peers, record: asyncpg.Record) -> dict[uuid.UUID, int]:
    account = wallet_account_id(record["wallet_id"], record["currency"])
    balance = (await peers.balances([account])).get(str(account))
    return {record["wallet_id"]: balance.posted} if balance is not None else {}


async def _post_hold(conn: DbConn, peers: Peers, record: asyncpg.Record) -> str:
    return await _resolve_hold(
        conn, peers, record, ledger_pb2.TRANSFER_TYPE_POST_PENDING,
        settlement_transfer_id(record["transfer_id"]), "COMPLETED", "settlement",
    )  # fmt: skip


async def _void_hold(conn: DbConn, peers: Peers, record: asyncpg.Record) -> str:
    return await _resolve_hold(
        conn, peers, record, ledger_pb2.TRANSFER_TYPE_VOID_PENDING,
        void_transfer_id(record["transfer_id"]), "FAILED", "void",
    )  # fmt: skip


async def _resolve_hold(
    conn: DbConn,
    peers: Peers,
    record: asyncpg.Record,
    kind: ledger_pb2.TransferType.ValueType,
    transfer_id: uuid.UUID,
    status: str,
    what: str,
) -> str:
    """Posts or voids the bank transfer's hold and moves its history to
    ``status``."""
    result = await peers.create_transfer(
        ledger_pb2.Transfer(
            id=str(transfer_id),
            amount=record["amount"],
            currency=record["currency"],
            type=kind,
            pending_id=str(record["transfer_id"]),
            code=record["kind"],
        )
    )
    if result.code not in _OK_CODES:
        raise _ledger_refused(result, what)
    await history.set_status(
        conn, record["transfer_id"], status, await _posted_balance(peers, record)
    )
    return status


def _reversal(record: asyncpg.Record) -> ledger_pb2.Transfer:
    """The reversal of a settled transfer, the same whether it goes alone or
    closes a linked chain (so that a retry is recognised either way)."""
    return ledger_pb2.Transfer(
        id=str(return_transfer_id(record["transfer_id"])),
        amount=record["amount"],
        currency=record["currency"],
        type=ledger_pb2.TRANSFER_TYPE_REVERSAL,
        reverses_id=str(settlement_transfer_id(record["transfer_id"])),
        code=f"{record['kind']}_RETURNED",
    )


async def _reverse_withdrawal(conn: DbConn, peers: Peers, record: asyncpg.Record) -> str:
    """The payout came back: the money returns to the wallet."""
    result = await peers.create_transfer(_reversal(record))
    if result.code not in _OK_CODES:
        raise _ledger_refused(result, "return")
    await history.set_status(
        conn, record["transfer_id"], "REVERSED", await _posted_balance(peers, record)
    )
    return "REVERSED"


# How often a return retries when the wallet's balance moves under it.
_RETURN_ATTEMPTS = 5


async def _reverse_deposit(
    pool: asyncpg.Pool,
    conn: DbConn,
    peers: Peers,
    record: asyncpg.Record,
) -> str:
    """Takes a returned deposit back. What the wallet no longer has is owed:
    the wallet takes it from the RECEIVABLE account in the same linked chain
    as the reversal, so the reversal never overdraws it and the debt exists
    exactly when the reversal does."""
    transfer_id, currency, amount = record["transfer_id"], record["currency"], record["amount"]
    debt_id = debt_id_for(transfer_id)
    wallet_account = wallet_account_id(record["wallet_id"], currency)
    # An earlier delivery may have gone through the ledger and crashed after.
    shortfall_transfer = await peers.lookup_transfer(debt_id)
    if shortfall_transfer is not None:
        shortfall = int(shortfall_transfer.amount)
    elif await peers.lookup_transfer(return_transfer_id(transfer_id)) is not None:
        shortfall = 0
    else:
        shortfall = await _take_back(pool, peers, record, debt_id, wallet_account)
    if shortfall:
        await _record_debt(conn, record, debt_id, shortfall)
    await history.set_status(conn, transfer_id, "REVERSED", await _posted_balance(peers, record))
    log.info("deposit_returned", transfer_id=str(transfer_id), amount=amount, owed=shortfall,
             currency=currency)  # fmt: skip
    return "REVERSED"


async def _take_back(
    pool: asyncpg.Pool,
    peers: Peers,
    record: asyncpg.Record,
    debt_id: uuid.UUID,
    wallet_account: uuid.UUID,
) -> int:
    """Reverses the deposit; returns the part that had to be recorded as owed."""
    transfer_id, currency = record["transfer_id"], record["currency"]
    amount = int(record["amount"])
    result = await peers.create_transfer(_reversal(record))
    if result.code in _OK_CODES:
        return 0
    if result.code != ledger_pb2.TransferResult.INSUFFICIENT_FUNDS:
        raise _ledger_refused(result, "return")
    # Spent already: nothing more leaves the wallet while the debt stands.
    async with pool.acquire() as freeze_conn:
        await _freeze_for_debt(freeze_conn, record)
    receivable = await _receivable(peers, currency)
    for _ in range(_RETURN_ATTEMPTS):
        available = (await peers.balances([wallet_account]))[str(wallet_account)].available
        shortfall = amount - max(0, min(int(available), amount))
        if shortfall == 0:
            results = [await peers.create_transfer(_reversal(record))]
        else:
            results = await peers.create_transfers(
                [
                    ledger_pb2.Transfer(
                        id=str(debt_id),
                        debit_account_id=str(receivable),
                        credit_account_id=str(wallet_account),
                        amount=shortfall,
                        currency=currency,
                        type=ledger_pb2.TRANSFER_TYPE_POSTED,
                        linked=True,
                        code="BANK_RETURN_SHORTFALL",
                        metadata={
                            "wallet_id": str(record["wallet_id"]),
                            "transfer_id": str(transfer_id),
                        },
                    ),
                    _reversal(record),
                ]
            )
        if all(r.code in _OK_CODES for r in results):
            return shortfall
        codes = {r.code for r in results}
        if not codes <= {
            *_OK_CODES,
            ledger_pb2.TransferResult.INSUFFICIENT_FUNDS,
            ledger_pb2.TransferResult.LINKED_EVENT_FAILED,
        }:
            failed = next(r for r in results if r.code not in _OK_CODES)
            raise _ledger_refused(failed, "return")
        # The balance moved between reading it and the chain: read it again.
    raise Aborted(
        "the wallet's balance kept changing; the return will apply on the next delivery",
        reason="RETURN_RETRY",
    )


async def _freeze_for_debt(conn: DbConn, record: asyncpg.Record) -> None:
    """Nothing leaves the wallet while it owes; who, when and why recorded.
    A wallet frozen (or closed) already stays as it is."""
    await store.change_wallet_status(
        conn, record["wallet_id"], WalletStatus.ACTIVE, WalletStatus.FROZEN,
        f"a returned deposit ({record['transfer_id']}) was already spent: the shortfall is owed",
        SYSTEM_ACTOR,
    )  # fmt: skip


async def _record_debt(
    conn: DbConn,
    record: asyncpg.Record,
    debt_id: uuid.UUID,
    shortfall: int,
) -> None:
    currency = record["currency"]
    await conn.execute(
        """
        INSERT INTO bank_debts (debt_id, wallet_id, currency, transfer_id, amount)
        VALUES ($1, $2, $3, $4, $5) ON CONFLICT (debt_id) DO NOTHING
        """,
        debt_id,
        record["wallet_id"],
        currency,
        record["transfer_id"],
        shortfall,
    )
    # Also here, in case the freeze before the chain was lost to a crash.
    await _freeze_for_debt(conn, record)
    await history.record(
        conn,
        history.Movement(
            wallet_id=record["wallet_id"],
            ledger_transfer_id=debt_id,
            type="CLAWBACK",
            amount=-shortfall,
            currency=currency,
            status="PENDING",
            counterparty="Moneta",
            description=(
                f"Returned deposit already spent: {to_major_units(shortfall, currency)} "
                f"{currency} owed, repaid first from incoming money"
            ),
            reference_id=str(record["transfer_id"]),
        ),
    )


# ================================================================ debts


async def repay_debts(pool: asyncpg.Pool, peers: Peers, wallet_id: uuid.UUID, currency: str) -> int:
    """Moves what the wallet has in ``currency`` to the RECEIVABLE account,
    oldest debt first, until its debts are repaid or its money runs out.
    Returns the amount repaid. Call it after money arrives in a wallet; with
    nothing owed it costs one indexed query."""
    async with pool.acquire() as conn:
        debts = await conn.fetch(
            """
            SELECT debt_id FROM bank_debts
             WHERE wallet_id = $1 AND currency = $2 AND repaid < amount
             ORDER BY created_at, debt_id
            """,
            wallet_id,
            currency,
        )
    repaid = 0
    for debt in debts:
        taken, settled = await _repay_debt(pool, peers, debt["debt_id"])
        repaid += taken
        if not settled:
            break  # the money ran out
    if repaid:
        await _lift_debt_freeze(pool, wallet_id)
    return repaid


async def _repay_debt(pool: asyncpg.Pool, peers: Peers, debt_id: uuid.UUID) -> tuple[int, bool]:
    """One repayment of one debt, under its row lock. Returns what was
    repaid and whether the debt is now settled."""
    async with pool.acquire() as conn, conn.transaction():
        debt = await conn.fetchrow(
            """
            SELECT debt_id, wallet_id, currency, transfer_id, amount, repaid
              FROM bank_debts WHERE debt_id = $1 FOR UPDATE
            """,
            debt_id,
        )
        assert debt is not None
        outstanding = debt["amount"] - debt["repaid"]
        if outstanding <= 0:
            return 0, True
        currency = debt["currency"]
        wallet_account = wallet_account_id(debt["wallet_id"], currency)
        repayment_id = repayment_transfer_id(debt_id, debt["repaid"])
        # An earlier attempt may have moved the money and crashed before
        # recording it: the ledger says.
        done = await peers.lookup_transfer(repayment_id)
        if done is not None:
            taken = int(done.amount)
        else:
            available = (await peers.balances([wallet_account]))[str(wallet_account)].available
            taken = min(int(available), outstanding)
            if taken <= 0:
                return 0, False
            result = await peers.create_transfer(
                ledger_pb2.Transfer(
                    id=str(repayment_id),
                    debit_account_id=str(wallet_account),
                    credit_account_id=str(await _receivable(peers, currency)),
                    amount=taken,
                    currency=currency,
                    type=ledger_pb2.TRANSFER_TYPE_POSTED,
                    code="BANK_DEBT_REPAYMENT",
                    metadata={"debt_id": str(debt_id)},
                )
            )
            if result.code == ledger_pb2.TransferResult.INSUFFICIENT_FUNDS:
                return 0, False  # spent meanwhile; the next arrival tries again
            if result.code == ledger_pb2.TransferResult.EXISTS_WITH_DIFFERENT_FIELDS:
                # A timed-out attempt landed after the lookup: it is the repayment.
                landed = await peers.lookup_transfer(repayment_id)
                assert landed is not None
                taken = int(landed.amount)
            elif result.code not in _OK_CODES:
                raise _ledger_refused(result, "debt repayment")
        settled = taken >= outstanding
        await conn.execute(
            "UPDATE bank_debts SET repaid = repaid + $2, updated_at = now() WHERE debt_id = $1",
            debt_id,
            taken,
        )
        if settled:
            balance = (await peers.balances([wallet_account])).get(str(wallet_account))
            await history.set_status(
                conn, debt_id, "COMPLETED",
                {debt["wallet_id"]: balance.posted} if balance is not None else None,
            )  # fmt: skip
    log.info("bank_debt_repaid", debt_id=str(debt_id), amount=taken, currency=currency,
             outstanding=outstanding - taken)  # fmt: skip
    return taken, settled


async def _lift_debt_freeze(pool: asyncpg.Pool, wallet_id: uuid.UUID) -> None:
    """With every debt repaid, a wallet that the debt froze (and nobody has
    changed since) is active again. A freeze someone else decided stays."""
    async with pool.acquire() as conn, conn.transaction():
        owed = await conn.fetchval(
            "SELECT count(*) FROM bank_debts WHERE wallet_id = $1 AND repaid < amount", wallet_id
        )
        if owed:
            return
        last = await conn.fetchrow(
            """
            SELECT change_id, actor_id, new_status FROM wallet_status_changes
             WHERE wallet_id = $1 ORDER BY created_at DESC, change_id DESC LIMIT 1
            """,
            wallet_id,
        )
        if last is None or last["actor_id"] != SYSTEM_ACTOR:
            return
        if last["new_status"] != WalletStatus.FROZEN:
            return
        if await store.change_wallet_status(
            conn, wallet_id, WalletStatus.FROZEN, WalletStatus.ACTIVE,
            "the debt from a returned deposit is repaid", SYSTEM_ACTOR,
        ):  # fmt: skip
            log.info("wallet_unfrozen", wallet_id=str(wallet_id), reason="debt repaid")


async def _repay_quietly(
    pool: asyncpg.Pool, peers: Peers, wallet_id: uuid.UUID, currency: str
) -> None:
    """Repays after money arrived; a failure is left to the relay's sweep
    (the wallet is frozen meanwhile, so nothing leaves before it)."""
    try:
        await repay_debts(pool, peers, wallet_id, currency)
    except (MonetaError, OSError, asyncpg.PostgresError) as exc:
        log.warning("bank_debt_repayment_failed", wallet_id=str(wallet_id), error=repr(exc))


async def repay_outstanding_debts(pool: asyncpg.Pool, peers: Peers) -> int:
    """Repays every debt the money in its wallet can cover: the safety net
    for money that arrived through a flow that does not call repay_debts."""
    async with pool.acquire() as conn:
        owing = await conn.fetch(
            "SELECT DISTINCT wallet_id, currency FROM bank_debts WHERE repaid < amount LIMIT 1000"
        )
    total = 0
    for row in owing:
        total += await repay_debts(pool, peers, row["wallet_id"], row["currency"])
    return total


# ================================================================ the bank partner


def bank_request_payload(
    row: asyncpg.Record | dict[str, Any], account_number: str
) -> dict[str, Any]:
    """What the partner is told about a collection (money in) or payout."""
    return {
        "request_id": str(row["request_id"]),
        "transfer_id": str(row["transfer_id"]),
        "type": row["request_kind"],
        "amount": to_major_units(row["amount"], row["currency"]),
        "amount_minor": row["amount"],
        "currency": row["currency"],
        "account_number": account_number,
        "routing_number": row["routing_number"],
        "holder_name": row["holder_name"],
    }


PARTNER_PATHS = {"COLLECTION": "/v1/collections", "PAYOUT": "/v1/payouts"}
# Requests sent per round; a full round is followed by the next at once.
RELAY_BATCH = 50


async def deliver_due_bank_requests(
    pool: asyncpg.Pool,
    client: httpx.AsyncClient,
    partner_url: str,
    key: bytes,
    limit: int = RELAY_BATCH,
) -> int:
    """Sends the requests that are due to the partner, at once, and records
    each answer: accepted, or tried again later (1 s, doubling, at most 5
    minutes). Replicas never send the same request at the same time (row
    locks, SKIP LOCKED); the partner deduplicates by request id. Returns how
    many were due."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            """
            SELECT r.request_id, r.transfer_id, r.kind AS request_kind, r.attempts,
                   t.amount, t.currency, a.bank_account_id, a.account_number_encrypted,
                   a.routing_number, a.holder_name
              FROM bank_requests r
              JOIN bank_transfers t USING (transfer_id)
              JOIN bank_accounts a ON a.bank_account_id = t.bank_account_id
             WHERE r.accepted_at IS NULL AND r.next_attempt_at <= now()
             ORDER BY r.next_attempt_at
             LIMIT $1
               FOR UPDATE OF r SKIP LOCKED
            """,
            limit,
        )
        if not rows:
            return 0
        errors = await asyncio.gather(*(_send(client, partner_url, key, row) for row in rows))
        for row, error in zip(rows, errors, strict=True):
            attempts = row["attempts"] + 1
            if error is None:
                await conn.execute(
                    """
                    UPDATE bank_requests SET accepted_at = now(), attempts = $2, last_error = NULL
                     WHERE request_id = $1
                    """,
                    row["request_id"],
                    attempts,
                )
                log.info("bank_request_accepted", request_id=str(row["request_id"]),
                         transfer_id=str(row["transfer_id"]), attempts=attempts)  # fmt: skip
            else:
                await conn.execute(
                    """
                    UPDATE bank_requests
                       SET attempts = $2, last_error = $3,
                           next_attempt_at = now() + make_interval(secs => $4)
                     WHERE request_id = $1
                    """,
                    row["request_id"],
                    attempts,
                    error[:500],
                    retry_delay_seconds(attempts),
                )
                log.warning("bank_request_failed", request_id=str(row["request_id"]),
                            attempts=attempts, error=error)  # fmt: skip
    return len(rows)


async def _send(
    client: httpx.AsyncClient, partner_url: str, key: bytes, row: asyncpg.Record
) -> str | None:
    """None when the partner accepted the request, else what went wrong."""
    try:
        number = decrypt_account_number(
            key, row["account_number_encrypted"], row["bank_account_id"]
        )
    except MonetaError as exc:
        return exc.reason
    try:
        response = await client.post(
            partner_url.rstrip("/") + PARTNER_PATHS[row["request_kind"]],
            json=bank_request_payload(row, number),
            headers={"Idempotency-Key": str(row["request_id"])},
        )
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    if response.is_success:
        return None
    return f"HTTP {response.status_code}: {response.text[:200]}"


async def bank_request_relay(
    pool: asyncpg.Pool,
    settings: WalletSettings,
    peers: Peers | None = None,
    poll_seconds: float = 1.0,
    sweep_seconds: float = 15.0,
) -> None:
    """Runs until cancelled: delivers the outbox to the bank partner and, on
    a slower beat, finishes abandoned requests and repays debts from money
    that has arrived. Without ``peers`` it opens its own ledger channel."""
    key = account_key(settings.bank_account_key)
    own = peers is None
    ledger = peers or Peers(
        settings.ledger_addr, settings.budget_addr, settings.fraud_addr,
        settings.peer_timeout_seconds,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    last_sweep = float("-inf")
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0)) as client:
            while True:
                due = 0
                try:
                    due = await deliver_due_bank_requests(
                        pool, client, settings.bank_partner_url, key
                    )
                    if loop.time() - last_sweep >= sweep_seconds:
                        last_sweep = loop.time()
                        await reconcile_stale_bank_transfers(pool, ledger)
                        await give_owed_budgets_back(pool, ledger)
                        await repay_outstanding_debts(pool, ledger)
                except (
                    MonetaError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError
                ) as exc:  # fmt: skip
                    log.warning("bank_relay_failed", error=repr(exc))
                if due < RELAY_BATCH:
                    await asyncio.sleep(poll_seconds)
    finally:
        if own:
            await ledger.close()
