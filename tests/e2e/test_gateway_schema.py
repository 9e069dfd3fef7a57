"""The live gateway against its own OpenAPI document (schemathesis, over the
real mesh): for requests generated from the document, valid and invalid
alike, no answer is a 5xx, and every answer (status, content type, headers,
body) is one the document describes. Bounded: a few examples per endpoint.

The requests carry a token of a real user with a funded wallet; ids that
name a user (in the path or the body) are that user's half of the time, so
that requests reach the upstreams, not only the gateway's own refusals."""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from moneta.wallet.v1 import wallet_pb2_grpc
from tests.e2e.conftest import Mesh, create_person

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
USER_FIELDS = ("user_id", "sender_id", "payer_id")
# Examples per endpoint: the whole run stays well under a minute.
EXAMPLES = 10


@pytest.fixture(scope="session")
def gateway_schema(mesh: Mesh) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{mesh.gateway_url}/openapi.json")


@pytest.fixture(scope="session")
async def someone(mesh: Mesh) -> str:
    """A user with a funded wallet."""
    async with (
        grpc.aio.insecure_channel(mesh.grpc_addrs["wallet"]) as channel,
        httpx.AsyncClient(base_url=mesh.gateway_url, timeout=10.0) as http,
    ):
        person = await create_person(
            wallet_pb2_grpc.WalletServiceStub(channel), http, mesh, "1000.00"
        )
    return person.user_id


def as_someone(case: schemathesis.Case[Any], user_id: str) -> None:
    """Points half of the generated user ids at the real user."""
    if hash(repr(case.path_parameters) + repr(case.body)) % 2:
        return
    for name in USER_FIELDS:
        if case.path_parameters and name in case.path_parameters:
            case.path_parameters[name] = user_id
        if isinstance(case.body, dict) and name in case.body:
            case.body[name] = user_id


def _operations() -> list[tuple[str, str]]:
    # The endpoints, known when tests are collected (before the mesh runs):
    # the same application the live gateway serves.
    from services.gateway.app import create_app
    from services.gateway.config import GatewaySettings

    document = create_app(GatewaySettings()).openapi()
    return [(m.upper(), p) for p, ops in document["paths"].items() for m in ops]


def test_the_live_document_is_the_one_tested(mesh: Mesh) -> None:
    live = httpx.get(f"{mesh.gateway_url}/openapi.json").json()

    assert sorted((m.upper(), p) for p, ops in live["paths"].items() for m in ops) == sorted(
        _operations()
    )


@pytest.mark.parametrize(("method", "path"), _operations(), ids=str)
def test_the_gateway_answers_as_its_document_says(
    gateway_schema: schemathesis.BaseSchema, mesh: Mesh, someone: str, method: str, path: str
) -> None:
    operation = gateway_schema[path][method]
    token = {"Authorization": f"Bearer {mesh.token(someone)}"}

    @given(
        case=st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        )
    )
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def answers_as_documented(case: schemathesis.Case[Any]) -> None:
        as_someone(case, someone)
        case.call_and_validate(
            base_url=mesh.gateway_url,
            headers={**dict(case.headers or {}), **token},
            checks=CHECKS,
            timeout=10,
        )

    answers_as_documented()
