"""Hostile inputs at the live gateway get a clean 4xx with a reason and move
nothing: bodies over the size limit, JSON nested too deep or not JSON at
all, numbers too long to parse, amounts beyond what 64-bit minor units hold,
page sizes beyond the maximum."""

from __future__ import annotations

import httpx
import pytest

from moneta.wallet.v1 import wallet_pb2_grpc
from tests.e2e.conftest import Mesh, create_person


@pytest.mark.parametrize(
    ("amount", "reason"),
    [
        ('"92233720368547758.08"', "AMOUNT_OUT_OF_RANGE"),
        ("1e30", "AMOUNT_OUT_OF_RANGE"),
        ("1e400", "INVALID_AMOUNT"),
        ('"NaN"', "INVALID_AMOUNT"),
        ('"1e5"', "INVALID_AMOUNT"),
        ("9" * 5000, "INVALID_JSON"),
    ],
    ids=["beyond-int64", "huge-float", "infinite", "nan", "exponent-string", "5000-digits"],
)
async def test_an_impossible_amount_is_400_and_moves_nothing(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    amount: str,
    reason: str,
) -> None:
    alice = await create_person(wallet_stub, http, mesh, "10.00")
    body = (
        f'{{"sender_id": "{alice.user_id}", "recipient": "{alice.email}", "amount": {amount},'
        f' "currency": "USD", "idempotency_key": "k"}}'
    )

    response = await http.post(
        "/api/v1/transfers",
        content=body,
        headers={**mesh.auth(alice.user_id), "Content-Type": "application/json"},
    )

    assert response.status_code == 400, response.text
    assert response.json()["error"]["reason"] == reason
    wallet = await http.get(f"/api/v1/wallets/{alice.user_id}", headers=mesh.admin())
    assert wallet.json()["balance"] == "10.00"


@pytest.mark.parametrize(
    ("content", "status", "reason"),
    [
        (b'{"note": "' + b"x" * 70_000 + b'"}', 413, "BODY_TOO_LARGE"),
        (b'{"note": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "JSON_TOO_DEEP"),
        (b"{not json", 400, "INVALID_JSON"),
        (b"[1, 2, 3]", 400, "VALIDATION_ERROR"),
    ],
    ids=["70-KiB", "5000-deep", "not-json", "not-an-object"],
)
async def test_a_hostile_body_is_refused_cleanly(
    mesh: Mesh, http: httpx.AsyncClient, content: bytes, status: int, reason: str
) -> None:
    response = await http.post(
        "/api/v1/transfers",
        content=content,
        headers={**mesh.auth("someone"), "Content-Type": "application/json"},
    )

    assert response.status_code == status, response.text
    assert response.json()["error"]["reason"] == reason
    assert response.headers["X-Request-ID"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/wallet/{user}/transactions?page_size=1000000",
        "/api/v1/wallet/{user}/transactions?page_size=99999999999999999999999999",
        "/api/v1/wallets/{user}/transactions?limit=100000",
        "/api/v1/budgets/{user}?page_size=-1",
        "/api/v1/fraud/reviews?page_size=5000",
    ],
)
async def test_a_page_size_beyond_the_maximum_is_400(
    mesh: Mesh, http: httpx.AsyncClient, path: str
) -> None:
    response = await http.get(path.format(user="someone"), headers=mesh.admin())

    assert response.status_code == 400, response.text
    assert response.json()["error"]["reason"] == "VALIDATION_ERROR"
