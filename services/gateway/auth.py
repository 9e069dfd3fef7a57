"""Bearer JWTs: signature, expiry, issuer and audience checked; only the
configured algorithm accepted (so never ``alg: none``)."""

from __future__ import annotations

from dataclasses import dataclass

import jwt

from services.common.errors import Unauthenticated

ROLES = frozenset({"user", "manager", "admin", "service"})
ALGORITHMS = ["HS256"]


@dataclass(frozen=True)
class Principal:
    user_id: str
    role: str
    company_id: str


class TokenVerifier:
    def __init__(self, secret: str, issuer: str, audience: str) -> None:
        self._secret = secret
        self._issuer = issuer
        self._audience = audience

    def verify(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated("a bearer token is required", reason="TOKEN_MISSING")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("use 'Authorization: Bearer <token>'", reason="TOKEN_MISSING")
        try:
            claims = jwt.decode(
                token.strip(),
                self._secret,
                algorithms=ALGORITHMS,
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired", reason="TOKEN_EXPIRED") from None
        except jwt.InvalidTokenError:
            raise Unauthenticated("the token is not valid", reason="TOKEN_INVALID") from None
        role = claims.get("role", "user")
        subject = claims.get("sub")
        company = claims.get("company_id")
        if (
            not isinstance(role, str)
            or role not in ROLES
            or not isinstance(subject, str)
            or not subject.strip()
            or not (company is None or isinstance(company, str))
        ):
            raise Unauthenticated("the token's claims are not valid", reason="TOKEN_INVALID")
        return Principal(
            user_id=claims["sub"], role=role, company_id=str(claims.get("company_id") or "")
        )

    def issue(self, user_id: str, role: str, company_id: str = "", ttl_seconds: int = 3600) -> str:
        """Mints a token, for development and tests."""
        import time

        now = int(time.time())
        claims = {
            "sub": user_id,
            "role": role,
            "iss": self._issuer,
            "aud": self._audience,
            "iat": now,
            "nbf": now,
            "exp": now + ttl_seconds,
        }
        if company_id:
            claims["company_id"] = company_id
        return jwt.encode(claims, self._secret, algorithm=ALGORITHMS[0])
