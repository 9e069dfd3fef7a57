"""Fixtures shared by the integration tests of one service's database."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests import conftest


@pytest.fixture(scope="module")
async def budget_pool(test_run: conftest.TestRun) -> AsyncIterator[asyncpg.Pool]:
    """The run's budget database (a module may override it with one of its own)."""
    pool = await conftest.service_pool(test_run, "budget")
    yield pool
    await pool.close()


@pytest.fixture
def user_id() -> str:
    return str(uuid.uuid4())
