"""Currency exchange: quotes from the configured rate table, and their
execution as a linked pair of ledger transfers through the platform's
per-currency ``FX_POOL`` accounts.

Rounding, stated once: the quoted rate is the table's cross rate less the
spread, rounded DOWN to ``RATE_SIGNIFICANT_DIGITS`` significant digits, and
``to_amount = floor(from_amount * rate)`` in minor units of the target
currency, computed exactly with ``Decimal``. The rate in the reply is that
rounded rate, so anyone can recompute the amount; every rounding goes
against the user by less than one minor unit, never for them, and what the
user gives up stays in the FX pools, so every minor unit is accounted for.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from decimal import Decimal

import asyncpg
import structlog

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
from services.common.fx_rates import (
    configured_table,
    converted_amount,
    format_rate,
    quoted_rate,
)
from services.common.ids import parse_uuid
from services.common.money import (
    INT64_MAX,
    require_positive,
)
from services.wallet import handlers, history, leases, store
from services.wallet.domain import (
    NAMESPACE,
    WalletStatus,
    ensure_can_send,
    validate_idempotency_key,
)
from services.wallet.handlers import ensure_wallet_account
from services.wallet.peers import Peers

log = structlog.get_logger("moneta.wallet.fx")

_OK_CODES = (ledger_pb2.TransferResult.OK, ledger_pb2.TransferResult.EXISTS)


@dataclass(frozen=True)
class QuoteTerms:
    rate: Decimal
    from_currency: str
    to_currency: str
    from_amount: int
    to_amount: int


def quote_terms(
    table: dict[str, Decimal], from_currency: str, to_currency: str, from_amount: int,
    spread_bps: int,
) -> QuoteTerms:  # fmt: skip
    """What exchanging ``from_amount`` (minor units) gives, at the quoted rate."""
    require_positive(from_amount)
    rate = quoted_rate(table, from_currency, to_currency, spread_bps)
    to_amount = converted_amount(from_amount, from_currency, to_currency, rate)
    if to_amount <= 0:
        raise InvalidArgument(
            f"the amount buys less than one minor unit of {to_currency}",
            reason="AMOUNT_TOO_SMALL",
        )
    if to_amount > INT64_MAX:
        raise InvalidArgument("the converted amount is out of range", reason="AMOUNT_OUT_OF_RANGE")
    return QuoteTerms(rate, from_currency, to_currency, from_amount, to_amount)


def fx_pool_account_id(currency: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"fx-pool:{currency}")


def second_leg_id(exchange_id: uuid.UUID) -> uuid.UUID:
    """The chain's second transfer; the first has the exchange's own id."""
    return uuid.uuid5(NAMESPACE, f"exchange-in:{exchange_id}")


def exchange_id_for(user_id: uuid.UUID, idempotency_key: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"exchange:{user_id}:{idempotency_key}")


# ---------------------------------------------------------------- quotes

_QUOTE_COLUMNS = """
    quote_id, user_id, from_currency, to_currency, from_amount, to_amount, rate, expires_at,
    created_at, exchange_id
"""


async def create_quote(
    pool: asyncpg.Pool,
    *,
    rates: str,
    spread_bps: int,
    ttl_seconds: int,
    user_id: str,
    from_currency: str,
    to_currency: str,
    amount: int,
) -> asyncpg.Record:
    """A quote for the user, stored, valid for ``ttl_seconds``."""
    uid = parse_uuid(user_id, "user_id")
    terms = quote_terms(configured_table(rates), from_currency, to_currency, amount, spread_bps)
    async with pool.acquire() as conn:
        if await store.fetch_wallet(conn, user_id=uid) is None:
            raise NotFound("no such wallet", reason="WALLET_NOT_FOUND")
        row = await conn.fetchrow(
            f"""
            INSERT INTO fx_quotes (quote_id, user_id, from_currency, to_currency, from_amount,
                                   to_amount, rate, expires_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8))
            RETURNING {_QUOTE_COLUMNS}
            """,
            uuid.uuid4(),
            uid,
            terms.from_currency,
            terms.to_currency,
            terms.from_amount,
            terms.to_amount,
            terms.rate,
            float(ttl_seconds),
        )
    assert row is not None
    log.info("fx_quoted", quote_id=str(row["quote_id"]), rate=format_rate(terms.rate),
             from_amount=terms.from_amount, to_amount=terms.to_amount)  # fmt: skip
    return row


# ---------------------------------------------------------------- executing

_EXCHANGE_COLUMNS = """
    exchange_id, user_id, idempotency_key, quote_id, status, failure_reason, failure_message,
    balances, created_at, updated_at
"""


@dataclass(frozen=True)
class ExchangeOutcome:
    exchange_id: uuid.UUID
    status: str
    # [{currency, available, pending, posted}] for the two currencies
    balances: list[dict[str, int | str]]


async def _fetch_exchange(conn: DbConn, exchange_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {_EXCHANGE_COLUMNS} FROM fx_exchanges WHERE exchange_id = $1", exchange_id
    )


async def _take_lease(conn: DbConn, exchange_id: uuid.UUID) -> leases.Lease | None:
    """Leases an exchange still PROCESSING to this attempt; None while
    another attempt holds it."""
    seconds, started = handlers.LEASE_SECONDS, leases.clock()
    until = await conn.fetchval(
        """
        UPDATE fx_exchanges SET lease_until = clock_timestamp() + make_interval(secs => $2), updated_at = now()
         WHERE exchange_id = $1 AND status = 'PROCESSING'
           AND (lease_until IS NULL OR lease_until < now())
        RETURNING lease_until
        """,
        exchange_id,
        seconds,
    )
    return None if until is None else leases.Lease(until, started, seconds)


async def _release_lease(conn: DbConn, exchange_id: uuid.UUID, lease: leases.Lease) -> None:
    """Gives the lease up, if it is still this attempt's."""
    await conn.execute(
        "UPDATE fx_exchanges SET lease_until = NULL WHERE exchange_id = $1 AND lease_until = $2",
        exchange_id,
        lease.until,
    )


async def _fail(
    conn: DbConn,
    exchange_id: uuid.UUID,
    reason: str,
    message: str,
    *,
    lease: leases.Lease,
) -> bool:
    """Records the exchange's refusal under the ``lease`` of the attempt
    recording it; False when it is finished already or no longer leased to it."""
    status = await conn.execute(
        """
        UPDATE fx_exchanges SET status = 'FAILED', failure_reason = $2, failure_message = $3,
                                lease_until = NULL, updated_at = now()
         WHERE exchange_id = $1 AND status = 'PROCESSING'
           AND lease_until = $4
        """,
        exchange_id,
        reason,
        message,
        lease.until,
    )
    return bool(status == "UPDATE 1")


def _replay(exchange: asyncpg.Record | None) -> ExchangeOutcome | None:
    if exchange is None or exchange["status"] == "PROCESSING":
        return None
    if exchange["status"] == "FAILED":
        raise FailedPrecondition(exchange["failure_message"], reason=exchange["failure_reason"])
    return ExchangeOutcome(exchange["exchange_id"], "COMPLETED", list(exchange["balances"]))


async def _claim_quote(
    conn: DbConn, user_id: uuid.UUID, quote_id: uuid.UUID, exchange_id: uuid.UUID, key: str
) -> leases.Lease | None:
    """Records the execution of the quote under the key, in one transaction,
    leased to this attempt from the moment it exists (the lease); None when
    it was recorded already (a retry). Refuses a quote that is not the
    user's, has expired, or is executed (or being executed) by another
    request."""
    async with conn.transaction():
        # Locked: concurrent executions of one quote take turns here.
        quote = await conn.fetchrow(
            f"SELECT {_QUOTE_COLUMNS}, expires_at <= now() AS expired FROM fx_quotes"
            " WHERE quote_id = $1 FOR UPDATE",
            quote_id,
        )
        existing = await _fetch_exchange(conn, exchange_id)
        if existing is not None:
            if existing["quote_id"] != quote_id:
                raise AlreadyExists(
                    "this idempotency key was used for a different request",
                    reason="IDEMPOTENCY_KEY_REUSED",
                )
            return None
        if quote is None or quote["user_id"] != user_id:
            raise NotFound("no such quote", reason="QUOTE_NOT_FOUND")
        if quote["exchange_id"] is not None:
            holder = await _fetch_exchange(conn, quote["exchange_id"])
            assert holder is not None
            if holder["status"] == "COMPLETED":
                raise AlreadyExists(
                    "this quote has been executed already", reason="QUOTE_ALREADY_USED"
                )
            if holder["status"] == "PROCESSING":
                raise Aborted(
                    "this quote is being executed by another request", reason="QUOTE_IN_USE"
                )
        if quote["expired"]:
            raise FailedPrecondition(
                "the quote has expired; ask for a new one",
                reason="QUOTE_EXPIRED",
                details={"expired_at": quote["expires_at"].isoformat()},
            )
        seconds, started = handlers.LEASE_SECONDS, leases.clock()
        until = await conn.fetchval(
            """
            INSERT INTO fx_exchanges (exchange_id, user_id, idempotency_key, quote_id, status,
                                      lease_until)
            VALUES ($1, $2, $3, $4, 'PROCESSING', clock_timestamp() + make_interval(secs => $5))
            RETURNING lease_until
            """,
            exchange_id,
            user_id,
            key,
            quote_id,
            seconds,
        )
        await conn.execute(
            "UPDATE fx_quotes SET exchange_id = $2 WHERE quote_id = $1", quote_id, exchange_id
        )
    return leases.Lease(until, started, seconds)


async def execute_exchange(
    pool: asyncpg.Pool, peers: Peers, *, user_id: str, quote_id: str, idempotency_key: str
) -> ExchangeOutcome:
    """Executes the user's quote once, at its rate, atomically."""
    uid = parse_uuid(user_id, "user_id")
    qid = parse_uuid(quote_id, "quote_id")
    key = validate_idempotency_key(idempotency_key)
    exchange_id = exchange_id_for(uid, key)
    async with pool.acquire() as conn:
        wallet = await store.fetch_wallet(conn, user_id=uid)
        if wallet is None:
            raise NotFound("no such wallet", reason="WALLET_NOT_FOUND")
        # Leased as it is recorded: no other attempt (nor the reconciler)
        # can take a fresh execution over before this one has looked.
        claimed = await _claim_quote(conn, uid, qid, exchange_id, key)
        exchange = await _fetch_exchange(conn, exchange_id)
        quote = await conn.fetchrow(
            f"SELECT {_QUOTE_COLUMNS} FROM fx_quotes WHERE quote_id = $1", qid
        )
    assert exchange is not None and quote is not None
    replayed = _replay(exchange)
    if replayed is not None:
        return replayed
    fresh, lease = claimed is not None, claimed
    if lease is None:
        async with pool.acquire() as conn:
            lease = await _take_lease(conn, exchange_id)
            if lease is None:
                replayed = _replay(await _fetch_exchange(conn, exchange_id))
                if replayed is not None:
                    return replayed
                raise Aborted(
                    "the same request is still in progress; retry shortly",
                    reason="REQUEST_IN_PROGRESS",
                )
    step = _Exchange(pool, peers, exchange_id, wallet, quote)
    try:
        with leases.holding(lease):
            return await step.drive(resumed=not fresh)
    except AttemptExpired:
        raise  # the lease may be another attempt's by now: nothing to record or release
    except BaseException as exc:
        async with pool.acquire() as conn:
            if isinstance(exc, FailedPrecondition) and not step.moved:
                # Refused before any money moved: final for this key; the
                # quote may still be executed by another request.
                if not await _fail(conn, exchange_id, exc.reason, exc.message, lease=lease):
                    # This attempt outlived its lease: another one holds the
                    # exchange (or finished it), and its outcome is the exchange's.
                    raise AttemptExpired() from exc
            else:
                await _release_lease(conn, exchange_id, lease)
        raise


class _Exchange:
    """One attempt at executing a quote, resumable: the ledger says whether
    the chain was applied (both transfers or neither)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        peers: Peers,
        exchange_id: uuid.UUID,
        wallet: asyncpg.Record,
        quote: asyncpg.Record,
    ) -> None:
        self.pool, self.peers, self.exchange_id = pool, peers, exchange_id
        self.wallet, self.quote = wallet, quote
        self.moved = False

    async def drive(self, *, resumed: bool) -> ExchangeOutcome:
        self.moved = resumed and await self.peers.lookup_transfer(self.exchange_id) is not None
        if not self.moved:
            await self._move_money()
            self.moved = True
        return await complete_exchange(
            self.pool, self.peers, self.exchange_id, self.wallet, self.quote
        )

    async def _move_money(self) -> None:
        q = self.quote
        ensure_can_send(WalletStatus(self.wallet["status"]))
        async with self.pool.acquire() as conn:
            accounts = await store.wallet_accounts(conn, self.wallet["wallet_id"])
        source = accounts.get(q["from_currency"])
        if source is None:
            raise FailedPrecondition(
                f"the wallet holds no {q['from_currency']}",
                reason="INSUFFICIENT_FUNDS",
                details={"currency": q["from_currency"], "available": 0},
            )
        target = await ensure_wallet_account(self.pool, self.peers, self.wallet, q["to_currency"])
        await self.peers.create_accounts(
            [_fx_pool(q["from_currency"]), _fx_pool(q["to_currency"])], keep_existing=True
        )
        metadata = {
            "kind": "EXCHANGE",
            "quote_id": str(q["quote_id"]),
            "rate": format_rate(q["rate"]),
        }
        results = await self.peers.create_transfers(
            [
                ledger_pb2.Transfer(
                    id=str(self.exchange_id),
                    debit_account_id=str(source),
                    credit_account_id=str(fx_pool_account_id(q["from_currency"])),
                    amount=q["from_amount"],
                    currency=q["from_currency"],
                    code="EXCHANGE",
                    metadata=metadata,
                    linked=True,
                ),
                ledger_pb2.Transfer(
                    id=str(second_leg_id(self.exchange_id)),
                    debit_account_id=str(fx_pool_account_id(q["to_currency"])),
                    credit_account_id=str(target),
                    amount=q["to_amount"],
                    currency=q["to_currency"],
                    code="EXCHANGE",
                    metadata=metadata,
                ),
            ]
        )
        applied = [r.code in _OK_CODES for r in results]
        if all(applied):
            return
        if any(applied):
            # A linked chain is all or nothing; this would be a ledger bug.
            raise Internal("the ledger applied half of an exchange", reason="LEDGER_CHAIN_BROKEN")
        codes = {r.code for r in results} - {ledger_pb2.TransferResult.LINKED_EVENT_FAILED}
        if ledger_pb2.TransferResult.INSUFFICIENT_FUNDS in codes:
            raise FailedPrecondition(
                "insufficient funds",
                reason="INSUFFICIENT_FUNDS",
                details={"currency": q["from_currency"]},
            )
        names = ",".join(sorted(ledger_pb2.TransferResult.Code.Name(c) for c in codes))
        raise FailedPrecondition(
            f"the ledger refused the exchange: {names}", reason="LEDGER_REFUSED"
        )


def _fx_pool(currency: str) -> ledger_pb2.Account:
    # The platform's position in the currency: it may go negative (the
    # platform owes what it has paid out), so no overdraft limit.
    return ledger_pb2.Account(
        id=str(fx_pool_account_id(currency)),
        currency=currency,
        type=ledger_pb2.ACCOUNT_TYPE_FX_POOL,
        normal_side=ledger_pb2.NORMAL_SIDE_CREDIT,
        metadata={"pool": "fx"},
    )


async def complete_exchange(
    pool: asyncpg.Pool,
    peers: Peers,
    exchange_id: uuid.UUID,
    wallet: asyncpg.Record,
    quote: asyncpg.Record,
) -> ExchangeOutcome:
    """Records an exchange whose money moved: two history rows (the amount
    given and the amount received) and the outcome, in one transaction."""
    from_currency, to_currency = quote["from_currency"], quote["to_currency"]
    async with pool.acquire() as conn:
        accounts = await store.wallet_accounts(conn, wallet["wallet_id"])
    source, target = accounts[from_currency], accounts[to_currency]
    by_account = await peers.balances([source, target])
    balances: list[dict[str, int | str]] = [
        {
            "currency": currency,
            "available": int(b.available),
            "pending": int(b.pending),
            "posted": int(b.posted),
        }
        for currency, b in (
            (from_currency, by_account[str(source)]),
            (to_currency, by_account[str(target)]),
        )
    ]
    rate = format_rate(quote["rate"])
    description = f"Exchange {from_currency} to {to_currency} at {rate}"
    async with pool.acquire() as conn, conn.transaction():
        await history.record(
            conn,
            history.Movement(
                wallet_id=wallet["wallet_id"], ledger_transfer_id=exchange_id, type="EXCHANGE",
                amount=-quote["from_amount"], currency=from_currency, status="COMPLETED",
                counterparty="Currency exchange", description=description,
                reference_id=str(quote["quote_id"]), balance_after=by_account[str(source)].posted,
            ),
            history.Movement(
                wallet_id=wallet["wallet_id"], ledger_transfer_id=second_leg_id(exchange_id),
                type="EXCHANGE", amount=quote["to_amount"], currency=to_currency,
                status="COMPLETED", counterparty="Currency exchange", description=description,
                reference_id=str(quote["quote_id"]), balance_after=by_account[str(target)].posted,
            ),
        )  # fmt: skip
        await conn.execute(
            """
            UPDATE fx_exchanges SET status = 'COMPLETED', balances = $2, lease_until = NULL,
                                    updated_at = now()
             WHERE exchange_id = $1 AND status = 'PROCESSING'
            """,
            exchange_id,
            balances,
        )
        stored = await _fetch_exchange(conn, exchange_id)
    assert stored is not None
    log.info("fx_executed", exchange_id=str(exchange_id), quote_id=str(quote["quote_id"]))
    await handlers.repay_debts_after_incoming(pool, peers, wallet["wallet_id"], to_currency)
    # A concurrent completion (the reconciler) may have answered first: its
    # balances are the answer.
    return ExchangeOutcome(exchange_id, "COMPLETED", list(stored["balances"] or balances))


# ---------------------------------------------------------------- reconciling


async def reconcile_stale_exchanges(
    pool: asyncpg.Pool, peers: Peers, older_than: float = 60.0
) -> int:
    """Settles executions no attempt finished: completes those whose chain
    was applied, fails the others (freeing their quote)."""
    async with pool.acquire() as conn:
        stale = await conn.fetch(
            """
            SELECT exchange_id FROM fx_exchanges
             WHERE status = 'PROCESSING' AND updated_at < now() - make_interval(secs => $1)
               AND (lease_until IS NULL OR lease_until < now())
             ORDER BY updated_at LIMIT 100
            """,
            older_than,
        )
    settled = 0
    for row in stale:
        exchange_id = row["exchange_id"]
        async with pool.acquire() as conn:
            lease = await _take_lease(conn, exchange_id)
            if lease is None:
                continue
            exchange = await _fetch_exchange(conn, exchange_id)
            assert exchange is not None
            wallet = await store.fetch_wallet(conn, user_id=exchange["user_id"])
            quote = await conn.fetchrow(
                f"SELECT {_QUOTE_COLUMNS} FROM fx_quotes WHERE quote_id = $1", exchange["quote_id"]
            )
            assert wallet is not None and quote is not None
        try:
            if await peers.lookup_transfer(exchange_id) is not None:
                await complete_exchange(pool, peers, exchange_id, wallet, quote)
                outcome = "COMPLETED"
            else:
                async with pool.acquire() as conn:
                    failed = await _fail(
                        conn, exchange_id, "EXCHANGE_ABANDONED",
                        "the exchange did not complete; nothing moved", lease=lease,
                    )  # fmt: skip
                if not failed:
                    continue  # a retry took over while this stalled: its outcome stands
                outcome = "FAILED"
            log.warning("exchange_reconciled", exchange_id=str(exchange_id), outcome=outcome)
            settled += 1
        except MonetaError as exc:
            log.warning(
                "exchange_reconcile_failed", exchange_id=str(exchange_id), reason=exc.reason
            )
            async with pool.acquire() as conn:
                await _release_lease(conn, exchange_id, lease)
    return settled


async def reconcile_forever(pool: asyncpg.Pool, peers: Peers, every_seconds: float = 10.0) -> None:
    while True:
        try:
            await reconcile_stale_exchanges(pool, peers)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("exchange_reconcile_failed", error=str(exc))
        await asyncio.sleep(every_seconds)
