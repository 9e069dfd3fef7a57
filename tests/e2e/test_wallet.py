"""Wallets over HTTP: history, status changes and PINs."""

from __future__ import annotations

import httpx

from moneta.wallet.v1 import wallet_pb2_grpc
from tests.e2e.conftest import Mesh, Person, create_person


async def send(http: httpx.AsyncClient, mesh: Mesh, sender: Person, to: str, amount: str,
               key: str, note: str = "") -> httpx.Response:  # fmt: skip
    return await http.post(
        "/api/v1/transfers",
        json={"sender_id": sender.user_id, "recipient": to, "amount": amount,
              "currency": "USD", "idempotency_key": key, "note": note},
        headers=mesh.auth(sender.user_id),
    )  # fmt: skip


async def history(
    http: httpx.AsyncClient, mesh: Mesh, person: Person, **params: str | int
) -> httpx.Response:
    return await http.get(
        f"/api/v1/wallet/{person.user_id}/transactions",
        params=params,
        headers=mesh.auth(person.user_id),
    )


async def test_a_p2p_transfer_appears_in_both_histories_with_masked_counterparties(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "50.00")
    bob = await create_person(wallet_stub, http, mesh, "0")
    assert (await send(http, mesh, alice, bob.email, "12.50", "h-1", "lunch")).status_code == 200

    mine = (await history(http, mesh, alice)).json()
    theirs = (await history(http, mesh, bob)).json()

    out = mine["transactions"][0]
    assert (out["type"], out["amount"], out["status"], out["description"]) == (
        "P2P_OUT", "-12.50", "COMPLETED", "lunch",
    )  # fmt: skip
    assert out["balance_after"] == "37.50"
    assert bob.email not in out["counterparty"]
    came = theirs["transactions"][0]
    assert (came["type"], came["amount"], came["balance_after"]) == ("P2P_IN", "12.50", "12.50")
    assert alice.email not in came["counterparty"]


async def test_a_transfer_to_a_user_id_names_each_side_to_the_other(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "20.00")
    bob = await create_person(wallet_stub, http, mesh, "0")
    sent = await send(http, mesh, alice, bob.user_id, "5.00", "by-id")
    assert (sent.status_code, sent.json()["sender_balance"]) == (200, "15.00")

    out = (await history(http, mesh, alice)).json()["transactions"][0]
    came = (await history(http, mesh, bob)).json()["transactions"][0]

    assert (out["type"], out["counterparty"]) == ("P2P_OUT", f"Person {bob.username[0]}.")
    assert (came["type"], came["counterparty"]) == ("P2P_IN", f"Person {alice.username[0]}.")


async def test_a_transfer_to_a_user_id_without_a_wallet_or_to_ones_own_moves_nothing(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    import uuid

    from moneta.wallet.v1 import wallet_pb2

    alice = await create_person(wallet_stub, http, mesh, "10.00")
    walletless = str(uuid.uuid4())
    await wallet_stub.CreateUser(
        wallet_pb2.CreateUserRequest(
            user=wallet_pb2.User(user_id=walletless, email=f"w{walletless[:8]}@example.com",
                                 default_currency="USD")
        )
    )  # fmt: skip

    to_self = await send(http, mesh, alice, alice.user_id, "1.00", "self-by-id")
    no_wallet = await send(http, mesh, alice, walletless, "1.00", "no-wallet")
    nobody = await send(http, mesh, alice, str(uuid.uuid4()), "1.00", "nobody")

    assert (to_self.status_code, to_self.json()["error"]["reason"]) == (400, "SELF_TRANSFER")
    for refused in (no_wallet, nobody):
        assert (refused.status_code, refused.json()["error"]["reason"]) == (
            404,
            "RECIPIENT_NOT_FOUND",
        )
    wallet = (await http.get(f"/api/v1/wallets/{alice.user_id}", headers=mesh.admin())).json()
    assert wallet["balance"] == "10.00"


async def test_history_pages_newest_first_and_filters(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "100.00")
    bob = await create_person(wallet_stub, http, mesh, "0")
    for i in range(5):
        note = "coffee beans" if i % 2 else "train ticket"
        response = await send(http, mesh, alice, bob.username, f"{i + 1}.00", f"p-{i}", note)
        assert response.status_code == 200

    first = (await history(http, mesh, alice, page_size=2)).json()
    second = (
        await history(http, mesh, alice, page_size=2, page_token=first["next_page_token"])
    ).json()
    coffee = (await history(http, mesh, alice, q="coffee")).json()
    big = (await history(http, mesh, alice, min_amount="4.00", max_amount="50.00")).json()
    outgoing = (await history(http, mesh, alice, type="P2P_OUT")).json()

    amounts = [t["amount"] for t in first["transactions"] + second["transactions"]]
    assert amounts == ["-5.00", "-4.00", "-3.00", "-2.00"]
    assert {t["description"] for t in coffee["transactions"]} == {"coffee beans"}
    assert [t["amount"] for t in big["transactions"]] == ["-5.00", "-4.00"]
    assert len(outgoing["transactions"]) == 5


async def test_someone_elses_history_is_not_found(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "1.00")
    eve = await create_person(wallet_stub, http, mesh, "0")

    response = await http.get(
        f"/api/v1/wallet/{alice.user_id}/transactions", headers=mesh.auth(eve.user_id)
    )

    assert response.status_code == 404


async def test_a_frozen_wallet_cannot_send_but_can_receive_and_the_change_is_audited(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "20.00")
    bob = await create_person(wallet_stub, http, mesh, "20.00")
    wallet_id = (await http.get(f"/api/v1/wallets/{alice.user_id}", headers=mesh.admin())).json()[
        "wallet_id"
    ]

    frozen = await http.put(
        f"/api/v1/wallets/{wallet_id}/status",
        json={"status": "FROZEN", "reason": "suspicious activity"},
        headers=mesh.admin(),
    )
    refused = await send(http, mesh, alice, bob.email, "1.00", "while-frozen")
    received = await send(http, mesh, bob, alice.email, "1.00", "to-frozen")

    assert frozen.status_code == 200 and frozen.json()["status"] == "FROZEN"
    assert refused.status_code == 422
    assert refused.json()["error"]["reason"] == "WALLET_FROZEN"
    assert received.status_code == 200


async def test_only_an_empty_wallet_can_be_closed(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "1.00")
    empty = await create_person(wallet_stub, http, mesh, "0")
    ids = {}
    for person in (alice, empty):
        body = (await http.get(f"/api/v1/wallets/{person.user_id}", headers=mesh.admin())).json()
        ids[person.user_id] = body["wallet_id"]

    refused = await http.put(
        f"/api/v1/wallets/{ids[alice.user_id]}/status",
        json={"status": "CLOSED", "reason": "leaving"},
        headers=mesh.admin(),
    )
    closed = await http.put(
        f"/api/v1/wallets/{ids[empty.user_id]}/status",
        json={"status": "CLOSED", "reason": "leaving"},
        headers=mesh.admin(),
    )
    reopened = await http.put(
        f"/api/v1/wallets/{ids[empty.user_id]}/status",
        json={"status": "ACTIVE", "reason": "back"},
        headers=mesh.admin(),
    )

    assert refused.status_code == 422 and refused.json()["error"]["reason"] == "WALLET_NOT_EMPTY"
    assert closed.status_code == 200 and closed.json()["status"] == "CLOSED"
    assert reopened.status_code == 422 and reopened.json()["error"]["reason"] == "WALLET_CLOSED"


async def test_a_user_cannot_change_wallet_status(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "1.00")
    wallet_id = (await http.get(f"/api/v1/wallets/{alice.user_id}", headers=mesh.admin())).json()[
        "wallet_id"
    ]

    response = await http.put(
        f"/api/v1/wallets/{wallet_id}/status",
        json={"status": "ACTIVE", "reason": "me"},
        headers=mesh.auth(alice.user_id),
    )

    assert response.status_code == 403


async def test_a_pin_is_set_changed_only_with_the_current_one_and_validated(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "0")
    auth = mesh.auth(alice.user_id)

    first = await http.put("/api/v1/wallet/pin", json={"pin": "1234"}, headers=auth)
    no_current = await http.put("/api/v1/wallet/pin", json={"pin": "5678"}, headers=auth)
    wrong = await http.put(
        "/api/v1/wallet/pin", json={"pin": "5678", "current_pin": "0000"}, headers=auth
    )
    right = await http.put(
        "/api/v1/wallet/pin", json={"pin": "5678", "current_pin": "1234"}, headers=auth
    )
    letters = await http.put("/api/v1/wallet/pin", json={"pin": "12ab"}, headers=auth)

    assert first.status_code == 204
    assert no_current.json()["error"]["reason"] == "CURRENT_PIN_REQUIRED"
    assert wrong.status_code == 403 and wrong.json()["error"]["reason"] == "PIN_INCORRECT"
    assert right.status_code == 204
    assert letters.status_code == 400


async def test_five_wrong_pins_lock_the_pin(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "0")
    auth = mesh.auth(alice.user_id)
    await http.put("/api/v1/wallet/pin", json={"pin": "1234"}, headers=auth)

    reasons = []
    for _ in range(6):
        response = await http.put(
            "/api/v1/wallet/pin", json={"pin": "9999", "current_pin": "0000"}, headers=auth
        )
        reasons.append(response.json()["error"]["reason"])
    locked_even_with_the_right_pin = await http.put(
        "/api/v1/wallet/pin", json={"pin": "9999", "current_pin": "1234"}, headers=auth
    )

    assert reasons == ["PIN_INCORRECT"] * 5 + ["PIN_LOCKED"]
    assert locked_even_with_the_right_pin.json()["error"]["reason"] == "PIN_LOCKED"


async def test_an_internal_service_credits_and_debits_a_wallet_once_per_key(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "10.00")
    wallet_id = (await http.get(f"/api/v1/wallets/{alice.user_id}", headers=mesh.admin())).json()[
        "wallet_id"
    ]
    service = mesh.auth("booking-service", "service")
    credit = {"amount": "5.00", "type": "CREDIT", "description": "goodwill",
              "reference_id": "case-1", "reference_type": "SUPPORT"}  # fmt: skip

    first = await http.post(
        f"/api/v1/wallets/{wallet_id}/transactions", json=credit, headers=service
    )
    again = await http.post(
        f"/api/v1/wallets/{wallet_id}/transactions", json=credit, headers=service
    )
    too_much = await http.post(
        f"/api/v1/wallets/{wallet_id}/transactions",
        json={**credit, "type": "DEBIT", "amount": "100.00", "reference_id": "case-2"},
        headers=service,
    )
    as_user = await http.post(
        f"/api/v1/wallets/{wallet_id}/transactions", json=credit, headers=mesh.auth(alice.user_id)
    )

    assert first.status_code == 201
    assert (first.json()["amount"], first.json()["balance_after"]) == ("5.00", "15.00")
    assert again.json()["txn_id"] == first.json()["txn_id"]
    assert too_much.status_code == 422
    assert as_user.status_code == 403
    balance = (await http.get(f"/api/v1/wallets/{alice.user_id}", headers=mesh.admin())).json()
    assert balance["balance"] == "15.00"


async def test_two_concurrent_transfers_that_together_exceed_the_balance_one_succeeds(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    import asyncio

    alice = await create_person(wallet_stub, http, mesh, "10.00")
    bob = await create_person(wallet_stub, http, mesh, "0")
    carol = await create_person(wallet_stub, http, mesh, "0")

    answers = await asyncio.gather(
        send(http, mesh, alice, bob.email, "7.00", "race-1"),
        send(http, mesh, alice, carol.email, "7.00", "race-2"),
    )

    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 422]
    refused = next(a for a in answers if a.status_code == 422)
    assert refused.json()["error"]["reason"] == "INSUFFICIENT_FUNDS"
    wallet = (await http.get(f"/api/v1/wallets/{alice.user_id}", headers=mesh.admin())).json()
    assert wallet["balance"] == "3.00"


async def test_refused_transfers_say_why_and_move_nothing(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "10.00")

    to_self = await send(http, mesh, alice, alice.email, "1.00", "self")
    unknown = await send(http, mesh, alice, "nobody@example.com", "1.00", "unknown")
    too_precise = await send(http, mesh, alice, "someone", "1.001", "precise")
    negative = await send(http, mesh, alice, "someone", "-1.00", "negative")

    assert (to_self.status_code, to_self.json()["error"]["reason"]) == (400, "SELF_TRANSFER")
    assert (unknown.status_code, unknown.json()["error"]["reason"]) == (404, "RECIPIENT_NOT_FOUND")
    assert (too_precise.status_code, too_precise.json()["error"]["reason"]) == (
        400,
        "AMOUNT_PRECISION",
    )
    assert negative.status_code == 400
    wallet = (await http.get(f"/api/v1/wallets/{alice.user_id}", headers=mesh.admin())).json()
    assert wallet["balance"] == "10.00"


async def test_concurrent_wrong_pins_cannot_outrun_the_lockout(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    import asyncio

    alice = await create_person(wallet_stub, http, mesh, "0")
    auth = mesh.auth(alice.user_id)
    first = await http.put("/api/v1/wallet/pin", json={"pin": "1234"}, headers=auth)
    assert first.status_code == 204, first.text

    answers = await asyncio.gather(
        *(
            http.put(
                "/api/v1/wallet/pin", json={"pin": "9999", "current_pin": f"{i:04d}"}, headers=auth
            )
            for i in range(2000, 2012)
        )
    )

    reasons = [a.json()["error"]["reason"] for a in answers]
    assert reasons.count("PIN_INCORRECT") <= 5
    assert set(reasons) <= {"PIN_INCORRECT", "PIN_LOCKED"}
    assert "PIN_LOCKED" in reasons


async def test_concurrent_first_pins_set_one_and_never_overwrite_it(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    import asyncio

    alice = await create_person(wallet_stub, http, mesh, "0")
    auth = mesh.auth(alice.user_id)

    answers = await asyncio.gather(
        *(
            http.put("/api/v1/wallet/pin", json={"pin": f"{i:04d}"}, headers=auth)
            for i in range(3000, 3008)
        )
    )

    statuses = [a.status_code for a in answers]
    assert statuses.count(204) == 1, [a.text for a in answers]
    assert {a.json()["error"]["reason"] for a in answers if a.status_code != 204} == {
        "CURRENT_PIN_REQUIRED"
    }
    winner = f"{3000 + statuses.index(204):04d}"
    change = await http.put(
        "/api/v1/wallet/pin", json={"pin": "4321", "current_pin": winner}, headers=auth
    )
    assert change.status_code == 204, change.text


async def test_a_manager_cannot_fund_their_own_wallet_by_spelling_their_id_differently(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> None:
    import uuid

    from moneta.wallet.v1 import wallet_pb2

    company = str(uuid.uuid4())
    manager_id = str(uuid.uuid4())
    await wallet_stub.CreateUser(
        wallet_pb2.CreateUserRequest(
            user=wallet_pb2.User(
                user_id=manager_id, email=f"m{manager_id[:8]}@example.com", company_id=company,
                role=wallet_pb2.ROLE_MANAGER, default_currency="USD",
            )
        )
    )  # fmt: skip

    response = await http.post(
        "/api/v1/wallets",
        json={"user_id": manager_id.upper(), "currency": "USD", "initial_balance": "5000.00"},
        headers=mesh.auth(manager_id, "manager", company),
    )

    assert response.status_code == 403
    assert response.json()["error"]["reason"] == "SELF_FUNDING_FORBIDDEN"
