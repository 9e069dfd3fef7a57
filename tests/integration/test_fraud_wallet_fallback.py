"""The wallet's side of fraud scoring over real gRPC: when the fraud service
is down or too slow, the configured policy decides (by default: refuse at or
above the review amount, allow below), and each such payment is counted."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import grpc
import pytest
from prometheus_client import REGISTRY

from moneta.common.v1.money_pb2 import Money
from moneta.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from services.common.errors import Unavailable
from services.wallet.config import WalletSettings
from services.wallet.peers import Peers
from tests.processes import free_port


class SlowFraud(fraud_pb2_grpc.FraudServiceServicer):
    async def Score(
        self, request: fraud_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> fraud_pb2.ScoreResponse:
        await asyncio.sleep(5)
        return fraud_pb2.ScoreResponse(decision=fraud_pb2.DECISION_BLOCK)


@pytest.fixture
async def slow_fraud() -> AsyncIterator[str]:
    server = grpc.aio.server()
    fraud_pb2_grpc.add_FraudServiceServicer_to_server(SlowFraud(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


def peers(fraud_addr: str, **settings: object) -> Peers:
    nowhere = f"127.0.0.1:{free_port()}"
    config = WalletSettings(fraud_timeout_seconds=0.2, **settings)  # type: ignore[arg-type]
    return Peers(nowhere, nowhere, fraud_addr, 2.0, tls=config)


def payment(amount: int) -> fraud_pb2.ScoreRequest:
    return fraud_pb2.ScoreRequest(transaction_id=str(uuid.uuid4()), user_id=str(uuid.uuid4()),
                                  type="P2P_OUT", amount=Money(amount=amount, currency="USD"))  # fmt: skip


def counted(outcome: str) -> float:
    value = REGISTRY.get_sample_value("moneta_wallet_fraud_unavailable_total", {"outcome": outcome})
    return value or 0.0


async def test_with_fraud_down_a_small_payment_is_allowed_and_counted() -> None:
    wallet = peers(f"127.0.0.1:{free_port()}")
    before = counted("allowed")
    try:
        verdict = await wallet.score(payment(999_999))
    finally:
        await wallet.close()

    assert (verdict.decision, verdict.model_version) == (
        fraud_pb2.DECISION_ALLOW,
        "wallet-fallback",
    )
    assert counted("allowed") == before + 1


async def test_with_fraud_down_a_payment_at_the_review_amount_is_refused_and_counted() -> None:
    wallet = peers(f"127.0.0.1:{free_port()}")
    before = counted("refused")
    try:
        with pytest.raises(Unavailable) as raised:
            await wallet.score(payment(1_000_000))
    finally:
        await wallet.close()

    assert raised.value.reason == "FRAUD_CHECK_UNAVAILABLE"
    assert counted("refused") == before + 1


async def test_a_fraud_service_slower_than_the_timeout_counts_as_down(slow_fraud: str) -> None:
    wallet = peers(slow_fraud)
    started = asyncio.get_running_loop().time()
    try:
        verdict = await wallet.score(payment(100))
    finally:
        await wallet.close()

    assert verdict.decision == fraud_pb2.DECISION_ALLOW
    assert asyncio.get_running_loop().time() - started < 1.0


@pytest.mark.parametrize(
    ("policy", "amount", "allowed"),
    [("refuse", 1, False), ("allow", 10**12, True), ("limit", 4_999, True),
     ("limit", 5_000, False)],
)  # fmt: skip
async def test_the_wallets_policy_is_configurable(policy: str, amount: int, allowed: bool) -> None:
    wallet = peers(f"127.0.0.1:{free_port()}", fraud_unavailable_policy=policy,
                   fraud_review_amount=Decimal("50"))  # fmt: skip
    try:
        if allowed:
            assert (await wallet.score(payment(amount))).decision == fraud_pb2.DECISION_ALLOW
        else:
            with pytest.raises(Unavailable):
                await wallet.score(payment(amount))
    finally:
        await wallet.close()
