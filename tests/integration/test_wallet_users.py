"""Creating users on the real database: the same user created twice at once
(two deliveries of UserCreated, say) is one user, answered to both."""

from __future__ import annotations

import asyncio
import uuid

from services.common.errors import AlreadyExists
from services.wallet import handlers
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
