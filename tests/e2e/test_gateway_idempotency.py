"""Idempotency at the live gateway: a money-moving request repeated with its
key replays the first answer (status and body, marked Idempotent-Replayed)
and moves nothing again, even when the repeats race; the key in the header
counts as in the body; another request under the key is 409; keys belong
to their caller; a refusal is replayed too; a request without a key is
400."""

from __future__ import annotations

import asyncio
import uuid

import httpx

from moneta.wallet.v1 import wallet_pb2_grpc
from tests.e2e.conftest import Mesh, Person, create_person


async def balance(http: httpx.AsyncClient, mesh: Mesh, person: Person) -> str:
    response = await http.get(f"/api/v1/wallets/{person.user_id}", headers=mesh.admin())
    return str(response.json()["balance"])


def send(
    http: httpx.AsyncClient,
    mesh: Mesh,
    sender: Person,
    recipient: Person,
    amount: str,
    key: str | None,
    header_key: str | None = None,
) -> asyncio.Future[httpx.Response]:
    body = {"sender_id": sender.user_id, "recipient": recipient.user_id, "amount": amount}
    if key is not None:
        body["idempotency_key"] = key
    headers = mesh.auth(sender.user_id)
    if header_key is not None:
        headers["Idempotency-Key"] = header_key
    return asyncio.ensure_future(http.post("/api/v1/transfers", json=body, headers=headers))


async def test_a_repeat_replays_the_first_answer_and_moves_nothing_again(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "50.00")
    bob = await create_person(wallet_stub, http, mesh, "0")

    first = await send(http, mesh, alice, bob, "10.00", "pay-bob")
    # Between the two, alice's balance changes: a replay still shows the first answer.
    await send(http, mesh, alice, bob, "1.00", "other")
    again = await send(http, mesh, alice, bob, "10", None, header_key="pay-bob")

    assert first.status_code == again.status_code == 200
    assert again.content == first.content
    assert first.json()["sender_balance"] == "40.00"
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert await balance(http, mesh, bob) == "11.00"


async def test_racing_repeats_move_the_money_once_and_agree(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "50.00")
    bob = await create_person(wallet_stub, http, mesh, "0")

    answers = await asyncio.gather(
        *(send(http, mesh, alice, bob, "7.00", "race") for _ in range(8))
    )

    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1
    assert await balance(http, mesh, bob) == "7.00"


async def test_another_request_under_the_key_is_409_and_moves_nothing(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "50.00")
    bob = await create_person(wallet_stub, http, mesh, "0")
    await send(http, mesh, alice, bob, "5.00", "reused")

    other = await send(http, mesh, alice, bob, "6.00", "reused")

    assert other.status_code == 409
    assert other.json()["error"]["reason"] == "IDEMPOTENCY_KEY_REUSED"
    assert await balance(http, mesh, bob) == "5.00"


async def test_keys_belong_to_their_caller(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "50.00")
    carol = await create_person(wallet_stub, http, mesh, "50.00")
    bob = await create_person(wallet_stub, http, mesh, "0")
    shared = f"shared-{uuid.uuid4()}"

    by_alice = await send(http, mesh, alice, bob, "3.00", shared)
    by_carol = await send(http, mesh, carol, bob, "4.00", shared)

    assert by_alice.status_code == by_carol.status_code == 200
    assert by_alice.json()["transfer_id"] != by_carol.json()["transfer_id"]
    assert await balance(http, mesh, bob) == "7.00"


async def test_a_refusal_is_replayed_as_it_was(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "5.00")
    bob = await create_person(wallet_stub, http, mesh, "0")

    refused = await send(http, mesh, alice, bob, "9.00", "too-much")
    replay = await send(http, mesh, alice, bob, "9.00", "too-much")

    assert refused.status_code == replay.status_code == 422
    assert refused.json()["error"]["reason"] == "INSUFFICIENT_FUNDS"
    assert replay.content == refused.content


async def test_a_money_moving_request_without_a_key_is_400(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "5.00")
    bob = await create_person(wallet_stub, http, mesh, "0")

    response = await send(http, mesh, alice, bob, "1.00", None)

    assert response.status_code == 400
    assert response.json()["error"]["reason"] == "IDEMPOTENCY_KEY_REQUIRED"
    assert await balance(http, mesh, bob) == "0.00"
