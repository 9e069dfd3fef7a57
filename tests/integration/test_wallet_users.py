"""Creating users on the real database: the same user created twice at once
(two deliveries of UserCreated, say) is one user, answered to both."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from services.common.errors import AlreadyExists
from services.wallet import handlers, store
from services.wallet.leases import Lease
from tests.conftest import TestRun, service_pool


def command(user_id: str, email: str | None = None) -> handlers.CreateUserCommand:
    handle = f"u{user_id[:8]}"
    return handlers.CreateUserCommand(
        user_id=user_id, email=email or f"{handle}@example.com", phone="", username=handle,
        full_name=f"Person {handle}", company_id="", role=1, default_currency="EUR",
    )  # fmt: skip


async def test_the_same_user_created_concurrently_is_created_once_and_answered_to_all(
    test_run: TestRun,
) -> None:
    pool = await service_pool(test_run, "wallet", database="wallet_users")
    try:
        for _ in range(40):
            user_id = str(uuid.uuid4())
            rows = await asyncio.gather(
                *(handlers.create_user(pool, command(user_id)) for _ in range(4))
            )
            assert {row["user_id"] for row in rows} == {uuid.UUID(user_id)}
            assert (
                await pool.fetchval(
                    "SELECT count(*) FROM users WHERE user_id = $1", uuid.UUID(user_id)
                )
                == 1
            )
    finally:
        await pool.close()


async def test_another_user_with_a_taken_email_is_refused_even_concurrently(
    test_run: TestRun,
) -> None:
    pool = await service_pool(test_run, "wallet", database="wallet_users_taken")
    try:
        email = f"taken-{uuid.uuid4().hex[:8]}@example.com"
        first, second = str(uuid.uuid4()), str(uuid.uuid4())
        results = await asyncio.gather(
            handlers.create_user(pool, command(first, email)),
            handlers.create_user(pool, command(second, email)),
            return_exceptions=True,
        )
        refused = [r for r in results if isinstance(r, AlreadyExists)]
        assert len(refused) == 1 and refused[0].reason == "EMAIL_TAKEN"
        assert await pool.fetchval("SELECT count(*) FROM users WHERE lower(email) = $1", email) == 1
    finally:
        await pool.close()


async def claim(
    pool: asyncpg.Pool, sender: uuid.UUID, key: str
) -> tuple[asyncpg.Record, Lease | None]:
    async with pool.acquire() as conn:
        return await store.claim_payment(
            conn, payment_id=uuid.uuid5(uuid.NAMESPACE_URL, f"{sender}:{key}"), kind="P2P",
            sender_user_id=sender, idempotency_key=key, request_hash="h", recipient_user_id=None,
            amount=100, currency="EUR", note="", lease_seconds=30,
        )  # fmt: skip


async def test_a_payment_is_claimed_once_per_key_and_leased_to_the_attempt_that_recorded_it(
    test_run: TestRun,
) -> None:
    pool = await service_pool(test_run, "wallet", database="wallet_claims")
    try:
        user = await handlers.create_user(pool, command(str(uuid.uuid4())))
        sender: uuid.UUID = user["user_id"]
        for round_ in range(20):
            key = f"key-{round_}"
            claims = await asyncio.gather(*(claim(pool, sender, key) for _ in range(5)))
            assert [lease is not None for _, lease in claims].count(True) == 1
            assert {row["payment_id"] for row, _ in claims} == {claims[0][0]["payment_id"]}
            leased = await pool.fetchval(
                "SELECT lease_until > now() FROM payments WHERE payment_id = $1",
                claims[0][0]["payment_id"],
            )
            assert leased is True
            # So no other attempt can take it while the first is at work.
            async with pool.acquire() as conn:
                assert not await store.take_lease(conn, claims[0][0]["payment_id"], 30)
    finally:
        await pool.close()
