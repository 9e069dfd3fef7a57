"""Budgets over HTTP, end to end: a manager gives a user of their company a
budget (its first period worked out, the user's company and wallet filled
in), the user sees it and spends against it (a hard budget refuses what
goes beyond), the manager changes it and the history says who, what and
why; company default budgets are set and read by the company's managers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from moneta.wallet.v1 import wallet_pb2_grpc
from tests.e2e.conftest import Mesh, Person, create_person


@pytest.fixture
async def team(
    mesh: Mesh, http: httpx.AsyncClient, wallet_stub: wallet_pb2_grpc.WalletServiceStub
) -> tuple[str, dict[str, str], Person]:
    """A company's manager (their token) and one of its users, with 100 USD."""
    company = str(uuid.uuid4())
    manager = await create_person(wallet_stub, http, mesh, "0", company_id=company)
    employee = await create_person(wallet_stub, http, mesh, "100.00", company_id=company)
    return company, mesh.auth(manager.user_id, "manager", company), employee


async def test_a_manager_gives_a_user_a_budget_for_the_current_month(
    mesh: Mesh, http: httpx.AsyncClient, team: tuple[str, dict[str, str], Person]
) -> None:
    company, manager, employee = team

    created = await http.post(
        "/api/v1/budgets",
        json={"user_id": employee.user_id, "total_amount": "250.5", "currency": "USD",
              "period_type": "MONTHLY", "category": "MEALS", "thresholds": [50, 90]},
        headers=manager,
    )  # fmt: skip
    listed = await http.get(
        f"/api/v1/budgets/{employee.user_id}", headers=mesh.auth(employee.user_id)
    )

    assert created.status_code == 201, created.text
    budget = created.json()
    today = datetime.now(UTC).date().isoformat()
    assert budget["start_date"].startswith(today)
    assert datetime.fromisoformat(budget["end_date"]) > datetime.fromisoformat(
        budget["start_date"]
    ) + timedelta(days=27)
    assert (budget["company_id"], budget["category"], budget["mode"]) == (company, "MEALS", "HARD")
    assert (budget["total_amount"], budget["remaining_amount"]) == ("250.50", "250.50")
    assert budget["thresholds"] == [50, 90] and budget["wallet_id"]
    assert [b["budget_id"] for b in listed.json()["budgets"]] == [budget["budget_id"]]


async def test_a_hard_p2p_budget_refuses_the_transfer_beyond_it(
    mesh: Mesh,
    http: httpx.AsyncClient,
    wallet_stub: wallet_pb2_grpc.WalletServiceStub,
    team: tuple[str, dict[str, str], Person],
) -> None:
    _, manager, employee = team
    friend = await create_person(wallet_stub, http, mesh, "0")
    await http.post(
        "/api/v1/budgets",
        json={"user_id": employee.user_id, "total_amount": "5", "currency": "USD",
              "period_type": "WEEKLY", "category": "P2P"},
        headers=manager,
    )  # fmt: skip

    response = await http.post(
        "/api/v1/transfers",
        json={"sender_id": employee.user_id, "recipient": friend.user_id, "amount": "6",
              "idempotency_key": "over"},
        headers=mesh.auth(employee.user_id),
    )  # fmt: skip

    assert response.status_code == 422
    assert response.json()["error"]["reason"] == "BUDGET_EXCEEDED"


async def test_a_change_is_recorded_with_who_what_and_why(
    mesh: Mesh, http: httpx.AsyncClient, team: tuple[str, dict[str, str], Person]
) -> None:
    _, manager, employee = team
    budget = (
        await http.post(
            "/api/v1/budgets",
            json={"user_id": employee.user_id, "total_amount": "100", "currency": "USD",
                  "period_type": "QUARTERLY"},
            headers=manager,
        )
    ).json()  # fmt: skip

    updated = await http.put(
        f"/api/v1/budgets/{budget['budget_id']}",
        json={"total_amount": "150.00", "status": "SUSPENDED", "reason": "conference season"},
        headers=manager,
    )
    history = await http.get(
        f"/api/v1/budgets/{budget['budget_id']}/history", headers=mesh.auth(employee.user_id)
    )

    assert updated.status_code == 200, updated.text
    assert (updated.json()["total_amount"], updated.json()["status"]) == ("150.00", "SUSPENDED")
    change = next(h for h in history.json()["history"] if h["action"] == "UPDATED")
    assert change["old_values"] == {"total_amount": "100.00", "status": "ACTIVE"}
    assert change["new_values"] == {"total_amount": "150.00", "status": "SUSPENDED"}
    assert change["reason"] == "conference season"
    assert change["actor_id"] == mesh.verifier.verify(manager["Authorization"]).user_id


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"period_type": "ONE_TIME"}, "INVALID_PERIOD"),
        ({"category": "YACHTS"}, "UNKNOWN_CATEGORY"),
        ({"total_amount": "0"}, "INVALID_AMOUNT"),
        ({"total_amount": "1.001"}, "AMOUNT_PRECISION"),
        ({"period_type": "DAILY"}, "VALIDATION_ERROR"),
        ({"thresholds": [0]}, "VALIDATION_ERROR"),
    ],
)
async def test_a_bad_budget_is_400_with_a_reason(
    http: httpx.AsyncClient,
    team: tuple[str, dict[str, str], Person],
    change: dict[str, object],
    reason: str,
) -> None:
    _, manager, employee = team
    body = {"user_id": employee.user_id, "total_amount": "10", "currency": "USD",
            "period_type": "MONTHLY", **change}  # fmt: skip

    response = await http.post("/api/v1/budgets", json=body, headers=manager)

    assert response.status_code == 400, response.text
    assert response.json()["error"]["reason"] == reason


async def test_a_company_policy_is_set_and_read_by_its_managers(
    mesh: Mesh, http: httpx.AsyncClient, team: tuple[str, dict[str, str], Person]
) -> None:
    company, manager, _ = team
    policy = {"budgets": [{"category": "MEALS", "currency": "USD", "total_amount": "300",
                           "period_type": "MONTHLY", "mode": "SOFT"}]}  # fmt: skip

    put = await http.put(f"/api/v1/companies/{company}/budget-policy", json=policy, headers=manager)
    got = await http.get(f"/api/v1/companies/{company}/budget-policy", headers=manager)

    assert put.status_code == 200, put.text
    assert got.json()["budgets"] == [
        {"category": "MEALS", "currency": "USD", "total_amount": "300.00", "period_type": "MONTHLY",
         "mode": "SOFT", "rollover": "RESET", "thresholds": [80, 100]}
    ]  # fmt: skip


async def test_a_retried_create_with_its_idempotency_key_makes_one_budget(
    mesh: Mesh, http: httpx.AsyncClient, team: tuple[str, dict[str, str], Person]
) -> None:
    _, manager, employee = team
    body = {"user_id": employee.user_id, "total_amount": "80", "currency": "USD",
            "period_type": "WEEKLY", "category": "RAIL"}  # fmt: skip
    headers = {**manager, "Idempotency-Key": f"rail-{employee.user_id}"}

    first = await http.post("/api/v1/budgets", json=body, headers=headers)
    again = await http.post("/api/v1/budgets", json=body, headers=headers)
    other = await http.post("/api/v1/budgets", json={**body, "total_amount": "90"}, headers=headers)
    listed = await http.get(f"/api/v1/budgets/{employee.user_id}", headers=manager)

    assert (first.status_code, again.status_code) == (201, 201), (first.text, again.text)
    assert again.json()["budget_id"] == first.json()["budget_id"]
    assert other.status_code == 409
    assert other.json()["error"]["reason"] == "IDEMPOTENCY_KEY_REUSED"
    assert len(listed.json()["budgets"]) == 1
