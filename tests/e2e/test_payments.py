"""Merchant payments (by QR code and by merchant id) and currency exchange,
end to end through the gateway, the wallet, fraud, budget and the ledger."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import httpx
import pytest

from moneta.fraud.v1 import fraud_pb2
from moneta.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from moneta.wallet.v1 import wallet_pb2_grpc
from services.common.errors import FailedPrecondition, Unavailable
from services.wallet import fx, handlers, merchants
from services.wallet.config import WalletSettings
from services.wallet.fx import fx_pool_account_id
from services.wallet.merchants import (
    PaymentRequest,
    merchant_account_id,
    open_signing_key,
    sign_payment_request,
)
from tests.conftest import TestRun
from tests.e2e.conftest import (
    InProcess,
    Mesh,
    Person,
    budgeted_person,
    create_merchant,
    create_person,
    fraud_case,
    only_budget,
    set_pin,
)

Stub = wallet_pb2_grpc.WalletServiceStub


@pytest.fixture
async def wallet_db(test_run: TestRun, mesh: Mesh) -> AsyncIterator[asyncpg.Connection]:
    """The wallet's own database, for what no API does: aging a quote, and
    reading a merchant's sealed signing key to sign an already expired code."""
    conn = await asyncpg.connect(test_run.database_url("wallet"))
    yield conn
    await conn.close()


async def create_qr(
    http: httpx.AsyncClient, mesh: Mesh, merchant_id: str, amount: str, reference: str
) -> str:
    response = await http.post(
        f"/api/v1/merchants/{merchant_id}/qr",
        json={"amount": amount, "currency": "USD", "reference": reference},
        headers=mesh.admin(),
    )
    assert response.status_code == 201, response.text
    return str(response.json()["qr_payload"])


async def pay(
    http: httpx.AsyncClient, mesh: Mesh, payer: Person, key: str, **what: str
) -> httpx.Response:
    return await http.post(
        "/api/v1/payments",
        json={"payer_id": payer.user_id, "idempotency_key": key, **what},
        headers=mesh.auth(payer.user_id),
    )


async def balances_of(http: httpx.AsyncClient, mesh: Mesh, person: Person) -> dict[str, str]:
    response = await http.get(f"/api/v1/wallets/{person.user_id}", headers=mesh.admin())
    assert response.status_code == 200, response.text
    return {b["currency"]: b["available"] for b in response.json()["balances"]}


async def ledger_balance(mesh: Mesh, account_id: uuid.UUID) -> int:
    async with grpc.aio.insecure_channel(mesh.grpc_addrs["ledger"]) as channel:
        response = await ledger_pb2_grpc.LedgerServiceStub(channel).GetBalances(
            ledger_pb2.GetBalancesRequest(account_ids=[str(account_id)])
        )
    return response.balances[0].posted if response.balances else 0


async def assert_ledger_verifies(http: httpx.AsyncClient, mesh: Mesh) -> None:
    response = await http.get("/api/v1/admin/ledger/verify", headers=mesh.admin())
    assert response.status_code == 200, response.text
    assert response.json()["ok"], response.json()["discrepancies"]


async def freeze(http: httpx.AsyncClient, mesh: Mesh, person: Person) -> None:
    wallet = await http.get(f"/api/v1/wallets/{person.user_id}", headers=mesh.admin())
    response = await http.put(
        f"/api/v1/wallets/{wallet.json()['wallet_id']}/status",
        json={"status": "FROZEN", "reason": "e2e"},
        headers=mesh.admin(),
    )
    assert response.status_code == 200, response.text


async def history(
    http: httpx.AsyncClient, mesh: Mesh, person: Person, kind: str
) -> list[dict[str, str]]:
    response = await http.get(
        f"/api/v1/wallet/{person.user_id}/transactions",
        params={"type": kind},
        headers=mesh.auth(person.user_id),
    )
    assert response.status_code == 200, response.text
    return list(response.json()["transactions"])


def error_of(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, str(response.json()["error"]["reason"])


# ---------------------------------------------------------------- merchant payments


async def test_paying_a_qr_code_moves_the_amount_to_the_merchant(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub
) -> None:
    payer = await create_person(wallet_stub, http, mesh, "50.00")
    merchant = await create_merchant(http, mesh)
    qr = await create_qr(http, mesh, merchant, "12.50", "order-1")

    response = await pay(http, mesh, payer, "qr-1", qr_payload=qr)

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["payer_balance"], body["currency"]) == (
        "COMPLETED",
        "37.50",
        "USD",
    )
    assert await ledger_balance(mesh, merchant_account_id(uuid.UUID(merchant), "USD")) == 1250
    [item] = await history(http, mesh, payer, "MERCHANT_PAYMENT")
    assert (item["amount"], item["currency"], item["status"], item["balance_after"]) == (
        "-12.50",
        "USD",
        "COMPLETED",
        "37.50",
    )
    assert item["counterparty"].startswith("Cafe ")
    await assert_ledger_verifies(http, mesh)


async def test_in_app_checkout_pays_a_merchant_id_with_an_amount(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub
) -> None:
    payer = await create_person(wallet_stub, http, mesh, "20.00")
    merchant = await create_merchant(http, mesh)

    response = await pay(
        http, mesh, payer, "checkout-1", merchant_id=merchant, amount="7.25", currency="USD"
    )

    assert response.status_code == 200, response.text
    assert response.json()["payer_balance"] == "12.75"
    assert await ledger_balance(mesh, merchant_account_id(uuid.UUID(merchant), "USD")) == 725


async def test_a_qr_code_pays_once(mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub) -> None:
    alice = await create_person(wallet_stub, http, mesh, "50.00")
    bob = await create_person(wallet_stub, http, mesh, "50.00")
    merchant = await create_merchant(http, mesh)
    qr = await create_qr(http, mesh, merchant, "10.00", "table-7")
    first = await pay(http, mesh, alice, "qr-once", qr_payload=qr)

    retry = await pay(http, mesh, alice, "qr-once", qr_payload=qr)
    again_by_alice = await pay(http, mesh, alice, "qr-once-2", qr_payload=qr)
    by_bob = await pay(http, mesh, bob, "qr-bob", qr_payload=qr)
    reissued = await http.post(
        f"/api/v1/merchants/{merchant}/qr",
        json={"amount": "10.00", "currency": "USD", "reference": "table-7"},
        headers=mesh.admin(),
    )

    assert first.status_code == retry.status_code == 200
    assert retry.json() == first.json()  # the same payer's retry: the first answer
    assert error_of(again_by_alice) == (409, "QR_ALREADY_PAID")
    assert error_of(by_bob) == (409, "QR_ALREADY_PAID")
    assert error_of(reissued) == (409, "QR_ALREADY_PAID")
    assert (await balances_of(http, mesh, alice))["USD"] == "40.00"
    assert (await balances_of(http, mesh, bob))["USD"] == "50.00"
    assert await ledger_balance(mesh, merchant_account_id(uuid.UUID(merchant), "USD")) == 1000


async def test_a_qr_code_whose_payment_was_refused_stays_payable(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub
) -> None:
    poor = await create_person(wallet_stub, http, mesh, "1.00")
    rich = await create_person(wallet_stub, http, mesh, "30.00")
    merchant = await create_merchant(http, mesh)
    qr = await create_qr(http, mesh, merchant, "20.00", "order-9")

    refused = await pay(http, mesh, poor, "poor-1", qr_payload=qr)
    paid = await pay(http, mesh, rich, "rich-1", qr_payload=qr)

    assert error_of(refused) == (422, "INSUFFICIENT_FUNDS")
    assert paid.status_code == 200, paid.text
    assert paid.json()["payer_balance"] == "10.00"


async def test_an_expired_qr_code_is_refused_and_nothing_moves(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub, wallet_db: asyncpg.Connection
) -> None:
    payer = await create_person(wallet_stub, http, mesh, "50.00")
    merchant = await create_merchant(http, mesh)
    # A code the merchant signed that expired a minute ago (codes live 15
    # minutes; no test waits that long): signed with the merchant's own key.
    sealed = await wallet_db.fetchval(
        "SELECT private_key_encrypted FROM merchants WHERE merchant_id = $1", uuid.UUID(merchant)
    )
    key = open_signing_key(
        WalletSettings.model_fields["bank_account_key"].default, uuid.UUID(merchant), sealed
    )
    expired = sign_payment_request(
        PaymentRequest(
            merchant_id=uuid.UUID(merchant),
            amount=500,
            currency="USD",
            reference="stale",
            expires_at=int((datetime.now(UTC) - timedelta(minutes=1)).timestamp()),
        ),
        key,
    )

    response = await pay(http, mesh, payer, "expired-qr", qr_payload=expired)

    assert error_of(response) == (422, "QR_EXPIRED")
    assert (await balances_of(http, mesh, payer))["USD"] == "50.00"


async def test_a_tampered_qr_code_is_refused(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub
) -> None:
    payer = await create_person(wallet_stub, http, mesh, "50.00")
    merchant = await create_merchant(http, mesh)
    body, signature = (await create_qr(http, mesh, merchant, "25.00", "order-t")).split(".")
    fields = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    fields["amount"] = 1  # 0.01 instead of 25.00
    forged = base64.urlsafe_b64encode(json.dumps(fields).encode()).decode().rstrip("=")

    response = await pay(http, mesh, payer, "tampered", qr_payload=f"{forged}.{signature}")
    garbage = await pay(http, mesh, payer, "garbage", qr_payload="not-a-qr-code")

    assert error_of(response) == (400, "QR_SIGNATURE_INVALID")
    assert error_of(garbage) == (400, "QR_MALFORMED")
    assert (await balances_of(http, mesh, payer))["USD"] == "50.00"


async def test_paying_more_than_the_balance_is_refused_and_writes_nothing(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub
) -> None:
    payer = await create_person(wallet_stub, http, mesh, "5.00")
    merchant = await create_merchant(http, mesh)

    response = await pay(
        http, mesh, payer, "too-much", merchant_id=merchant, amount="5.01", currency="USD"
    )
    retry = await pay(
        http, mesh, payer, "too-much", merchant_id=merchant, amount="5.01", currency="USD"
    )

    assert error_of(response) == error_of(retry) == (422, "INSUFFICIENT_FUNDS")
    assert (await balances_of(http, mesh, payer))["USD"] == "5.00"
    assert await ledger_balance(mesh, merchant_account_id(uuid.UUID(merchant), "USD")) == 0
    await assert_ledger_verifies(http, mesh)


async def test_a_frozen_payer_cannot_pay(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub
) -> None:
    payer = await create_person(wallet_stub, http, mesh, "50.00")
    merchant = await create_merchant(http, mesh)
    await freeze(http, mesh, payer)

    response = await pay(
        http, mesh, payer, "frozen", merchant_id=merchant, amount="1.00", currency="USD"
    )

    assert error_of(response) == (422, "WALLET_FROZEN")
    assert (await balances_of(http, mesh, payer))["USD"] == "50.00"


async def test_two_payers_racing_for_one_qr_code_pay_it_once(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "50.00")
    bob = await create_person(wallet_stub, http, mesh, "50.00")
    merchant = await create_merchant(http, mesh)
    qr = await create_qr(http, mesh, merchant, "10.00", "race")

    answers = await asyncio.gather(
        pay(http, mesh, alice, "race-a", qr_payload=qr),
        pay(http, mesh, bob, "race-b", qr_payload=qr),
    )

    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 409], [a.text for a in answers]
    refused = next(a for a in answers if a.status_code == 409)
    assert error_of(refused)[1] in ("QR_ALREADY_PAID", "QR_PAYMENT_IN_PROGRESS")
    assert await ledger_balance(mesh, merchant_account_id(uuid.UUID(merchant), "USD")) == 1000
    left = {(await balances_of(http, mesh, p))["USD"] for p in (alice, bob)}
    assert left == {"40.00", "50.00"}


async def test_a_payment_whose_ledger_answer_was_lost_completes_once_on_retry(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub, in_process: InProcess
) -> None:
    payer = await create_person(wallet_stub, http, mesh, "30.00")
    merchant = await create_merchant(http, mesh)
    checkout = {"merchant_id": merchant, "amount": "8.00", "currency": "USD"}
    with pytest.raises(Unavailable):
        await merchants.pay_merchant(
            in_process.pool,
            in_process.lossy,
            merchants.PayMerchantCommand(
                payer_id=payer.user_id, idempotency_key="lost", merchant_id=merchant,
                amount=800, currency="USD",
            ),
        )  # fmt: skip

    retry = await pay(http, mesh, payer, "lost", **checkout)

    assert retry.status_code == 200, retry.text
    assert retry.json()["payer_balance"] == "22.00"
    assert await ledger_balance(mesh, merchant_account_id(uuid.UUID(merchant), "USD")) == 800
    assert len(await history(http, mesh, payer, "MERCHANT_PAYMENT")) == 1


async def test_the_reconciler_completes_an_abandoned_payment_whose_money_moved(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub, in_process: InProcess
) -> None:
    payer = await create_person(wallet_stub, http, mesh, "30.00")
    merchant = await create_merchant(http, mesh)
    qr = await create_qr(http, mesh, merchant, "5.00", "abandoned")
    with pytest.raises(Unavailable):
        await merchants.pay_merchant(
            in_process.pool,
            in_process.lossy,
            merchants.PayMerchantCommand(
                payer_id=payer.user_id, idempotency_key="gave-up", qr_payload=qr
            ),
        )

    await merchants.reconcile_stale_merchant_payments(in_process.pool, in_process.peers, 0.0)

    [item] = await history(http, mesh, payer, "MERCHANT_PAYMENT")
    assert (item["amount"], item["status"]) == ("-5.00", "COMPLETED")
    replay = await pay(http, mesh, payer, "gave-up", qr_payload=qr)
    assert replay.status_code == 200, replay.text
    assert replay.json()["payer_balance"] == "25.00"
    await assert_ledger_verifies(http, mesh)


async def test_an_abandoned_payment_that_never_moved_money_frees_its_budget(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub, in_process: InProcess
) -> None:
    # The wallet names its reservations, so one made just before a crash
    # (nothing recorded) is freed by the reconciler, not left to its ttl.
    payer = await budgeted_person(wallet_stub, http, mesh, "50.00", "P2P", "30")
    friend = await create_person(wallet_stub, http, mesh, "0")
    cmd = handlers.TransferCommand(payer.user_id, ("user_id", friend.user_id), 2000, "USD", "cut")
    with pytest.raises(Unavailable):
        await handlers.transfer(in_process.pool, in_process.down, cmd)
    reserved = (await only_budget(http, mesh, payer))["reserved_amount"]
    recorded = await in_process.pool.fetchval(
        "SELECT reservation_id FROM payments WHERE sender_user_id = $1", uuid.UUID(payer.user_id)
    )

    await handlers.reconcile_stale_payments(in_process.pool, in_process.peers, 0.0)

    budget = await only_budget(http, mesh, payer)
    assert reserved == "20.00" and recorded is None  # nothing recorded: a crash loses nothing
    assert (budget["reserved_amount"], budget["used_amount"]) == ("0.00", "0.00")
    with pytest.raises(FailedPrecondition) as replay:
        await handlers.transfer(in_process.pool, in_process.peers, cmd)
    assert replay.value.reason == "PAYMENT_ABANDONED"
    assert (await balances_of(http, mesh, payer))["USD"] == "50.00"


async def test_a_payment_in_its_own_category_whose_answer_was_lost_is_completed(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub, in_process: InProcess
) -> None:
    payer = await budgeted_person(wallet_stub, http, mesh, "50.00", "MEALS", "30")
    friend = await create_person(wallet_stub, http, mesh, "0")
    cmd = handlers.TransferCommand(
        payer.user_id, ("user_id", friend.user_id), 1200, "USD", "lunch", category="MEALS"
    )
    with pytest.raises(Unavailable):
        await handlers.transfer(in_process.pool, in_process.lossy, cmd)

    await handlers.reconcile_stale_payments(in_process.pool, in_process.peers, 0.0)

    replay = await handlers.transfer(in_process.pool, in_process.peers, cmd)
    assert replay.status == "COMPLETED"
    budget = await only_budget(http, mesh, payer)
    assert (budget["used_amount"], budget["reserved_amount"]) == ("12.00", "0.00")
    assert (await balances_of(http, mesh, payer))["USD"] == "38.00"


async def test_a_payment_flagged_for_review_goes_ahead_only_with_the_payers_pin(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub
) -> None:
    payer = await create_person(wallet_stub, http, mesh, "20000.00")
    await set_pin(http, mesh, payer, "2468")
    merchant = await create_merchant(http, mesh)
    # The mesh sends payments of 10,000 or more to review; the merchant
    # cannot wait for one, so the payer's PIN steps up there and then.
    big = {"merchant_id": merchant, "amount": "10000.00", "currency": "USD"}

    no_pin = await pay(http, mesh, payer, "big", **big)
    same_key_with_pin = await pay(http, mesh, payer, "big", **big, pin="2468")
    wrong_pin = await pay(http, mesh, payer, "big-2", **big, pin="1357")
    untouched = await balances_of(http, mesh, payer)
    right_pin = await pay(http, mesh, payer, "big-3", **big, pin="2468")
    replayed = await pay(http, mesh, payer, "big-3", **big, pin="2468")

    assert error_of(no_pin) == (422, "PIN_REQUIRED")
    assert error_of(same_key_with_pin) == (422, "PIN_REQUIRED")  # the key's first answer
    assert error_of(wrong_pin) == (403, "PIN_INCORRECT")
    assert untouched["USD"] == "20000.00"
    assert right_pin.status_code == 200, right_pin.text
    assert right_pin.json()["payer_balance"] == "10000.00"
    assert replayed.json() == right_pin.json()
    assert (await balances_of(http, mesh, payer))["USD"] == "10000.00"
    assert await ledger_balance(mesh, merchant_account_id(uuid.UUID(merchant), "USD")) == 1_000_000
    case = await fraud_case(mesh, right_pin.json()["payment_id"])
    assert (case.status, case.resolved_by) == (
        fraud_pb2.REVIEW_STATUS_APPROVED, f"payer-pin:{payer.user_id}",
    )  # fmt: skip
    await assert_ledger_verifies(http, mesh)


async def test_a_qr_code_refused_for_a_wrong_pin_is_payable_again_with_the_right_one(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub
) -> None:
    payer = await create_person(wallet_stub, http, mesh, "20000.00")
    await set_pin(http, mesh, payer, "2468")
    merchant = await create_merchant(http, mesh)
    qr = await create_qr(http, mesh, merchant, "10000.00", "till-7")

    wrong = await pay(http, mesh, payer, "till-a", qr_payload=qr, pin="1357")
    right = await pay(http, mesh, payer, "till-b", qr_payload=qr, pin="2468")

    assert error_of(wrong) == (403, "PIN_INCORRECT")
    assert right.status_code == 200, right.text
    assert (await balances_of(http, mesh, payer))["USD"] == "10000.00"


async def test_an_unknown_merchant_is_not_found(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub
) -> None:
    payer = await create_person(wallet_stub, http, mesh, "5.00")

    response = await pay(
        http, mesh, payer, "nobody", merchant_id=str(uuid.uuid4()), amount="1.00", currency="USD"
    )

    assert error_of(response) == (404, "MERCHANT_NOT_FOUND")


async def test_a_user_cannot_pay_from_someone_elses_wallet(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "10.00")
    eve = await create_person(wallet_stub, http, mesh, "0")
    merchant = await create_merchant(http, mesh)

    response = await http.post(
        "/api/v1/payments",
        json={
            "payer_id": alice.user_id,
            "merchant_id": merchant,
            "amount": "1.00",
            "currency": "USD",
            "idempotency_key": "theft",
        },
        headers=mesh.auth(eve.user_id),
    )

    assert response.status_code == 404
    assert (await balances_of(http, mesh, alice))["USD"] == "10.00"


async def test_only_admins_register_merchants(mesh: Mesh, http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/api/v1/merchants",
        json={"name": "Mine", "currency": "USD"},
        headers=mesh.auth(str(uuid.uuid4())),
    )

    assert error_of(response) == (403, "ROLE_REQUIRED")


# ---------------------------------------------------------------- exchange


async def quote(
    http: httpx.AsyncClient, mesh: Mesh, person: Person, source: str, target: str, amount: str
) -> dict[str, str]:
    response = await http.post(
        "/api/v1/exchange/quotes",
        json={
            "user_id": person.user_id,
            "from_currency": source,
            "to_currency": target,
            "amount": amount,
        },
        headers=mesh.auth(person.user_id),
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


async def execute(
    http: httpx.AsyncClient, mesh: Mesh, person: Person, quote_id: str, key: str
) -> httpx.Response:
    return await http.post(
        "/api/v1/exchanges",
        json={"user_id": person.user_id, "quote_id": quote_id, "idempotency_key": key},
        headers=mesh.auth(person.user_id),
    )


async def test_exchange_moves_exactly_the_quoted_amounts(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub
) -> None:
    person = await create_person(wallet_stub, http, mesh, "100.00")
    pools_before = (
        await ledger_balance(mesh, fx_pool_account_id("USD")),
        await ledger_balance(mesh, fx_pool_account_id("JPY")),
    )
    q = await quote(http, mesh, person, "USD", "JPY", "40.00")

    response = await execute(http, mesh, person, q["quote_id"], "fx-1")

    assert (q["rate"], q["from_amount"], q["to_amount"]) == ("150.444", "40.00", "6017")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "COMPLETED"
    assert {b["currency"]: b["available"] for b in body["balances"]} == {
        "USD": "60.00",
        "JPY": "6017",
    }
    assert await balances_of(http, mesh, person) == {"USD": "60.00", "JPY": "6017"}
    # What left the wallet is in the USD pool; what arrived came out of the JPY pool.
    assert await ledger_balance(mesh, fx_pool_account_id("USD")) == pools_before[0] + 4000
    assert await ledger_balance(mesh, fx_pool_account_id("JPY")) == pools_before[1] - 6017
    rows = await history(http, mesh, person, "EXCHANGE")
    assert sorted((r["amount"], r["currency"]) for r in rows) == [
        ("-40.00", "USD"),
        ("6017", "JPY"),
    ]
    await assert_ledger_verifies(http, mesh)


async def test_exchange_back_into_a_three_decimal_currency(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub
) -> None:
    person = await create_person(wallet_stub, http, mesh, "10.00")
    q = await quote(http, mesh, person, "USD", "BHD", "10.00")

    response = await execute(http, mesh, person, q["quote_id"], "fx-bhd")

    assert (q["rate"], q["to_amount"]) == ("0.37412", "3.741")  # 3.7412, rounded down
    assert response.status_code == 200, response.text
    assert await balances_of(http, mesh, person) == {"USD": "0.00", "BHD": "3.741"}


async def test_a_quote_executed_twice_with_the_same_key_moves_money_once(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub
) -> None:
    person = await create_person(wallet_stub, http, mesh, "30.00")
    q = await quote(http, mesh, person, "USD", "EUR", "10.00")

    first = await execute(http, mesh, person, q["quote_id"], "fx-twice")
    second = await execute(http, mesh, person, q["quote_id"], "fx-twice")
    other_key = await execute(http, mesh, person, q["quote_id"], "fx-twice-2")

    assert first.status_code == second.status_code == 200, first.text
    assert second.json() == first.json()
    assert error_of(other_key) == (409, "QUOTE_ALREADY_USED")
    assert await balances_of(http, mesh, person) == {"USD": "20.00", "EUR": q["to_amount"]}
    await assert_ledger_verifies(http, mesh)


async def test_a_quote_used_after_expiry_is_refused(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub, wallet_db: asyncpg.Connection
) -> None:
    person = await create_person(wallet_stub, http, mesh, "30.00")
    q = await quote(http, mesh, person, "USD", "EUR", "10.00")
    # Quotes live 30 seconds; rather than wait, this one is made to expire.
    await wallet_db.execute(
        "UPDATE fx_quotes SET expires_at = now() - interval '1 second' WHERE quote_id = $1",
        uuid.UUID(q["quote_id"]),
    )

    response = await execute(http, mesh, person, q["quote_id"], "fx-late")

    assert error_of(response) == (422, "QUOTE_EXPIRED")
    assert await balances_of(http, mesh, person) == {"USD": "30.00"}


async def test_an_exchange_beyond_the_balance_is_refused_and_the_quote_stays_usable(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub
) -> None:
    person = await create_person(wallet_stub, http, mesh, "5.00")
    q = await quote(http, mesh, person, "USD", "JPY", "10.00")

    refused = await execute(http, mesh, person, q["quote_id"], "fx-poor")
    replay = await execute(http, mesh, person, q["quote_id"], "fx-poor")

    assert error_of(refused) == error_of(replay) == (422, "INSUFFICIENT_FUNDS")
    after = await balances_of(http, mesh, person)
    assert (after["USD"], after.get("JPY", "0")) == ("5.00", "0")
    await assert_ledger_verifies(http, mesh)


async def test_a_frozen_wallet_cannot_exchange(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub
) -> None:
    person = await create_person(wallet_stub, http, mesh, "5.00")
    q = await quote(http, mesh, person, "USD", "EUR", "1.00")
    await freeze(http, mesh, person)

    response = await execute(http, mesh, person, q["quote_id"], "fx-frozen")

    assert error_of(response) == (422, "WALLET_FROZEN")


async def test_someone_elses_quote_is_not_found(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "5.00")
    eve = await create_person(wallet_stub, http, mesh, "5.00")
    q = await quote(http, mesh, alice, "USD", "EUR", "1.00")

    response = await execute(http, mesh, eve, q["quote_id"], "fx-steal")
    for_alice = await http.post(
        "/api/v1/exchange/quotes",
        json={
            "user_id": alice.user_id,
            "from_currency": "USD",
            "to_currency": "EUR",
            "amount": "1",
        },
        headers=mesh.auth(eve.user_id),
    )

    assert error_of(response) == (404, "QUOTE_NOT_FOUND")
    assert for_alice.status_code == 404
    assert (await balances_of(http, mesh, alice))["USD"] == "5.00"


async def test_a_quote_amount_with_too_many_decimals_is_refused(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub
) -> None:
    person = await create_person(wallet_stub, http, mesh, "5.00")

    response = await http.post(
        "/api/v1/exchange/quotes",
        json={
            "user_id": person.user_id,
            "from_currency": "JPY",
            "to_currency": "USD",
            "amount": "1.5",
        },
        headers=mesh.auth(person.user_id),
    )

    assert error_of(response) == (400, "AMOUNT_PRECISION")


async def test_one_quote_executed_concurrently_under_two_keys_moves_money_once(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub
) -> None:
    person = await create_person(wallet_stub, http, mesh, "30.00")
    q = await quote(http, mesh, person, "USD", "GBP", "10.00")

    answers = await asyncio.gather(
        execute(http, mesh, person, q["quote_id"], "fx-race-1"),
        execute(http, mesh, person, q["quote_id"], "fx-race-2"),
    )

    assert sorted(a.status_code for a in answers) == [200, 409], [a.text for a in answers]
    refused = next(a for a in answers if a.status_code == 409)
    assert error_of(refused)[1] in ("QUOTE_ALREADY_USED", "QUOTE_IN_USE")
    assert await balances_of(http, mesh, person) == {"USD": "20.00", "GBP": q["to_amount"]}


async def test_an_idempotency_key_reused_for_another_quote_is_a_conflict(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub
) -> None:
    person = await create_person(wallet_stub, http, mesh, "30.00")
    first = await quote(http, mesh, person, "USD", "EUR", "1.00")
    second = await quote(http, mesh, person, "USD", "EUR", "2.00")
    assert (await execute(http, mesh, person, first["quote_id"], "fx-key")).status_code == 200

    response = await execute(http, mesh, person, second["quote_id"], "fx-key")

    assert error_of(response) == (409, "IDEMPOTENCY_KEY_REUSED")
    assert (await balances_of(http, mesh, person))["USD"] == "29.00"


async def test_an_exchange_whose_ledger_answer_was_lost_completes_once(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: Stub, in_process: InProcess
) -> None:
    person = await create_person(wallet_stub, http, mesh, "30.00")
    retried = await quote(http, mesh, person, "USD", "JPY", "10.00")
    reconciled = await quote(http, mesh, person, "USD", "EUR", "10.00")
    for q, key in ((retried, "fx-lost"), (reconciled, "fx-abandoned")):
        with pytest.raises(Unavailable):
            await fx.execute_exchange(
                in_process.pool, in_process.lossy, user_id=person.user_id,
                quote_id=q["quote_id"], idempotency_key=key,
            )  # fmt: skip

    retry = await execute(http, mesh, person, retried["quote_id"], "fx-lost")
    await fx.reconcile_stale_exchanges(in_process.pool, in_process.peers, 0.0)

    assert retry.status_code == 200, retry.text
    assert await balances_of(http, mesh, person) == {
        "USD": "10.00",
        "JPY": retried["to_amount"],
        "EUR": reconciled["to_amount"],
    }
    assert len(await history(http, mesh, person, "EXCHANGE")) == 4
    replay = await execute(http, mesh, person, reconciled["quote_id"], "fx-abandoned")
    assert replay.status_code == 200, replay.text
    await assert_ledger_verifies(http, mesh)
