"""The gateway's edge, in process: a request id on every answer, bodies over
the limit refused with 413 (declared or streamed), JSON nested too deep
refused unparsed, a bug answered with a 500 that says nothing but the
request id, and an OpenAPI document that describes every endpoint with
its errors. No upstreams are called: every request here stops at the edge
or at validation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.common.errors import Aborted, AlreadyExists, AttemptExpired, MonetaError
from services.gateway.app import create_app, json_depth_exceeds
from services.gateway.config import GatewaySettings
from services.gateway.deps import error_response

MAX_BODY = 1024


@pytest.fixture(scope="module")
async def app() -> AsyncIterator[FastAPI]:
    # Rate limits off: nothing here may reach Redis (or an upstream).
    settings = GatewaySettings(max_body_bytes=MAX_BODY, max_json_depth=8, rate_limit_enabled=False)
    app = create_app(settings)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals: postgres://admin:hunter2@db")

    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        yield client


def error(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["reason"]


async def test_every_answer_carries_a_new_request_id(client: httpx.AsyncClient) -> None:
    first = await client.get("/health")
    second = await client.get("/health")

    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]


async def test_a_sane_request_id_is_kept_and_a_bad_one_replaced(client: httpx.AsyncClient) -> None:
    kept = await client.get("/health", headers={"X-Request-ID": "abc-123"})
    replaced = await client.get("/health", headers={"X-Request-ID": "bad id <script>"})

    assert kept.headers["X-Request-ID"] == "abc-123"
    assert replaced.headers["X-Request-ID"] not in ("", "bad id <script>")


async def test_a_declared_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/transfers", content=b"{" + b" " * MAX_BODY + b"}")

    assert error(response) == (413, "BODY_TOO_LARGE")
    assert response.headers["X-Request-ID"]


async def test_a_streamed_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b" " * 256

    response = await client.post("/api/v1/transfers", content=chunks())

    assert error(response) == (413, "BODY_TOO_LARGE")


async def test_json_nested_too_deep_is_400_before_it_is_parsed(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/transfers",
        content=b"[" * 200 + b"]" * 200,
        headers={"Content-Type": "application/json"},
    )

    assert error(response) == (400, "JSON_TOO_DEEP")


async def test_a_bug_is_a_500_with_only_the_request_id(client: httpx.AsyncClient) -> None:
    response = await client.get("/boom", headers={"X-Request-ID": "req-bug"})

    assert error(response) == (500, "INTERNAL")
    assert "req-bug" in response.json()["error"]["message"]
    assert "hunter2" not in response.text and "postgres" not in response.text
    assert response.headers["X-Request-ID"] == "req-bug"


async def test_an_unknown_route_is_a_404_envelope(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/nothing-here")

    assert error(response) == (404, "ROUTE_NOT_FOUND")


async def test_a_request_without_a_token_is_401_before_anything_else(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/api/v1/wallets/someone")

    assert error(response) == (401, "TOKEN_MISSING")


@pytest.mark.parametrize(
    ("text", "limit", "deeper"),
    [
        (b'{"a": [1, {"b": [2]}]}', 4, False),
        (b'{"a": [1, {"b": [[2]]}]}', 4, True),
        (b'{"s": "[[[[[[[[[[[[[[[[[[[[[["}', 3, False),
        (b'{"s": "\\"[[[[[[[[[[[[[[[["}', 3, False),
        (b"[" * 40, 32, True),
    ],
    ids=["within", "beyond", "brackets-in-a-string", "escaped-quote", "unclosed"],
)
def test_json_depth_counts_only_structure(text: bytes, limit: int, deeper: bool) -> None:
    assert json_depth_exceeds(text, limit) is deeper


# -- the OpenAPI document


@pytest.fixture(scope="module")
def document(app: FastAPI) -> dict[str, Any]:
    return app.openapi()


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, ops in document["paths"].items()
        for method, op in ops.items()
        if path.startswith("/api/")
    ]


# Every row of the endpoint table.
TABLE = {
    ("POST", "/api/v1/wallets"),
    ("GET", "/api/v1/wallets/{user_id}"),
    ("PUT", "/api/v1/wallets/{wallet_id}/status"),
    ("GET", "/api/v1/wallets/{wallet_id}/transactions"),
    ("POST", "/api/v1/wallets/{wallet_id}/transactions"),
    ("GET", "/api/v1/wallet/{user_id}/transactions"),
    ("POST", "/api/v1/wallet/bank-accounts"),
    ("POST", "/api/v1/wallet/add-funds"),
    ("POST", "/api/v1/wallet/withdraw"),
    ("PUT", "/api/v1/wallet/pin"),
    ("POST", "/api/v1/transfers"),
    ("POST", "/api/v1/transfers/{transfer_id}/confirm"),
    ("POST", "/api/v1/merchants"),
    ("POST", "/api/v1/merchants/{merchant_id}/qr"),
    ("POST", "/api/v1/payments"),
    ("POST", "/api/v1/exchange/quotes"),
    ("POST", "/api/v1/exchanges"),
    ("GET", "/api/v1/budgets/{user_id}"),
    ("POST", "/api/v1/budgets"),
    ("PUT", "/api/v1/budgets/{budget_id}"),
    ("GET", "/api/v1/budgets/{budget_id}/history"),
    ("GET", "/api/v1/fraud/reviews"),
    ("POST", "/api/v1/fraud/reviews/{review_id}/resolve"),
    ("POST", "/api/v1/fraud/flags"),
    ("DELETE", "/api/v1/fraud/flags/{user_id}"),
    ("GET", "/api/v1/admin/ledger/verify"),
    ("POST", "/api/v1/webhooks/bank"),
}


def test_openapi_describes_every_endpoint_of_the_table(document: dict[str, Any]) -> None:
    described = {(method, path) for method, path, _ in operations(document)}
    assert {"/health", "/ready", "/metrics"} <= set(document["paths"])

    assert described >= TABLE


def test_openapi_describes_each_endpoints_errors_with_the_envelope(
    document: dict[str, Any],
) -> None:
    for method, path, op in operations(document):
        for code in ("400", "401", "404", "413", "429", "500", "503", "504"):
            schema = op["responses"][code]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, code)
    envelope = document["components"]["schemas"]["ErrorDetail"]
    assert set(envelope["required"]) == {"code", "status", "reason", "message", "details"}


async def test_docs_render(client: httpx.AsyncClient) -> None:
    docs = await client.get("/docs")
    schema = await client.get("/openapi.json")

    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert schema.status_code == 200 and schema.json()["info"]["title"] == "Moneta API"


@pytest.mark.parametrize(
    ("refusal", "retry_after"),
    [
        (Aborted("still at work", reason="REQUEST_IN_PROGRESS"), "1"),
        (AttemptExpired(), "1"),
        (AlreadyExists("key reused", reason="IDEMPOTENCY_KEY_REUSED"), None),
        (AlreadyExists("used", reason="QUOTE_ALREADY_USED"), None),
    ],
)
def test_a_409_a_retry_may_get_past_says_when_to_retry_and_a_final_one_does_not(
    refusal: MonetaError, retry_after: str | None
) -> None:
    response = error_response(refusal)
    assert response.status_code == 409
    assert response.headers.get("Retry-After") == retry_after
