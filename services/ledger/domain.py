"""The ledger's rules: pure, no I/O.

A batch is one or more requests, applied in arrival order against in-memory
account states (TigerBeetle's shape). Each transfer gets a result code; a
linked chain succeeds or fails as a whole and never spans two requests, its
failed members' effects undone. What the batch changed (new and updated
transfers, entries, final balances) is collected for the store to write in
one database transaction.

Kinds of transfer:
- POSTED moves money at once and writes a debit and a credit entry.
- PENDING holds money: pending debits and credits grow, no entries yet; with a
  timeout it expires and releases by itself.
- POST_PENDING posts a hold, in full (amount 0) or in part (the rest is
  released); VOID_PENDING releases it.
- REVERSAL moves posted money back; in total a transfer is reversed at most by
  its own amount.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from asyncpg.pgproto.pgproto import UUID as FastUUID  # a C uuid.UUID: parses and hashes fast

from services.common.money import CURRENCY_EXPONENTS

MAX_BATCH = 8_000
INT64_MAX = 2**63 - 1


class AccountType(enum.IntEnum):
    USER_WALLET = 1
    BANK_CLEARING = 2
    MERCHANT = 3
    FX_POOL = 4
    BOOKING_CLEARING = 5
    COMPANY_FUNDING = 6
    RECEIVABLE = 7
    FEES = 8
    EXTERNAL = 9


class Side(enum.IntEnum):
    DEBIT = 1
    CREDIT = 2


# Liabilities of the platform (money it owes people and merchants) and its
# income are credit-normal; what it holds or is owed is debit-normal.
CREDIT_NORMAL_TYPES = frozenset(
    {AccountType.USER_WALLET, AccountType.MERCHANT, AccountType.FEES, AccountType.FX_POOL}
)


def default_normal_side(account_type: AccountType) -> Side:
    return Side.CREDIT if account_type in CREDIT_NORMAL_TYPES else Side.DEBIT


class TransferType(enum.IntEnum):
    POSTED = 1
    PENDING = 2
    POST_PENDING = 3
    VOID_PENDING = 4
    REVERSAL = 5


class TransferStatus(enum.IntEnum):
    POSTED = 1
    PENDING = 2
    PENDING_POSTED = 3
    VOIDED = 4
    EXPIRED = 5


class AccountCode(enum.Enum):
    OK = "OK"
    EXISTS = "EXISTS"
    EXISTS_WITH_DIFFERENT_FIELDS = "EXISTS_WITH_DIFFERENT_FIELDS"
    INVALID_ID = "INVALID_ID"
    INVALID_CURRENCY = "INVALID_CURRENCY"
    INVALID_TYPE = "INVALID_TYPE"
    INVALID_OVERDRAFT_LIMIT = "INVALID_OVERDRAFT_LIMIT"


class TransferCode(enum.Enum):
    OK = "OK"
    EXISTS = "EXISTS"
    EXISTS_WITH_DIFFERENT_FIELDS = "EXISTS_WITH_DIFFERENT_FIELDS"
    INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
    ACCOUNT_NOT_FOUND = "ACCOUNT_NOT_FOUND"
    ACCOUNT_CLOSED = "ACCOUNT_CLOSED"
    CURRENCY_MISMATCH = "CURRENCY_MISMATCH"
    SAME_ACCOUNT = "SAME_ACCOUNT"
    INVALID_AMOUNT = "INVALID_AMOUNT"
    LINKED_EVENT_FAILED = "LINKED_EVENT_FAILED"
    INVALID_ID = "INVALID_ID"
    INVALID_CURRENCY = "INVALID_CURRENCY"
    INVALID_TYPE = "INVALID_TYPE"
    LINKED_EVENT_CHAIN_OPEN = "LINKED_EVENT_CHAIN_OPEN"
    INVALID_TIMEOUT = "INVALID_TIMEOUT"
    PENDING_NOT_FOUND = "PENDING_NOT_FOUND"
    PENDING_ALREADY_RESOLVED = "PENDING_ALREADY_RESOLVED"
    PENDING_EXPIRED = "PENDING_EXPIRED"
    EXCEEDS_PENDING_AMOUNT = "EXCEEDS_PENDING_AMOUNT"
    ALREADY_REVERSED = "ALREADY_REVERSED"
    TRANSFER_NOT_FOUND = "TRANSFER_NOT_FOUND"
    REFERENCE_MISMATCH = "REFERENCE_MISMATCH"

    @property
    def ok(self) -> bool:
        return self in (TransferCode.OK, TransferCode.EXISTS)


# ---------------------------------------------------------------- accounts


@dataclass(frozen=True)
class AccountSpec:
    """An account as a client asks for it; fields not yet validated."""

    id: str
    currency: str
    type: int
    normal_side: int = 0
    no_overdraft: bool = False
    overdraft_limit: int = 0
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NewAccount:
    id: uuid.UUID
    currency: str
    type: AccountType
    normal_side: Side
    no_overdraft: bool
    overdraft_limit: int
    metadata: Mapping[str, str]

    def same_fields(self, other: NewAccount) -> bool:
        return self == other


def validate_account(spec: AccountSpec) -> NewAccount | AccountCode:
    try:
        account_id = uuid.UUID(spec.id)
    except ValueError:
        return AccountCode.INVALID_ID
    if account_id.int == 0:
        return AccountCode.INVALID_ID
    if spec.currency not in CURRENCY_EXPONENTS:
        return AccountCode.INVALID_CURRENCY
    try:
        account_type = AccountType(spec.type)
    except ValueError:
        return AccountCode.INVALID_TYPE
    if spec.normal_side not in (0, Side.DEBIT, Side.CREDIT):
        return AccountCode.INVALID_TYPE
    if not 0 <= spec.overdraft_limit <= INT64_MAX or (
        spec.overdraft_limit and not spec.no_overdraft
    ):
        return AccountCode.INVALID_OVERDRAFT_LIMIT
    side = Side(spec.normal_side) if spec.normal_side else default_normal_side(account_type)
    return NewAccount(
        id=account_id,
        currency=spec.currency,
        type=account_type,
        normal_side=side,
        no_overdraft=spec.no_overdraft,
        overdraft_limit=spec.overdraft_limit,
        metadata=dict(spec.metadata),
    )


@dataclass
class AccountState:
    """An account's balances as the engine sees them while applying a batch."""

    id: uuid.UUID
    currency: str
    normal_side: Side
    no_overdraft: bool
    overdraft_limit: int
    closed: bool
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0

    @property
    def posted(self) -> int:
        """Posted balance on the account's normal side."""
        net = self.credits_posted - self.debits_posted
        return net if self.normal_side == Side.CREDIT else -net

    def can_debit(self, amount: int) -> bool:
        if not self.no_overdraft:
            return True
        return (
            self.debits_posted + self.debits_pending + amount
            <= self.credits_posted + self.overdraft_limit
        )

    def clone(self) -> AccountState:
        return AccountState(
            self.id, self.currency, self.normal_side, self.no_overdraft, self.overdraft_limit,
            self.closed, self.debits_posted, self.credits_posted, self.debits_pending,
            self.credits_pending,
        )  # fmt: skip

    def refuses_closing(self) -> str | None:
        """Why the account cannot be closed now, or None."""
        if self.debits_pending or self.credits_pending:
            return "ACCOUNT_HAS_PENDING"
        if self.debits_posted != self.credits_posted:
            return "ACCOUNT_NOT_EMPTY"
        return None

    def balances(self) -> tuple[int, int, int, int]:
        return (self.debits_posted, self.credits_posted, self.debits_pending, self.credits_pending)


# ---------------------------------------------------------------- transfers


@dataclass(frozen=True)
class TransferSpec:
    """A transfer as a client asks for it; fields not yet validated."""

    id: str
    debit_account_id: str
    credit_account_id: str
    amount: int
    currency: str
    type: int = TransferType.POSTED
    pending_id: str = ""
    reverses_id: str = ""
    linked: bool = False
    timeout_seconds: int = 0
    code: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    effective_at: datetime | None = None


@dataclass(frozen=True)
class Transfer:
    """A transfer as stored."""

    id: uuid.UUID
    debit_account_id: uuid.UUID
    credit_account_id: uuid.UUID
    amount: int
    currency: str
    type: TransferType
    pending_id: uuid.UUID | None
    reverses_id: uuid.UUID | None
    linked: bool
    timeout_seconds: int
    code: str
    metadata: Mapping[str, Any]
    effective_at: datetime | None
    created_at: datetime
    expires_at: datetime | None
    status: TransferStatus
    amount_reversed: int = 0
    # When a hold was posted, voided or expired.
    resolved_at: datetime | None = None

    def same_request(self, other: Transfer) -> bool:
        """Whether a retry asks for exactly this transfer (ignoring what the
        ledger itself filled in)."""
        return _request_key(self) == _request_key(other)


def _request_key(t: Transfer) -> tuple[Any, ...]:
    return (
        t.debit_account_id,
        t.credit_account_id,
        t.amount,
        t.currency,
        t.type,
        t.pending_id,
        t.reverses_id,
        t.linked,
        t.timeout_seconds,
        t.code,
        dict(t.metadata),
        t.effective_at,
    )


@dataclass(frozen=True)
class Request:
    """A validated transfer request. For transfers that refer to another one
    (POST_PENDING, VOID_PENDING, REVERSAL), accounts, currency and amount may
    be left out (None / 0): they come from the referenced transfer."""

    id: uuid.UUID
    type: TransferType
    debit_account_id: uuid.UUID | None
    credit_account_id: uuid.UUID | None
    amount: int
    currency: str | None
    pending_id: uuid.UUID | None
    reverses_id: uuid.UUID | None
    linked: bool
    timeout_seconds: int
    code: str
    metadata: Mapping[str, str]
    effective_at: datetime | None

    def matches(self, stored: Transfer) -> bool:
        """Whether this request is a retry of ``stored``. Fields the request
        left out match what the ledger filled in."""

        def same(asked: object, kept: object) -> bool:
            return asked is None or asked == kept

        return (
            self.type == stored.type
            and same(self.debit_account_id, stored.debit_account_id)
            and same(self.credit_account_id, stored.credit_account_id)
            and same(self.currency, stored.currency)
            # 0 on a VOID_PENDING or REVERSAL asks for "all of it": whatever
            # that was when the transfer was made.
            and (
                self.amount == stored.amount
                or (self.amount == 0 and self.type in _WHOLE_BY_DEFAULT)
            )
            and self.pending_id == stored.pending_id
            and self.reverses_id == stored.reverses_id
            and self.linked == stored.linked
            and self.timeout_seconds == stored.timeout_seconds
            and self.code == stored.code
            and dict(self.metadata) == dict(stored.metadata)
            and self.effective_at == stored.effective_at
        )


# A dictionary look-up costs a tenth of calling the enum.
_TRANSFER_TYPES = {int(t): t for t in TransferType}
_REFERRING = frozenset(
    {TransferType.POST_PENDING, TransferType.VOID_PENDING, TransferType.REVERSAL}
)
_WHOLE_BY_DEFAULT = frozenset({TransferType.VOID_PENDING, TransferType.REVERSAL})
MAX_TIMEOUT_SECONDS = 366 * 24 * 3600


@dataclass(frozen=True)
class Entry:
    transfer_id: uuid.UUID
    account_id: uuid.UUID
    side: Side
    amount: int
    currency: str
    balance_after: int
    code: str


@dataclass(frozen=True)
class TransferOutcome:
    id: str
    code: TransferCode
    transfer: Transfer | None = None


def _uuid_or_none(raw: str) -> uuid.UUID | None:
    try:
        return FastUUID(raw)
    except (ValueError, TypeError):
        return None


def _valid_id(raw: str) -> uuid.UUID | None:
    parsed = _uuid_or_none(raw)
    return parsed if parsed is not None and parsed.int != 0 else None


def parse_request(spec: TransferSpec) -> Request | TransferCode:
    """Validates what can be validated without state."""
    transfer_id = _valid_id(spec.id)
    if transfer_id is None:
        return TransferCode.INVALID_ID
    transfer_type = _TRANSFER_TYPES.get(spec.type or TransferType.POSTED)
    if transfer_type is None:
        return TransferCode.INVALID_TYPE
    referring = transfer_type in _REFERRING

    accounts: list[uuid.UUID | None] = []
    for raw in (spec.debit_account_id, spec.credit_account_id):
        if not raw and referring:
            accounts.append(None)
            continue
        parsed = _valid_id(raw)
        if parsed is None:
            return TransferCode.INVALID_ID
        accounts.append(parsed)
    debit, credit = accounts

    pending_id = reverses_id = None
    if transfer_type in (TransferType.POST_PENDING, TransferType.VOID_PENDING):
        pending_id = _valid_id(spec.pending_id)
        if pending_id is None:
            return TransferCode.INVALID_ID
    elif spec.pending_id:
        return TransferCode.INVALID_ID
    if transfer_type == TransferType.REVERSAL:
        reverses_id = _valid_id(spec.reverses_id)
        if reverses_id is None:
            return TransferCode.INVALID_ID
    elif spec.reverses_id:
        return TransferCode.INVALID_ID

    if not (0 < spec.amount <= INT64_MAX or (referring and spec.amount == 0)):
        return TransferCode.INVALID_AMOUNT
    if spec.currency and spec.currency not in CURRENCY_EXPONENTS:
        return TransferCode.INVALID_CURRENCY
    if not spec.currency and not referring:
        return TransferCode.INVALID_CURRENCY
    if debit is not None and debit == credit:
        return TransferCode.SAME_ACCOUNT
    if spec.timeout_seconds and transfer_type != TransferType.PENDING:
        return TransferCode.INVALID_TIMEOUT
    if not 0 <= spec.timeout_seconds <= MAX_TIMEOUT_SECONDS:
        return TransferCode.INVALID_TIMEOUT
    return Request(
        id=transfer_id,
        type=transfer_type,
        debit_account_id=debit,
        credit_account_id=credit,
        amount=spec.amount,
        currency=spec.currency or None,
        pending_id=pending_id,
        reverses_id=reverses_id,
        linked=spec.linked,
        timeout_seconds=spec.timeout_seconds,
        code=spec.code,
        metadata=dict(spec.metadata),
        effective_at=spec.effective_at,
    )


def parse_transfer(spec: TransferSpec, now: datetime) -> Transfer | TransferCode:
    """A complete spec (accounts, amount and currency given) as the transfer
    it would store, without applying it."""
    request = parse_request(spec)
    if isinstance(request, TransferCode):
        return request
    if request.debit_account_id is None or request.credit_account_id is None:
        return TransferCode.INVALID_ID
    if request.currency is None or request.amount == 0:
        return TransferCode.INVALID_AMOUNT
    return _new_transfer(
        request,
        request.debit_account_id,
        request.credit_account_id,
        request.amount,
        request.currency,
        now,
        TransferStatus.PENDING if request.type == TransferType.PENDING else TransferStatus.POSTED,
    )


def _new_transfer(
    request: Request,
    debit: uuid.UUID,
    credit: uuid.UUID,
    amount: int,
    currency: str,
    now: datetime,
    status: TransferStatus,
) -> Transfer:
    return Transfer(
        id=request.id,
        debit_account_id=debit,
        credit_account_id=credit,
        amount=amount,
        currency=currency,
        type=request.type,
        pending_id=request.pending_id,
        reverses_id=request.reverses_id,
        linked=request.linked,
        timeout_seconds=request.timeout_seconds,
        code=request.code,
        metadata=dict(request.metadata),
        effective_at=request.effective_at,
        created_at=now,
        expires_at=now + timedelta(seconds=request.timeout_seconds)
        if request.timeout_seconds
        else None,
        status=status,
    )


def transfer_ids(specs: Sequence[TransferSpec]) -> list[uuid.UUID]:
    """The well-formed ids of a batch: what the store must look up."""
    return [tid for tid in (_uuid_or_none(s.id) for s in specs) if tid is not None]


def referenced_ids(specs: Sequence[TransferSpec]) -> list[uuid.UUID]:
    """The transfers a batch posts, voids or reverses, sorted: the lock order."""
    ids = {_uuid_or_none(raw) for s in specs for raw in (s.pending_id, s.reverses_id) if raw}
    return sorted(i for i in ids if i is not None)


def account_ids(
    specs: Sequence[TransferSpec], referenced: Iterable[Transfer] = ()
) -> list[uuid.UUID]:
    """The well-formed account ids a batch touches (its own and those of the
    transfers it refers to), sorted: the lock order."""
    ids: set[uuid.UUID] = set()
    for spec in specs:
        for raw in (spec.debit_account_id, spec.credit_account_id):
            parsed = _uuid_or_none(raw) if raw else None
            if parsed is not None:
                ids.add(parsed)
    for transfer in referenced:
        ids.update((transfer.debit_account_id, transfer.credit_account_id))
    return sorted(ids)


@dataclass
class BatchResult:
    outcomes: list[TransferOutcome]
    new_transfers: list[Transfer]
    # Stored transfers the batch changed: holds resolved or expired, amounts
    # reversed.
    updated_transfers: list[Transfer]
    entries: list[Entry]
    # Final balances of every account the batch changed.
    touched: dict[uuid.UUID, AccountState]
    # What the batch's decisions rest on, for its write to check that it is
    # still so: every account it looked at, as it found it (in id order), and
    # each updated transfer as it found it (in the order of updated_transfers).
    accounts_read: dict[uuid.UUID, AccountState] = field(default_factory=dict)
    transfers_read: list[Transfer] = field(default_factory=list)
    # What the batch leaves behind, for the next batch to start from: every
    # account it looked at and every transfer it knew of, as it left them.
    accounts_after: dict[uuid.UUID, AccountState] = field(default_factory=dict)
    transfers_after: dict[uuid.UUID, Transfer] = field(default_factory=dict)


_Balances = tuple[int, int, int, int]


class LedgerBatch:
    """Applies requests, in arrival order, against the states of one batch.

    ``accounts`` must hold every account the batch touches that exists (locked
    by the caller); ``existing``, every stored transfer whose id appears in
    the batch or that it refers to. Neither mapping is modified.
    """

    def __init__(
        self,
        accounts: Mapping[uuid.UUID, AccountState],
        existing: Mapping[uuid.UUID, Transfer],
        now: datetime,
    ) -> None:
        # Account states are copied when first changed, so that the caller's
        # mapping is never modified and untouched accounts cost nothing.
        self._originals = accounts
        self._states: dict[uuid.UUID, AccountState] = {}
        self._existing = existing
        self._now = now
        self._created: dict[uuid.UUID, Transfer] = {}
        self._updated: dict[uuid.UUID, Transfer] = {}
        self._entries: list[Entry] = []
        self._touched: set[uuid.UUID] = set()
        self.outcomes: list[TransferOutcome] = []
        # The undo log of the chain being applied: account balances and
        # transfers as they were before the chain first changed them.
        self._chain: _ChainLog | None = None

    # -- reading state

    def _state(self, aid: uuid.UUID) -> AccountState | None:
        state = self._states.get(aid)
        if state is None:
            original = self._originals.get(aid)
            if original is None:
                return None
            state = self._states[aid] = original.clone()
        return state

    def _transfer(self, tid: uuid.UUID) -> Transfer | None:
        return self._created.get(tid) or self._updated.get(tid) or self._existing.get(tid)

    # -- applying

    def apply(self, specs: Sequence[TransferSpec]) -> list[TransferOutcome]:
        """Applies one request's transfers; a chain still open at its end
        fails."""
        first = len(self.outcomes)
        chain_start: int | None = None
        chain_failed = False
        for index, spec in enumerate(specs):
            position = first + index
            if spec.linked and chain_start is None:
                chain_start, chain_failed = position, False
                self._chain = _ChainLog(len(self._entries))
            in_chain = chain_start is not None

            if chain_failed:
                code, transfer = TransferCode.LINKED_EVENT_FAILED, None
            elif spec.linked and index == len(specs) - 1:
                code, transfer = TransferCode.LINKED_EVENT_CHAIN_OPEN, None
            else:
                code, transfer = self._apply_one(spec)
            self.outcomes.append(TransferOutcome(spec.id, code, transfer))

            if in_chain and not code.ok and not chain_failed:
                chain_failed = True
                self._undo_chain(chain_start or 0, position)
            if not spec.linked:
                chain_start, chain_failed, self._chain = None, False, None
        return self.outcomes[first:]

    def expire(self, pending_ids: Iterable[uuid.UUID]) -> list[Transfer]:
        """Releases holds whose timeout has passed; returns them expired."""
        expired = []
        for tid in pending_ids:
            pending = self._transfer(tid)
            if (
                pending is not None
                and pending.status == TransferStatus.PENDING
                and pending.expires_at is not None
                and pending.expires_at <= self._now
            ):
                expired.append(self._release(pending, TransferStatus.EXPIRED))
        return expired

    def result(self) -> BatchResult:
        updated = [t for tid, t in self._updated.items() if tid not in self._created]
        return BatchResult(
            outcomes=self.outcomes,
            new_transfers=list(self._created.values()),
            updated_transfers=updated,
            entries=self._entries,
            touched={a: self._states[a] for a in sorted(self._touched) if a in self._states},
            accounts_read={a: self._originals[a] for a in sorted(self._states)},
            transfers_read=[self._existing[t.id] for t in updated],
            accounts_after=self._states,
            transfers_after={**self._existing, **self._updated, **self._created},
        )

    # -- one transfer

    def _apply_one(self, spec: TransferSpec) -> tuple[TransferCode, Transfer | None]:
        request = parse_request(spec)
        if isinstance(request, TransferCode):
            return request, None
        prior = self._transfer(request.id)
        if prior is not None:
            if request.type == TransferType.POST_PENDING and request.amount == 0:
                # "The full hold" is a definite amount: a retry of a partial
                # post asking for the full hold is a different request.
                pending = self._transfer(request.pending_id) if request.pending_id else None
                request = replace(request, amount=pending.amount if pending else -1)
            if request.matches(prior):
                return TransferCode.EXISTS, prior
            return TransferCode.EXISTS_WITH_DIFFERENT_FIELDS, None
        if request.type in (TransferType.POSTED, TransferType.PENDING):
            return self._move(request)
        if request.type == TransferType.REVERSAL:
            return self._reverse(request)
        return self._resolve(request)

    def _accounts(
        self, request: Request, debit_id: uuid.UUID, credit_id: uuid.UUID, currency: str
    ) -> tuple[AccountState, AccountState] | TransferCode:
        debit = self._state(debit_id)
        credit = self._state(credit_id)
        if debit is None or credit is None:
            return TransferCode.ACCOUNT_NOT_FOUND
        if debit.closed or credit.closed:
            return TransferCode.ACCOUNT_CLOSED
        if debit.currency != currency or credit.currency != currency:
            return TransferCode.CURRENCY_MISMATCH
        return debit, credit

    def _move(self, request: Request) -> tuple[TransferCode, Transfer | None]:
        """POSTED or PENDING: new money movement (or hold) between accounts."""
        assert request.debit_account_id and request.credit_account_id and request.currency
        found = self._accounts(
            request, request.debit_account_id, request.credit_account_id, request.currency
        )
        if isinstance(found, TransferCode):
            return found, None
        debit, credit = found
        if not debit.can_debit(request.amount):
            return TransferCode.INSUFFICIENT_FUNDS, None
        if _overflows(debit, credit, request.amount):
            return TransferCode.INVALID_AMOUNT, None
        self._save(debit, credit)
        if request.type == TransferType.PENDING:
            debit.debits_pending += request.amount
            credit.credits_pending += request.amount
            status = TransferStatus.PENDING
        else:
            self._post(debit, credit, request.amount, request.currency, request.id, request.code)
            status = TransferStatus.POSTED
        transfer = _new_transfer(
            request, debit.id, credit.id, request.amount, request.currency, self._now, status
        )
        self._create(transfer)
        return TransferCode.OK, transfer

    def _resolve(self, request: Request) -> tuple[TransferCode, Transfer | None]:
        """POST_PENDING or VOID_PENDING of the hold ``pending_id``."""
        assert request.pending_id is not None
        pending = self._transfer(request.pending_id)
        if pending is None or pending.type != TransferType.PENDING:
            return TransferCode.PENDING_NOT_FOUND, None
        if pending.status == TransferStatus.EXPIRED:
            return TransferCode.PENDING_EXPIRED, None
        if pending.status != TransferStatus.PENDING:
            return TransferCode.PENDING_ALREADY_RESOLVED, None
        mismatch = _reference_mismatch(request, pending)
        if mismatch is not None:
            return mismatch, None
        found = self._accounts(
            request, pending.debit_account_id, pending.credit_account_id, pending.currency
        )
        if isinstance(found, TransferCode):
            return found, None
        debit, credit = found
        if pending.expires_at is not None and pending.expires_at <= self._now:
            # Expired but not swept yet: it expires now, whatever the chain does.
            self._release(pending, TransferStatus.EXPIRED, undoable=False)
            return TransferCode.PENDING_EXPIRED, None

        if request.type == TransferType.POST_PENDING:
            amount = request.amount or pending.amount
            if amount > pending.amount:
                return TransferCode.EXCEEDS_PENDING_AMOUNT, None
            self._release(pending, TransferStatus.PENDING_POSTED)
            self._post(debit, credit, amount, pending.currency, request.id, request.code)
            status = TransferStatus.POSTED
        else:
            if request.amount not in (0, pending.amount):
                return TransferCode.EXCEEDS_PENDING_AMOUNT, None
            amount = pending.amount
            self._release(pending, TransferStatus.VOIDED)
            status = TransferStatus.VOIDED
        transfer = _new_transfer(
            request, debit.id, credit.id, amount, pending.currency, self._now, status
        )
        self._create(transfer)
        return TransferCode.OK, transfer

    def _reverse(self, request: Request) -> tuple[TransferCode, Transfer | None]:
        """Moves posted money of ``reverses_id`` back, at most its amount in total."""
        assert request.reverses_id is not None
        original = self._transfer(request.reverses_id)
        if (
            original is None
            or original.status != TransferStatus.POSTED
            or original.type not in (TransferType.POSTED, TransferType.POST_PENDING)
        ):
            return TransferCode.TRANSFER_NOT_FOUND, None
        # A reversal debits what the original credited, and credits what it debited.
        mirrored = replace(
            original,
            debit_account_id=original.credit_account_id,
            credit_account_id=original.debit_account_id,
        )
        mismatch = _reference_mismatch(request, mirrored)
        if mismatch is not None:
            return mismatch, None
        remaining = original.amount - original.amount_reversed
        amount = request.amount or remaining
        if amount > remaining or remaining == 0:
            return TransferCode.ALREADY_REVERSED, None
        found = self._accounts(
            request, mirrored.debit_account_id, mirrored.credit_account_id, original.currency
        )
        if isinstance(found, TransferCode):
            return found, None
        debit, credit = found
        if not debit.can_debit(amount):
            return TransferCode.INSUFFICIENT_FUNDS, None
        if _overflows(debit, credit, amount):
            return TransferCode.INVALID_AMOUNT, None
        self._save(debit, credit)
        self._save_transfer(original)
        self._store(replace(original, amount_reversed=original.amount_reversed + amount))
        self._post(debit, credit, amount, original.currency, request.id, request.code)
        transfer = _new_transfer(
            request, debit.id, credit.id, amount, original.currency, self._now,
            TransferStatus.POSTED,
        )  # fmt: skip
        self._create(transfer)
        return TransferCode.OK, transfer

    # -- effects

    def _post(
        self,
        debit: AccountState,
        credit: AccountState,
        amount: int,
        currency: str,
        transfer_id: uuid.UUID,
        code: str,
    ) -> None:
        debit.debits_posted += amount
        credit.credits_posted += amount
        self._entries.append(
            Entry(transfer_id, debit.id, Side.DEBIT, amount, currency, debit.posted, code)
        )
        self._entries.append(
            Entry(transfer_id, credit.id, Side.CREDIT, amount, currency, credit.posted, code)
        )

    def _release(
        self, pending: Transfer, status: TransferStatus, *, undoable: bool = True
    ) -> Transfer:
        """Takes a hold off both accounts and gives it its final status."""
        debit = self._state(pending.debit_account_id)
        credit = self._state(pending.credit_account_id)
        assert debit is not None and credit is not None  # a hold's accounts exist
        if undoable:
            self._save(debit, credit)
            self._save_transfer(pending)
        else:
            self._touched.update((debit.id, credit.id))
            self._forget(debit, credit, pending)
        debit.debits_pending -= pending.amount
        credit.credits_pending -= pending.amount
        resolved = replace(pending, status=status, resolved_at=self._now)
        self._store(resolved)
        return resolved

    def _store(self, changed: Transfer) -> None:
        """Keeps the new version of a transfer: still to be inserted if this
        batch created it, to be updated otherwise."""
        if changed.id in self._created:
            self._created[changed.id] = changed
        else:
            self._updated[changed.id] = changed

    def _create(self, transfer: Transfer) -> None:
        self._created[transfer.id] = transfer
        if self._chain is not None:
            self._chain.created.append(transfer.id)

    def _save(self, *states: AccountState) -> None:
        for state in states:
            self._touched.add(state.id)
            if self._chain is not None:
                self._chain.accounts.setdefault(state.id, state.balances())

    def _save_transfer(self, transfer: Transfer) -> None:
        if self._chain is not None and transfer.id not in self._chain.transfers:
            self._chain.transfers[transfer.id] = self._created.get(
                transfer.id
            ) or self._updated.get(transfer.id)

    def _forget(self, debit: AccountState, credit: AccountState, pending: Transfer) -> None:
        """An expiry found mid-chain stands even if the chain fails: drop it
        from the chain's undo log, keeping the chain's other effects undoable."""
        if self._chain is None:
            return
        for state in (debit, credit):
            saved = self._chain.accounts.get(state.id)
            if saved is not None:
                dp, cp, dpe, cpe = saved
                if state.id == pending.debit_account_id:
                    dpe -= pending.amount
                if state.id == pending.credit_account_id:
                    cpe -= pending.amount
                self._chain.accounts[state.id] = (dp, cp, dpe, cpe)

    def _undo_chain(self, start: int, failed_at: int) -> None:
        chain = self._chain
        assert chain is not None
        for aid, (dp, cp, dpe, cpe) in chain.accounts.items():
            state = self._states[aid]
            state.debits_posted, state.credits_posted = dp, cp
            state.debits_pending, state.credits_pending = dpe, cpe
        for tid, before in chain.transfers.items():
            if before is None:
                self._updated.pop(tid, None)
            elif tid in self._created:
                self._created[tid] = before
            else:
                self._updated[tid] = before
        for tid in chain.created:
            self._created.pop(tid, None)
        del self._entries[chain.entries_mark :]
        for i in range(start, failed_at):
            outcome = self.outcomes[i]
            self.outcomes[i] = TransferOutcome(outcome.id, TransferCode.LINKED_EVENT_FAILED)
        self._chain = _ChainLog(len(self._entries))


@dataclass
class _ChainLog:
    entries_mark: int
    accounts: dict[uuid.UUID, _Balances] = field(default_factory=dict)
    transfers: dict[uuid.UUID, Transfer | None] = field(default_factory=dict)
    created: list[uuid.UUID] = field(default_factory=list)


def _overflows(debit: AccountState, credit: AccountState, amount: int) -> bool:
    return (
        credit.credits_posted + credit.credits_pending + amount > INT64_MAX
        or debit.debits_posted + debit.debits_pending + amount > INT64_MAX
    )


def _reference_mismatch(request: Request, referenced: Transfer) -> TransferCode | None:
    """Accounts or currency a referring request gave must be the referenced
    transfer's own."""
    if request.currency is not None and request.currency != referenced.currency:
        return TransferCode.CURRENCY_MISMATCH
    if (
        request.debit_account_id is not None
        and request.debit_account_id != referenced.debit_account_id
    ) or (
        request.credit_account_id is not None
        and request.credit_account_id != referenced.credit_account_id
    ):
        return TransferCode.REFERENCE_MISMATCH
    return None


def apply_batch(
    specs: Sequence[TransferSpec],
    accounts: Mapping[uuid.UUID, AccountState],
    existing: Mapping[uuid.UUID, Transfer],
    now: datetime,
) -> BatchResult:
    """Applies one request's transfers in order (see ``LedgerBatch``)."""
    batch = LedgerBatch(accounts, existing, now)
    batch.apply(specs)
    return batch.result()
