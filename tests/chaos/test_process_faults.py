"""Faults of the services' own processes, under the mixed load: a ledger or
wallet killed with SIGKILL and started again, an upstream frozen with
SIGSTOP. After each, every invariant of tests/chaos/invariants.py holds and
every request replayed with its key answers what it answered first."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

import asyncpg
import httpx
import pytest

from services.wallet.domain import payment_id
from tests.chaos.invariants import settle_and_check
from tests.chaos.load import Attempt, LoadShape, MixedLoad, Population
from tests.chaos.mesh import (
    FORGET_STORED_IN_PROGRESS,
    Mesh,
    expire_leases_of_dead_attempts,
    forget_stored_in_progress_answers,
)

# The fast subset (also in make test) sends no payments for review: see
# LoadShape.review_pause.
FAST = LoadShape(review_pause=None)


async def test_a_ledger_killed_mid_load_loses_nothing_and_doubles_nothing(
    mesh: Mesh, population: Population
) -> None:
    async with MixedLoad(mesh, population, FAST) as load:
        load.start()
        await asyncio.sleep(2.0)
        await mesh.crash("ledger")
        await asyncio.sleep(2.0)

        await settle_and_check(load)
    failed_over = [op for op in load.journal.operations if not op.clean]
    assert failed_over, "the kill did not hit a single request"


async def test_a_wallet_killed_mid_payments_moves_no_money_twice(
    mesh: Mesh, population: Population
) -> None:
    async with MixedLoad(mesh, population, FAST) as load:
        load.start()
        await asyncio.sleep(2.0)
        await mesh.crash("wallet")
        await asyncio.sleep(1.5)
        await load.drain(seconds=3.0)
        await expire_leases_of_dead_attempts(mesh)
        if FORGET_STORED_IN_PROGRESS:
            await forget_stored_in_progress_answers(mesh)

        await settle_and_check(load)
    assert [op for op in load.journal.operations if not op.clean], "the kill hit no request"


async def test_a_frozen_wallet_gets_fast_503s_from_the_gateway_and_recovers(
    mesh: Mesh, population: Population
) -> None:
    async with MixedLoad(mesh, population, FAST) as load:
        load.start()
        await asyncio.sleep(1.5)
        mesh.pause("wallet")
        paused_at = time.monotonic()
        try:
            await asyncio.sleep(5.0)
        finally:
            mesh.resume("wallet")
        resumed_at = time.monotonic()
        recovered_at = await first_success_after(load, resumed_at, seconds=20.0)
        await asyncio.sleep(1.0)

        await settle_and_check(load)

    # Once the breaker had seen the upstream fail (five calls past their
    # 2 s deadline), callers were told 503 at once instead of waiting.
    def failed_fast(a: Attempt) -> bool:
        return a.status == 503 and a.reason == "UPSTREAM_UNAVAILABLE"

    attempts = [a for op in load.journal.of("p2p", "deposit") for a in op.attempts]
    opened_at = min(
        a.started + a.seconds for a in attempts if failed_fast(a) and a.started >= paused_at
    )
    assert opened_at - paused_at < 5.0, opened_at - paused_at
    while_open = [
        a for a in attempts if opened_at <= a.started and a.started + a.seconds <= resumed_at
    ]
    answered_fast = [a for a in while_open if failed_fast(a)]
    assert len(while_open) >= 8, len(while_open)
    assert len(answered_fast) >= 0.9 * len(while_open), sorted(
        {(a.status, a.reason) for a in while_open}
    )
    assert statistics.median(a.seconds for a in answered_fast) < 0.1
    assert recovered_at - resumed_at < 10.0, recovered_at - resumed_at


async def first_success_after(load: MixedLoad, since: float, seconds: float) -> float:
    """When the first money-moving request that started after ``since``
    succeeded."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done = [
            a.started + a.seconds for op in load.journal.of("p2p", "deposit") for a in op.attempts
            if a.started >= since and a.status is not None and a.status < 300
        ]  # fmt: skip
        if done:
            return min(done)
        await asyncio.sleep(0.1)
    raise AssertionError(f"no request succeeded within {seconds}s of the upstream's return")


async def test_a_retry_after_in_progress_gets_the_payments_outcome(
    mesh: Mesh, population: Population
) -> None:
    sender, recipient = population.senders[0], population.receivers[0]
    key = f"stuck-{uuid.uuid4()}"
    body = {"sender_id": sender.user_id, "recipient": recipient.email, "amount": "1.00",
            "currency": "USD", "idempotency_key": key}  # fmt: skip
    pid = payment_id(uuid.UUID(sender.user_id), key)
    async with httpx.AsyncClient(base_url=mesh.gateway_url, timeout=15.0) as http:

        async def transfer() -> httpx.Response:
            return await http.post(
                "/api/v1/transfers", json=body, headers=mesh.auth(sender.user_id)
            )

        # An attempt that holds the payment's lease when the wallet dies: it
        # waits for a frozen ledger.
        mesh.pause("ledger")
        try:
            first = asyncio.create_task(transfer())
            await leased(mesh, pid)
            mesh.kill("wallet")
        finally:
            mesh.resume("ledger")
        assert (await first).status_code >= 500
        await asyncio.to_thread(mesh.restart, "wallet")
        for _ in range(50):  # the gateway's breaker may still be open
            meanwhile = await transfer()
            if meanwhile.status_code < 500:
                break
            await asyncio.sleep(0.2)
        assert (meanwhile.status_code, meanwhile.json()["error"]["reason"]) == (
            409, "REQUEST_IN_PROGRESS",
        )  # fmt: skip
        await expire_leases_of_dead_attempts(mesh)  # 30 s later, as far as the wallet knows

        retry = await transfer()

    assert retry.status_code == 200, retry.text
    assert retry.json()["status"] == "COMPLETED"


async def leased(mesh: Mesh, pid: uuid.UUID, seconds: float = 10.0) -> None:
    """Waits until an attempt holds the payment's lease."""
    conn = await asyncpg.connect(mesh.database_url("wallet"))
    try:
        deadline = time.monotonic() + seconds
        while not await conn.fetchval(
            "SELECT lease_until > now() FROM payments WHERE payment_id = $1", pid
        ):
            assert time.monotonic() < deadline, "no attempt took the payment"
            await asyncio.sleep(0.02)
    finally:
        await conn.close()


# ---------------------------------------------------------------- slow (make chaos)


async def payments_processing(mesh: Mesh) -> int:
    conn = await asyncpg.connect(mesh.database_url("wallet"))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM payments WHERE status = 'PROCESSING'"))
    finally:
        await conn.close()


@pytest.mark.chaos(slow=True)
@pytest.mark.timeout(600)
async def test_payments_a_killed_wallet_abandoned_are_settled_by_its_reconciler(
    mesh: Mesh, population: Population
) -> None:
    """No client comes back for the payments in flight when the wallet
    died: the wallet's reconciler settles each from what the ledger says
    (money moved: completed; nothing moved: failed, its budget released)."""
    async with MixedLoad(mesh, population) as load:
        load.start()
        await asyncio.sleep(3.0)
        mesh.kill("wallet")
        await load.drain(seconds=0.5)  # its clients give up
        abandoned = load.journal.unsettled()
        await asyncio.to_thread(mesh.restart, "wallet")
        # Untouched for 60 s, then settled on the reconciler's next round (10 s).
        for _ in range(150):
            if not (left := await payments_processing(mesh)):
                break
            await asyncio.sleep(1.0)
        assert left == 0, f"{left} payments still PROCESSING"

        # The clients come back now: each key answers its payment's outcome.
        report = await settle_and_check(load, quiet_seconds=60.0)
    assert abandoned, "the kill abandoned no request"
    # A reservation whose id the dying attempt had not recorded yet is not
    # released by the reconciler: it holds the budget until its ttl (within
    # the contract; _stuck checks the ttl). Shown, not failed.
    print("held until their ttl:", report.figures["reservations_held_after_their_payment"])


@pytest.mark.chaos(slow=True)
async def test_event_consumers_killed_mid_stream_apply_each_event_once(
    mesh: Mesh, population: Population
) -> None:
    busy = LoadShape(review_pause=None, booking_pause=0.03, onboard_pause=0.1)
    async with MixedLoad(mesh, population, busy) as load:
        load.start()
        await asyncio.sleep(2.0)
        await mesh.crash("consumers")
        await asyncio.sleep(2.0)
        await mesh.crash("consumers", down_seconds=2.0)
        await asyncio.sleep(2.0)

        report = await settle_and_check(load)
    events = report.figures["events"]
    assert events["booking"]["applied"] >= 20 and events["onboard"]["applied"] >= 10, events
