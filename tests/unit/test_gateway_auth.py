"""Bearer tokens at the gateway: only HS256 tokens signed with our secret, for
our issuer and audience, unexpired, with a subject and a known role, become a
Principal; everything else is UNAUTHENTICATED with a reason. No network."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import jwt
import pytest

from services.common.errors import Unauthenticated
from services.gateway.auth import Principal, TokenVerifier

# 64 bytes: long enough for HS512 too, so that forging with it draws no key warning.
SECRET = "test-only-secret-long-enough-for-hs256-and-for-hs512-01234567890"
OTHER_SECRET = "another-secret-that-is-also-long-enough-for-hs256"
ISSUER = "moneta"
AUDIENCE = "moneta-api"


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier(SECRET, ISSUER, AUDIENCE)


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims for a fresh user token; an override of None drops the claim."""
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": str(uuid.uuid4()),
        "role": "user",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def bearer(token: str) -> str:
    return f"Bearer {token}"


def signed(secret: str = SECRET, algorithm: str = "HS256", **overrides: Any) -> str:
    return bearer(jwt.encode(claims(**overrides), secret, algorithm=algorithm))


def b64url(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def refusal(verifier: TokenVerifier, authorization: str | None) -> str:
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(authorization)
    return caught.value.reason


def test_issued_token_verifies_into_its_principal(verifier: TokenVerifier) -> None:
    user_id, company_id = str(uuid.uuid4()), str(uuid.uuid4())
    token = verifier.issue(user_id, "manager", company_id=company_id)

    assert verifier.verify(bearer(token)) == Principal(
        user_id=user_id, role="manager", company_id=company_id
    )


def test_issued_token_without_company_has_empty_company_id(verifier: TokenVerifier) -> None:
    user_id = str(uuid.uuid4())

    principal = verifier.verify(bearer(verifier.issue(user_id, "admin")))

    assert principal == Principal(user_id=user_id, role="admin", company_id="")


def test_bearer_scheme_is_case_insensitive(verifier: TokenVerifier) -> None:
    token = verifier.issue("u-1", "user")

    assert verifier.verify(f"bearer {token}").user_id == "u-1"


@pytest.mark.parametrize("role", ["user", "manager", "admin", "service"])
def test_every_known_role_is_accepted(verifier: TokenVerifier, role: str) -> None:
    assert verifier.verify(signed(role=role)).role == role


def test_expired_token_is_refused_as_token_expired(verifier: TokenVerifier) -> None:
    now = int(time.time())
    authorization = signed(iat=now - 600, nbf=now - 600, exp=now - 60)

    assert refusal(verifier, authorization) == "TOKEN_EXPIRED"


def test_token_issued_with_negative_ttl_is_expired(verifier: TokenVerifier) -> None:
    token = verifier.issue("u-1", "user", ttl_seconds=-60)

    assert refusal(verifier, bearer(token)) == "TOKEN_EXPIRED"


def test_token_for_another_audience_is_invalid(verifier: TokenVerifier) -> None:
    assert refusal(verifier, signed(aud="someone-else")) == "TOKEN_INVALID"


def test_token_from_another_issuer_is_invalid(verifier: TokenVerifier) -> None:
    assert refusal(verifier, signed(iss="evil-issuer")) == "TOKEN_INVALID"


def test_token_signed_with_another_secret_is_invalid(verifier: TokenVerifier) -> None:
    assert refusal(verifier, signed(secret=OTHER_SECRET)) == "TOKEN_INVALID"


def test_token_issued_by_a_verifier_with_another_secret_is_invalid(
    verifier: TokenVerifier,
) -> None:
    forger = TokenVerifier(OTHER_SECRET, ISSUER, AUDIENCE)

    assert refusal(verifier, bearer(forger.issue("u-1", "admin"))) == "TOKEN_INVALID"


def test_expired_token_with_a_forged_signature_is_invalid_not_expired(
    verifier: TokenVerifier,
) -> None:
    now = int(time.time())
    authorization = signed(secret=OTHER_SECRET, iat=now - 600, nbf=now - 600, exp=now - 60)

    assert refusal(verifier, authorization) == "TOKEN_INVALID"


def test_unsigned_alg_none_token_is_invalid(verifier: TokenVerifier) -> None:
    header = b64url({"alg": "none", "typ": "JWT"})
    token = f"{header}.{b64url(claims(role='admin'))}."

    assert refusal(verifier, bearer(token)) == "TOKEN_INVALID"


def test_alg_none_token_carrying_a_valid_hs256_signature_is_invalid(
    verifier: TokenVerifier,
) -> None:
    # The signature is genuine for the payload, but the header asks for none.
    real = jwt.encode(claims(role="admin"), SECRET, algorithm="HS256")
    _, payload, signature = real.split(".")
    token = f"{b64url({'alg': 'none', 'typ': 'JWT'})}.{payload}.{signature}"

    assert refusal(verifier, bearer(token)) == "TOKEN_INVALID"


def test_hs512_token_signed_with_the_right_secret_is_invalid(verifier: TokenVerifier) -> None:
    assert refusal(verifier, signed(algorithm="HS512")) == "TOKEN_INVALID"


def test_token_without_sub_is_invalid(verifier: TokenVerifier) -> None:
    assert refusal(verifier, signed(sub=None)) == "TOKEN_INVALID"


def test_token_without_exp_is_invalid(verifier: TokenVerifier) -> None:
    assert refusal(verifier, signed(exp=None)) == "TOKEN_INVALID"


def test_token_with_an_empty_sub_is_invalid(verifier: TokenVerifier) -> None:
    assert refusal(verifier, signed(sub="")) == "TOKEN_INVALID"


def test_token_with_a_non_string_sub_is_invalid(verifier: TokenVerifier) -> None:
    assert refusal(verifier, signed(sub=12345)) == "TOKEN_INVALID"


def test_token_not_valid_yet_is_invalid(verifier: TokenVerifier) -> None:
    later = int(time.time()) + 600
    assert refusal(verifier, signed(nbf=later, exp=later + 600)) == "TOKEN_INVALID"


def test_token_with_an_unknown_role_is_invalid(verifier: TokenVerifier) -> None:
    assert refusal(verifier, signed(role="superuser")) == "TOKEN_INVALID"


def test_token_without_role_is_a_plain_user(verifier: TokenVerifier) -> None:
    assert verifier.verify(signed(role=None)).role == "user"


def test_garbage_token_is_invalid(verifier: TokenVerifier) -> None:
    assert refusal(verifier, "Bearer not.a.jwt") == "TOKEN_INVALID"


@pytest.mark.parametrize("authorization", [None, ""], ids=["absent", "empty"])
def test_missing_authorization_is_token_missing(
    verifier: TokenVerifier, authorization: str | None
) -> None:
    assert refusal(verifier, authorization) == "TOKEN_MISSING"


@pytest.mark.parametrize(
    "authorization",
    ["Basic x", "Bearer", "Bearer ", "Token abc", "bearerabc"],
)
def test_malformed_authorization_is_token_missing(
    verifier: TokenVerifier, authorization: str
) -> None:
    assert refusal(verifier, authorization) == "TOKEN_MISSING"


def test_basic_scheme_carrying_a_valid_jwt_is_token_missing(verifier: TokenVerifier) -> None:
    assert refusal(verifier, f"Basic {verifier.issue('u-1', 'admin')}") == "TOKEN_MISSING"


def test_a_token_verified_before_is_still_refused_once_expired(verifier: TokenVerifier) -> None:
    authorization = signed(exp=int(time.time()) + 1)
    assert verifier.verify(authorization).role == "user"  # verified, and remembered

    deadline = time.monotonic() + 3
    while True:  # the clock passes its expiry within about a second
        try:
            verifier.verify(authorization)
        except Unauthenticated as refused:
            assert refused.reason == "TOKEN_EXPIRED"
            break
        assert time.monotonic() < deadline, "still accepted after its expiry"
        time.sleep(0.05)


def test_a_remembered_token_answers_the_same_principal(verifier: TokenVerifier) -> None:
    authorization = signed(role="manager", company_id="c-1")

    assert verifier.verify(authorization) == verifier.verify(authorization)
