"""Merchants: the registry, their signed QR payment requests, and payments
to them.

A merchant has a settlement ``MERCHANT`` ledger account per currency and an
Ed25519 signing key. A QR code carries a payment request (merchant, amount,
currency, reference, expiry) signed with that key, so the wallet needs no
record of the codes it issued: paying one verifies the signature and the
expiry, and a (merchant, reference) pays once.

A payment to a merchant is made as safe as a P2P transfer, by the same
steps: idempotency (a ``payments`` row of kind MERCHANT, scoped to the
payer) → fraud score → budget reservation → ledger transfer → budget commit
→ history. Its id is the ledger transfer's id, the fraud transaction id and
the budget reference, so a retried or resumed payment repeats no effect. The
merchant cannot wait for a review: one that fraud sends to review goes ahead
only with the payer's PIN in the request (``handlers.screen``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

import asyncpg
import structlog
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from moneta.common.v1.money_pb2 import Money
from moneta.fraud.v1 import fraud_pb2
from moneta.ledger.v1 import ledger_pb2
from services.common.db import DbConn
from services.common.errors import (
    Aborted,
    AlreadyExists,
    AttemptExpired,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MonetaError,
    NotFound,
)
from services.common.ids import parse_uuid
from services.common.money import INT64_MAX, require_positive, validate_currency
from services.wallet import handlers, history, leases, store
from services.wallet.domain import (
    NAMESPACE,
    WalletStatus,
    ensure_can_send,
    payment_id,
    request_hash,
    validate_idempotency_key,
)
from services.wallet.handlers import LEASE_SECONDS, commit_spend
from services.wallet.peers import Peers
from services.wallet.pins import validate_pin

log = structlog.get_logger("moneta.wallet.merchants")

_OK_CODES = (ledger_pb2.TransferResult.OK, ledger_pb2.TransferResult.EXISTS)
MAX_REFERENCE = 100
MAX_QR_PAYLOAD = 2048
DEFAULT_CATEGORY = "MERCHANT"
_CATEGORY_RE = re.compile(r"[A-Z][A-Z0-9_]{0,31}")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")
# What a signature covers: this context, then the payload's first segment as
# sent. Nothing signed for another purpose can pass for a QR code.
_QR_CONTEXT = b"moneta.qr.v1."
_QR_FIELDS = frozenset({"v", "merchant_id", "amount", "currency", "reference", "expires_at"})


def merchant_account_id(merchant_id: uuid.UUID, currency: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"merchant-account:{merchant_id}:{currency}")


def validate_reference(reference: str) -> str:
    if not 1 <= len(reference) <= MAX_REFERENCE or not reference.isprintable():
        raise InvalidArgument(
            f"reference must be 1 to {MAX_REFERENCE} printable characters",
            reason="INVALID_REFERENCE",
        )
    return reference


# ---------------------------------------------------------------- QR codes (pure)


@dataclass(frozen=True)
class PaymentRequest:
    """What a merchant's QR code asks for."""

    merchant_id: uuid.UUID
    amount: int
    currency: str
    reference: str
    # Unix seconds.
    expires_at: int

    @property
    def expires_at_datetime(self) -> datetime:
        return datetime.fromtimestamp(self.expires_at, UTC)


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _b64decode(text: str) -> bytes:
    if not _B64URL_RE.fullmatch(text):
        raise binascii.Error("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_payment_request(request: PaymentRequest, key: Ed25519PrivateKey) -> str:
    """The QR payload: base64url(JSON of the request) "." base64url(Ed25519
    signature of the context and that first segment)."""
    body = json.dumps(
        {
            "v": 1,
            "merchant_id": str(request.merchant_id),
            "amount": request.amount,
            "currency": request.currency,
            "reference": request.reference,
            "expires_at": request.expires_at,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    segment = _b64encode(body)
    return f"{segment}.{_b64encode(key.sign(_QR_CONTEXT + segment.encode()))}"


@dataclass(frozen=True)
class SignedQr:
    """A QR payload read but not yet trusted."""

    request: PaymentRequest
    signed: bytes
    signature: bytes

    def verified(self, public_key: bytes) -> PaymentRequest:
        """The request, if the merchant's key signed it; QR_SIGNATURE_INVALID
        otherwise. Expiry is checked separately (``ensure_unexpired``)."""
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(self.signature, self.signed)
        except (InvalidSignature, ValueError):
            raise InvalidArgument(
                "the QR code's signature is not the merchant's", reason="QR_SIGNATURE_INVALID"
            ) from None
        return self.request


def _malformed() -> InvalidArgument:
    return InvalidArgument("the QR payload is not a Moneta payment request", reason="QR_MALFORMED")


def read_qr(payload: str) -> SignedQr:
    """Parses a QR payload's structure (QR_MALFORMED when it is not one);
    nothing in it is trusted until ``SignedQr.verified``."""
    if len(payload) > MAX_QR_PAYLOAD or payload.count(".") != 1:
        raise _malformed()
    segment, signature_text = payload.split(".")
    try:
        fields = json.loads(_b64decode(segment))
        signature = _b64decode(signature_text)
    except (binascii.Error, ValueError):
        raise _malformed() from None
    if not isinstance(fields, dict) or set(fields) != _QR_FIELDS or fields["v"] != 1:
        raise _malformed()
    version = fields["v"]
    amount, expires_at = fields["amount"], fields["expires_at"]
    currency, reference = fields["currency"], fields["reference"]
    if not (
        type(version) is int
        and type(amount) is int
        and 0 < amount <= INT64_MAX
        and type(expires_at) is int
        and isinstance(currency, str)
        and isinstance(reference, str)
        and isinstance(fields["merchant_id"], str)
    ):
        raise _malformed()
    try:
        merchant_id = uuid.UUID(fields["merchant_id"])
        validate_currency(currency)
        validate_reference(reference)
    except (ValueError, InvalidArgument):
        raise _malformed() from None
    request = PaymentRequest(merchant_id, amount, currency, reference, expires_at)
    return SignedQr(request, _QR_CONTEXT + segment.encode(), signature)


def ensure_unexpired(request: PaymentRequest, now: datetime) -> None:
    if now.timestamp() >= request.expires_at:
        raise FailedPrecondition(
            "the QR code has expired; ask the merchant for a new one",
            reason="QR_EXPIRED",
            details={"expired_at": request.expires_at_datetime.isoformat()},
        )


# ---------------------------------------------------------------- signing keys at rest


def _aead(key_b64: str) -> AESGCM:
    key = base64.b64decode(key_b64)
    if len(key) != 32:
        raise Internal("the key-encryption key is not 32 bytes", reason="KEY_MISCONFIGURED")
    return AESGCM(key)


def seal_signing_key(key_b64: str, merchant_id: uuid.UUID, key: Ed25519PrivateKey) -> bytes:
    """The private key, AES-256-GCM encrypted and bound to its merchant."""
    raw = key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    nonce = os.urandom(12)
    return nonce + _aead(key_b64).encrypt(nonce, raw, merchant_id.bytes)


def open_signing_key(key_b64: str, merchant_id: uuid.UUID, sealed: bytes) -> Ed25519PrivateKey:
    try:
        raw = _aead(key_b64).decrypt(sealed[:12], sealed[12:], merchant_id.bytes)
    except InvalidTag:
        raise Internal(
            "the merchant's signing key cannot be opened", reason="KEY_UNREADABLE"
        ) from None
    return Ed25519PrivateKey.from_private_bytes(raw)


def public_key_of(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ---------------------------------------------------------------- SQL

_MERCHANT_COLUMNS = "merchant_id, name, currency, public_key, private_key_encrypted, created_at"


async def fetch_merchant(conn: DbConn, merchant_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {_MERCHANT_COLUMNS} FROM merchants WHERE merchant_id = $1", merchant_id
    )


async def _merchant(conn: DbConn, merchant_id: uuid.UUID) -> asyncpg.Record:
    row = await fetch_merchant(conn, merchant_id)
    if row is None:
        raise NotFound("no such merchant", reason="MERCHANT_NOT_FOUND")
    return row


async def _qr_holder(conn: DbConn, merchant_id: uuid.UUID, reference: str) -> asyncpg.Record | None:
    """The payment holding a QR reference, with its status."""
    return await conn.fetchrow(
        """
        SELECT q.payment_id, p.status FROM qr_references q JOIN payments p USING (payment_id)
         WHERE q.merchant_id = $1 AND q.reference = $2
        """,
        merchant_id,
        reference,
    )


async def _claim_qr_reference(
    conn: DbConn, merchant_id: uuid.UUID, reference: str, pid: uuid.UUID
) -> None:
    """Gives the QR reference to this payment, unless another payment holds
    it that has not failed (then the QR is paid, or being paid)."""
    for _ in range(2):
        claimed = await conn.fetchval(
            """
            INSERT INTO qr_references (merchant_id, reference, payment_id) VALUES ($1, $2, $3)
            ON CONFLICT (merchant_id, reference) DO UPDATE
               SET payment_id = EXCLUDED.payment_id, claimed_at = now()
             WHERE (SELECT p.status FROM payments p
                     WHERE p.payment_id = qr_references.payment_id) = 'FAILED'
            RETURNING payment_id
            """,
            merchant_id,
            reference,
            pid,
        )
        if claimed == pid:
            return
        _refuse_paid_qr(await _qr_holder(conn, merchant_id, reference))
        # The holder failed after the statement began: claim again.
    raise Aborted("this QR code is being paid; retry shortly", reason="QR_PAYMENT_IN_PROGRESS")


def _refuse_paid_qr(holder: asyncpg.Record | None) -> None:
    if holder is None or holder["status"] == "FAILED":
        return
    if holder["status"] == "COMPLETED":
        raise AlreadyExists("this QR code has been paid already", reason="QR_ALREADY_PAID")
    raise Aborted(
        "this QR code is being paid by another payment; retry shortly",
        reason="QR_PAYMENT_IN_PROGRESS",
    )


async def _ensure_merchant_account(
    pool: asyncpg.Pool, peers: Peers, merchant: asyncpg.Record, currency: str
) -> uuid.UUID:
    """The merchant's settlement account in ``currency``, opened on first use."""
    merchant_id = merchant["merchant_id"]
    async with pool.acquire() as conn:
        existing = await conn.fetchval(
            "SELECT ledger_account_id FROM merchant_accounts WHERE merchant_id = $1 AND currency = $2",
            merchant_id,
            currency,
        )
    if existing is not None:
        return existing  # type: ignore[no-any-return]
    account_id = merchant_account_id(merchant_id, currency)
    await peers.create_accounts([_merchant_account(merchant_id, account_id, currency)])
    async with pool.acquire() as conn:
        await _insert_merchant_account(conn, merchant_id, currency, account_id)
    return account_id


def _merchant_account(
    merchant_id: uuid.UUID, account_id: uuid.UUID, currency: str
) -> ledger_pb2.Account:
    return ledger_pb2.Account(
        id=str(account_id),
        currency=currency,
        type=ledger_pb2.ACCOUNT_TYPE_MERCHANT,
        normal_side=ledger_pb2.NORMAL_SIDE_CREDIT,
        # Money owed to the merchant: it never goes below zero.
        no_overdraft=True,
        metadata={"merchant_id": str(merchant_id)},
    )


async def _insert_merchant_account(
    conn: DbConn, merchant_id: uuid.UUID, currency: str, account_id: uuid.UUID
) -> None:
    await conn.execute(
        """
        INSERT INTO merchant_accounts (merchant_id, currency, ledger_account_id)
        VALUES ($1, $2, $3) ON CONFLICT (merchant_id, currency) DO NOTHING
        """,
        merchant_id,
        currency,
        account_id,
    )


# ---------------------------------------------------------------- registry


async def create_merchant(
    pool: asyncpg.Pool, peers: Peers, key_b64: str, name: str, currency: str
) -> asyncpg.Record:
    """Registers a merchant with a settlement account in its currency and a
    fresh signing key (sealed at rest)."""
    name = name.strip()
    if not 1 <= len(name) <= 200:
        raise InvalidArgument("name must be 1 to 200 characters", reason="INVALID_NAME")
    currency = validate_currency(currency)
    merchant_id = uuid.uuid4()
    signing_key = Ed25519PrivateKey.generate()
    sealed = seal_signing_key(key_b64, merchant_id, signing_key)
    account_id = merchant_account_id(merchant_id, currency)
    # The ledger account first: if what follows fails, an empty account is
    # all that is left, and no merchant without its account can exist.
    await peers.create_accounts([_merchant_account(merchant_id, account_id, currency)])
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """
            INSERT INTO merchants (merchant_id, name, currency, public_key, private_key_encrypted)
            VALUES ($1, $2, $3, $4, $5)
            """,
            merchant_id,
            name,
            currency,
            public_key_of(signing_key),
            sealed,
        )
        await _insert_merchant_account(conn, merchant_id, currency, account_id)
        row = await fetch_merchant(conn, merchant_id)
    assert row is not None
    log.info("merchant_created", merchant_id=str(merchant_id), currency=currency)
    return row


async def create_payment_qr(
    pool: asyncpg.Pool,
    key_b64: str,
    ttl_seconds: int,
    merchant_id: str,
    amount: int,
    currency: str,
    reference: str,
    now: datetime | None = None,
) -> tuple[str, datetime]:
    """A signed payment request for the merchant's QR code, and its expiry."""
    mid = parse_uuid(merchant_id, "merchant_id")
    require_positive(amount)
    reference = validate_reference(reference)
    async with pool.acquire() as conn:
        merchant = await _merchant(conn, mid)
        _refuse_paid_qr(await _qr_holder(conn, mid, reference))
    currency = validate_currency(currency or merchant["currency"])
    now = now or datetime.now(UTC)
    request = PaymentRequest(mid, amount, currency, reference, int(now.timestamp()) + ttl_seconds)
    key = open_signing_key(key_b64, mid, merchant["private_key_encrypted"])
    return sign_payment_request(request, key), request.expires_at_datetime


# ---------------------------------------------------------------- paying


@dataclass(frozen=True)
class PayMerchantCommand:
    payer_id: str
    idempotency_key: str
    # Either a QR payload ...
    qr_payload: str = ""
    # ... or a merchant with an amount (in-app checkout; `currency` empty:
    # the merchant's).
    merchant_id: str = ""
    amount: int = 0
    currency: str = ""
    category: str = DEFAULT_CATEGORY
    device_id: str = ""
    # The payer's PIN, for a payment fraud sends to review (step-up).
    pin: str = field(default="", repr=False)


@dataclass(frozen=True)
class PaymentOutcome:
    payment_id: uuid.UUID
    status: str
    payer_balance: int
    currency: str


@dataclass(frozen=True)
class _What:
    """What a payment pays, once its request is understood and trusted."""

    merchant: asyncpg.Record
    amount: int
    currency: str
    # The QR code's request; None for in-app checkout.
    qr: PaymentRequest | None


async def _understand(conn: DbConn, cmd: PayMerchantCommand) -> _What:
    if cmd.qr_payload:
        if cmd.merchant_id or cmd.amount or cmd.currency:
            raise InvalidArgument(
                "give either a qr_payload or a merchant_id with an amount, not both",
                reason="AMBIGUOUS_PAYMENT",
            )
        signed = read_qr(cmd.qr_payload)
        merchant = await _merchant(conn, signed.request.merchant_id)
        request = signed.verified(merchant["public_key"])
        return _What(merchant, request.amount, request.currency, request)
    if not cmd.merchant_id:
        raise InvalidArgument(
            "a qr_payload or a merchant_id with an amount is required",
            reason="MISSING_MERCHANT",
        )
    merchant = await _merchant(conn, parse_uuid(cmd.merchant_id, "merchant_id"))
    require_positive(cmd.amount)
    currency = validate_currency(cmd.currency or merchant["currency"])
    return _What(merchant, cmd.amount, currency, None)


async def pay_merchant(pool: asyncpg.Pool, peers: Peers, cmd: PayMerchantCommand) -> PaymentOutcome:
    payer_id = parse_uuid(cmd.payer_id, "payer_id")
    key = validate_idempotency_key(cmd.idempotency_key)
    category = cmd.category or DEFAULT_CATEGORY
    if not _CATEGORY_RE.fullmatch(category):
        raise InvalidArgument("category must be an UPPER_SNAKE name", reason="INVALID_CATEGORY")
    if len(cmd.device_id) > 200:
        raise InvalidArgument("device_id is at most 200 characters", reason="INVALID_DEVICE_ID")
    if cmd.pin:
        validate_pin(cmd.pin)

    async with pool.acquire() as conn:
        wallet, payer_accounts = await store.fetch_wallet_and_accounts(conn, payer_id)
        if wallet is None:
            raise NotFound("the payer has no wallet", reason="WALLET_NOT_FOUND")
        what = await _understand(conn, cmd)
        merchant_id = what.merchant["merchant_id"]
        reference = what.qr.reference if what.qr else None
        pid = payment_id(payer_id, key)
        fingerprint = request_hash(
            kind="MERCHANT",
            merchant=merchant_id,
            amount=what.amount,
            currency=what.currency,
            reference=reference,
            category=category,
        )
        if what.qr is not None and await store.fetch_payment(conn, pid) is None:
            # A new payment needs a live code; a retry of one accepted in
            # time is answered whatever the clock says now.
            ensure_unexpired(what.qr, datetime.now(UTC))
        async with conn.transaction():
            payment, claimed = await store.claim_payment(
                conn,
                payment_id=pid,
                kind="MERCHANT",
                sender_user_id=payer_id,
                idempotency_key=key,
                request_hash=fingerprint,
                recipient_user_id=None,
                amount=what.amount,
                currency=what.currency,
                note=reference or "",
                lease_seconds=handlers.LEASE_SECONDS,
            )
            if claimed is not None:
                await conn.execute(
                    """
                    INSERT INTO merchant_payments (payment_id, merchant_id, reference, category)
                    VALUES ($1, $2, $3, $4)
                    """,
                    pid,
                    merchant_id,
                    reference,
                    category,
                )
                if reference is not None:
                    # Refused: the transaction rolls back, nothing is recorded.
                    await _claim_qr_reference(conn, merchant_id, reference, pid)

    fresh = claimed is not None
    replayed, lease = await handlers.admit_attempt(
        pool, payment, pid, fingerprint, _replay, claimed
    )
    if replayed is not None:
        return replayed
    assert lease is not None
    step = _MerchantPayment(
        pool, peers, pid, wallet, payer_accounts.get(what.currency), what, category,
        cmd.device_id, payment["reservation_id"], cmd.pin,
    )  # fmt: skip
    try:
        with leases.holding(lease):
            return await step.drive(resumed=not fresh)
    except AttemptExpired:
        raise  # the lease may be another attempt's by now: nothing to record or release
    except BaseException as exc:
        async with pool.acquire() as conn:
            refused_early = handlers.is_refusal(exc) and not step.moved
            if refused_early:
                # Refused before any money moved: final for this key (a
                # retry replays it), and a QR code becomes payable again.
                refused = cast(MonetaError, exc)
                if not await store.fail_payment(
                    conn, pid, refused.reason, refused.message, lease=lease
                ):
                    # This attempt outlived its lease: another one holds the
                    # payment (or finished it), and its outcome is the payment's.
                    raise AttemptExpired() from exc
            else:
                # Outcome unknown: the next attempt, or the reconciler, asks
                # the ledger whether the money moved.
                await store.release_lease(conn, pid, lease)
        if refused_early and (not fresh or step.reservation_id is not None):
            # What this or an earlier attempt reserved is freed now, not at
            # its ttl: only once the refusal is recorded under this attempt's
            # lease, as a retry that took over may have reserved (and moved
            # money) under the same name.
            await handlers.release_quietly(peers, handlers.reservation_of(step.reservation_id, pid))
        raise


def _replay(payment: asyncpg.Record | None) -> PaymentOutcome | None:
    """The recorded outcome of a finished payment, or None if it is not."""
    if payment is None or payment["status"] not in ("COMPLETED", "FAILED"):
        return None
    if payment["status"] == "FAILED":
        raise handlers.refusal(payment["failure_reason"], payment["failure_message"])
    return PaymentOutcome(
        payment["payment_id"], "COMPLETED", payment["sender_balance"], payment["currency"]
    )


class _MerchantPayment:
    """One attempt at a merchant payment, resumable at any step. Before the
    money moves a refusal is final; after, the payment completes."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        peers: Peers,
        pid: uuid.UUID,
        wallet: asyncpg.Record,
        payer_account: uuid.UUID | None,
        what: _What,
        category: str,
        device_id: str,
        reservation_id: uuid.UUID | None,
        pin: str = "",
    ) -> None:
        self.pool, self.peers, self.pid = pool, peers, pid
        self.wallet, self.payer_account = wallet, payer_account
        self.merchant, self.amount, self.currency = what.merchant, what.amount, what.currency
        self.reference = what.qr.reference if what.qr else None
        self.category, self.device_id, self.pin = category, device_id, pin
        self.reservation_id = str(reservation_id) if reservation_id else None
        self.moved = False

    async def drive(self, *, resumed: bool) -> PaymentOutcome:
        self.moved = resumed and await self.peers.lookup_transfer(self.pid) is not None
        if not self.moved:
            await self._move_money()
            self.moved = True
        return await self._complete()

    async def _move_money(self) -> None:
        ensure_can_send(WalletStatus(self.wallet["status"]))
        if self.payer_account is None:
            raise FailedPrecondition(
                f"the wallet holds no {self.currency}",
                reason="INSUFFICIENT_FUNDS",
                details={"currency": self.currency, "available": 0},
            )
        await self._score()
        self.reservation_id = await handlers.reserve_for_payment(
            self.pool, self.peers, self.pid, self.wallet["user_id"], self.amount, self.currency,
            self.category,
        )  # fmt: skip
        merchant_account = await _ensure_merchant_account(
            self.pool, self.peers, self.merchant, self.currency
        )
        metadata = {"kind": "MERCHANT_PAYMENT", "merchant_id": str(self.merchant["merchant_id"])}
        if self.reference is not None:
            metadata["reference"] = self.reference
        result = await self.peers.create_transfer(
            ledger_pb2.Transfer(
                id=str(self.pid),
                debit_account_id=str(self.payer_account),
                credit_account_id=str(merchant_account),
                amount=self.amount,
                currency=self.currency,
                code="MERCHANT_PAYMENT",
                metadata=metadata,
            )
        )
        if result.code in _OK_CODES:
            return
        # Refused: the caller frees the reservation once the refusal is recorded.
        if result.code == ledger_pb2.TransferResult.INSUFFICIENT_FUNDS:
            raise FailedPrecondition(
                "insufficient funds",
                reason="INSUFFICIENT_FUNDS",
                details={"currency": self.currency},
            )
        raise FailedPrecondition(
            "the ledger refused the payment: " + ledger_pb2.TransferResult.Code.Name(result.code),
            reason="LEDGER_REFUSED",
        )

    async def _score(self) -> None:
        await handlers.screen(
            self.pool,
            self.peers,
            fraud_pb2.ScoreRequest(
                transaction_id=str(self.pid),
                user_id=str(self.wallet["user_id"]),
                type="MERCHANT_PAYMENT",
                amount=Money(amount=self.amount, currency=self.currency),
                recipient_kind=fraud_pb2.RECIPIENT_KIND_MERCHANT,
                recipient_id=str(self.merchant["merchant_id"]),
                device_id=self.device_id,
            ),
            self.pin,
        )

    async def _complete(self) -> PaymentOutcome:
        """The money has moved: count the spend and record the outcome."""
        await commit_spend(
            self.peers, self.pid, self.reservation_id, self.wallet, self.amount, self.currency,
            self.category,
        )  # fmt: skip
        assert self.payer_account is not None  # money moved from it
        balance = await complete_merchant_payment(
            self.pool, self.peers, self.pid, self.wallet, self.payer_account, self.merchant,
            self.amount, self.currency, self.reference,
        )  # fmt: skip
        log.info("merchant_payment_completed", payment_id=str(self.pid), amount=self.amount,
                 currency=self.currency, merchant_id=str(self.merchant["merchant_id"]))  # fmt: skip
        return PaymentOutcome(self.pid, "COMPLETED", balance, self.currency)


async def complete_merchant_payment(
    pool: asyncpg.Pool,
    peers: Peers,
    pid: uuid.UUID,
    wallet: asyncpg.Record,
    payer_account: uuid.UUID,
    merchant: asyncpg.Record,
    amount: int,
    currency: str,
    reference: str | None,
) -> int:
    """Records a merchant payment whose money moved: the payer's history and
    the payment's outcome, in one transaction. Returns the payer's available
    balance afterwards."""
    balance = (await peers.balances([payer_account]))[str(payer_account)]
    description = f"Payment to {merchant['name']}" + (f" ({reference})" if reference else "")
    async with pool.acquire() as conn, conn.transaction():
        await history.record(
            conn,
            history.Movement(
                wallet_id=wallet["wallet_id"], ledger_transfer_id=pid, type="MERCHANT_PAYMENT",
                amount=-amount, currency=currency, status="COMPLETED",
                counterparty=merchant["name"], description=description,
                reference_id=reference or "", balance_after=balance.posted,
            ),
        )  # fmt: skip
        await store.complete_payment(conn, pid, balance.available)
    return int(balance.available)


# ---------------------------------------------------------------- reconciling


async def reconcile_stale_merchant_payments(
    pool: asyncpg.Pool, peers: Peers, older_than: float = 60.0
) -> int:
    """Settles merchant payments no attempt finished (a crash, a client that
    gave up): completes those whose money moved, fails the others and frees
    their budget reservation (and with it the QR code)."""
    async with pool.acquire() as conn:
        stale = await conn.fetch(
            """
            SELECT p.payment_id FROM payments p
             WHERE p.status = 'PROCESSING' AND p.kind = 'MERCHANT'
               AND p.updated_at < now() - make_interval(secs => $1)
               AND (p.lease_until IS NULL OR p.lease_until < now())
             ORDER BY p.updated_at LIMIT 100
            """,
            older_than,
        )
    settled = 0
    for row in stale:
        pid = row["payment_id"]
        async with pool.acquire() as conn:
            lease = await store.take_lease(conn, pid, LEASE_SECONDS)
            if lease is None:
                continue
            payment = await conn.fetchrow(
                """
                SELECT p.payment_id, p.sender_user_id, p.amount, p.currency, p.reservation_id,
                       m.merchant_id, m.reference, m.category
                  FROM payments p JOIN merchant_payments m USING (payment_id)
                 WHERE p.payment_id = $1
                """,
                pid,
            )
            assert payment is not None
            wallet = await store.fetch_wallet(conn, user_id=payment["sender_user_id"])
            merchant = await fetch_merchant(conn, payment["merchant_id"])
            assert wallet is not None and merchant is not None
            payer_account = (await store.wallet_accounts(conn, wallet["wallet_id"])).get(
                payment["currency"]
            )
        reservation_id = handlers.payment_reservation(payment)
        try:
            if payer_account is not None and await peers.lookup_transfer(pid) is not None:
                await commit_spend(
                    peers, pid, reservation_id, wallet, payment["amount"], payment["currency"],
                    payment["category"],
                )  # fmt: skip
                await complete_merchant_payment(
                    pool, peers, pid, wallet, payer_account, merchant, payment["amount"],
                    payment["currency"], payment["reference"],
                )  # fmt: skip
                outcome = "COMPLETED"
            elif await handlers.abandon_payment(pool, peers, payment, lease):
                outcome = "FAILED"
            else:
                continue  # a retry took over while this stalled: its outcome stands
            log.warning("merchant_payment_reconciled", payment_id=str(pid), outcome=outcome)
            settled += 1
        except MonetaError as exc:
            log.warning("merchant_payment_reconcile_failed", payment_id=str(pid), reason=exc.reason)
            async with pool.acquire() as conn:
                await store.release_lease(conn, pid, lease)
    return settled


async def reconcile_forever(pool: asyncpg.Pool, peers: Peers, every_seconds: float = 10.0) -> None:
    while True:
        try:
            await reconcile_stale_merchant_payments(pool, peers)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("merchant_reconcile_failed", error=str(exc))
        await asyncio.sleep(every_seconds)
