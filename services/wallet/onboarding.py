"""Onboarding a new user (UserCreated): the user, their wallet in their
default currency, and the default budgets of their company's policy; once
per user, however often the event arrives.

Each step is idempotent: the user and the wallet are created once by id, and
the budget service applies the company's policy once per user and policy
entry (ApplyCompanyPolicy), under a per-user lock here too, before the
onboarding is recorded as done.
A crash between steps is finished by the event's redelivery.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal

import asyncpg
import structlog

from services.common.db import DbConn
from services.common.errors import AlreadyExists
from services.wallet import handlers
from services.wallet.domain import wallet_id_for
from services.wallet.peers import Peers

log = structlog.get_logger("moneta.wallet.onboarding")

ONBOARDING_ACTOR = "moneta-wallet:onboarding"

OnCommit = Callable[[DbConn], Awaitable[None]]


async def onboard_user(
    pool: asyncpg.Pool,
    peers: Peers,
    cmd: handlers.CreateUserCommand,
    company_credit_limit: Decimal,
    on_commit: OnCommit | None = None,
) -> int:
    """Onboards the user; returns how many default budgets this call
    created. ``on_commit`` runs in the transaction that records the
    onboarding as done."""
    user = await handlers.create_user(pool, cmd)
    user_id: uuid.UUID = user["user_id"]
    try:
        await handlers.create_wallet(
            pool, peers, str(user_id), user["default_currency"], 0, company_credit_limit
        )
    except AlreadyExists as exc:
        if exc.reason != "WALLET_EXISTS":
            raise
        # Made before the event came (by an admin, say): it is the user's wallet.
    created = 0
    async with pool.acquire() as conn, conn.transaction():
        # One onboarding of a user at a time, so the budgets are asked for once.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"onboarding:{user_id}"
        )
        done = await conn.fetchval("SELECT 1 FROM onboardings WHERE user_id = $1", user_id)
        if done is None:
            if user["company_id"] is not None:
                created = await _create_default_budgets(peers, user_id, user["company_id"])
            await conn.execute(
                "INSERT INTO onboardings (user_id, budgets) VALUES ($1, $2)", user_id, created
            )
        if on_commit is not None:
            await on_commit(conn)
    if done is None:
        log.info("user_onboarded", user_id=str(user_id), default_budgets=created)
    return created


async def _create_default_budgets(peers: Peers, user_id: uuid.UUID, company_id: uuid.UUID) -> int:
    """Asks the budget service for the policy's budgets the user lacks;
    returns how many it created (none on a repeat: it is idempotent)."""
    return len(await peers.apply_company_policy(user_id, company_id, wallet_id_for(user_id)))
