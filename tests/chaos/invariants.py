"""What must hold after any fault, checked against the databases, the
ledger's own verifier, the gateway's answers and the load's journal:

- per currency debits = credits, and every account's stored sums = its
  entries (VerifyLedger);
- every wallet balance = the sum of its ledger entries = what the gateway
  answers = what the journal says the clients were told moved;
- every P2P answer was right: a payment answered COMPLETED is in the ledger
  once, with the balance it reported; a refused one moved nothing;
- the bookings accepted, less their refunds, = the booking debits less the
  refunds in the ledger; every booking event charged once or refused;
- every event published was applied once or parked for a business reason:
  none lost, none applied twice (counted at both ends);
- no budget overspent: each budget's spend = the ledger's, within its total;
- no reservation held past its ttl, no hold pending past its expiry, no
  deposit or withdrawal hold left open after its webhook was answered, no payment left
  PROCESSING.

``check`` returns the problems found (empty when all hold) and the figures.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import asyncpg

from services.common.consumer import REASON_HEADER, queue_names
from services.wallet.bookings import clearing_account_id
from services.wallet.config import CONSUMERS
from services.wallet.domain import payment_id, wallet_account_id, wallet_id_for
from tests.chaos.load import (
    CURRENCY,
    Client,
    Journal,
    MixedLoad,
    Operation,
    Person,
    Population,
    minor,
    replay,
)
from tests.chaos.mesh import CONSUMER_RETRY_DELAYS, Mesh, verify_ledger

POSTED, PENDING = 1, 2
RESERVED = 1
# Past its expiry by more than this, a hold or reservation counts as stuck
# (the sweepers run every second or so).
SWEEP_SLACK_SECONDS = 5
CONSUMER_OF = {"booking": "booking_created", "cancel": "booking_cancelled",
               "onboard": "user_created"}  # fmt: skip


def account_of(user_id: str) -> uuid.UUID:
    return wallet_account_id(wallet_id_for(uuid.UUID(user_id)), CURRENCY)


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def problem(self, text: str) -> None:
        self.problems.append(text)


@dataclass
class Databases:
    ledger: asyncpg.Connection
    wallet: asyncpg.Connection
    budget: asyncpg.Connection

    @classmethod
    async def open(cls, mesh: Mesh) -> Databases:
        return cls(
            *[await asyncpg.connect(mesh.database_url(s)) for s in ("ledger", "wallet", "budget")]
        )

    async def close(self) -> None:
        for conn in (self.ledger, self.wallet, self.budget):
            await conn.close()


# ---------------------------------------------------------------- waiting


async def parked_events(mesh: Mesh) -> dict[str, str]:
    """Event id → the reason it was parked, read (and taken) from the
    consumers' parking queues."""
    parked: dict[str, str] = {}
    connection = await aio_pika.connect(mesh.amqp_url)
    try:
        channel = await connection.channel()
        for consumer in CONSUMERS:
            name = queue_names(f"{mesh.exchange}.wallet", consumer, CONSUMER_RETRY_DELAYS).parked
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                channel = await connection.channel()
                continue
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                event_id = str(_event_id(message.body))
                parked[event_id] = str((message.headers or {}).get(REASON_HEADER, ""))
    finally:
        await connection.close()
    return parked


def _event_id(body: bytes) -> str:
    import orjson

    try:
        return str(orjson.loads(body).get("event_id", ""))
    except (orjson.JSONDecodeError, AttributeError):
        return ""


async def wait_until_quiet(mesh: Mesh, journal: Journal, seconds: float = 60.0) -> dict[str, str]:
    """Waits until the mesh has nothing left to do for the journal: every
    published event applied or parked, no payment or booking PROCESSING,
    no hold or reservation past its expiry. Returns the parked events (read
    once: they leave their queues)."""
    published = {op.key: op.kind for op in journal.operations
                 if op.kind in CONSUMER_OF and op.succeeded}  # fmt: skip
    parked: dict[str, str] = {}
    deadline = time.monotonic() + seconds
    while True:
        parked.update(await parked_events(mesh))
        db = await Databases.open(mesh)
        try:
            applied = {
                str(r["event_id"]) for r in await db.wallet.fetch("SELECT event_id FROM inbox")
            }
            # Held payments too: the wallet settles a lapsed review (and
            # forgets the cached balance it held) on its reconciler's round.
            busy = await db.wallet.fetchval(
                "SELECT (SELECT count(*) FROM payments WHERE status IN ('PROCESSING', 'PENDING_REVIEW'))"
                " + (SELECT count(*) FROM bookings WHERE status = 'PROCESSING')"
            )
            stuck = await _stuck(db)
            # Review holds expire by themselves, deposit holds by their webhook.
            holds = await db.ledger.fetchval(
                "SELECT count(*) FROM transfers WHERE status = $1", PENDING
            )
        finally:
            await db.close()
        waiting = [e for e in published if e not in applied and e not in parked]
        if not waiting and not busy and not holds and not any(stuck.values()):
            return parked
        if time.monotonic() > deadline:
            return parked
        await asyncio.sleep(0.5)


async def _stuck(db: Databases) -> dict[str, int]:
    return {
        "holds_past_expiry": await db.ledger.fetchval(
            "SELECT count(*) FROM transfers WHERE status = $1"
            " AND expires_at < now() - make_interval(secs => $2)",
            PENDING,
            SWEEP_SLACK_SECONDS,
        ),
        "reservations_past_ttl": await db.budget.fetchval(
            "SELECT count(*) FROM reservations WHERE status = $1"
            " AND expires_at < now() - make_interval(secs => $2)",
            RESERVED,
            SWEEP_SLACK_SECONDS,
        ),
    }


# ---------------------------------------------------------------- the checks


async def check(
    mesh: Mesh,
    population: Population,
    journal: Journal,
    client: Client,
    quiet_seconds: float = 60.0,
) -> Report:
    report = Report(figures={"journal": journal.summary()})
    parked = await wait_until_quiet(mesh, journal, quiet_seconds)
    for op in journal.unsettled():
        report.problem(f"{op.kind} {op.key} never got a definitive answer: {op.attempts[-1:]}")
    verified = await verify_ledger(mesh)
    report.figures["ledger"] = {"ok": verified.ok, "transfers_checked": verified.transfers_checked,
                                "accounts_checked": verified.accounts_checked}  # fmt: skip
    if not verified.ok:
        report.problem(f"VerifyLedger: {list(verified.discrepancies)[:5]}")
    db = await Databases.open(mesh)
    try:
        stuck = await _stuck(db)
        report.figures["stuck"] = stuck
        for what, count in stuck.items():
            if count:
                report.problem(f"{count} {what.replace('_', ' ')}")
        await _payments(db, population, journal, report)
        await _deposits(db, journal, report)
        await _bookings(db, population, journal, report)
        await _events(db, journal, parked, report)
        await _budgets(db, population, report)
        await _balances(db, population, journal, client, report)
    finally:
        await db.close()
    return report


async def _one(conn: asyncpg.Connection, query: str, *args: object) -> asyncpg.Record:
    row = await conn.fetchrow(query, *args)
    assert row is not None, query
    return row


async def _ledger_p2p(db: Databases, person: Person) -> list[asyncpg.Record]:
    return list(
        await db.ledger.fetch(
            "SELECT id, amount, created_at, status FROM transfers"
            " WHERE debit_account_id = $1 AND code = 'P2P' ORDER BY created_at, id",
            account_of(person.user_id),
        )
    )


async def _payments(
    db: Databases, population: Population, journal: Journal, report: Report
) -> None:
    processing = await db.wallet.fetchval(
        "SELECT count(*) FROM payments WHERE status = 'PROCESSING'"
    )
    if processing:
        report.problem(f"{processing} payments still PROCESSING")
    by_sender: dict[str, list[Operation]] = defaultdict(list)
    for op in journal.of("p2p"):
        by_sender[op.user].append(op)
    wrong_balance = 0
    for sender in population.senders:
        ledger = await _ledger_p2p(db, sender)
        posted = {str(r["id"]): r for r in ledger if r["status"] == POSTED}
        # The sender's available balance right after each of its transfers.
        after: dict[str, int] = {}
        running = sender.initial
        for row in ledger:
            if row["status"] == POSTED:
                running -= row["amount"]
                after[str(row["id"])] = running
        told_completed = 0
        for op in by_sender[sender.user_id]:
            pid = str(payment_id(uuid.UUID(sender.user_id), op.key))
            answer = op.answer
            if answer is None:
                continue
            if answer.status == 200:
                body = answer.body
                if body.get("status") != "COMPLETED" or body.get("transfer_id") != pid:
                    report.problem(f"p2p {op.key}: answered {body}")
                    continue
                told_completed += 1
                placed = posted.get(pid)
                if placed is None:
                    report.problem(f"p2p {op.key} answered COMPLETED is not posted in the ledger")
                elif placed["amount"] != op.amount:
                    report.problem(f"p2p {op.key}: ledger amount {placed['amount']} != {op.amount}")
                # Another payment of the same sender may have completed
                # between this one and its balance read (the soak sends some
                # at once): only the sequential ones are checked exactly.
                elif (
                    op.clean
                    and not op.detail.get("concurrent")
                    and minor(body["sender_balance"]) != after[pid]
                ):
                    wrong_balance += 1
                    report.problem(
                        f"p2p {op.key}: sender_balance {body['sender_balance']} but the ledger"
                        f" had {after[pid]} after it"
                    )
            elif pid in posted:
                report.problem(
                    f"p2p {op.key} answered {answer.status} {answer.reason} but moved money"
                )
        if told_completed != len(posted):
            report.problem(
                f"sender {sender.user_id}: {told_completed} payments answered COMPLETED,"
                f" {len(posted)} P2P transfers in the ledger"
            )
    reviews = journal.of("review")
    for op in reviews:
        answer = op.answer
        if (
            answer is not None
            and answer.status == 200
            and answer.body.get("status") != "PENDING_REVIEW"
        ):
            report.problem(f"review {op.key}: answered {answer.body}")
    report.figures["p2p"] = {"wrong_sender_balance": wrong_balance, "reviews": len(reviews)}


async def _deposits(db: Databases, journal: Journal, report: Report) -> None:
    for op in journal.of("settle"):
        answer = op.answer
        if answer is None or answer.status != 200:
            if answer is not None:
                report.problem(f"webhook {op.key} answered {answer.status} {answer.reason}")
            continue
        status = await db.ledger.fetchval(
            "SELECT status FROM transfers WHERE id = $1", uuid.UUID(op.key)
        )
        if status == PENDING:
            report.problem(
                f"{op.detail['of']} hold {op.key} still pending after its webhook was answered"
            )


async def _bookings(
    db: Databases, population: Population, journal: Journal, report: Report
) -> None:
    published = {op.detail["booking_id"]: op for op in journal.of("booking") if op.succeeded}
    rows = {r["booking_id"]: r for r in await db.wallet.fetch(
        "SELECT booking_id, user_id, amount, status, failure_reason, refunded, transfer_id"
        " FROM bookings")}  # fmt: skip
    missing = [b for b in published if b not in rows]
    if missing:
        report.problem(f"{len(missing)} booking events never became a booking: {missing[:3]}")
    charged = [r for r in rows.values() if r["status"] == "CHARGED"]
    failed = [r for r in rows.values() if r["status"] == "FAILED"]
    if len(charged) + len(failed) != len(rows):
        report.problem(
            f"{len(rows) - len(charged) - len(failed)} bookings neither charged nor failed"
        )
    refunds = await db.wallet.fetchval("SELECT coalesce(sum(amount), 0) FROM booking_refunds")
    refunded_rows = sum(r["refunded"] for r in charged)
    if refunds != refunded_rows:
        report.problem(f"booking refunds {refunds} != refunded on bookings {refunded_rows}")
    ledger = await _one(
        db.ledger,
        "SELECT coalesce(sum(amount) FILTER (WHERE code = 'BOOKING' AND status = $1), 0) AS charged,"
        "       count(*) FILTER (WHERE code = 'BOOKING') AS charges,"
        "       coalesce(sum(amount) FILTER (WHERE code = 'REFUND' AND status = $1), 0) AS refunded"
        "  FROM transfers WHERE code IN ('BOOKING', 'REFUND')",
        POSTED,
    )
    accepted = sum(r["amount"] for r in charged)
    if ledger["charges"] != len(charged):
        report.problem(f"{len(charged)} bookings charged, {ledger['charges']} booking transfers")
    if accepted - refunds != ledger["charged"] - ledger["refunded"]:
        report.problem(
            f"bookings accepted less refunds = {accepted - refunds}, ledger booking debits less"
            f" refunds = {ledger['charged'] - ledger['refunded']}"
        )
    clearing = await db.ledger.fetchrow(
        "SELECT credits_posted - debits_posted AS net FROM accounts WHERE id = $1",
        clearing_account_id(CURRENCY),
    )
    if clearing is not None and clearing["net"] != accepted - refunds:
        report.problem(
            f"booking clearing holds {clearing['net']}, bookings net {accepted - refunds}"
        )
    report.figures["bookings"] = {"published": len(published), "charged": len(charged),
                                  "failed": len(failed), "accepted": accepted, "refunded": refunds,
                                  "failure_reasons": sorted({r["failure_reason"] for r in failed})}  # fmt: skip


async def _events(db: Databases, journal: Journal, parked: dict[str, str], report: Report) -> None:
    inbox = await db.wallet.fetch("SELECT consumer, event_id FROM inbox")
    applied: dict[str, list[str]] = defaultdict(list)
    for row in inbox:
        applied[str(row["event_id"])].append(row["consumer"])
    counts: dict[str, dict[str, int]] = {}
    for op in journal.operations:
        if op.kind not in CONSUMER_OF or not op.succeeded:
            continue
        entry = counts.setdefault(op.kind, {"published": 0, "applied": 0, "parked": 0})
        entry["published"] += 1
        where = applied.get(op.key, [])
        if len(where) > 1 or (where and where[0] != CONSUMER_OF[op.kind]):
            report.problem(f"event {op.key} ({op.kind}) applied as {where}")
        if where and op.key in parked:
            report.problem(f"event {op.key} ({op.kind}) applied and parked ({parked[op.key]})")
        if where:
            entry["applied"] += 1
        elif op.key in parked:
            entry["parked"] += 1
            if parked[op.key] in ("RETRIES_EXHAUSTED", "HANDLER_ERROR", ""):
                report.problem(f"event {op.key} ({op.kind}) parked: {parked[op.key]}")
        else:
            report.problem(f"event {op.key} ({op.kind}) lost: neither applied nor parked")
    # The effects, counted on the other side.
    cancels = {op.key for op in journal.of("cancel") if op.succeeded}
    refund_ids = {r["refund_id"] for r in await db.wallet.fetch(
        "SELECT refund_id FROM booking_refunds WHERE booking_id = ANY($1::text[])",
        [op.detail["booking_id"] for op in journal.of("booking")])}  # fmt: skip
    if not refund_ids <= cancels:
        report.problem(f"refunds without a cancellation: {sorted(refund_ids - cancels)[:3]}")
    onboarded = {op.user for op in journal.of("onboard") if op.key in applied}
    wallets = {str(r["user_id"]) for r in await db.wallet.fetch(
        "SELECT user_id FROM onboardings WHERE user_id = ANY($1::uuid[])", list(onboarded))}  # fmt: skip
    if wallets != onboarded:
        report.problem(f"{len(onboarded - wallets)} applied UserCreated without an onboarding")
    report.figures["events"] = {**counts, "parked_reasons": sorted(set(parked.values()))}


async def _budgets(db: Databases, population: Population, report: Report) -> None:
    overspent = await db.budget.fetch(
        "SELECT budget_id, used_amount, reserved_amount, total_amount FROM budgets"
        " WHERE mode = 1 AND used_amount + reserved_amount > total_amount"
    )
    for row in overspent:
        report.problem(f"budget {row['budget_id']} overspent: {dict(row)}")
    # What each budget holds for reservations still open (each within its
    # ttl, or _stuck says so).
    holding = {
        r["budget_id"]: r["held"]
        for r in await db.budget.fetch(
            "SELECT l.budget_id, sum(l.amount) AS held FROM reservation_lines l"
            " JOIN reservations r USING (reservation_id) WHERE r.status = $1 GROUP BY 1",
            RESERVED,
        )
    }
    for sender in population.senders:
        budget = await _one(
            db.budget,
            "SELECT used_amount, reserved_amount, total_amount FROM budgets WHERE budget_id = $1",
            uuid.UUID(sender.budget_id),
        )
        spent = sum(r["amount"] for r in await _ledger_p2p(db, sender) if r["status"] == POSTED)
        held = holding.get(uuid.UUID(sender.budget_id), 0)
        if budget["used_amount"] != spent or budget["reserved_amount"] != held:
            report.problem(
                f"P2P budget of {sender.user_id}: used {budget['used_amount']}, reserved"
                f" {budget['reserved_amount']}, but the ledger says {spent} was spent and open"
                f" reservations hold {held}"
            )
    for booker in population.bookers:
        budget = await _one(
            db.budget,
            "SELECT used_amount, reserved_amount FROM budgets WHERE budget_id = $1",
            uuid.UUID(booker.budget_id),
        )
        net = await db.wallet.fetchval(
            "SELECT coalesce(sum(amount - refunded), 0) FROM bookings"
            " WHERE user_id = $1 AND status = 'CHARGED'",
            uuid.UUID(booker.user_id),
        )
        held = holding.get(uuid.UUID(booker.budget_id), 0)
        if budget["used_amount"] != net or budget["reserved_amount"] != held:
            report.problem(
                f"HOTEL budget of {booker.user_id}: used {budget['used_amount']}, reserved"
                f" {budget['reserved_amount']}, bookings net of refunds {net}, open reservations"
                f" hold {held}"
            )
    report.figures["reservations_held_after_their_payment"] = await _held_after_payment(db)


async def _held_after_payment(db: Databases) -> list[dict[str, Any]]:
    """Reservations still open whose payment is over: they hold budget until
    their ttl, no longer (the check of stuck ones is _stuck)."""
    open_ = await db.budget.fetch(
        "SELECT reference, amount, expires_at - now() AS left FROM reservations WHERE status = $1",
        RESERVED,
    )
    held = []
    for row in open_:
        try:
            pid = uuid.UUID(row["reference"])
        except ValueError:
            continue
        payment = await db.wallet.fetchrow(
            "SELECT status, failure_reason, reservation_id FROM payments WHERE payment_id = $1", pid
        )
        if payment is not None and payment["status"] in ("COMPLETED", "FAILED"):
            held.append({"payment": str(pid), "status": payment["status"],
                         "reason": payment["failure_reason"],
                         "reservation_recorded": payment["reservation_id"] is not None,
                         "amount": row["amount"], "ttl_left": str(row["left"])})  # fmt: skip
    return held


async def _balances(
    db: Databases, population: Population, journal: Journal, client: Client, report: Report
) -> None:
    expected: dict[str, int] = {p.user_id: p.initial for p in population.everyone}
    for op in journal.of("p2p"):
        answer = op.answer
        if answer is not None and answer.status == 200 and answer.body.get("status") == "COMPLETED":
            expected[op.user] -= op.amount
            expected[op.detail["to"]] += op.amount
    for op in journal.of("settle"):
        if op.succeeded and op.detail["outcome"] == "SETTLED":
            expected[op.user] += op.amount if op.detail["of"] == "deposit" else -op.amount
    for row in await db.wallet.fetch(
        "SELECT user_id, sum(amount - refunded) AS net FROM bookings WHERE status = 'CHARGED'"
        " GROUP BY user_id"
    ):
        if str(row["user_id"]) in expected:
            expected[str(row["user_id"])] -= row["net"]
    mismatched = 0
    for person in population.everyone:
        account = account_of(person.user_id)
        from_entries = await db.ledger.fetchval(
            "SELECT coalesce(sum(CASE side WHEN 2 THEN amount ELSE -amount END), 0)"
            "  FROM entries WHERE account_id = $1",
            account,
        )
        history = await db.wallet.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM transactions"
            " WHERE wallet_id = $1 AND status = 'COMPLETED' AND currency = $2",
            wallet_id_for(uuid.UUID(person.user_id)),
            CURRENCY,
        )
        told = await client.balance(person)
        figures = {"expected": expected[person.user_id], "ledger_entries": int(from_entries),
                   "gateway_posted": told["posted"], "gateway_available": told["available"],
                   "history": int(history)}  # fmt: skip
        if told["pending"] != 0:
            figures["gateway_pending"] = told["pending"]
        values = ("expected", "ledger_entries", "gateway_posted", "gateway_available", "history")
        if len({figures[k] for k in values}) != 1 or told["pending"] != 0:
            mismatched += 1
            report.problem(f"balance of {person.user_id}: {figures}")
    report.figures["balances"] = {"wallets": len(population.everyone), "mismatched": mismatched}


async def settle_and_check(load: MixedLoad, quiet_seconds: float = 60.0) -> Report:
    """Lets every client finish, retries what is left, replays every key,
    checks the invariants; fails the test on any problem."""
    phases: dict[str, float] = {}
    started = time.monotonic()

    def phase(name: str) -> None:
        nonlocal started
        phases[name] = round(time.monotonic() - started, 2)
        started = time.monotonic()

    await load.drain()
    phase("drain")
    unsettled = await load.settle_unsettled()
    phase("retry")
    assert not unsettled, "\n".join(f"{op.kind} {op.key}: {op.trail()}" for op in unsettled)
    differences = await replay(load)
    phase("replay")
    assert load.client is not None
    report = await check(load.mesh, load.population, load.journal, load.client, quiet_seconds)
    phase("check")
    report.figures["seconds"] = phases
    print("chaos figures:", report.figures)  # shown when a test fails, or with -s
    assert not differences, "\n".join(differences[:10])
    assert not report.problems, "\n".join([*report.problems[:20], str(report.figures)])
    return report
