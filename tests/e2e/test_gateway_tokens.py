"""Tokens at the live gateway: forged, expired, for another audience or
issuer, not yet valid, unsigned (alg none) or in another algorithm are all
401 with a reason, and never reach an upstream: a forged admin token moves
nothing and reads nothing."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import httpx
import jwt
import pytest

from tests.e2e.conftest import JWT_SECRET, Mesh


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": str(uuid.uuid4()),
        "role": "admin",
        "iss": "moneta",
        "aud": "moneta-api",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


NOW = int(time.time())
TOKENS = {
    "forged": jwt.encode(claims(), "not-the-secret-but-long-enough-0123456789", "HS256"),
    "expired": jwt.encode(claims(iat=NOW - 900, nbf=NOW - 900, exp=NOW - 600), JWT_SECRET),
    "wrong-audience": jwt.encode(claims(aud="another-api"), JWT_SECRET),
    "wrong-issuer": jwt.encode(claims(iss="evil"), JWT_SECRET),
    "not-yet-valid": jwt.encode(claims(nbf=NOW + 600, exp=NOW + 1200), JWT_SECRET),
    "alg-none": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims())}.",
    "hs512": jwt.encode(claims(), JWT_SECRET + "-padding-for-hs512-0123456789", "HS512"),
    "no-expiry": jwt.encode(claims(exp=None), JWT_SECRET),
    "unknown-role": jwt.encode(claims(role="root"), JWT_SECRET),
    "garbage": "not.a.token",
}
EXPECTED = {name: "TOKEN_INVALID" for name in TOKENS} | {"expired": "TOKEN_EXPIRED"}


@pytest.mark.parametrize("name", sorted(TOKENS))
async def test_a_bad_token_is_401_with_a_reason_and_reaches_nothing(
    mesh: Mesh, http: httpx.AsyncClient, name: str
) -> None:
    headers = {"Authorization": f"Bearer {TOKENS[name]}"}

    verify = await http.get("/api/v1/admin/ledger/verify", headers=headers)
    merchant = await http.post(
        "/api/v1/merchants", json={"name": "Forged", "currency": "USD"}, headers=headers
    )

    for response in (verify, merchant):
        assert response.status_code == 401, response.text
        error = response.json()["error"]
        assert (error["status"], error["reason"]) == ("UNAUTHENTICATED", EXPECTED[name])
        assert response.headers["X-Request-ID"]


async def test_the_same_claims_properly_signed_are_accepted(
    mesh: Mesh, http: httpx.AsyncClient
) -> None:
    token = jwt.encode(claims(), JWT_SECRET, "HS256")

    response = await http.get(
        "/api/v1/admin/ledger/verify", headers={"Authorization": f"Bearer {token}"}
    )

    assert response.status_code == 200, response.text
