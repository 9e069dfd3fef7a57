"""Fault tests: the mesh under a mixed load while one thing fails.

Every test here is marked ``chaos``. Those marked ``chaos(slow=True)`` run
only when MONETA_CHAOS=1 (``make chaos``); the others, a fast subset, also
run in ``make test``. See docs/chaos.md.

Two meshes: ``mesh`` runs on the machine's own PostgreSQL, Redis and
RabbitMQ (with the run's own databases, key prefix and exchange) for faults
of the services themselves; ``private_mesh`` runs on private servers
(tests/chaos/infra.py) for faults of the servers, which the machine's own
must never suffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.chaos.infra import PrivateInfra, missing_binaries
from tests.chaos.load import Population, populate
from tests.chaos.mesh import REVIEW_AMOUNT, Mesh, build_mesh, delete_mesh_topology
from tests.conftest import TestRun

CHAOS_ENV = "MONETA_CHAOS"
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks this folder's tests ``chaos``; without MONETA_CHAOS=1 the slow
    ones are deselected."""
    run_slow = os.environ.get(CHAOS_ENV) == "1"
    kept: list[pytest.Item] = []
    deselected: list[pytest.Item] = []
    for item in items:
        if HERE not in Path(str(item.fspath)).resolve().parents:
            kept.append(item)
            continue
        item.add_marker(pytest.mark.chaos)
        slow = any(m.kwargs.get("slow") for m in item.iter_markers("chaos"))
        (kept if run_slow or not slow else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


async def _forget_redis_keys(url: str, prefix: str) -> None:
    client = aioredis.from_url(url)
    try:
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


def _shared_servers(test_run: TestRun) -> dict[str, str]:
    settings = test_run.settings
    return {
        "MONETA_POSTGRES_URL": settings.postgres_url,
        "MONETA_REDIS_URL": settings.redis_url,
        "MONETA_AMQP_URL": settings.amqp_url,
    }


@pytest.fixture(scope="module")
def mesh(test_run: TestRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """The mesh for faults of the services: on a private PostgreSQL and
    Redis when this machine has them (the machine's own PostgreSQL takes 100
    connections, for every test run at once), the machine's RabbitMQ with
    an exchange of its own."""
    shared = _shared_servers(test_run)
    have = [s for s in ("postgres", "redis") if not missing_binaries(s)]
    infra = PrivateInfra.start(postgres="postgres" in have, redis="redis" in have, rabbitmq=False)
    the_mesh = build_mesh(
        tmp_path_factory.mktemp("chaos-mesh"),
        infra_env=infra.env(shared),
        db_prefix=f"{test_run.db_prefix}chaos_",
        redis_prefix=f"{test_run.redis_prefix}chaos:",
        exchange=f"{test_run.amqp_exchange}.chaos",
        **({} if "postgres" in have else {"MONETA_DB_POOL_MAX": "4"}),
    )
    try:
        the_mesh.start()
        yield the_mesh
    finally:
        the_mesh.stop()
        with contextlib.suppress(Exception):
            asyncio.run(delete_mesh_topology(the_mesh))
        if "redis" not in have:
            with contextlib.suppress(Exception):
                asyncio.run(_forget_redis_keys(shared["MONETA_REDIS_URL"], the_mesh.redis_prefix))
        # On the machine's PostgreSQL the databases go with the run's.
        infra.close()


@pytest.fixture(scope="module")
def private_infra() -> Iterator[PrivateInfra]:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"private servers need {', '.join(missing)} on this machine")
    infra = PrivateInfra.start(redis_proxy=True)
    try:
        yield infra
    finally:
        infra.close()


@pytest.fixture(scope="module")
def private_mesh(
    private_infra: PrivateInfra, test_run: TestRun, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    """The mesh on private servers that the tests may stop and restart."""
    the_mesh = build_mesh(
        tmp_path_factory.mktemp("chaos-private-mesh"),
        infra_env=private_infra.env(_shared_servers(test_run)),
        db_prefix="moneta_chaos_",
        redis_prefix="moneta-chaos:",
        exchange="moneta.events.chaos",
        # Without Redis, fraud sends payments of this much to review.
        MONETA_FRAUD_DEGRADED_REVIEW_AMOUNT=str(REVIEW_AMOUNT - 20),
    )
    try:
        the_mesh.start()
        yield the_mesh
    finally:
        the_mesh.stop()  # the servers and their data go with private_infra


@pytest.fixture
async def population(mesh: Mesh) -> AsyncIterator[Population]:
    yield await populate(mesh)


@pytest.fixture
async def private_population(private_mesh: Mesh) -> AsyncIterator[Population]:
    yield await populate(private_mesh)
