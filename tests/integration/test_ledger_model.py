"""The ledger against a model of its contract, at random (TigerBeetle's way).

A hypothesis state machine drives a real ledger process over gRPC and, beside
it, a small in-memory model written from the contract's comments
(protos/moneta/ledger/v1/ledger.proto), not from ``services.ledger.domain``.
Every step sends the same requests to both; they must agree on every result
code, and after every step on the balances of every account the machine
opened (the four raw sums and what the contract derives from them), on the
status of every hold, and on VerifyLedger finding nothing.

Holds that expire: the database refuses to move a hold's ``expires_at``
(``002_holds_resolved_at.sql`` guards it), so the machine opens holds with a
one-second timeout and lets the ledger's sweeper release them. Until the
ledger says such a hold is EXPIRED the machine never posts or voids it (a
past-due hold answers PENDING_EXPIRED even before the sweep: a race the model
would have to guess), and it opens them only on debit accounts without
``no_overdraft``, so whether one is still held never changes a result code,
only balances, which the machine reads after learning which holds expired.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from copy import deepcopy
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import grpc
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from moneta.ledger.v1 import ledger_pb2 as pb
from moneta.ledger.v1 import ledger_pb2_grpc
from tests.processes import ServiceProcess

RPC_TIMEOUT = 10.0
# A hold the sweeper releases within the test; and one that never expires in it.
SHORT_TIMEOUT = 1
LONG_TIMEOUT = 3600
EXPIRY_DEADLINE = 5.0
CURRENCIES = ("USD", "JPY")

POSTED = pb.TRANSFER_TYPE_POSTED
PENDING = pb.TRANSFER_TYPE_PENDING
POST_PENDING = pb.TRANSFER_TYPE_POST_PENDING
VOID_PENDING = pb.TRANSFER_TYPE_VOID_PENDING
REVERSAL = pb.TRANSFER_TYPE_REVERSAL
REFERRING = (POST_PENDING, VOID_PENDING, REVERSAL)

# Account.normal_side: "Defaults to CREDIT for USER_WALLET, MERCHANT, FEES and
# FX_POOL, DEBIT otherwise."
CREDIT_NORMAL = (
    pb.ACCOUNT_TYPE_USER_WALLET,
    pb.ACCOUNT_TYPE_MERCHANT,
    pb.ACCOUNT_TYPE_FEES,
    pb.ACCOUNT_TYPE_FX_POOL,
)
SUCCEEDED = ("OK", "EXISTS")

# Derandomized: every run plays the same histories. No shrinking: each step is
# round trips to a real process and the shrinker would run for minutes, past
# the suite's timeout; a failure prints its whole history and the batch that
# disagreed. To reduce one, add Phase.shrink and run with --timeout=0.
MODEL_SETTINGS = settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def new_id() -> str:
    return str(uuid.uuid4())


# ---------------------------------------------------------------- the model


def normal_side(account: pb.Account) -> pb.NormalSide.ValueType:
    if account.normal_side:
        return account.normal_side
    return pb.NORMAL_SIDE_CREDIT if account.type in CREDIT_NORMAL else pb.NORMAL_SIDE_DEBIT


def account_fields(account: pb.Account) -> tuple[object, ...]:
    """What makes two creations of one account id the same request."""
    return (
        account.currency,
        account.type,
        normal_side(account),
        account.no_overdraft,
        account.overdraft_limit,
        dict(account.metadata),
    )


def request_fields(transfer: pb.Transfer) -> tuple[object, ...]:
    """What makes two creations of one transfer id the same request (the
    first four, for a referring transfer, as LedgerModel._same_request says)."""
    return (
        transfer.debit_account_id,
        transfer.credit_account_id,
        transfer.currency,
        transfer.amount,
        transfer.type,
        transfer.pending_id,
        transfer.reverses_id,
        transfer.linked,
        transfer.timeout_seconds,
        transfer.code,
        dict(transfer.metadata),
    )


class Balance(NamedTuple):
    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int
    posted: int
    pending: int
    available: int


@dataclass
class ModelAccount:
    spec: pb.Account
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def currency(self) -> str:
        return self.spec.currency

    def room(self) -> int:
        """How much more may be debited (posted or held) with no_overdraft:
        debits may never exceed posted credits plus the overdraft limit."""
        return (
            self.credits_posted
            + self.spec.overdraft_limit
            - self.debits_posted
            - self.debits_pending
        )

    def can_debit(self, amount: int) -> bool:
        return not self.spec.no_overdraft or amount <= self.room()

    def balance(self) -> Balance:
        """The four raw sums, and what the contract derives from them on the
        account's normal side: posted; pending, incoming minus outgoing; and
        available, posted minus pending outgoing."""
        if normal_side(self.spec) == pb.NORMAL_SIDE_CREDIT:
            posted = self.credits_posted - self.debits_posted
            incoming, outgoing = self.credits_pending, self.debits_pending
        else:
            posted = self.debits_posted - self.credits_posted
            incoming, outgoing = self.debits_pending, self.credits_pending
        return Balance(
            self.debits_posted,
            self.credits_posted,
            self.debits_pending,
            self.credits_pending,
            posted,
            incoming - outgoing,
            posted - outgoing,
        )


@dataclass
class ModelTransfer:
    """A transfer as the ledger should have stored it: accounts, currency and
    amount filled in from what it refers to."""

    request: pb.Transfer
    type: int
    debit: str
    credit: str
    amount: int
    currency: str
    status: str  # TransferStatus without its prefix
    reversed: int = 0


Outcome = tuple[str, ModelTransfer | None]


class LedgerModel:
    def __init__(self) -> None:
        self.accounts: dict[str, ModelAccount] = {}
        self.transfers: dict[str, ModelTransfer] = {}

    # -- accounts

    def create_account(self, spec: pb.Account) -> str:
        if spec.overdraft_limit < 0:
            return "INVALID_OVERDRAFT_LIMIT"
        existing = self.accounts.get(spec.id)
        if existing is None:
            self.accounts[spec.id] = ModelAccount(spec)
            return "OK"
        if account_fields(existing.spec) == account_fields(spec):
            return "EXISTS"
        return "EXISTS_WITH_DIFFERENT_FIELDS"

    # -- transfers

    def create_transfers(self, batch: Sequence[pb.Transfer]) -> list[Outcome]:
        """One outcome per transfer, in order. A linked chain (consecutive
        ``linked`` ending at the first one without) succeeds or fails as a
        whole: when a member fails, it keeps its own code, the others answer
        LINKED_EVENT_FAILED and nothing of the chain stays."""
        outcomes: list[Outcome] = []
        chain_start: int | None = None
        chain_failed = False
        before_chain: tuple[dict[str, ModelAccount], dict[str, ModelTransfer]] | None = None
        for index, transfer in enumerate(batch):
            if transfer.linked and chain_start is None:
                chain_start, chain_failed = index, False
                before_chain = deepcopy((self.accounts, self.transfers))
            outcome: Outcome
            if chain_failed:
                outcome = ("LINKED_EVENT_FAILED", None)
            elif transfer.linked and index == len(batch) - 1:
                outcome = ("LINKED_EVENT_CHAIN_OPEN", None)
            else:
                outcome = self._create_transfer(transfer)
            outcomes.append(outcome)
            if chain_start is not None and not chain_failed and outcome[0] not in SUCCEEDED:
                chain_failed = True
                assert before_chain is not None
                self.accounts, self.transfers = before_chain
                for member in range(chain_start, index):
                    outcomes[member] = ("LINKED_EVENT_FAILED", None)
            if not transfer.linked:
                chain_start, chain_failed, before_chain = None, False, None
        return outcomes

    def expire(self, hold_id: str) -> None:
        hold = self.transfers[hold_id]
        assert hold.status == "PENDING"
        self._release(hold, "EXPIRED")

    def _create_transfer(self, t: pb.Transfer) -> Outcome:
        # What the request alone tells.
        if t.amount < 0 or (t.amount == 0 and t.type not in REFERRING):
            return ("INVALID_AMOUNT", None)
        if t.timeout_seconds and t.type != PENDING:
            return ("INVALID_TIMEOUT", None)
        if t.debit_account_id and t.debit_account_id == t.credit_account_id:
            return ("SAME_ACCOUNT", None)
        # Ids are idempotency keys.
        prior = self.transfers.get(t.id)
        if prior is not None:
            if self._same_request(prior, t):
                return ("EXISTS", prior)
            return ("EXISTS_WITH_DIFFERENT_FIELDS", None)
        if t.type in (POSTED, PENDING):
            return self._move(t)
        if t.type == REVERSAL:
            return self._reverse(t)
        return self._resolve(t)

    def _same_request(self, prior: ModelTransfer, t: pb.Transfer) -> bool:
        """Whether ``t`` asks again for the transfer ``prior``. What a
        referring transfer may leave out (accounts, currency) counts as the
        values taken from the transfer it refers to, and a POST_PENDING or
        VOID_PENDING amount of 0 as the whole hold."""
        if request_fields(prior.request)[4:] != request_fields(t)[4:]:
            return False
        filled = (
            t.debit_account_id or prior.debit,
            t.credit_account_id or prior.credit,
            t.currency or prior.currency,
        )
        return filled == (prior.debit, prior.credit, prior.currency) and (
            self._amount_asked(prior.request) == self._amount_asked(t)
        )

    def _amount_asked(self, t: pb.Transfer) -> int:
        if t.type in (POST_PENDING, VOID_PENDING) and t.amount == 0:
            return self.transfers[t.pending_id].amount
        return t.amount

    def _move(self, t: pb.Transfer) -> Outcome:
        debit = self.accounts.get(t.debit_account_id)
        credit = self.accounts.get(t.credit_account_id)
        if debit is None or credit is None:
            return ("ACCOUNT_NOT_FOUND", None)
        if debit.currency != t.currency or credit.currency != t.currency:
            return ("CURRENCY_MISMATCH", None)
        if not debit.can_debit(t.amount):
            return ("INSUFFICIENT_FUNDS", None)
        if t.type == PENDING:
            # A hold writes no entries: only the pending sums move.
            debit.debits_pending += t.amount
            credit.credits_pending += t.amount
            return self._record(t, debit.id, credit.id, t.amount, t.currency, "PENDING")
        self._post(debit, credit, t.amount)
        return self._record(t, debit.id, credit.id, t.amount, t.currency, "POSTED")

    def _resolve(self, t: pb.Transfer) -> Outcome:
        hold = self.transfers.get(t.pending_id)
        if hold is None or hold.type != PENDING:
            return ("PENDING_NOT_FOUND", None)
        if hold.status == "EXPIRED":
            return ("PENDING_EXPIRED", None)
        if hold.status != "PENDING":
            return ("PENDING_ALREADY_RESOLVED", None)
        mismatch = self._mismatch(t, hold.debit, hold.credit, hold.currency)
        if mismatch is not None:
            return (mismatch, None)
        debit, credit = self.accounts[hold.debit], self.accounts[hold.credit]
        if t.type == POST_PENDING:
            # Posts `amount` (0: all of it) and releases the whole hold.
            amount = t.amount or hold.amount
            if amount > hold.amount:
                return ("EXCEEDS_PENDING_AMOUNT", None)
            self._release(hold, "PENDING_POSTED")
            self._post(debit, credit, amount)
            return self._record(t, debit.id, credit.id, amount, hold.currency, "POSTED")
        if t.amount not in (0, hold.amount):
            return ("EXCEEDS_PENDING_AMOUNT", None)
        self._release(hold, "VOIDED")
        return self._record(t, debit.id, credit.id, hold.amount, hold.currency, "VOIDED")

    def _reverse(self, t: pb.Transfer) -> Outcome:
        original = self.transfers.get(t.reverses_id)
        if original is None or original.type not in (POSTED, POST_PENDING):
            return ("TRANSFER_NOT_FOUND", None)
        # Debits the original's credit account and credits its debit account.
        mismatch = self._mismatch(t, original.credit, original.debit, original.currency)
        if mismatch is not None:
            return (mismatch, None)
        remaining = original.amount - original.reversed
        amount = t.amount or remaining
        if remaining == 0 or amount > remaining:
            return ("ALREADY_REVERSED", None)
        debit, credit = self.accounts[original.credit], self.accounts[original.debit]
        if not debit.can_debit(amount):
            return ("INSUFFICIENT_FUNDS", None)
        original.reversed += amount
        self._post(debit, credit, amount)
        return self._record(t, debit.id, credit.id, amount, original.currency, "POSTED")

    @staticmethod
    def _mismatch(t: pb.Transfer, debit: str, credit: str, currency: str) -> str | None:
        """Fields a referring transfer may leave empty must, when given, be
        those of the transfer it refers to."""
        if t.currency and t.currency != currency:
            return "CURRENCY_MISMATCH"
        if (t.debit_account_id and t.debit_account_id != debit) or (
            t.credit_account_id and t.credit_account_id != credit
        ):
            return "REFERENCE_MISMATCH"
        return None

    def _post(self, debit: ModelAccount, credit: ModelAccount, amount: int) -> None:
        debit.debits_posted += amount
        credit.credits_posted += amount

    def _release(self, hold: ModelTransfer, status: str) -> None:
        self.accounts[hold.debit].debits_pending -= hold.amount
        self.accounts[hold.credit].credits_pending -= hold.amount
        hold.status = status

    def _record(
        self, t: pb.Transfer, debit: str, credit: str, amount: int, currency: str, status: str
    ) -> Outcome:
        request = pb.Transfer()
        request.CopyFrom(t)
        stored = ModelTransfer(request, t.type, debit, credit, amount, currency, status)
        self.transfers[t.id] = stored
        return ("OK", stored)


# ---------------------------------------------------------------- the machine


@dataclass(frozen=True)
class Target:
    """A transfer the batch being drawn may refer to (stored, or earlier in
    the same batch), as far as is known while drawing."""

    id: str
    debit: str
    credit: str
    amount: int
    currency: str


TRANSFER_KINDS = (
    ["posted"] * 4
    + ["pending"] * 3
    + ["post_pending"] * 3
    + ["void_pending"] * 2
    + ["reversal"] * 3
    + ["retry_same"] * 3
    + ["retry_changed"] * 3
    + ["expired_hold"] * 3  # when expire_hold has run; else a POSTED one
    + [
        "insufficient_funds",
        "exact_funds",
        "currency_mismatch",
        "same_account",
        "unknown_account",
        "bad_amount",
        "bad_timeout",
        "pending_not_found",
        "reversal_not_found",
        "reference_mismatch",
    ]
)


CHAIN_KINDS = (
    ["posted"] * 3 + ["pending"] * 2 + ["post_pending", "void_pending", "reversal", "retry_same"]
)


@st.composite
def new_accounts(draw: st.DrawFn) -> pb.Account:
    no_overdraft = draw(st.booleans())
    return pb.Account(
        id=new_id(),
        currency=draw(st.sampled_from(CURRENCIES)),
        type=draw(
            st.sampled_from(
                [
                    pb.ACCOUNT_TYPE_USER_WALLET,
                    pb.ACCOUNT_TYPE_BANK_CLEARING,
                    pb.ACCOUNT_TYPE_MERCHANT,
                    pb.ACCOUNT_TYPE_FEES,
                ]
            )
        ),
        no_overdraft=no_overdraft,
        overdraft_limit=draw(st.sampled_from([0, 0, 50, 500])) if no_overdraft else 0,
        metadata=draw(st.sampled_from([{}, {"owner": "model"}])),
    )


class LedgerMachine(RuleBasedStateMachine):
    # The ledger under test: set by the test on a subclass.
    ledger: ClassVar[ledger_pb2_grpc.LedgerServiceStub]

    def __init__(self) -> None:
        super().__init__()
        self.model = LedgerModel()
        # Every transfer request sent, for retries.
        self.sent: list[pb.Transfer] = []
        # Short holds seen expired by expire_hold. What is drawn depends on
        # these only, never on when the sweeper happened to run (which
        # _learn_expiries follows for balances): a replay draws the same.
        self.swept: set[str] = set()
        # Empty but after a failure: a replay of the failing history must not
        # stop at what the failing run left in the ledger (the test checks
        # that VerifyLedger is clean before the machine runs).
        self.known_discrepancies = set(self._discrepancies())
        self.labels: dict[str, str] = {}

    # -- accounts

    @initialize()
    def open_accounts(self) -> None:
        def account(
            currency: str,
            kind: pb.AccountType.ValueType,
            no_overdraft: bool = False,
            overdraft_limit: int = 0,
        ) -> pb.Account:
            return pb.Account(
                id=new_id(),
                currency=currency,
                type=kind,
                no_overdraft=no_overdraft,
                overdraft_limit=overdraft_limit,
            )

        usd_bank = account("USD", pb.ACCOUNT_TYPE_BANK_CLEARING)
        jpy_bank = account("JPY", pb.ACCOUNT_TYPE_BANK_CLEARING)
        wallets = [
            account("USD", pb.ACCOUNT_TYPE_USER_WALLET, no_overdraft=True),
            account("USD", pb.ACCOUNT_TYPE_USER_WALLET, no_overdraft=True, overdraft_limit=100),
            account("JPY", pb.ACCOUNT_TYPE_MERCHANT, no_overdraft=True),
        ]
        self._create_accounts([usd_bank, jpy_bank, *wallets])
        # Money to spend from the accounts that can only spend what they hold.
        self._create_transfers(
            [
                pb.Transfer(
                    id=new_id(),
                    debit_account_id=usd_bank.id if w.currency == "USD" else jpy_bank.id,
                    credit_account_id=w.id,
                    amount=1000,
                    currency=w.currency,
                    type=POSTED,
                    code="DEPOSIT",
                )
                for w in wallets
            ]
        )

    @rule(data=st.data(), again=st.booleans())
    def create_accounts(self, data: st.DataObject, again: bool) -> None:
        """New accounts, or an existing one asked for again."""
        if again:
            self._create_account_again(data)
        else:
            self._create_new_accounts(data)

    def _create_new_accounts(self, data: st.DataObject) -> None:
        specs = data.draw(st.lists(new_accounts(), min_size=1, max_size=3), label="accounts")
        if data.draw(st.booleans(), label="same id twice in one call"):
            again = pb.Account()
            again.CopyFrom(specs[0])
            specs.append(again)
        if data.draw(st.booleans(), label="with a negative overdraft limit"):
            bad = data.draw(new_accounts())
            bad.no_overdraft, bad.overdraft_limit = True, -1
            specs.insert(data.draw(st.integers(0, len(specs))), bad)
        self._create_accounts(specs)

    def _create_account_again(self, data: st.DataObject) -> None:
        change = data.draw(
            st.sampled_from(
                [
                    "none",
                    "explicit_default_side",
                    "currency",
                    "no_overdraft",
                    "limit",
                    "type",
                    "metadata",
                ]
            ),
            label="change",
        )
        original = self._draw_account(data, list(self.model.accounts.values()), "account").spec
        again = pb.Account()
        again.CopyFrom(original)
        if change == "explicit_default_side":
            again.normal_side = normal_side(original)
        elif change == "currency":
            again.currency = "JPY" if original.currency == "USD" else "USD"
        elif change == "no_overdraft":
            again.no_overdraft = not original.no_overdraft
            again.overdraft_limit = 0
        elif change == "limit":
            again.no_overdraft, again.overdraft_limit = True, original.overdraft_limit + 1
        elif change == "type":
            again.type = (
                pb.ACCOUNT_TYPE_FEES
                if original.type != pb.ACCOUNT_TYPE_FEES
                else pb.ACCOUNT_TYPE_MERCHANT
            )
        elif change == "metadata":
            again.metadata["changed"] = "yes"
        self._create_accounts([again])

    def _create_accounts(self, specs: list[pb.Account]) -> None:
        expected = [(s.id, self.model.create_account(s)) for s in specs]
        for spec in specs:
            if spec.id in self.model.accounts and spec.id not in self.labels:
                self.labels[spec.id] = f"A{len(self.labels)}"
        response = self.ledger.CreateAccounts(
            pb.CreateAccountsRequest(accounts=specs), timeout=RPC_TIMEOUT
        )
        got = [(r.id, pb.AccountResult.Code.Name(r.code)) for r in response.results]
        assert got == expected, "\n".join(
            f"{self._label(s.id)} {s.currency} type={s.type} side={s.normal_side} "
            f"no_overdraft={s.no_overdraft} limit={s.overdraft_limit}: "
            f"ledger {g[1]}, model {e[1]}"
            for s, g, e in zip(specs, got, expected, strict=False)
        )

    # -- transfers

    @rule(data=st.data(), size=st.integers(1, 6))
    def create_transfers(self, data: st.DataObject, size: int) -> None:
        """A batch of anything, some of it linked."""
        self._create_transfers(self._draw_batch(data, TRANSFER_KINDS, [None] * size))

    @rule(data=st.data(), size=st.integers(2, 5), left_open=st.sampled_from([False] * 4 + [True]))
    def create_linked_chain(self, data: st.DataObject, size: int, left_open: bool) -> None:
        """One chain of transfers that mostly succeed, so that whole chains
        commit too (a retry in it may cut it short or run it on)."""
        links = [True] * (size - 1) + [left_open]
        self._create_transfers(self._draw_batch(data, CHAIN_KINDS, links))

    def _draw_batch(
        self, data: st.DataObject, kinds: Sequence[str], links: Sequence[bool | None]
    ) -> list[pb.Transfer]:
        """One transfer per entry of ``links``: its ``linked`` flag, or None
        to draw it."""
        batch: list[pb.Transfer] = []
        for linked in links:
            kind = data.draw(st.sampled_from(kinds), label="kind")
            transfer = self._draw_transfer(data, kind, batch, linked)
            if transfer is None:  # nothing to refer to yet
                transfer = self._draw_transfer(data, "posted", batch, linked)
            assert transfer is not None
            batch.append(transfer)
        return batch

    def _create_transfers(self, batch: list[pb.Transfer]) -> None:
        for transfer in batch:
            self.labels.setdefault(transfer.id, f"T{len(self.labels)}")

        expected = self.model.create_transfers(batch)
        response = self.ledger.CreateTransfers(
            pb.CreateTransfersRequest(transfers=batch), timeout=RPC_TIMEOUT
        )
        self.sent.extend(batch)

        got = [(r.id, pb.TransferResult.Code.Name(r.code)) for r in response.results]
        want = [(t.id, code) for t, (code, _) in zip(batch, expected, strict=True)]
        assert got == want, self._describe(batch, got, want)
        for result, (code, stored) in zip(response.results, expected, strict=True):
            if code in SUCCEEDED:
                assert stored is not None
                # "The transfer as stored, for OK and EXISTS", with what a
                # referring transfer left out taken from what it refers to.
                as_stored = (
                    result.transfer.debit_account_id,
                    result.transfer.credit_account_id,
                    result.transfer.amount,
                    result.transfer.currency,
                )
                assert as_stored == (
                    stored.debit,
                    stored.credit,
                    stored.amount,
                    stored.currency,
                ), f"{self._label(result.id)} stored as {as_stored}"

    def _draw_transfer(
        self, data: st.DataObject, kind: str, batch: list[pb.Transfer], linked: bool | None
    ) -> pb.Transfer | None:
        draw = data.draw
        accounts = list(self.model.accounts.values())
        if linked is None:
            linked = draw(st.sampled_from([False, False, False, True]), label="linked")
        t = pb.Transfer(id=new_id(), linked=linked, code=draw(st.sampled_from(["", "P2P"])))

        if kind in ("posted", "pending", "bad_amount", "bad_timeout", "same_account"):
            t.amount = draw(st.integers(1, 300))
            debit, credit = self._same_currency_pair(data, t.amount)
            t.debit_account_id, t.credit_account_id = debit.id, credit.id
            t.currency = debit.currency
            t.type = PENDING if kind == "pending" else draw(st.sampled_from([POSTED, PENDING]))
            if t.type == PENDING:
                timeouts = [0, LONG_TIMEOUT]
                # Short holds only where holding never refuses anything (see
                # the module's docstring).
                if not debit.spec.no_overdraft and kind == "pending":
                    timeouts += [SHORT_TIMEOUT] * 2
                t.timeout_seconds = draw(st.sampled_from(timeouts), label="timeout")
            if kind == "bad_amount":
                t.amount = draw(st.sampled_from([0, -1, -1000]))
            if kind == "same_account":
                t.credit_account_id = t.debit_account_id
            if kind == "bad_timeout":  # a timeout is for holds only
                t.type, t.timeout_seconds = POSTED, draw(st.sampled_from([1, LONG_TIMEOUT]))
            return t

        if kind in ("insufficient_funds", "exact_funds"):
            limited = [a for a in accounts if a.spec.no_overdraft]
            if not limited:
                return None
            debit = self._draw_account(data, limited, "debit")
            credit = self._draw_account(
                data,
                [a for a in accounts if a.currency == debit.currency and a is not debit],
                "credit",
            )
            room = debit.room()
            if kind == "exact_funds":
                if room <= 0:
                    return None
                t.amount = room
            else:
                t.amount = max(1, room + draw(st.integers(1, 100)))
            t.debit_account_id, t.credit_account_id = debit.id, credit.id
            t.currency, t.type = debit.currency, draw(st.sampled_from([POSTED, PENDING]))
            return t

        if kind == "currency_mismatch":
            usd = self._draw_account(data, [a for a in accounts if a.currency == "USD"], "usd")
            jpy = self._draw_account(data, [a for a in accounts if a.currency == "JPY"], "jpy")
            t.debit_account_id, t.credit_account_id = draw(st.permutations([usd.id, jpy.id]))
            t.currency = draw(st.sampled_from(CURRENCIES))
            t.amount, t.type = draw(st.integers(1, 100)), draw(st.sampled_from([POSTED, PENDING]))
            return t

        if kind == "unknown_account":
            known = self._draw_account(data, accounts, "known")
            ids = draw(st.permutations([known.id, new_id()]))
            t.debit_account_id, t.credit_account_id = ids
            t.currency = known.currency
            t.amount, t.type = draw(st.integers(1, 100)), draw(st.sampled_from([POSTED, PENDING]))
            return t

        if kind in ("post_pending", "void_pending"):
            holds = self._holds(batch)
            if not holds:
                return None
            hold = self._draw_target(data, holds, "hold")
            t.pending_id = hold.id
            if kind == "void_pending":
                t.type = VOID_PENDING
                t.amount = draw(st.sampled_from([0, hold.amount]))
            else:
                t.type = POST_PENDING
                t.amount = draw(
                    st.sampled_from(
                        [
                            0,
                            0,
                            hold.amount,
                            max(1, hold.amount // 2),
                            max(1, hold.amount // 2),
                            hold.amount + 1,
                            -1,
                        ]
                    ),
                    label="amount",
                )
            if draw(st.booleans(), label="names the hold's accounts"):
                t.debit_account_id, t.credit_account_id = hold.debit, hold.credit
                t.currency = hold.currency
            return t

        if kind == "expired_hold":
            if not self.swept:
                return None
            t.type = draw(st.sampled_from([POST_PENDING, VOID_PENDING]))
            t.pending_id = draw(st.sampled_from(sorted(self.swept)))
            return t

        if kind == "pending_not_found":
            posted = self._posted(batch)
            t.type = draw(st.sampled_from([POST_PENDING, VOID_PENDING]))
            t.pending_id = draw(st.sampled_from([new_id(), *[p.id for p, _ in posted]]))
            return t

        if kind == "reversal":
            posted = self._posted(batch)
            if not posted:
                return None
            original = self._draw_target(data, posted, "original")
            t.type, t.reverses_id = REVERSAL, original.id
            t.amount = draw(
                st.sampled_from(
                    [0, original.amount, max(1, original.amount // 3), original.amount + 1]
                ),
                label="amount",
            )
            if draw(st.booleans(), label="names the mirrored accounts"):
                t.debit_account_id, t.credit_account_id = original.credit, original.debit
                t.currency = original.currency
            return t

        if kind == "reversal_not_found":
            # Holds (open or resolved) and voids moved no posted money.
            unposted = [
                m.request.id
                for m in self.model.transfers.values()
                if m.type in (PENDING, VOID_PENDING)
            ]
            t.type = REVERSAL
            t.reverses_id = draw(st.sampled_from([new_id(), *unposted]))
            return t

        if kind == "reference_mismatch":
            candidates = [("hold", h) for h, _ in self._holds(batch)] + [
                ("posted", p) for p, _ in self._posted(batch)
            ]
            if not candidates:
                return None
            what, target = draw(st.sampled_from(candidates))
            if what == "hold":
                t.type, t.pending_id = (
                    draw(st.sampled_from([POST_PENDING, VOID_PENDING])),
                    target.id,
                )
                right_debit = target.debit
            else:
                t.type, t.reverses_id = REVERSAL, target.id
                right_debit = target.credit
            if draw(st.booleans(), label="wrong currency"):
                t.currency = "JPY" if target.currency == "USD" else "USD"
            else:
                t.debit_account_id = draw(
                    st.sampled_from([a.id for a in accounts if a.id != right_debit])
                )
            return t

        if kind in ("retry_same", "retry_changed"):
            # Mostly a transfer that was stored, of each type as often; else
            # any request sent before.
            earlier = [m.request for m in self.model.transfers.values()]
            if earlier and draw(st.sampled_from([True] * 3 + [False]), label="a stored one"):
                kind_of = draw(st.sampled_from(sorted({r.type for r in earlier})), label="type")
                earlier = [r for r in earlier if r.type == kind_of]
            else:
                earlier = self.sent + batch
            if not earlier:
                return None
            # Newest first: hypothesis favours the first choices.
            t.CopyFrom(draw(st.sampled_from(earlier[::-1]), label="retried"))
            stored = self.model.transfers.get(t.id)
            if kind == "retry_changed":
                change = draw(st.sampled_from(["code", "amount", "accounts"]), label="change")
                if change == "amount" and t.type == POST_PENDING and t.amount > 0:
                    # Part of a hold asked again in full (0), or a part asked
                    # again as more.
                    t.amount = draw(st.sampled_from([0, t.amount + 1]), label="amount")
                elif change == "amount" and t.amount > 0:
                    t.amount += 1
                elif (
                    change == "accounts"
                    and t.debit_account_id
                    and t.credit_account_id
                    # A short hold's debit account must stay one without
                    # no_overdraft (see the module's docstring).
                    and t.timeout_seconds != SHORT_TIMEOUT
                ):
                    t.debit_account_id, t.credit_account_id = (
                        t.credit_account_id,
                        t.debit_account_id,
                    )
                else:
                    t.code += "-changed"
            elif stored is not None and t.type in REFERRING and draw(st.booleans()):
                # The same request, spelt out: what was left out given as the
                # ledger filled it in, and "all of the hold" as 0 or in full.
                t.debit_account_id, t.credit_account_id = stored.debit, stored.credit
                t.currency = stored.currency
                if t.type in (POST_PENDING, VOID_PENDING):
                    held = self.model.transfers[t.pending_id].amount
                    if t.amount in (0, held):
                        t.amount = held - t.amount
            return t

        raise AssertionError(f"unknown kind {kind}")

    def _same_currency_pair(
        self, data: st.DataObject, amount: int
    ) -> tuple[ModelAccount, ModelAccount]:
        """Two accounts of one currency, the debit one mostly able to pay
        ``amount`` (the insufficient_funds kind is there for the others)."""
        accounts = list(self.model.accounts.values())
        currency = data.draw(st.sampled_from(CURRENCIES))
        mine = [a for a in accounts if a.currency == currency]
        payers = [a for a in mine if a.can_debit(amount)]
        if payers and data.draw(st.sampled_from([True, True, True, False]), label="a payer"):
            debit = self._draw_account(data, payers, "debit")
        else:
            debit = self._draw_account(data, mine, "debit")
        credit = self._draw_account(data, [a for a in mine if a is not debit], "credit")
        return debit, credit

    def _draw_account(
        self, data: st.DataObject, candidates: list[ModelAccount], label: str
    ) -> ModelAccount:
        """One of ``candidates``, drawn by id: hypothesis shows the draw as it
        was, not as the account's balances are by the time it prints."""
        chosen = data.draw(st.sampled_from([a.id for a in candidates]), label=label)
        return self.model.accounts[chosen]

    def _holds(self, batch: list[pb.Transfer]) -> list[tuple[Target, bool]]:
        """Holds that may be posted or voided without racing the sweeper
        (without a short timeout, or known to have expired already), each
        with whether it is still open as far as is known."""
        resolved_in_batch = {t.pending_id for t in batch}
        stored = [
            (Target(m.request.id, m.debit, m.credit, m.amount, m.currency), m.status == "PENDING")
            for m in self.model.transfers.values()
            if m.type == PENDING
            and (m.request.timeout_seconds != SHORT_TIMEOUT or m.request.id in self.swept)
        ]
        drawn = [
            (
                Target(t.id, t.debit_account_id, t.credit_account_id, t.amount, t.currency),
                t.id not in resolved_in_batch,
            )
            for t in batch
            if t.type == PENDING and t.timeout_seconds != SHORT_TIMEOUT and t.amount > 0
        ]
        return stored + drawn

    def _posted(self, batch: list[pb.Transfer]) -> list[tuple[Target, bool]]:
        """Transfers that moved posted money (POSTED ones and posts of holds,
        stored or earlier in the batch), each with whether some of it is left
        to reverse as far as is known."""
        reversed_in_batch = {t.reverses_id for t in batch}
        stored = [
            (Target(m.request.id, m.debit, m.credit, m.amount, m.currency), m.reversed < m.amount)
            for m in self.model.transfers.values()
            if m.type in (POSTED, POST_PENDING)
        ]
        drawn = [
            (
                Target(t.id, t.debit_account_id, t.credit_account_id, t.amount, t.currency),
                t.id not in reversed_in_batch,
            )
            for t in batch
            if t.type == POSTED and t.amount > 0
        ]
        return stored + drawn

    def _draw_target(
        self, data: st.DataObject, targets: list[tuple[Target, bool]], label: str
    ) -> Target:
        """Mostly one that is still open (or left to reverse)."""
        live = [target for target, alive in targets if alive]
        if not (live and data.draw(st.sampled_from([True] * 3 + [False]), label=f"{label} live")):
            live = [target for target, _ in targets]
        # Newest first: hypothesis favours the first choices.
        return data.draw(st.sampled_from(live[::-1]), label=label)

    # -- expiry

    def _short_holds(self) -> list[str]:
        return [
            tid
            for tid, m in self.model.transfers.items()
            if m.type == PENDING and m.request.timeout_seconds == SHORT_TIMEOUT
        ]

    def _unswept_short_holds(self) -> list[str]:
        return [tid for tid in self._short_holds() if tid not in self.swept]

    # Once per history: each wait is a second or two of the sweeper's time.
    @precondition(lambda self: not self.swept and bool(self._unswept_short_holds()))
    @rule(data=st.data())
    def expire_hold(self, data: st.DataObject) -> None:
        """Waits for the sweeper to release a hold whose timeout passed."""
        hold_id = data.draw(st.sampled_from(self._unswept_short_holds()), label="hold")
        deadline = time.monotonic() + EXPIRY_DEADLINE
        while self._statuses([hold_id])[hold_id] != "EXPIRED":
            assert time.monotonic() < deadline, (
                f"hold {self._label(hold_id)} not expired {EXPIRY_DEADLINE}s after its timeout"
            )
            time.sleep(0.05)
        if self.model.transfers[hold_id].status == "PENDING":
            self.model.expire(hold_id)
        self.swept.add(hold_id)
        # Too late now to post or void it.
        resolve = data.draw(st.sampled_from([POST_PENDING, VOID_PENDING]), label="then")
        self._create_transfers([pb.Transfer(id=new_id(), type=resolve, pending_id=hold_id)])

    def _learn_expiries(self) -> int:
        """Marks expired in the model the short holds the ledger has
        expired; how many there were."""
        open_holds = [
            tid for tid in self._short_holds() if self.model.transfers[tid].status == "PENDING"
        ]
        if not open_holds:
            return 0
        expired = [tid for tid, s in self._statuses(open_holds).items() if s == "EXPIRED"]
        for tid in expired:
            self.model.expire(tid)
        return len(expired)

    def _discrepancies(self) -> dict[tuple[str, str, str, int], pb.Discrepancy]:
        verdict = self.ledger.VerifyLedger(pb.VerifyLedgerRequest(), timeout=RPC_TIMEOUT)
        assert verdict.ok == (not verdict.discrepancies), str(verdict)
        return {
            (d.kind, d.account_id, d.currency, d.actual - d.expected): d
            for d in verdict.discrepancies
        }

    def _statuses(self, ids: list[str]) -> dict[str, str]:
        response = self.ledger.LookupTransfers(
            pb.LookupTransfersRequest(ids=ids), timeout=RPC_TIMEOUT
        )
        return {
            t.id: pb.TransferStatus.Name(t.status).removeprefix("TRANSFER_STATUS_")
            for t in response.transfers
        }

    # -- what must hold after every step

    @invariant()
    def ledger_agrees_with_model(self) -> None:
        balances = self._balances_in_step_with_expiries()
        model = {aid: a.balance() for aid, a in self.model.accounts.items()}
        differing = [
            f"{self._label(aid)}: "
            + ", ".join(
                f"{name} ledger {theirs} model {ours}"
                for name, theirs, ours in zip(Balance._fields, balances[aid], balance, strict=True)
                if theirs != ours
            )
            for aid, balance in model.items()
            if aid in balances and balances[aid] != balance
        ]
        assert model.keys() == balances.keys(), "GetBalances misses accounts"
        assert not differing, "\n".join(differing)

        holds = {tid: m.status for tid, m in self.model.transfers.items() if m.type == PENDING}
        # A short hold the model still has open may have expired since.
        settled = {
            tid: s
            for tid, s in holds.items()
            if s != "PENDING" or self.model.transfers[tid].request.timeout_seconds != SHORT_TIMEOUT
        }
        if settled:
            statuses = self._statuses(list(settled))
            assert statuses == settled, {
                self._label(tid): (statuses.get(tid), s)
                for tid, s in settled.items()
                if statuses.get(tid) != s
            }

        found = self._discrepancies()
        assert found.keys() <= self.known_discrepancies, "VerifyLedger: " + "\n".join(
            str(d) for key, d in found.items() if key not in self.known_discrepancies
        )

        for currency in CURRENCIES:
            mine = [aid for aid, a in self.model.accounts.items() if a.currency == currency]
            for name, seen in (("model", model), ("ledger", balances)):
                debits = sum(seen[aid].debits_posted for aid in mine)
                credits = sum(seen[aid].credits_posted for aid in mine)
                assert debits == credits, f"{name}: {currency} debits {debits} != credits {credits}"

    def _balances_in_step_with_expiries(self) -> dict[str, Balance]:
        """Balances read while no hold the model thinks open expired: learn
        expiries, read, and read again if one happened meanwhile."""
        for _ in range(10):
            self._learn_expiries()
            response = self.ledger.GetBalances(
                pb.GetBalancesRequest(account_ids=list(self.model.accounts)),
                timeout=RPC_TIMEOUT,
            )
            if self._learn_expiries() == 0:
                return {
                    b.account_id: Balance(
                        b.debits_posted,
                        b.credits_posted,
                        b.debits_pending,
                        b.credits_pending,
                        b.posted,
                        b.pending,
                        b.available,
                    )
                    for b in response.balances
                }
        raise AssertionError("holds kept expiring while balances were read")

    # -- messages

    def _label(self, some_id: str) -> str:
        return self.labels.get(some_id, f"?{some_id[:8]}") if some_id else "-"

    def _describe(
        self,
        batch: list[pb.Transfer],
        got: list[tuple[str, str]],
        want: list[tuple[str, str]],
    ) -> str:
        lines = ["transfer: ledger / model"]
        for t, (_, g), (_, w) in zip(batch, got, want, strict=False):
            lines.append(
                f"{'!!' if g != w else '  '} {self._label(t.id)} "
                f"{pb.TransferType.Name(t.type).removeprefix('TRANSFER_TYPE_')} "
                f"{self._label(t.debit_account_id)}->{self._label(t.credit_account_id)} "
                f"{t.amount} {t.currency or '-'} pending={self._label(t.pending_id)} "
                f"reverses={self._label(t.reverses_id)} linked={t.linked} "
                f"timeout={t.timeout_seconds} code={t.code!r}: {g} / {w}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def ledger(ledger_process: ServiceProcess) -> Iterator[ledger_pb2_grpc.LedgerServiceStub]:
    with grpc.insecure_channel(ledger_process.address) as channel:
        yield ledger_pb2_grpc.LedgerServiceStub(channel)


def test_ledger_behaves_as_its_contract_says(ledger: ledger_pb2_grpc.LedgerServiceStub) -> None:
    class MachineOnThisLedger(LedgerMachine):
        pass

    MachineOnThisLedger.ledger = ledger
    before = ledger.VerifyLedger(pb.VerifyLedgerRequest(), timeout=RPC_TIMEOUT)
    assert before.ok and not before.discrepancies, str(before)
    run_state_machine_as_test(MachineOnThisLedger, settings=MODEL_SETTINGS)


# ---------------------------------------------------------------- what the machine found
# Reduced from histories that once disagreed with the model.


def open_bank_and_wallet(ledger: ledger_pb2_grpc.LedgerServiceStub) -> tuple[str, str]:
    bank = pb.Account(id=new_id(), currency="USD", type=pb.ACCOUNT_TYPE_BANK_CLEARING)
    wallet = pb.Account(
        id=new_id(), currency="USD", type=pb.ACCOUNT_TYPE_USER_WALLET, no_overdraft=True
    )
    response = ledger.CreateAccounts(
        pb.CreateAccountsRequest(accounts=[bank, wallet]), timeout=RPC_TIMEOUT
    )
    assert [r.code for r in response.results] == [pb.AccountResult.OK] * 2
    return bank.id, wallet.id


def posted(debit: str, credit: str, amount: int) -> pb.Transfer:
    return pb.Transfer(
        id=new_id(),
        debit_account_id=debit,
        credit_account_id=credit,
        amount=amount,
        currency="USD",
        type=POSTED,
    )


def reversal_of(transfer: pb.Transfer) -> pb.Transfer:
    """The whole of ``transfer`` back (amount 0: all that is left)."""
    return pb.Transfer(id=new_id(), type=REVERSAL, reverses_id=transfer.id)


def create(ledger: ledger_pb2_grpc.LedgerServiceStub, *transfers: pb.Transfer) -> list[str]:
    response = ledger.CreateTransfers(
        pb.CreateTransfersRequest(transfers=transfers), timeout=RPC_TIMEOUT
    )
    return [pb.TransferResult.Code.Name(r.code) for r in response.results]


def test_a_transfer_reversed_in_the_batch_that_created_it_cannot_be_reversed_later(
    ledger: ledger_pb2_grpc.LedgerServiceStub,
) -> None:
    bank, wallet = open_bank_and_wallet(ledger)
    payment = posted(bank, wallet, 100)
    assert create(ledger, payment, reversal_of(payment)) == ["OK", "OK"]
    # Money on the wallet, so that only the reversal's own limit can refuse.
    assert create(ledger, posted(bank, wallet, 500)) == ["OK"]

    assert create(ledger, reversal_of(payment)) == ["ALREADY_REVERSED"]


def test_a_transfer_reversed_in_the_batch_that_created_it_cannot_be_reversed_twice_there(
    ledger: ledger_pb2_grpc.LedgerServiceStub,
) -> None:
    bank, wallet = open_bank_and_wallet(ledger)
    assert create(ledger, posted(bank, wallet, 500)) == ["OK"]
    payment = posted(bank, wallet, 100)

    results = create(ledger, payment, reversal_of(payment), reversal_of(payment))

    assert results == ["OK", "OK", "ALREADY_REVERSED"]


def test_retrying_a_partial_post_in_full_is_a_different_request(
    ledger: ledger_pb2_grpc.LedgerServiceStub,
) -> None:
    bank, wallet = open_bank_and_wallet(ledger)
    hold = posted(bank, wallet, 100)
    hold.type = PENDING
    half = pb.Transfer(id=new_id(), type=POST_PENDING, pending_id=hold.id, amount=50)
    assert create(ledger, hold) == ["OK"]
    assert create(ledger, half) == ["OK"]
    in_full = pb.Transfer()
    in_full.CopyFrom(half)
    in_full.amount = 0

    assert create(ledger, in_full) == ["EXISTS_WITH_DIFFERENT_FIELDS"]
