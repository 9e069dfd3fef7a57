"""The ledger's rules: pure, no I/O.

A batch of transfers is applied in arrival order against in-memory account
states. Each transfer gets a result code; a linked chain succeeds or fails as
a whole, its failed members' effects undone. What the batch changed (new
transfers, entries, final balances) is collected for the store to write in one
database transaction.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

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

    def same_request(self, other: Transfer) -> bool:
        """Whether a retry asks for exactly this transfer (ignoring what the
        ledger itself filled in)."""

        def key(t: Transfer) -> tuple[Any, ...]:
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

        return key(self) == key(other)


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


IMPLEMENTED_TYPES = frozenset({TransferType.POSTED})


def parse_transfer(spec: TransferSpec, now: datetime) -> Transfer | TransferCode:
    """Validates what can be validated without state."""
    try:
        transfer_id = uuid.UUID(spec.id)
        if transfer_id.int == 0:
            return TransferCode.INVALID_ID
        debit = uuid.UUID(spec.debit_account_id)
        credit = uuid.UUID(spec.credit_account_id)
    except ValueError:
        return TransferCode.INVALID_ID
    try:
        transfer_type = TransferType(spec.type or TransferType.POSTED)
    except ValueError:
        return TransferCode.INVALID_TYPE
    if transfer_type not in IMPLEMENTED_TYPES:
        return TransferCode.INVALID_TYPE
    if not 0 < spec.amount <= INT64_MAX:
        return TransferCode.INVALID_AMOUNT
    if spec.currency not in CURRENCY_EXPONENTS:
        return TransferCode.INVALID_CURRENCY
    if debit == credit:
        return TransferCode.SAME_ACCOUNT
    if spec.timeout_seconds and transfer_type != TransferType.PENDING:
        return TransferCode.INVALID_TIMEOUT
    return Transfer(
        id=transfer_id,
        debit_account_id=debit,
        credit_account_id=credit,
        amount=spec.amount,
        currency=spec.currency,
        type=transfer_type,
        pending_id=None,
        reverses_id=None,
        linked=spec.linked,
        timeout_seconds=spec.timeout_seconds,
        code=spec.code,
        metadata=dict(spec.metadata),
        effective_at=spec.effective_at,
        created_at=now,
        expires_at=None,
        status=TransferStatus.POSTED,
    )


def transfer_ids(specs: Sequence[TransferSpec]) -> list[uuid.UUID]:
    """The well-formed ids of a batch: what the store must look up."""
    return [tid for tid in (_uuid_or_none(s.id) for s in specs) if tid is not None]


def account_ids(specs: Sequence[TransferSpec]) -> list[uuid.UUID]:
    """The well-formed account ids a batch touches, sorted: the lock order."""
    ids = set()
    for spec in specs:
        for raw in (spec.debit_account_id, spec.credit_account_id):
            parsed = _uuid_or_none(raw)
            if parsed is not None:
                ids.add(parsed)
    return sorted(ids)


def _uuid_or_none(raw: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(raw)
    except ValueError:
        return None


@dataclass
class BatchResult:
    outcomes: list[TransferOutcome]
    new_transfers: list[Transfer]
    entries: list[Entry]
    # Final balances of every account the batch changed.
    touched: dict[uuid.UUID, AccountState]


def apply_batch(
    specs: Sequence[TransferSpec],
    accounts: Mapping[uuid.UUID, AccountState],
    existing: Mapping[uuid.UUID, Transfer],
    now: datetime,
) -> BatchResult:
    """Applies transfers in order. ``accounts`` must hold every account of the
    batch that exists (locked by the caller); ``existing``, every stored
    transfer whose id appears in the batch. Neither mapping is modified."""
    states = {aid: replace(state) for aid, state in accounts.items()}
    created: dict[uuid.UUID, Transfer] = {}
    outcomes: list[TransferOutcome] = []
    entries: list[Entry] = []
    touched: set[uuid.UUID] = set()

    # A chain's undo log: the state of each account before the chain first
    # touched it, and how much had been written when the chain began.
    chain_start: int | None = None
    chain_saved: dict[uuid.UUID, tuple[int, int, int, int]] = {}
    chain_entries_mark = 0
    chain_failed = False

    for index, spec in enumerate(specs):
        linked = spec.linked
        if linked and chain_start is None:
            chain_start, chain_saved, chain_entries_mark, chain_failed = (
                index,
                {},
                len(entries),
                False,
            )
        in_chain = chain_start is not None

        if chain_failed:
            code: TransferCode = TransferCode.LINKED_EVENT_FAILED
            transfer = None
        elif linked and index == len(specs) - 1:
            code, transfer = TransferCode.LINKED_EVENT_CHAIN_OPEN, None
        else:
            code, transfer = _apply_one(
                spec,
                states,
                existing,
                created,
                entries,
                touched,
                now,
                chain_saved if in_chain else None,
            )
        outcomes.append(TransferOutcome(spec.id, code, transfer))

        if in_chain and not code.ok and not chain_failed:
            chain_failed = True
            _undo_chain(
                chain_start or 0,
                index,
                outcomes,
                states,
                chain_saved,
                created,
                entries,
                chain_entries_mark,
            )
        if not linked:
            chain_start, chain_failed = None, False  # the chain (if any) ends here

    new_transfers = list(created.values())
    return BatchResult(
        outcomes=outcomes,
        new_transfers=new_transfers,
        entries=entries,
        touched={aid: states[aid] for aid in sorted(touched) if aid in states},
    )


def _undo_chain(
    start: int,
    failed_at: int,
    outcomes: list[TransferOutcome],
    states: dict[uuid.UUID, AccountState],
    saved: dict[uuid.UUID, tuple[int, int, int, int]],
    created: dict[uuid.UUID, Transfer],
    entries: list[Entry],
    entries_mark: int,
) -> None:
    for aid, (dp, cp, dpe, cpe) in saved.items():
        state = states[aid]
        state.debits_posted, state.credits_posted = dp, cp
        state.debits_pending, state.credits_pending = dpe, cpe
    del entries[entries_mark:]
    for i in range(start, failed_at):
        outcome = outcomes[i]
        if outcome.code == TransferCode.OK and outcome.transfer is not None:
            created.pop(outcome.transfer.id, None)
        outcomes[i] = TransferOutcome(outcome.id, TransferCode.LINKED_EVENT_FAILED)


def _apply_one(
    spec: TransferSpec,
    states: dict[uuid.UUID, AccountState],
    existing: Mapping[uuid.UUID, Transfer],
    created: dict[uuid.UUID, Transfer],
    entries: list[Entry],
    touched: set[uuid.UUID],
    now: datetime,
    chain_saved: dict[uuid.UUID, tuple[int, int, int, int]] | None,
) -> tuple[TransferCode, Transfer | None]:
    parsed = parse_transfer(spec, now)
    if isinstance(parsed, TransferCode):
        return parsed, None
    prior = created.get(parsed.id) or existing.get(parsed.id)
    if prior is not None:
        if prior.same_request(parsed):
            return TransferCode.EXISTS, prior
        return TransferCode.EXISTS_WITH_DIFFERENT_FIELDS, None

    debit = states.get(parsed.debit_account_id)
    credit = states.get(parsed.credit_account_id)
    if debit is None or credit is None:
        return TransferCode.ACCOUNT_NOT_FOUND, None
    if debit.closed or credit.closed:
        return TransferCode.ACCOUNT_CLOSED, None
    if debit.currency != parsed.currency or credit.currency != parsed.currency:
        return TransferCode.CURRENCY_MISMATCH, None
    if not debit.can_debit(parsed.amount):
        return TransferCode.INSUFFICIENT_FUNDS, None
    if credit.credits_posted + credit.credits_pending + parsed.amount > INT64_MAX or (
        debit.debits_posted + debit.debits_pending + parsed.amount > INT64_MAX
    ):
        return TransferCode.INVALID_AMOUNT, None

    for state in (debit, credit):
        if chain_saved is not None and state.id not in chain_saved:
            chain_saved[state.id] = state.balances()
        touched.add(state.id)
    debit.debits_posted += parsed.amount
    credit.credits_posted += parsed.amount
    entries.append(
        Entry(
            parsed.id,
            debit.id,
            Side.DEBIT,
            parsed.amount,
            parsed.currency,
            debit.posted,
            parsed.code,
        )
    )
    entries.append(
        Entry(
            parsed.id,
            credit.id,
            Side.CREDIT,
            parsed.amount,
            parsed.currency,
            credit.posted,
            parsed.code,
        )
    )
    created[parsed.id] = parsed
    return TransferCode.OK, parsed
