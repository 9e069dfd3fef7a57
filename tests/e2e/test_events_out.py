"""Events the wallet publishes through its outbox, read from the real
RabbitMQ exchange of this test run."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import httpx
import pytest

from moneta.wallet.v1 import wallet_pb2_grpc
from tests.conftest import TestRun
from tests.e2e.conftest import Mesh, create_person


@pytest.fixture
async def events(test_run: TestRun) -> AsyncIterator[aio_pika.abc.AbstractQueue]:
    connection = await aio_pika.connect_robust(test_run.settings.amqp_url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(
        test_run.amqp_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(exclusive=True)
    for key in ("wallet.created", "transaction.completed"):
        await queue.bind(exchange, routing_key=key)
    yield queue
    await connection.close()


async def collect(
    queue: aio_pika.abc.AbstractQueue, wanted: Any, seconds: float = 10.0
) -> list[dict[str, Any]]:
    """Messages until ``wanted(messages)`` holds, or the deadline passes."""
    found: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline and not wanted(found):
        message = await queue.get(fail=False, no_ack=True)
        if message is None:
            await asyncio.sleep(0.1)
            continue
        found.append(json.loads(message.body))
    return found


async def test_a_p2p_transfer_announces_each_side_once(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    events: aio_pika.abc.AbstractQueue,
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "30.00")
    bob = await create_person(wallet_stub, http, mesh, "0")
    body = {"sender_id": alice.user_id, "recipient": bob.email, "amount": "12.50",
            "currency": "USD", "idempotency_key": "evt-1"}  # fmt: skip
    for _ in range(2):  # the retry must announce nothing new
        answer = await http.post("/api/v1/transfers", json=body, headers=mesh.auth(alice.user_id))
        assert answer.status_code == 200

    def p2p(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in found if e["data"].get("type", "").startswith("P2P")]

    found = await collect(events, lambda f: len(p2p(f)) >= 2)
    await asyncio.sleep(1.0)
    found += await collect(events, lambda f: False, seconds=0.5)

    transfers = p2p(found)
    assert sorted((e["data"]["type"], e["data"]["amount"]) for e in transfers) == [
        ("P2P_IN", "12.50"),
        ("P2P_OUT", "-12.50"),
    ]
    assert {e["event_type"] for e in transfers} == {"TransactionCompleted"}
    out = next(e for e in transfers if e["data"]["type"] == "P2P_OUT")
    assert out["data"]["new_balance"] == "17.50"
    assert len({e["event_id"] for e in found}) == len(found)
    created = [e for e in found if e["event_type"] == "WalletCreated"]
    assert {e["data"]["user_id"] for e in created} >= {alice.user_id, bob.user_id}
