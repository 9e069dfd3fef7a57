"""Public-key tokens at the gateway: RS256 and ES256 verified with the key
the token's kid names in a JWKS (a file, or a URL fetched again when a new
kid appears); a token signed with another key, for another audience or
issuer, expired, not yet valid, unsigned, or in an algorithm not configured
is refused; so is an HS256 token "signed" with the public key. No network:
the URL's document comes from a stand-in loader."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.common.errors import Unauthenticated
from services.gateway.auth import JwksKeys, Principal, TokenVerifier
from services.gateway.config import GatewaySettings
from tests.unit.test_gateway_auth import AUDIENCE, ISSUER, claims

SECRET = "hs-secret-that-is-long-enough-for-hs256-0123456789"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def jwk(private_key: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.get_algorithm_by_name(alg)
    public: dict[str, Any] = json.loads(algorithm.to_jwk(private_key.public_key()))
    return {**public, "kid": kid, "alg": alg, "use": "sig"}


def jwks(*keys: dict[str, Any]) -> dict[str, Any]:
    return {"keys": list(keys)}


def token(key: Any, alg: str, kid: str | None, **overrides: Any) -> str:
    headers = {"kid": kid} if kid else {}
    return "Bearer " + jwt.encode(claims(**overrides), key, algorithm=alg, headers=headers)


def verifier_over(document: dict[str, Any], algorithms: tuple[str, ...]) -> TokenVerifier:
    keys = JwksKeys(lambda: document, refresh_seconds=300)
    keys.reload()
    return TokenVerifier(SECRET, ISSUER, AUDIENCE, algorithms, keys)


@pytest.fixture
def verifier() -> TokenVerifier:
    return verifier_over(
        jwks(jwk(RSA_KEY, "rsa-1", "RS256"), jwk(EC_KEY, "ec-1", "ES256")), ("RS256", "ES256")
    )


async def refusal(verifier: TokenVerifier, authorization: str) -> str:
    with pytest.raises(Unauthenticated) as caught:
        await verifier.authenticate(authorization)
    return caught.value.reason


def test_rs256_token_verifies_with_the_key_its_kid_names(verifier: TokenVerifier) -> None:
    user_id = str(uuid.uuid4())

    principal = verifier.verify(token(RSA_KEY, "RS256", "rsa-1", sub=user_id, role="manager"))

    assert principal == Principal(user_id=user_id, role="manager", company_id="")


def test_es256_token_verifies_with_the_key_its_kid_names(verifier: TokenVerifier) -> None:
    assert verifier.verify(token(EC_KEY, "ES256", "ec-1", role="admin")).role == "admin"


async def test_token_signed_with_another_rsa_key_is_invalid(verifier: TokenVerifier) -> None:
    assert await refusal(verifier, token(OTHER_RSA_KEY, "RS256", "rsa-1")) == "TOKEN_INVALID"


async def test_token_naming_another_keys_kid_is_invalid(verifier: TokenVerifier) -> None:
    # Signed with the RSA key but claiming to be verified by the EC one.
    assert await refusal(verifier, token(RSA_KEY, "RS256", "ec-1")) == "TOKEN_INVALID"


async def test_expired_public_key_token_is_token_expired(verifier: TokenVerifier) -> None:
    now = int(time.time())
    expired = token(RSA_KEY, "RS256", "rsa-1", iat=now - 900, nbf=now - 900, exp=now - 600)

    assert await refusal(verifier, expired) == "TOKEN_EXPIRED"


@pytest.mark.parametrize(
    "overrides",
    [
        {"aud": "another-api"},
        {"iss": "evil-issuer"},
        {"nbf": int(time.time()) + 600, "exp": int(time.time()) + 1200},
        {"exp": None},
    ],
    ids=["wrong-audience", "wrong-issuer", "not-yet-valid", "no-expiry"],
)
async def test_public_key_token_with_bad_claims_is_invalid(
    verifier: TokenVerifier, overrides: dict[str, Any]
) -> None:
    assert await refusal(verifier, token(RSA_KEY, "RS256", "rsa-1", **overrides)) == "TOKEN_INVALID"


async def test_hs256_token_signed_with_the_public_key_is_invalid(verifier: TokenVerifier) -> None:
    # The classic confusion: the public key used as an HMAC secret.
    pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = jwt.utils.base64url_encode(
        json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode()
    )
    payload = jwt.utils.base64url_encode(json.dumps(claims(role="admin")).encode())
    signature = jwt.utils.base64url_encode(
        hmac.new(pem, header + b"." + payload, hashlib.sha256).digest()
    )
    forged = b".".join([header, payload, signature]).decode()

    assert await refusal(verifier, f"Bearer {forged}") == "TOKEN_INVALID"


async def test_hs256_token_with_the_shared_secret_is_invalid_when_hs256_is_not_configured(
    verifier: TokenVerifier,
) -> None:
    assert await refusal(verifier, token(SECRET, "HS256", None)) == "TOKEN_INVALID"


async def test_rs384_token_is_invalid_when_only_rs256_is_configured() -> None:
    verifier = verifier_over(jwks(jwk(RSA_KEY, "rsa-384", "RS384")), ("RS256",))

    assert await refusal(verifier, token(RSA_KEY, "RS384", "rsa-384")) == "TOKEN_INVALID"


async def test_alg_none_token_is_invalid(verifier: TokenVerifier) -> None:
    unsigned = jwt.encode(claims(role="admin"), "", algorithm="none", headers={"kid": "rsa-1"})

    assert await refusal(verifier, f"Bearer {unsigned}") == "TOKEN_INVALID"


def test_token_without_kid_uses_the_single_key_for_its_algorithm(
    verifier: TokenVerifier,
) -> None:
    assert verifier.verify(token(EC_KEY, "ES256", None)).role == "user"


def test_hs256_and_rs256_configured_together_each_verify_with_their_own_key() -> None:
    verifier = verifier_over(jwks(jwk(RSA_KEY, "rsa-1", "RS256")), ("HS256", "RS256"))

    assert verifier.verify(token(SECRET, "HS256", None)).role == "user"
    assert verifier.verify(token(RSA_KEY, "RS256", "rsa-1")).role == "user"


async def test_encryption_keys_in_the_set_are_not_used_for_signatures() -> None:
    key = {**jwk(RSA_KEY, "rsa-1", "RS256"), "use": "enc"}
    verifier = verifier_over(jwks(key), ("RS256",))

    assert await refusal(verifier, token(RSA_KEY, "RS256", "rsa-1")) == "TOKEN_INVALID"


async def test_a_rotated_key_is_fetched_when_a_token_first_names_it() -> None:
    document = jwks(jwk(RSA_KEY, "rsa-1", "RS256"))
    fetches: list[float] = []

    def fetch() -> dict[str, Any]:
        fetches.append(time.monotonic())
        return document

    keys = JwksKeys(fetch, refresh_seconds=300)
    verifier = TokenVerifier(SECRET, ISSUER, AUDIENCE, ("RS256",), keys)
    assert (await verifier.authenticate(token(RSA_KEY, "RS256", "rsa-1"))).role == "user"
    document["keys"].append(jwk(OTHER_RSA_KEY, "rsa-2", "RS256"))
    keys._loaded_at -= 60  # the last fetch was a minute ago

    principal = await verifier.authenticate(token(OTHER_RSA_KEY, "RS256", "rsa-2"))

    assert principal.role == "user"
    assert len(fetches) == 2


async def test_unknown_kids_refetch_the_set_at_most_once_per_interval() -> None:
    fetches: list[int] = []

    def fetch() -> dict[str, Any]:
        fetches.append(1)
        return jwks(jwk(RSA_KEY, "rsa-1", "RS256"))

    verifier = TokenVerifier(SECRET, ISSUER, AUDIENCE, ("RS256",), JwksKeys(fetch, 300))

    for i in range(5):
        with pytest.raises(Unauthenticated):
            await verifier.authenticate(token(OTHER_RSA_KEY, "RS256", f"forged-{i}"))

    assert len(fetches) == 1  # the first load; forged kids fetch nothing more


async def test_a_failing_jwks_url_keeps_the_keys_it_had() -> None:
    calls: list[int] = []

    def fetch() -> dict[str, Any]:
        calls.append(1)
        if len(calls) > 1:
            raise OSError("connection refused")
        return jwks(jwk(RSA_KEY, "rsa-1", "RS256"))

    keys = JwksKeys(fetch, refresh_seconds=300)
    verifier = TokenVerifier(SECRET, ISSUER, AUDIENCE, ("RS256",), keys)
    await verifier.authenticate(token(RSA_KEY, "RS256", "rsa-1"))
    keys._loaded_at -= 600  # due for a refresh, which fails

    assert (await verifier.authenticate(token(RSA_KEY, "RS256", "rsa-1"))).role == "user"


def test_settings_read_the_jwks_file(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(jwk(EC_KEY, "ec-1", "ES256"))))
    settings = GatewaySettings(jwt_algorithms="ES256", jwt_jwks_file=str(path), jwt_issuer=ISSUER)

    verifier = TokenVerifier.from_settings(settings)

    assert verifier.verify(token(EC_KEY, "ES256", "ec-1")).role == "user"


@pytest.mark.parametrize("algorithms", ["none", "HS256,none", "XS999", ""])
def test_settings_refuse_unknown_algorithms_and_none(algorithms: str) -> None:
    with pytest.raises(ValueError, match="jwt_algorithms"):
        GatewaySettings(jwt_algorithms=algorithms)


def test_settings_refuse_public_key_algorithms_without_a_key_set() -> None:
    with pytest.raises(ValueError, match="JWKS"):
        GatewaySettings(jwt_algorithms="RS256")
