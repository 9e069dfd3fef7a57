"""The ledger engine as a pure state machine: a batch of transfer specs, the
accounts it touches and the transfers already stored go in; one result code
per transfer, new transfers, entries and final balances come out."""

from __future__ import annotations

import copy
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.ledger.domain import (
    INT64_MAX,
    AccountCode,
    AccountSpec,
    AccountState,
    AccountType,
    BatchResult,
    LedgerBatch,
    Side,
    Transfer,
    TransferCode,
    TransferSpec,
    TransferType,
    apply_batch,
    parse_transfer,
    validate_account,
)

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
LATER = datetime(2025, 3, 2, 12, 0, tzinfo=UTC)


def account(
    *,
    currency: str = "USD",
    credits: int = 0,
    debits: int = 0,
    no_overdraft: bool = False,
    overdraft_limit: int = 0,
    closed: bool = False,
    normal_side: Side = Side.CREDIT,
) -> AccountState:
    return AccountState(
        id=uuid.uuid4(),
        currency=currency,
        normal_side=normal_side,
        no_overdraft=no_overdraft,
        overdraft_limit=overdraft_limit,
        closed=closed,
        debits_posted=debits,
        credits_posted=credits,
    )


def wallet(credits: int = 0, **fields: object) -> AccountState:
    """A user wallet that cannot go below zero."""
    return account(credits=credits, no_overdraft=True, **fields)  # type: ignore[arg-type]


def transfer(
    debit: AccountState | str,
    credit: AccountState | str,
    amount: int = 100,
    **fields: object,
) -> TransferSpec:
    fields.setdefault("id", str(uuid.uuid4()))
    fields.setdefault("currency", "USD")
    return TransferSpec(
        debit_account_id=str(debit.id) if isinstance(debit, AccountState) else debit,
        credit_account_id=str(credit.id) if isinstance(credit, AccountState) else credit,
        amount=amount,
        **fields,  # type: ignore[arg-type]
    )


def apply(
    specs: Sequence[TransferSpec],
    *accounts: AccountState,
    existing: Iterable[Transfer] = (),
    now: datetime = NOW,
) -> BatchResult:
    return apply_batch(specs, {a.id: a for a in accounts}, {t.id: t for t in existing}, now)


def codes(result: BatchResult) -> list[TransferCode]:
    return [o.code for o in result.outcomes]


def balances(result: BatchResult, *accounts: AccountState) -> list[tuple[int, int]]:
    """(debits_posted, credits_posted) of each account after the batch."""
    final = [result.touched.get(a.id, a) for a in accounts]
    return [(a.debits_posted, a.credits_posted) for a in final]


def stored(spec: TransferSpec, created_at: datetime = NOW) -> Transfer:
    """The transfer as the store would hand it back after an earlier batch."""
    parsed = parse_transfer(spec, created_at)
    assert isinstance(parsed, Transfer)
    return parsed


# ---------------------------------------------------------------- posting


def test_posted_transfer_is_ok() -> None:
    payer, payee = wallet(1_000), account()
    assert codes(apply([transfer(payer, payee, 300)], payer, payee)) == [TransferCode.OK]


def test_posted_transfer_debits_one_account_and_credits_the_other() -> None:
    payer, payee = wallet(1_000), account()
    result = apply([transfer(payer, payee, 300)], payer, payee)
    assert balances(result, payer, payee) == [(300, 1_000), (0, 300)]


def test_posted_transfer_writes_a_debit_entry_and_a_credit_entry() -> None:
    payer, payee = wallet(1_000), account()
    spec = transfer(payer, payee, 300, code="P2P")
    result = apply([spec], payer, payee)
    assert [
        (str(e.transfer_id), e.account_id, e.side, e.amount, e.currency, e.code)
        for e in result.entries
    ] == [
        (spec.id, payer.id, Side.DEBIT, 300, "USD", "P2P"),
        (spec.id, payee.id, Side.CREDIT, 300, "USD", "P2P"),
    ]


def test_entries_record_each_account_balance_after_on_its_normal_side() -> None:
    payer = wallet(1_000)
    clearing = account(normal_side=Side.DEBIT, debits=50)
    result = apply([transfer(payer, clearing, 300)], payer, clearing)
    # The wallet (credit-normal) goes down to 700; the clearing account
    # (debit-normal) is credited, so its balance of 50 goes to -250.
    assert [e.balance_after for e in result.entries] == [700, -250]


def test_balance_after_follows_successive_transfers_in_a_batch() -> None:
    payer, payee = wallet(1_000), account()
    result = apply([transfer(payer, payee, 100), transfer(payer, payee, 250)], payer, payee)
    assert [e.balance_after for e in result.entries] == [900, 100, 650, 350]


def test_posted_transfer_is_returned_as_a_new_transfer() -> None:
    payer, payee = wallet(1_000), account()
    spec = transfer(payer, payee, 300, metadata={"order": "o-1"})
    (new,) = apply([spec], payer, payee).new_transfers
    assert (str(new.id), new.amount, new.type, new.created_at, dict(new.metadata)) == (
        spec.id,
        300,
        TransferType.POSTED,
        NOW,
        {"order": "o-1"},
    )


def test_outcome_carries_the_created_transfer() -> None:
    payer, payee = wallet(1_000), account()
    result = apply([transfer(payer, payee)], payer, payee)
    assert result.outcomes[0].transfer == result.new_transfers[0]


def test_touched_holds_only_the_accounts_the_batch_changed() -> None:
    payer, payee, bystander = wallet(1_000), account(), account()
    result = apply([transfer(payer, payee)], payer, payee, bystander)
    assert set(result.touched) == {payer.id, payee.id}


def test_type_zero_means_posted() -> None:
    payer, payee = wallet(1_000), account()
    result = apply([transfer(payer, payee, type=0)], payer, payee)
    assert result.new_transfers[0].type == TransferType.POSTED


def test_empty_batch_changes_nothing() -> None:
    result = apply([], wallet(1_000))
    assert (result.outcomes, result.new_transfers, result.entries, result.touched) == (
        [],
        [],
        [],
        {},
    )


# ---------------------------------------------------------------- idempotency


def test_retry_of_a_stored_transfer_is_exists_with_the_stored_transfer() -> None:
    payer, payee = wallet(1_000), account()
    spec = transfer(payer, payee, 300)
    earlier = stored(spec, created_at=NOW)
    (outcome,) = apply([spec], payer, payee, existing=[earlier], now=LATER).outcomes
    assert (outcome.code, outcome.transfer) == (TransferCode.EXISTS, earlier)


def test_retry_of_a_stored_transfer_moves_no_money() -> None:
    payer, payee = wallet(1_000), account()
    spec = transfer(payer, payee, 300)
    result = apply([spec], payer, payee, existing=[stored(spec)], now=LATER)
    assert (result.new_transfers, result.entries, balances(result, payer, payee)) == (
        [],
        [],
        [(0, 1_000), (0, 0)],
    )


def test_retry_within_one_batch_is_exists_with_the_first_transfer() -> None:
    payer, payee = wallet(1_000), account()
    spec = transfer(payer, payee, 300)
    result = apply([spec, spec], payer, payee)
    assert [(o.code, o.transfer) for o in result.outcomes] == [
        (TransferCode.OK, result.new_transfers[0]),
        (TransferCode.EXISTS, result.new_transfers[0]),
    ]


def test_retry_within_one_batch_moves_money_once() -> None:
    payer, payee = wallet(1_000), account()
    spec = transfer(payer, payee, 300)
    result = apply([spec, spec], payer, payee)
    assert (len(result.entries), balances(result, payer, payee)) == (2, [(300, 1_000), (0, 300)])


def test_retry_of_a_stored_transfer_succeeds_even_if_funds_are_now_short() -> None:
    payer, payee = wallet(0), account()
    spec = transfer(payer, payee, 300)
    (outcome,) = apply([spec], payer, payee, existing=[stored(spec)]).outcomes
    assert outcome.code == TransferCode.EXISTS


@pytest.mark.parametrize(
    "change",
    [
        {"amount": 301},
        {"code": "OTHER"},
        {"metadata": {"order": "o-2"}},
        {"linked": True},
        {"effective_at": LATER},
    ],
)
def test_same_id_with_different_fields_is_exists_with_different_fields(
    change: dict[str, object],
) -> None:
    payer, payee = wallet(1_000), account()
    spec = transfer(payer, payee, 300, metadata={"order": "o-1"})
    retry = replace(spec, **change)  # type: ignore[arg-type]
    outcome = apply([retry, transfer(payer, payee)], payer, payee, existing=[stored(spec)])
    assert outcome.outcomes[0].code == TransferCode.EXISTS_WITH_DIFFERENT_FIELDS


def test_same_id_with_other_accounts_is_exists_with_different_fields() -> None:
    payer, payee, other = wallet(1_000), account(), account()
    spec = transfer(payer, payee, 300)
    retry = replace(spec, credit_account_id=str(other.id))
    (outcome,) = apply([retry], payer, payee, other, existing=[stored(spec)]).outcomes
    assert outcome.code == TransferCode.EXISTS_WITH_DIFFERENT_FIELDS


def test_same_id_with_different_fields_within_one_batch_is_refused() -> None:
    payer, payee = wallet(1_000), account()
    spec = transfer(payer, payee, 300)
    result = apply([spec, replace(spec, amount=400)], payer, payee)
    assert (codes(result), balances(result, payer, payee)) == (
        [TransferCode.OK, TransferCode.EXISTS_WITH_DIFFERENT_FIELDS],
        [(300, 1_000), (0, 300)],
    )


# ---------------------------------------------------------------- funds


def test_no_overdraft_account_cannot_spend_more_than_its_balance() -> None:
    payer, payee = wallet(100), account()
    assert codes(apply([transfer(payer, payee, 101)], payer, payee)) == [
        TransferCode.INSUFFICIENT_FUNDS
    ]


def test_no_overdraft_account_can_spend_its_whole_balance() -> None:
    payer, payee = wallet(100), account()
    assert codes(apply([transfer(payer, payee, 100)], payer, payee)) == [TransferCode.OK]


def test_no_overdraft_account_cannot_spend_the_same_money_twice_in_a_batch() -> None:
    payer, payee = wallet(100), account()
    result = apply([transfer(payer, payee, 60), transfer(payer, payee, 60)], payer, payee)
    assert codes(result) == [TransferCode.OK, TransferCode.INSUFFICIENT_FUNDS]


def test_overdraft_limit_lets_a_no_overdraft_account_go_down_to_minus_the_limit() -> None:
    payer, payee = wallet(100, overdraft_limit=50), account()
    assert codes(apply([transfer(payer, payee, 150)], payer, payee)) == [TransferCode.OK]


def test_overdraft_limit_is_not_exceeded() -> None:
    payer, payee = wallet(100, overdraft_limit=50), account()
    assert codes(apply([transfer(payer, payee, 151)], payer, payee)) == [
        TransferCode.INSUFFICIENT_FUNDS
    ]


def test_pending_debits_count_against_a_no_overdraft_account() -> None:
    payer, payee = wallet(100), account()
    payer.debits_pending = 40
    assert codes(apply([transfer(payer, payee, 61)], payer, payee)) == [
        TransferCode.INSUFFICIENT_FUNDS
    ]


def test_account_without_no_overdraft_may_go_negative() -> None:
    source, payee = account(normal_side=Side.CREDIT), account()
    result = apply([transfer(source, payee, 500)], source, payee)
    assert (codes(result), result.entries[0].balance_after) == ([TransferCode.OK], -500)


def test_refused_transfer_changes_nothing() -> None:
    payer, payee = wallet(100), account()
    result = apply([transfer(payer, payee, 101)], payer, payee)
    assert (result.new_transfers, result.entries, balances(result, payer, payee)) == (
        [],
        [],
        [(0, 100), (0, 0)],
    )


def test_credit_that_would_overflow_int64_is_invalid_amount() -> None:
    payer, payee = account(), account(credits=INT64_MAX - 10)
    assert codes(apply([transfer(payer, payee, 11)], payer, payee)) == [TransferCode.INVALID_AMOUNT]


def test_debit_that_would_overflow_int64_is_invalid_amount() -> None:
    payer, payee = account(debits=INT64_MAX - 10), account()
    assert codes(apply([transfer(payer, payee, 11)], payer, payee)) == [TransferCode.INVALID_AMOUNT]


# ---------------------------------------------------------------- accounts


def test_missing_debit_account_is_account_not_found() -> None:
    payee = account()
    assert codes(apply([transfer(str(uuid.uuid4()), payee)], payee)) == [
        TransferCode.ACCOUNT_NOT_FOUND
    ]


def test_missing_credit_account_is_account_not_found() -> None:
    payer = wallet(1_000)
    assert codes(apply([transfer(payer, str(uuid.uuid4()))], payer)) == [
        TransferCode.ACCOUNT_NOT_FOUND
    ]


@pytest.mark.parametrize("closed_side", ["debit", "credit"])
def test_closed_account_is_account_closed(closed_side: str) -> None:
    payer = wallet(1_000, closed=closed_side == "debit")
    payee = account(closed=closed_side == "credit")
    assert codes(apply([transfer(payer, payee)], payer, payee)) == [TransferCode.ACCOUNT_CLOSED]


def test_transfer_currency_other_than_the_accounts_is_currency_mismatch() -> None:
    payer, payee = wallet(1_000), account()
    assert codes(apply([transfer(payer, payee, currency="EUR")], payer, payee)) == [
        TransferCode.CURRENCY_MISMATCH
    ]


def test_accounts_in_different_currencies_are_currency_mismatch() -> None:
    payer, payee = wallet(1_000), account(currency="EUR")
    assert codes(apply([transfer(payer, payee)], payer, payee)) == [TransferCode.CURRENCY_MISMATCH]


def test_transfer_to_the_same_account_is_same_account() -> None:
    payer = wallet(1_000)
    assert codes(apply([transfer(payer, payer)], payer)) == [TransferCode.SAME_ACCOUNT]


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("amount", [0, -1, INT64_MAX + 1])
def test_amount_outside_one_to_int64_max_is_invalid_amount(amount: int) -> None:
    payer, payee = account(), account()
    assert codes(apply([transfer(payer, payee, amount)], payer, payee)) == [
        TransferCode.INVALID_AMOUNT
    ]


def test_amount_of_int64_max_is_accepted() -> None:
    payer, payee = account(), account()
    assert codes(apply([transfer(payer, payee, INT64_MAX)], payer, payee)) == [TransferCode.OK]


@pytest.mark.parametrize(
    "transfer_id", ["", "not-a-uuid", "00000000-0000-0000-0000-000000000000", "1234"]
)
def test_malformed_or_nil_transfer_id_is_invalid_id(transfer_id: str) -> None:
    payer, payee = wallet(1_000), account()
    assert codes(apply([transfer(payer, payee, id=transfer_id)], payer, payee)) == [
        TransferCode.INVALID_ID
    ]


@pytest.mark.parametrize("side", ["debit", "credit"])
def test_malformed_account_id_is_invalid_id(side: str) -> None:
    payer, payee = wallet(1_000), account()
    spec = transfer(payer if side == "credit" else "x", payee if side == "debit" else "")
    assert codes(apply([spec], payer, payee)) == [TransferCode.INVALID_ID]


@pytest.mark.parametrize("currency", ["", "usd", "XXX"])
def test_unknown_currency_is_invalid_currency(currency: str) -> None:
    payer, payee = wallet(1_000), account()
    assert codes(apply([transfer(payer, payee, currency=currency)], payer, payee)) == [
        TransferCode.INVALID_CURRENCY
    ]


def test_timeout_on_a_posted_transfer_is_invalid_timeout() -> None:
    payer, payee = wallet(1_000), account()
    assert codes(apply([transfer(payer, payee, timeout_seconds=60)], payer, payee)) == [
        TransferCode.INVALID_TIMEOUT
    ]


def test_unknown_transfer_type_is_invalid_type() -> None:
    payer, payee = wallet(1_000), account()
    assert codes(apply([transfer(payer, payee, type=99)], payer, payee)) == [
        TransferCode.INVALID_TYPE
    ]


# ---------------------------------------------------------------- linked chains


def test_linked_chain_succeeds_as_a_whole() -> None:
    a, b, c = wallet(1_000), wallet(0), account()
    chain = [transfer(a, b, 300, linked=True), transfer(b, c, 200, linked=True), transfer(a, c, 1)]
    result = apply(chain, a, b, c)
    assert (codes(result), len(result.entries)) == ([TransferCode.OK] * 3, 6)


def test_failing_member_keeps_its_code_and_the_rest_of_its_chain_fails_with_it() -> None:
    a, b, c = wallet(1_000), wallet(0), account()
    chain = [
        transfer(a, b, 300, linked=True),
        transfer(b, c, 500, linked=True),  # b holds only 300
        transfer(a, c, 1),
    ]
    assert codes(apply(chain, a, b, c)) == [
        TransferCode.LINKED_EVENT_FAILED,
        TransferCode.INSUFFICIENT_FUNDS,
        TransferCode.LINKED_EVENT_FAILED,
    ]


def test_failed_chain_moves_no_money() -> None:
    a, b, c = wallet(1_000), wallet(0), account()
    chain = [transfer(a, b, 300, linked=True), transfer(b, c, 500)]
    result = apply(chain, a, b, c)
    assert balances(result, a, b, c) == [(0, 1_000), (0, 0), (0, 0)]


def test_failed_chain_writes_no_entries_and_no_transfers() -> None:
    a, b, c = wallet(1_000), wallet(0), account()
    chain = [transfer(a, b, 300, linked=True), transfer(b, c, 500)]
    result = apply(chain, a, b, c)
    assert (result.entries, result.new_transfers) == ([], [])


def test_failed_chain_outcomes_carry_no_transfer() -> None:
    a, b, c = wallet(1_000), wallet(0), account()
    chain = [transfer(a, b, 300, linked=True), transfer(b, c, 500)]
    assert [o.transfer for o in apply(chain, a, b, c).outcomes] == [None, None]


def test_transfer_after_a_failed_chain_is_unaffected() -> None:
    a, b, c = wallet(1_000), wallet(0), account()
    batch = [transfer(a, b, 300, linked=True), transfer(b, c, 500), transfer(a, c, 50)]
    result = apply(batch, a, b, c)
    assert (codes(result)[2], balances(result, a, c)) == (
        TransferCode.OK,
        [(50, 1_000), (0, 50)],
    )


def test_transfer_before_a_failed_chain_keeps_its_effect() -> None:
    a, b, c = wallet(1_000), wallet(0), account()
    batch = [transfer(a, c, 50), transfer(a, b, 300, linked=True), transfer(b, c, 500)]
    result = apply(batch, a, b, c)
    assert (codes(result)[0], balances(result, a, b, c), len(result.entries)) == (
        TransferCode.OK,
        [(50, 1_000), (0, 0), (0, 50)],
        2,
    )


def test_chain_after_a_failed_chain_stands_on_its_own() -> None:
    a, b, c = wallet(1_000), wallet(0), account()
    batch = [
        transfer(a, b, 300, linked=True),
        transfer(b, c, 500),
        transfer(a, b, 100, linked=True),
        transfer(b, c, 100),
    ]
    assert codes(apply(batch, a, b, c)) == [
        TransferCode.LINKED_EVENT_FAILED,
        TransferCode.INSUFFICIENT_FUNDS,
        TransferCode.OK,
        TransferCode.OK,
    ]


def test_last_transfer_marked_linked_is_linked_event_chain_open() -> None:
    a, b = wallet(1_000), account()
    batch = [transfer(a, b, 100, linked=True), transfer(a, b, 100, linked=True)]
    assert codes(apply(batch, a, b)) == [
        TransferCode.LINKED_EVENT_FAILED,
        TransferCode.LINKED_EVENT_CHAIN_OPEN,
    ]


def test_open_chain_moves_no_money() -> None:
    a, b = wallet(1_000), account()
    batch = [transfer(a, b, 100, linked=True), transfer(a, b, 100, linked=True)]
    result = apply(batch, a, b)
    assert (result.entries, balances(result, a, b)) == ([], [(0, 1_000), (0, 0)])


def test_lone_linked_transfer_is_linked_event_chain_open() -> None:
    a, b = wallet(1_000), account()
    assert codes(apply([transfer(a, b, linked=True)], a, b)) == [
        TransferCode.LINKED_EVENT_CHAIN_OPEN
    ]


def test_failed_chain_undoes_a_retry_within_it_but_not_the_original() -> None:
    a, b = wallet(1_000), account()
    first = transfer(a, b, 100, linked=True)
    batch = [first, transfer(a, b, 1), first, transfer(a, b, 5_000)]
    result = apply(batch, a, b)
    assert (codes(result), balances(result, a, b), len(result.new_transfers)) == (
        [
            TransferCode.OK,
            TransferCode.OK,
            TransferCode.LINKED_EVENT_FAILED,
            TransferCode.INSUFFICIENT_FUNDS,
        ],
        [(101, 1_000), (0, 101)],
        2,
    )


def test_one_failing_transfer_never_fails_unrelated_ones() -> None:
    a, b = wallet(1_000), account()
    batch = [transfer(a, b, 100), transfer(a, b, 0), transfer(a, b, 200)]
    result = apply(batch, a, b)
    assert (codes(result), balances(result, a, b)) == (
        [TransferCode.OK, TransferCode.INVALID_AMOUNT, TransferCode.OK],
        [(300, 1_000), (0, 300)],
    )


# ---------------------------------------------------------------- inputs


def test_accounts_given_to_the_engine_are_not_changed() -> None:
    payer, payee = wallet(1_000), account()
    before = copy.deepcopy([payer, payee])
    apply([transfer(payer, payee, 300)], payer, payee)
    assert [payer, payee] == before


# ---------------------------------------------------------------- properties

ACCOUNT_POOL = 5
ID_POOL = [str(uuid.UUID(int=i + 1)) for i in range(6)]


@st.composite
def ledgers(draw: st.DrawFn) -> dict[uuid.UUID, AccountState]:
    """A few accounts in two currencies, each currency balanced to start with."""
    states: list[AccountState] = []
    for currency in ("USD", "EUR"):
        members = []
        for _ in range(draw(st.integers(2, ACCOUNT_POOL))):
            no_overdraft = draw(st.booleans())
            limit = draw(st.sampled_from([0, 0, 100])) if no_overdraft else 0
            credits = draw(st.integers(0, 2_000))
            debits = draw(st.integers(0, credits + limit))
            members.append(
                account(
                    currency=currency,
                    credits=credits,
                    debits=debits,
                    no_overdraft=no_overdraft,
                    overdraft_limit=limit,
                    closed=draw(st.integers(0, 9)) == 0,
                    normal_side=draw(st.sampled_from(Side)),
                )
            )
        # An outside-world account that may go negative closes the books.
        net = sum(a.credits_posted - a.debits_posted for a in members)
        members.append(account(currency=currency, debits=max(net, 0), credits=max(-net, 0)))
        states.extend(members)
    return {a.id: a for a in states}


@st.composite
def batches(draw: st.DrawFn, accounts: Mapping[uuid.UUID, AccountState]) -> list[TransferSpec]:
    account_ids = [str(a) for a in accounts] + [str(uuid.uuid4())]
    specs = []
    for _ in range(draw(st.integers(0, 25))):
        specs.append(
            TransferSpec(
                id=draw(st.sampled_from([*ID_POOL, "", "junk"])),
                debit_account_id=draw(st.sampled_from(account_ids)),
                credit_account_id=draw(st.sampled_from(account_ids)),
                amount=draw(st.one_of(st.integers(1, 1_500), st.integers(-5, 0))),
                currency=draw(st.sampled_from(["USD", "USD", "EUR", "XXX"])),
                type=draw(st.sampled_from([TransferType.POSTED] * 4 + [TransferType.PENDING])),
                linked=draw(st.booleans()),
                code=draw(st.sampled_from(["", "FEE"])),
            )
        )
    return specs


History = tuple[dict[uuid.UUID, AccountState], list[TransferSpec], dict[uuid.UUID, Transfer]]


@st.composite
def histories(draw: st.DrawFn) -> History:
    """Accounts, a batch over them, and transfers stored by earlier batches
    (some of which the batch retries, with the same fields or not)."""
    accounts = draw(ledgers())
    earlier = [parse_transfer(s, NOW) for s in draw(batches(accounts))[:4]]
    existing = {t.id: t for t in earlier if isinstance(t, Transfer)}
    return accounts, draw(batches(accounts)), existing


def final_states(
    accounts: Mapping[uuid.UUID, AccountState], result: BatchResult
) -> list[AccountState]:
    return [result.touched.get(aid, state) for aid, state in accounts.items()]


def chains(specs: Sequence[TransferSpec]) -> list[range]:
    """Index ranges of the linked chains: linked members and the one closing them."""
    found, start = [], None
    for i, spec in enumerate(specs):
        if spec.linked and start is None:
            start = i
        if not spec.linked and start is not None:
            found.append(range(start, i + 1))
            start = None
    if start is not None:
        found.append(range(start, len(specs)))
    return found


@settings(max_examples=150)
@given(histories())
def test_random_batches_keep_every_currency_balanced(
    history: History,
) -> None:
    accounts, specs, existing = history
    result = apply_batch(specs, accounts, existing, NOW)
    debits: dict[str, int] = defaultdict(int)
    credits: dict[str, int] = defaultdict(int)
    for state in final_states(accounts, result):
        debits[state.currency] += state.debits_posted
        credits[state.currency] += state.credits_posted
    assert debits == credits


@settings(max_examples=150)
@given(histories())
def test_random_batches_never_overdraw_a_no_overdraft_account(
    history: History,
) -> None:
    accounts, specs, existing = history
    result = apply_batch(specs, accounts, existing, NOW)
    overdrawn = [
        s.id
        for s in final_states(accounts, result)
        if s.no_overdraft
        and s.debits_posted + s.debits_pending > s.credits_posted + s.overdraft_limit
    ]
    assert overdrawn == []


@settings(max_examples=150)
@given(histories())
def test_random_batches_do_not_mutate_their_inputs(
    history: History,
) -> None:
    accounts, specs, existing = history
    before = copy.deepcopy((accounts, specs, existing))
    apply_batch(specs, accounts, existing, NOW)
    assert (accounts, specs, existing) == before


@settings(max_examples=150)
@given(histories())
def test_random_batches_change_balances_by_exactly_their_entries(
    history: History,
) -> None:
    accounts, specs, existing = history
    result = apply_batch(specs, accounts, existing, NOW)
    moved: dict[uuid.UUID, list[int]] = defaultdict(lambda: [0, 0])
    for entry in result.entries:
        moved[entry.account_id][entry.side - 1] += entry.amount
    changed = {
        s.id: [
            s.debits_posted - accounts[s.id].debits_posted,
            s.credits_posted - accounts[s.id].credits_posted,
        ]
        for s in final_states(accounts, result)
        if s.balances()[:2] != accounts[s.id].balances()[:2]
    }
    assert changed == {aid: m for aid, m in moved.items() if m != [0, 0]}


@settings(max_examples=150)
@given(histories())
def test_random_batches_write_two_entries_per_new_transfer(
    history: History,
) -> None:
    accounts, specs, existing = history
    result = apply_batch(specs, accounts, existing, NOW)
    # Holds write no entries: only posted movements do.
    ok = [
        o.transfer.id
        for o in result.outcomes
        if o.code == TransferCode.OK and o.transfer and o.transfer.type == TransferType.POSTED
    ]
    assert (sorted(ok), sorted(e.transfer_id for e in result.entries)) == (
        sorted(t.id for t in result.new_transfers if t.type == TransferType.POSTED),
        sorted(ok * 2),
    )


@settings(max_examples=150)
@given(histories())
def test_random_batches_apply_each_chain_all_or_nothing(
    history: History,
) -> None:
    accounts, specs, existing = history
    result = apply_batch(specs, accounts, existing, NOW)
    mixed = [
        chain for chain in chains(specs) if len({result.outcomes[i].code.ok for i in chain}) > 1
    ]
    assert mixed == []


def pipelined(
    accounts: Mapping[uuid.UUID, AccountState],
    existing: Mapping[uuid.UUID, Transfer],
    requests: Sequence[Sequence[TransferSpec]],
    per_batch: int,
) -> tuple[list[TransferCode], dict[uuid.UUID, AccountState]]:
    """Applies requests as the pipelined writer does: each batch starts from
    what is committed (everything before the batch just before it) and from
    that batch's overlay. Returns the codes and the final balances."""
    committed_accounts, committed_transfers = dict(accounts), dict(existing)
    before: BatchResult | None = None
    found: list[TransferCode] = []
    for start in range(0, len(requests), per_batch):
        overlay_accounts = before.accounts_after if before else {}
        overlay_transfers = before.transfers_after if before else {}
        batch = LedgerBatch(
            {**committed_accounts, **overlay_accounts},
            {**committed_transfers, **overlay_transfers},
            NOW,
        )
        for request in requests[start : start + per_batch]:
            found.extend(o.code for o in batch.apply(request))
        if before is not None:
            committed_accounts.update(before.touched)
            committed_transfers.update(before.transfers_after)
        before = batch.result()
    if before is not None:
        committed_accounts.update(before.touched)
    return found, committed_accounts


def test_a_batch_started_from_the_overlay_sees_what_the_batch_before_spent_and_created() -> None:
    payer, payee = wallet(credits=100), wallet()
    spend = transfer(payer, payee, 60)
    requests = [[spend], [transfer(payer, payee, 60)], [spend]]

    found, final = pipelined({a.id: a for a in (payer, payee)}, {}, requests, per_batch=1)

    assert found == [TransferCode.OK, TransferCode.INSUFFICIENT_FUNDS, TransferCode.EXISTS]
    assert [final[a.id].posted for a in (payer, payee)] == [40, 60]


@settings(max_examples=150)
@given(histories(), st.integers(1, 4), st.integers(1, 3))
def test_batches_started_from_the_overlay_of_the_batch_before_agree_with_one_batch(
    history: History, per_request: int, per_batch: int
) -> None:
    accounts, specs, existing = history
    requests = [specs[i : i + per_request] for i in range(0, len(specs), per_request)]
    serial = LedgerBatch(accounts, existing, NOW)
    expected = [o.code for request in requests for o in serial.apply(request)]
    final = {**accounts, **serial.result().touched}

    assert pipelined(accounts, existing, requests, per_batch) == (expected, final)


def test_the_nil_uuid_is_not_an_account_id() -> None:
    spec = AccountSpec(id=str(uuid.UUID(int=0)), currency="USD", type=AccountType.USER_WALLET)

    assert validate_account(spec) == AccountCode.INVALID_ID
