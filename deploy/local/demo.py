"""Seeds two demo users with wallets on a running mesh and prints their
tokens and a curl command for the P2P transfer.

    make demo      (with `make run` going in another terminal)
"""

from __future__ import annotations

import asyncio
import os
import uuid

import grpc
import httpx

from moneta.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.gateway.auth import TokenVerifier
from services.gateway.config import GatewaySettings

ALICE = uuid.UUID("a11ce000-0000-4000-8000-000000000001")
BOB = uuid.UUID("b0b00000-0000-4000-8000-000000000002")
ADMIN = uuid.UUID("ad000000-0000-4000-8000-000000000003")


async def main() -> None:
    settings = GatewaySettings()
    verifier = TokenVerifier(settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience)
    gateway = os.environ.get("MONETA_GATEWAY_URL", f"http://127.0.0.1:{settings.gateway_port}")
    async with grpc.aio.insecure_channel(settings.wallet_addr) as channel:
        wallet = wallet_pb2_grpc.WalletServiceStub(channel)
        for user_id, name in ((ALICE, "alice"), (BOB, "bob")):
            await wallet.CreateUser(
                wallet_pb2.CreateUserRequest(
                    user=wallet_pb2.User(
                        user_id=str(user_id),
                        email=f"{name}@example.com",
                        username=name,
                        full_name=name.title(),
                        role=wallet_pb2.ROLE_USER,
                        default_currency="USD",
                    )
                )
            )
    admin = verifier.issue(str(ADMIN), "admin", ttl_seconds=24 * 3600)
    async with httpx.AsyncClient(base_url=gateway) as http:
        for user_id, initial in ((ALICE, "100.00"), (BOB, "0")):
            response = await http.post(
                "/api/v1/wallets",
                json={"user_id": str(user_id), "currency": "USD", "initial_balance": initial},
                headers={"Authorization": f"Bearer {admin}"},
            )
            if response.status_code not in (201, 409):
                raise SystemExit(
                    f"creating a wallet failed: {response.status_code} {response.text}"
                )
    alice = verifier.issue(str(ALICE), "user", ttl_seconds=24 * 3600)
    print(f"ALICE_TOKEN={alice}")
    print(f"ADMIN_TOKEN={admin}")
    print()
    print("# Alice sends Bob 12.50 USD:")
    print(
        f'curl -s -X POST {gateway}/api/v1/transfers -H "Authorization: Bearer $ALICE_TOKEN" '
        "-H 'Content-Type: application/json' "
        f'-d \'{{"sender_id": "{ALICE}", "recipient": "bob@example.com", '
        '"amount": "12.50", "currency": "USD", "idempotency_key": "demo-1"}\''
    )
    print("# Alice's wallet:")
    print(f'curl -s {gateway}/api/v1/wallets/{ALICE} -H "Authorization: Bearer $ALICE_TOKEN"')


if __name__ == "__main__":
    asyncio.run(main())
