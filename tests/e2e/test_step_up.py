"""A payment fraud flags for review waits as a hold until the payer confirms
it with their PIN, or the hold expires and the money is free again."""

from __future__ import annotations

import asyncio

import grpc
import httpx

from moneta.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from moneta.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from moneta.wallet.v1 import wallet_pb2_grpc
from tests.e2e.conftest import Mesh, Person, create_person, fraud_case, set_pin

LARGE = "10000.00"  # at the review threshold the mesh runs with


async def wallet(http: httpx.AsyncClient, mesh: Mesh, person: Person) -> dict[str, object]:
    response = await http.get(f"/api/v1/wallets/{person.user_id}", headers=mesh.admin())
    return dict(response.json())


async def send_large(
    http: httpx.AsyncClient, mesh: Mesh, sender: Person, to: Person, key: str
) -> httpx.Response:
    return await http.post(
        "/api/v1/transfers",
        json={"sender_id": sender.user_id, "recipient": to.email, "amount": LARGE,
              "currency": "USD", "idempotency_key": key},
        headers=mesh.auth(sender.user_id),
    )  # fmt: skip


async def confirm(
    http: httpx.AsyncClient, mesh: Mesh, person: Person, transfer_id: str, pin: str
) -> httpx.Response:
    return await http.post(
        f"/api/v1/transfers/{transfer_id}/confirm",
        json={"pin": pin},
        headers=mesh.auth(person.user_id),
    )


async def test_a_large_payment_waits_for_review_holding_the_money(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "15000.00")
    bob = await create_person(wallet_stub, http, mesh, "0")

    response = await send_large(http, mesh, alice, bob, "review-1")
    retried = await send_large(http, mesh, alice, bob, "review-1")

    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["sender_balance"]) == ("PENDING_REVIEW", "5000.00")
    assert retried.json() == body
    balances = (await wallet(http, mesh, alice))["balances"][0]  # type: ignore[index]
    assert (balances["available"], balances["posted"]) == ("5000.00", "15000.00")
    assert (await wallet(http, mesh, bob))["balance"] == "0.00"


async def test_the_payer_confirms_with_their_pin_and_the_money_moves_once(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "15000.00")
    bob = await create_person(wallet_stub, http, mesh, "0")
    await set_pin(http, mesh, alice, "2468")
    transfer_id = (await send_large(http, mesh, alice, bob, "review-2")).json()["transfer_id"]

    wrong = await confirm(http, mesh, alice, transfer_id, "1357")
    someone_else = await confirm(http, mesh, bob, transfer_id, "2468")
    right = await confirm(http, mesh, alice, transfer_id, "2468")
    again = await confirm(http, mesh, alice, transfer_id, "2468")

    assert wrong.status_code == 403 and wrong.json()["error"]["reason"] == "PIN_INCORRECT"
    assert someone_else.status_code == 404
    assert right.status_code == 200 and right.json()["status"] == "COMPLETED"
    assert again.json() == right.json()
    assert (await wallet(http, mesh, bob))["balance"] == "10000.00"
    assert (await wallet(http, mesh, alice))["balance"] == "5000.00"
    verify = await http.get("/api/v1/admin/ledger/verify", headers=mesh.admin())
    assert verify.json()["ok"]
    case = await fraud_case(mesh, transfer_id)
    assert (case.status, case.resolved_by) == (
        fraud_pb2.REVIEW_STATUS_APPROVED, f"payer-pin:{alice.user_id}",
    )  # fmt: skip


async def test_a_payment_an_analyst_rejected_cannot_be_confirmed(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "15000.00")
    bob = await create_person(wallet_stub, http, mesh, "0")
    await set_pin(http, mesh, alice, "2468")
    transfer_id = (await send_large(http, mesh, alice, bob, "review-5")).json()["transfer_id"]
    async with grpc.aio.insecure_channel(mesh.grpc_addrs["fraud"]) as channel:
        await fraud_pb2_grpc.FraudServiceStub(channel).ResolveReview(
            fraud_pb2.ResolveReviewRequest(transaction_id=transfer_id, mark_fraud=True,
                                           decision=fraud_pb2.REVIEW_DECISION_REJECT)
        )  # fmt: skip

    refused = await confirm(http, mesh, alice, transfer_id, "2468")

    assert refused.status_code == 422
    assert refused.json()["error"]["reason"] == "TRANSACTION_DECLINED"
    assert (await wallet(http, mesh, bob))["balance"] == "0.00"
    assert (await fraud_case(mesh, transfer_id)).status == fraud_pb2.REVIEW_STATUS_REJECTED


async def test_an_unconfirmed_hold_expires_and_frees_the_money(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "15000.00")
    bob = await create_person(wallet_stub, http, mesh, "0")
    await set_pin(http, mesh, alice, "2468")
    transfer_id = (await send_large(http, mesh, alice, bob, "review-3")).json()["transfer_id"]

    await _until_the_ledger_expires(mesh, transfer_id)
    late = await confirm(http, mesh, alice, transfer_id, "2468")

    assert late.status_code == 422 and late.json()["error"]["reason"] == "REVIEW_EXPIRED"
    assert (await wallet(http, mesh, alice))["balance"] == "15000.00"
    assert (await wallet(http, mesh, bob))["balance"] == "0.00"


async def _until_the_ledger_expires(mesh: Mesh, transfer_id: str, seconds: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    async with grpc.aio.insecure_channel(mesh.grpc_addrs["ledger"]) as channel:
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        while asyncio.get_running_loop().time() < deadline:
            found = await ledger.LookupTransfers(
                ledger_pb2.LookupTransfersRequest(ids=[transfer_id])
            )
            if found.transfers and found.transfers[0].status == ledger_pb2.TRANSFER_STATUS_EXPIRED:
                return
            await asyncio.sleep(0.2)
    raise AssertionError("the hold did not expire")


async def test_a_wallet_frozen_while_its_payment_waits_cannot_confirm_it(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "15000.00")
    bob = await create_person(wallet_stub, http, mesh, "0")
    await set_pin(http, mesh, alice, "2468")
    transfer_id = (await send_large(http, mesh, alice, bob, "review-4")).json()["transfer_id"]
    wallet_id = (await wallet(http, mesh, alice))["wallet_id"]
    frozen = await http.put(
        f"/api/v1/wallets/{wallet_id}/status",
        json={"status": "FROZEN", "reason": "investigation"},
        headers=mesh.admin(),
    )

    refused = await confirm(http, mesh, alice, transfer_id, "2468")

    assert frozen.status_code == 200
    assert refused.status_code == 422 and refused.json()["error"]["reason"] == "WALLET_FROZEN"
    assert (await wallet(http, mesh, bob))["balance"] == "0.00"
